//! The agent's configuration: a TOML file, with command-line flags (and their environment
//! variables) overriding the keys an operator or a test most often sets.
//!
//! ```toml
//! control_plane = "http://127.0.0.1:7070"   # NodeControl gRPC address (plain HTTP/2)
//! state_dir = "/var/lib/kiln-agent"         # credential.json and state.json live here
//! bootstrap_token_file = "/etc/kiln/bootstrap-token"   # only needed for the first start
//! metrics_interval_ms = 5000
//! observed_interval_ms = 10000
//!
//! [capacity]          # optional; each key defaults to what the host reports
//! cpu_cores = 32
//! memory_mib = 262144
//! disk_gib = 1800
//!
//! [runtime]           # how pods run; every key optional
//! docker = "auto"                     # "auto": Docker if its socket answers, else none; "disabled"
//! docker_socket = "/var/run/docker.sock"
//! publish_address = "0.0.0.0"         # where pods' ports are published (ephemeral host ports)
//! public_address = "gpu-7.example.net" # where tenants reach them [default: publish_address
//!                                     # unless it is 0.0.0.0 or ::, else the hostname]
//! reconcile_interval_ms = 10000
//! read_only_rootfs = false
//! qemu = "auto"                       # instances as QEMU VMs if qemu-system-x86_64 is installed
//! vm_image_dir = "/var/lib/kiln-agent/vm-images"   # relative VmImage paths [default: <state_dir>/vm-images]
//! vm_port_min = 20000                 # host ports for instances' SSH and ports
//! vm_port_max = 29999
//! vm_accel = "auto"                   # "auto" (KVM if /dev/kvm opens, else TCG), "kvm", "tcg"
//! vm_powerdown_timeout_ms = 30000     # a stop waits this long for the guest's ACPI shutdown
//! vm_start_timeout_ms = 30000         # how long QEMU may take to answer on its QMP socket
//!
//! [gpu]               # kiln_inventory::SourceConfig, verbatim
//! nvml = "auto"
//! [gpu.simulated]
//! inventory = "agent/inventory/inventories/h100-sxm-8x.toml"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_inventory::SourceConfig;
use serde::{Deserialize, Serialize};

/// The default NodeControl address: the local stack's scheduler.
pub const DEFAULT_CONTROL_PLANE: &str = "http://127.0.0.1:7070";
/// Where the agent keeps its credential and applied state by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kiln-agent";
const DEFAULT_METRICS_INTERVAL_MS: u64 = 5_000;
const DEFAULT_OBSERVED_INTERVAL_MS: u64 = 10_000;
/// Shortest metrics interval accepted: a faster one only loads the control plane.
const MIN_METRICS_INTERVAL_MS: u64 = 100;

/// The whole configuration, after the file and the flags are merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The NodeControl gRPC address, `http://host:port`: plain HTTP/2 (h2c), for loopback and
    /// trusted networks. TLS (`https://`, tonic's TLS client with the control plane's CA) is the
    /// production option and is not in this build yet.
    pub control_plane: String,
    pub state_dir: PathBuf,
    /// A file holding the one-time bootstrap token (only read when there is no credential yet).
    pub bootstrap_token_file: Option<PathBuf>,
    /// The bootstrap token itself; only ever from `KILN_AGENT_BOOTSTRAP_TOKEN`, never the file
    /// or a flag (a flag shows in `ps`).
    #[serde(skip)]
    pub bootstrap_token: Option<String>,
    pub metrics_interval_ms: u64,
    /// How often a complete observed-state report is sent besides after each applied event.
    pub observed_interval_ms: u64,
    pub capacity: CapacityOverrides,
    pub runtime: RuntimeConfig,
    pub gpu: SourceConfig,
}

/// Whether pods run in Docker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DockerPolicy {
    /// Use the Docker engine if its socket answers; otherwise pods stay pending (with a warning).
    #[default]
    Auto,
    Disabled,
}

/// `[runtime]`: how workloads run on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub docker: DockerPolicy,
    pub docker_socket: PathBuf,
    /// The host address pods' ports are published on (Docker picks the host port).
    pub publish_address: String,
    /// Where tenants reach those ports (an IP address or DNS name), as the API shows them.
    /// Empty: `publish_address` when it is a specific address, else the hostname.
    pub public_address: String,
    /// How often the node is made to match the applied pods (missing containers recreated,
    /// stray ones removed).
    pub reconcile_interval_ms: u64,
    /// Pods' root filesystems read-only (the spec has no such field yet: one switch for all).
    pub read_only_rootfs: bool,
    /// Whether instances run as QEMU VMs.
    pub qemu: QemuPolicy,
    /// Where relative VM image paths (`VmImage`) are found. Empty: `<state_dir>/vm-images`.
    pub vm_image_dir: PathBuf,
    /// The host ports instances' SSH and ports are forwarded on.
    pub vm_port_min: u16,
    pub vm_port_max: u16,
    /// How VMs execute: "auto" (KVM when /dev/kvm opens, else TCG), "kvm" or "tcg" (for hosts
    /// whose /dev/kvm opens but does not work, e.g. broken nested virtualisation).
    pub vm_accel: VmAccel,
    /// How long a stop waits for the guest to shut down after ACPI powerdown before QEMU is
    /// told to quit (a guest without an ACPI handler always takes this long).
    pub vm_powerdown_timeout_ms: u64,
    /// How long a starting QEMU may take before it answers on its QMP socket.
    pub vm_start_timeout_ms: u64,
}

/// `[runtime] vm_accel`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmAccel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Whether instances run in QEMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QemuPolicy {
    /// Use QEMU if `qemu-system-x86_64` is installed; otherwise instances stay pending.
    #[default]
    Auto,
    Disabled,
}

impl RuntimeConfig {
    /// The address to register as the node's public address ('' for "the hostname").
    pub fn advertised_address(&self) -> String {
        if !self.public_address.trim().is_empty() {
            return self.public_address.trim().to_owned();
        }
        match self.publish_address.trim() {
            "0.0.0.0" | "::" | "[::]" | "" => String::new(),
            specific => specific.to_owned(),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            docker: DockerPolicy::Auto,
            docker_socket: PathBuf::from(crate::docker::DEFAULT_SOCKET),
            publish_address: "0.0.0.0".into(),
            public_address: String::new(),
            reconcile_interval_ms: 10_000,
            read_only_rootfs: false,
            qemu: QemuPolicy::Auto,
            vm_image_dir: PathBuf::new(),
            vm_port_min: 20000,
            vm_port_max: 29999,
            vm_accel: VmAccel::Auto,
            vm_powerdown_timeout_ms: 30_000,
            vm_start_timeout_ms: 30_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            control_plane: DEFAULT_CONTROL_PLANE.to_owned(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            bootstrap_token_file: None,
            bootstrap_token: None,
            metrics_interval_ms: DEFAULT_METRICS_INTERVAL_MS,
            observed_interval_ms: DEFAULT_OBSERVED_INTERVAL_MS,
            capacity: CapacityOverrides::default(),
            runtime: RuntimeConfig::default(),
            gpu: SourceConfig::default(),
        }
    }
}

/// Host capacity the operator states instead of letting the agent measure it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityOverrides {
    pub cpu_cores: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("could not read bootstrap token file {}", path.display())]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{field}` {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The keys a flag (or its environment variable) may override; `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub control_plane: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub bootstrap_token_file: Option<PathBuf>,
    pub bootstrap_token: Option<String>,
    pub metrics_interval_ms: Option<u64>,
    pub hostname: Option<String>,
    pub nvml: Option<kiln_inventory::NvmlPolicy>,
    pub simulated_inventory: Option<PathBuf>,
    pub fault_file: Option<PathBuf>,
    pub docker: Option<DockerPolicy>,
    pub public_address: Option<String>,
}

impl Config {
    /// Parses config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: match e.span() {
                Some(span) => format!(
                    "line {}: {}",
                    text[..span.start.min(text.len())].matches('\n').count() + 1,
                    e.message().trim()
                ),
                None => e.message().trim().to_owned(),
            },
        })
    }

    /// Reads the config file, or starts from the defaults when there is none.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(Self::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text, &path.display().to_string())
            }
        }
    }

    /// Applies flag overrides, then checks the result.
    pub fn with_overrides(mut self, o: Overrides) -> Result<Self, ConfigError> {
        if let Some(v) = o.control_plane {
            self.control_plane = v;
        }
        if let Some(v) = o.state_dir {
            self.state_dir = v;
        }
        if let Some(v) = o.bootstrap_token_file {
            self.bootstrap_token_file = Some(v);
        }
        if let Some(v) = o.bootstrap_token.filter(|t| !t.trim().is_empty()) {
            self.bootstrap_token = Some(v.trim().to_owned());
        }
        if let Some(v) = o.metrics_interval_ms {
            self.metrics_interval_ms = v;
        }
        if let Some(v) = o.hostname {
            self.gpu.hostname = Some(v);
        }
        if let Some(v) = o.docker {
            self.runtime.docker = v;
        }
        if let Some(v) = o.public_address {
            self.runtime.public_address = v;
        }
        if let Some(v) = o.nvml {
            self.gpu.nvml = v;
        }
        if let Some(inventory) = o.simulated_inventory {
            let fault_file = self.gpu.simulated.take().and_then(|s| s.fault_file);
            self.gpu.simulated = Some(kiln_inventory::SimulatedConfig {
                inventory,
                fault_file,
            });
        }
        if let Some(fault_file) = o.fault_file {
            match &mut self.gpu.simulated {
                Some(sim) => sim.fault_file = Some(fault_file),
                None => {
                    return Err(ConfigError::Invalid {
                        field: "gpu.simulated.fault_file",
                        reason: "needs a simulated inventory (`gpu.simulated.inventory` or \
                                 --simulated-inventory)"
                            .into(),
                    });
                }
            }
        }
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let cp = self.control_plane.trim();
        if !cp.starts_with("http://") {
            return Err(ConfigError::Invalid {
                field: "control_plane",
                reason: format!(
                    "must be an http:// URL (plain HTTP/2; this build has no TLS client, so put \
                     TLS in front of the control plane on a network you trust), not {cp:?}"
                ),
            });
        }
        if self.metrics_interval_ms < MIN_METRICS_INTERVAL_MS {
            return Err(ConfigError::Invalid {
                field: "metrics_interval_ms",
                reason: format!("must be at least {MIN_METRICS_INTERVAL_MS}"),
            });
        }
        if self.observed_interval_ms < MIN_METRICS_INTERVAL_MS {
            return Err(ConfigError::Invalid {
                field: "observed_interval_ms",
                reason: format!("must be at least {MIN_METRICS_INTERVAL_MS}"),
            });
        }
        if self.runtime.reconcile_interval_ms < MIN_METRICS_INTERVAL_MS {
            return Err(ConfigError::Invalid {
                field: "runtime.reconcile_interval_ms",
                reason: format!("must be at least {MIN_METRICS_INTERVAL_MS}"),
            });
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "state_dir",
                reason: "must not be empty".into(),
            });
        }
        Ok(())
    }

    /// The bootstrap token: the environment's, else the token file's (trimmed), else none.
    pub fn bootstrap_token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(t) = &self.bootstrap_token {
            return Ok(Some(t.clone()));
        }
        let Some(path) = &self.bootstrap_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadToken {
            path: path.clone(),
            source,
        })?;
        let token = text.trim();
        Ok((!token.is_empty()).then(|| token.to_owned()))
    }

    pub fn metrics_interval(&self) -> Duration {
        Duration::from_millis(self.metrics_interval_ms)
    }

    pub fn observed_interval(&self) -> Duration {
        Duration::from_millis(self.observed_interval_ms)
    }

    pub fn credential_path(&self) -> PathBuf {
        self.state_dir.join(crate::credential::CREDENTIAL_FILE)
    }

    pub fn state_path(&self) -> PathBuf {
        self.state_dir.join(crate::state::STATE_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_inventory::NvmlPolicy;

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
control_plane = "http://10.0.0.1:7070"
state_dir = "/tmp/kiln/agent-a"
bootstrap_token_file = "/etc/kiln/token"
metrics_interval_ms = 1000

[capacity]
cpu_cores = 32
disk_gib = 100

[gpu]
nvml = "disabled"
hostname = "node-a"
[gpu.simulated]
inventory = "agent/inventory/inventories/l40s-2x.toml"
fault_file = "/tmp/kiln/a.faults.toml"
"#,
            "test",
        )
        .unwrap()
        .with_overrides(Overrides::default())
        .unwrap();
        assert_eq!(c.control_plane, "http://10.0.0.1:7070");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/kiln/agent-a"));
        assert_eq!(c.metrics_interval(), Duration::from_secs(1));
        assert_eq!(c.observed_interval(), Duration::from_secs(10));
        assert_eq!(c.capacity.cpu_cores, Some(32));
        assert_eq!(c.capacity.memory_mib, None);
        assert_eq!(c.gpu.nvml, NvmlPolicy::Disabled);
        assert_eq!(c.gpu.hostname.as_deref(), Some("node-a"));
        let sim = c.gpu.simulated.as_ref().unwrap();
        assert_eq!(
            sim.fault_file.as_deref(),
            Some(Path::new("/tmp/kiln/a.faults.toml"))
        );
        assert_eq!(
            c.credential_path(),
            PathBuf::from("/tmp/kiln/agent-a/credential.json")
        );
        assert_eq!(
            c.state_path(),
            PathBuf::from("/tmp/kiln/agent-a/state.json")
        );
    }

    #[test]
    fn runtime_section_and_docker_flag() {
        let c = Config::parse(
            "[runtime]\ndocker = \"disabled\"\npublish_address = \"127.0.0.1\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.runtime.docker, DockerPolicy::Disabled);
        assert_eq!(c.runtime.publish_address, "127.0.0.1");
        assert_eq!(c.runtime.reconcile_interval_ms, 10_000);
        let c = c
            .with_overrides(Overrides {
                docker: Some(DockerPolicy::Auto),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.runtime.docker, DockerPolicy::Auto);
        assert_eq!(Config::default().runtime.docker, DockerPolicy::Auto);
        // The advertised address: the publish address when specific, an override first.
        assert_eq!(c.runtime.advertised_address(), "127.0.0.1");
        assert_eq!(Config::default().runtime.advertised_address(), "");
        let c = c
            .with_overrides(Overrides {
                public_address: Some("gpu-7.example.net".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.runtime.advertised_address(), "gpu-7.example.net");
        assert!(Config::parse("[runtime]\ndocker = \"maybe\"\n", "x").is_err());
        let c = Config::parse(
            "[runtime]\nqemu = \"disabled\"\nvm_accel = \"tcg\"\nvm_image_dir = \"/img\"\nvm_port_min = 30000\nvm_powerdown_timeout_ms = 2000\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.runtime.qemu, QemuPolicy::Disabled);
        assert_eq!(c.runtime.vm_accel, VmAccel::Tcg);
        assert_eq!(c.runtime.vm_image_dir, PathBuf::from("/img"));
        assert_eq!(c.runtime.vm_powerdown_timeout_ms, 2000);
        assert_eq!(
            (c.runtime.vm_port_min, c.runtime.vm_port_max),
            (30000, 29999)
        );
        assert_eq!(Config::default().runtime.qemu, QemuPolicy::Auto);
        assert!(Config::parse("[runtime]\nvm_accel = \"hvf\"\n", "x").is_err());
    }

    #[test]
    fn defaults_without_a_file() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.control_plane, DEFAULT_CONTROL_PLANE);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.metrics_interval_ms, 5000);
        assert_eq!(c.gpu, SourceConfig::default());
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let err = Config::parse(
            "control_plane = \"http://x:1\"\nheartbeat = 5\n",
            "agent.toml",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("agent.toml") && msg.contains("line 2"),
            "{msg}"
        );
        assert!(Config::parse("[gpu]\nnvml = \"sometimes\"\n", "x").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let c = Config::parse(
            "control_plane = \"http://a:1\"\n[gpu.simulated]\ninventory = \"a.toml\"\nfault_file = \"f\"\n",
            "x",
        )
        .unwrap()
        .with_overrides(Overrides {
            control_plane: Some("http://b:2".into()),
            state_dir: Some("/s".into()),
            bootstrap_token: Some("  tok  ".into()),
            metrics_interval_ms: Some(250),
            hostname: Some("h".into()),
            nvml: Some(NvmlPolicy::Disabled),
            simulated_inventory: Some("b.toml".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.control_plane, "http://b:2");
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.bootstrap_token().unwrap().as_deref(), Some("tok"));
        assert_eq!(c.metrics_interval_ms, 250);
        assert_eq!(c.gpu.hostname.as_deref(), Some("h"));
        let sim = c.gpu.simulated.unwrap();
        assert_eq!(sim.inventory, PathBuf::from("b.toml"));
        assert_eq!(
            sim.fault_file,
            Some(PathBuf::from("f")),
            "kept from the file"
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        let bad = |o: Overrides| Config::default().with_overrides(o).unwrap_err();
        assert!(
            bad(Overrides {
                control_plane: Some("127.0.0.1:7070".into()),
                ..Default::default()
            })
            .to_string()
            .contains("control_plane")
        );
        assert!(
            bad(Overrides {
                metrics_interval_ms: Some(0),
                ..Default::default()
            })
            .to_string()
            .contains("metrics_interval_ms")
        );
        assert!(
            bad(Overrides {
                fault_file: Some("f".into()),
                ..Default::default()
            })
            .to_string()
            .contains("simulated")
        );
    }

    #[test]
    fn token_from_file_when_not_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "kiln_nbt_abc\n").unwrap();
        let c = Config::default()
            .with_overrides(Overrides {
                bootstrap_token_file: Some(path.clone()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            c.bootstrap_token().unwrap().as_deref(),
            Some("kiln_nbt_abc")
        );
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(c.bootstrap_token().unwrap(), None);
        let none = Config::default();
        assert_eq!(none.bootstrap_token().unwrap(), None);
        let missing = Config {
            bootstrap_token_file: Some(dir.path().join("nope")),
            ..Config::default()
        };
        assert!(missing.bootstrap_token().is_err());
    }
}

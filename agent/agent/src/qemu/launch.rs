//! The pure half of the QEMU runtime: what QEMU is told (argv), what the guest's cloud-init seed
//! says, how many vCPUs a spec gets, which host ports an instance takes, and what a change of
//! power state or reboot count means. No I/O here; `super` runs what these functions decide.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use kiln_proto::node::v1::{InstanceSpec, PowerState, Protocol};
use serde::{Deserialize, Serialize};

/// The guest port SSH listens on; always forwarded.
pub const SSH_PORT: u32 = 22;

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm` usable), with the host's CPU model.
    Kvm,
    /// Software emulation only.
    Tcg,
}

/// One guest port reachable on the host through user-mode networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Forward {
    pub guest_port: u32,
    /// `Protocol` as its wire number (TCP or UDP).
    pub protocol: i32,
    pub host_port: u16,
}

impl Forward {
    fn proto_name(&self) -> &'static str {
        if self.protocol == Protocol::Udp as i32 {
            "udp"
        } else {
            "tcp"
        }
    }
}

/// Everything needed to start one VM, as plain data.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// QEMU's `-name` (the assignment id).
    pub name: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Direct kernel boot: kernel, initrd, command line. `None`: the disk's boot loader.
    pub kernel: Option<(PathBuf, Option<PathBuf>, String)>,
    pub overlay: PathBuf,
    pub seed: PathBuf,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    /// The host address forwarded ports listen on.
    pub host_address: String,
    pub forwards: Vec<Forward>,
    /// Host PCI addresses passed through (`-device vfio-pci,host=…`).
    pub vfio: Vec<String>,
    /// The host NUMA node the guest's memory is bound to (the GPUs' node).
    pub numa_node: Option<u32>,
}

/// vCPUs for `cpu_millis`: whole CPUs, rounded up, at least one.
pub fn vcpus(cpu_millis: u32) -> u32 {
    cpu_millis.div_ceil(1000).max(1)
}

/// The memory a spec gets: its own, or `default_mib` when it says none.
pub fn memory_mib(spec: &InstanceSpec, default_mib: u64) -> u64 {
    if spec.memory_mib > 0 {
        spec.memory_mib
    } else {
        default_mib
    }
}

/// The QEMU command line (without the program name).
pub fn argv(l: &Launch) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("kiln-{},process=kiln-{}", l.name, l.name)]);
    push(&["-machine", "q35"]);
    match l.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg"]),
    }
    push(&["-smp", &l.vcpus.to_string()]);
    match l.numa_node {
        Some(node) => push(&[
            "-m",
            &format!("{}M", l.memory_mib),
            "-object",
            &format!(
                "memory-backend-ram,id=mem0,size={}M,host-nodes={node},policy=bind",
                l.memory_mib
            ),
            "-numa",
            "node,nodeid=0,memdev=mem0",
        ]),
        None => push(&["-m", &format!("{}M", l.memory_mib)]),
    }
    // No display, no monitor on stdio; the serial console goes to a file and QMP to a socket.
    push(&["-display", "none", "-monitor", "none", "-nodefaults"]);
    push(&["-serial", &format!("file:{}", l.serial_log.display())]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", l.qmp_socket.display()),
    ]);
    // A guest poweroff leaves QEMU up with status "shutdown", so it is told from a crash.
    push(&["-no-shutdown"]);
    if let Some((kernel, initrd, cmdline)) = &l.kernel {
        push(&["-kernel", &kernel.display().to_string()]);
        if let Some(initrd) = initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        push(&["-append", cmdline]);
    }
    // The instance's own disk first (the guest mounts the first non-seed disk), then the seed.
    push(&[
        "-drive",
        &format!(
            "file={},if=virtio,format=qcow2,cache=writeback",
            l.overlay.display()
        ),
    ]);
    push(&[
        "-drive",
        &format!("file={},if=virtio,format=raw,readonly=on", l.seed.display()),
    ]);
    let mut netdev = "user,id=n0".to_owned();
    for f in &l.forwards {
        netdev.push_str(&format!(
            ",hostfwd={}:{}:{}-:{}",
            f.proto_name(),
            l.host_address,
            f.host_port,
            f.guest_port
        ));
    }
    push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);
    for host in &l.vfio {
        push(&["-device", &format!("vfio-pci,host={host}")]);
    }
    a
}

/// The cloud-init NoCloud `user-data` for the guest contract (images/vm/README.md): a
/// hostname and the tenant's keys, one per list item.
pub fn user_data(hostname: &str, keys: &[String]) -> String {
    let mut s = format!("#cloud-config\nhostname: {}\n", yaml_scalar(hostname));
    s.push_str("ssh_authorized_keys:\n");
    for k in keys {
        // A key is one line; anything after a newline is not part of it.
        let k = k.lines().next().unwrap_or("").trim();
        if !k.is_empty() {
            s.push_str(&format!("  - {k}\n"));
        }
    }
    s
}

/// The NoCloud `meta-data`.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_scalar(instance_id),
        yaml_scalar(hostname)
    )
}

/// A hostname the guest can take: lowercase letters, digits and hyphens, at most 63, not
/// starting or ending with a hyphen; `fallback` when nothing is left.
pub fn hostname(wanted: &str, fallback: &str) -> String {
    let mut h: String = wanted
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    h.truncate(63);
    let h = h.trim_matches('-').to_owned();
    if h.is_empty() { fallback.to_owned() } else { h }
}

fn yaml_scalar(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect()
}

/// The guest ports an instance forwards: SSH first, then the spec's (each once).
pub fn wanted_ports(spec: &InstanceSpec) -> Vec<(u32, i32)> {
    let mut out = vec![(SSH_PORT, Protocol::Tcp as i32)];
    for p in &spec.ports {
        let proto = if p.protocol == Protocol::Udp as i32 {
            Protocol::Udp as i32
        } else {
            Protocol::Tcp as i32
        };
        if p.port > 0 && p.port <= 65535 && !out.contains(&(p.port, proto)) {
            out.push((p.port, proto));
        }
    }
    out
}

/// Why no host port could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free host port in {start}..={end} ({wanted} wanted)")]
pub struct NoFreePort {
    pub start: u16,
    pub end: u16,
    pub wanted: usize,
}

/// Host ports for `wanted` guest ports: the ones the instance had (`previous`, so the SSH
/// command stays the same across stop/start and restarts) when still free, else the lowest free
/// ports of `range` that no other instance holds (`taken`) and `free` accepts.
pub fn choose_ports(
    wanted: &[(u32, i32)],
    previous: &[Forward],
    range: RangeInclusive<u16>,
    taken: &BTreeSet<u16>,
    mut free: impl FnMut(u16) -> bool,
) -> Result<Vec<Forward>, NoFreePort> {
    let mut used = taken.clone();
    let mut out = Vec::with_capacity(wanted.len());
    for &(guest_port, protocol) in wanted {
        let before = previous
            .iter()
            .find(|f| f.guest_port == guest_port && f.protocol == protocol)
            .map(|f| f.host_port)
            .filter(|p| !used.contains(p) && free(*p));
        let host_port = match before {
            Some(p) => p,
            None => range
                .clone()
                .find(|p| !used.contains(p) && free(*p))
                .ok_or(NoFreePort {
                    start: *range.start(),
                    end: *range.end(),
                    wanted: wanted.len(),
                })?,
        };
        used.insert(host_port);
        out.push(Forward {
            guest_port,
            protocol,
            host_port,
        });
    }
    Ok(out)
}

/// Whether the spec wants the VM powered on.
pub fn wants_running(spec: &InstanceSpec) -> bool {
    spec.power() != PowerState::Stopped
}

/// What the VM is doing now, as far as a power decision cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// A QEMU process runs the guest.
    On,
    /// No QEMU process (never started, powered off, or died), or the guest powered itself
    /// off.
    Off,
}

/// What to do to make the VM match its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Nothing,
    /// Start QEMU on the (kept) overlay.
    Boot,
    /// ACPI powerdown, then quit after the timeout; the overlay is kept.
    PowerOff,
    /// `system_reset` of the running guest.
    Reboot,
}

/// The power rule: a stopped spec powers the VM off; a running one boots it; a reboot count
/// past the last applied one reboots a running VM (a VM that boots anyway needs no reboot).
pub fn power_action(
    spec: &InstanceSpec,
    applied_reboot_count: Option<u64>,
    now: Power,
) -> PowerAction {
    match (wants_running(spec), now) {
        (false, Power::On) => PowerAction::PowerOff,
        (false, Power::Off) => PowerAction::Nothing,
        (true, Power::Off) => PowerAction::Boot,
        (true, Power::On) => match applied_reboot_count {
            Some(applied) if spec.reboot_count > applied => PowerAction::Reboot,
            _ => PowerAction::Nothing,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::node::v1::PortSpec;

    fn launch() -> Launch {
        Launch {
            name: "asg_1".into(),
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 512,
            kernel: Some((
                "/img/vmlinuz".into(),
                Some("/img/initrd".into()),
                "console=ttyS0".into(),
            )),
            overlay: "/vm/overlay.qcow2".into(),
            seed: "/vm/seed.iso".into(),
            qmp_socket: "/vm/qmp.sock".into(),
            serial_log: "/vm/serial.log".into(),
            host_address: "127.0.0.1".into(),
            forwards: vec![
                Forward {
                    guest_port: 22,
                    protocol: Protocol::Tcp as i32,
                    host_port: 20000,
                },
                Forward {
                    guest_port: 53,
                    protocol: Protocol::Udp as i32,
                    host_port: 20001,
                },
            ],
            vfio: Vec::new(),
            numa_node: None,
        }
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn argv_says_everything_the_vm_needs() {
        let a = argv(&launch());
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["512M"]);
        assert_eq!(after(&a, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(after(&a, "-initrd"), ["/img/initrd"]);
        assert_eq!(after(&a, "-append"), ["console=ttyS0"]);
        assert_eq!(after(&a, "-serial"), ["file:/vm/serial.log"]);
        assert_eq!(after(&a, "-qmp"), ["unix:/vm/qmp.sock,server=on,wait=off"]);
        assert_eq!(
            after(&a, "-drive"),
            [
                "file=/vm/overlay.qcow2,if=virtio,format=qcow2,cache=writeback",
                "file=/vm/seed.iso,if=virtio,format=raw,readonly=on"
            ]
        );
        assert_eq!(
            after(&a, "-netdev"),
            ["user,id=n0,hostfwd=tcp:127.0.0.1:20000-:22,hostfwd=udp:127.0.0.1:20001-:53"]
        );
        assert!(a.contains(&"-no-shutdown".to_owned()));
        assert!(!a.iter().any(|x| x.starts_with("vfio-pci")));
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_gpus_are_passed_with_their_numa_node() {
        let mut l = launch();
        l.accel = Accel::Kvm;
        l.kernel = None;
        l.vfio = vec!["0000:3b:00.0".into(), "0000:3b:00.1".into()];
        l.numa_node = Some(1);
        let a = argv(&l);
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert!(after(&a, "-kernel").is_empty());
        assert_eq!(
            after(&a, "-device"),
            [
                "virtio-net-pci,netdev=n0",
                "vfio-pci,host=0000:3b:00.0",
                "vfio-pci,host=0000:3b:00.1"
            ]
        );
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-ram,id=mem0,size=512M,host-nodes=1,policy=bind"]
        );
        assert_eq!(after(&a, "-numa"), ["node,nodeid=0,memdev=mem0"]);
    }

    #[test]
    fn vcpus_round_up_and_memory_defaults() {
        assert_eq!(vcpus(0), 1);
        assert_eq!(vcpus(1), 1);
        assert_eq!(vcpus(1000), 1);
        assert_eq!(vcpus(1001), 2);
        assert_eq!(vcpus(7500), 8);
        let mut s = InstanceSpec::default();
        assert_eq!(memory_mib(&s, 512), 512);
        s.memory_mib = 2048;
        assert_eq!(memory_mib(&s, 512), 2048);
    }

    #[test]
    fn seed_has_the_hostname_and_one_key_per_item() {
        let keys = vec![
            "ssh-ed25519 AAAA one".to_owned(),
            "ssh-rsa BBBB two\nmalicious: yes".to_owned(),
            "  ".to_owned(),
        ];
        assert_eq!(
            user_data("web-1", &keys),
            "#cloud-config\nhostname: web-1\nssh_authorized_keys:\n  - ssh-ed25519 AAAA one\n  - ssh-rsa BBBB two\n"
        );
        assert_eq!(
            meta_data("asg_1", "web-1"),
            "instance-id: asg_1\nlocal-hostname: web-1\n"
        );
        assert_eq!(hostname("My VM #1", "x"), "my-vm--1");
        assert_eq!(hostname("---", "asg-1"), "asg-1");
        assert_eq!(hostname(&"a".repeat(80), "x").len(), 63);
    }

    #[test]
    fn ssh_is_always_forwarded_and_ports_are_deduplicated() {
        let spec = InstanceSpec {
            ports: vec![
                PortSpec {
                    port: 22,
                    protocol: Protocol::Tcp as i32,
                    name: "ssh".into(),
                },
                PortSpec {
                    port: 8080,
                    protocol: 0,
                    name: "http".into(),
                },
                PortSpec {
                    port: 8080,
                    protocol: Protocol::Udp as i32,
                    name: String::new(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            wanted_ports(&spec),
            [
                (22, Protocol::Tcp as i32),
                (8080, Protocol::Tcp as i32),
                (8080, Protocol::Udp as i32)
            ]
        );
    }

    #[test]
    fn ports_are_kept_when_free_and_otherwise_the_lowest_free() {
        let wanted = [(22, 1), (80, 1)];
        let taken: BTreeSet<u16> = [100].into();
        let got = choose_ports(&wanted, &[], 100..=110, &taken, |p| p != 101).unwrap();
        assert_eq!(
            got.iter().map(|f| f.host_port).collect::<Vec<_>>(),
            [102, 103]
        );
        // Kept across a restart when still free.
        let previous = vec![Forward {
            guest_port: 80,
            protocol: 1,
            host_port: 108,
        }];
        let got = choose_ports(&wanted, &previous, 100..=110, &taken, |_| true).unwrap();
        assert_eq!(
            got.iter().map(|f| f.host_port).collect::<Vec<_>>(),
            [101, 108]
        );
        // Not kept when someone else holds it now.
        let got = choose_ports(&wanted, &previous, 100..=110, &taken, |p| p != 108).unwrap();
        assert_eq!(got[1].host_port, 102);
        let err = choose_ports(&wanted, &[], 100..=101, &taken, |_| true).unwrap_err();
        assert_eq!(err.wanted, 2);
    }

    #[test]
    fn power_decisions() {
        let mut s = InstanceSpec {
            reboot_count: 2,
            ..Default::default()
        };
        // Unspecified power is running.
        assert_eq!(power_action(&s, None, Power::Off), PowerAction::Boot);
        assert_eq!(power_action(&s, None, Power::On), PowerAction::Nothing);
        assert_eq!(power_action(&s, Some(2), Power::On), PowerAction::Nothing);
        assert_eq!(power_action(&s, Some(1), Power::On), PowerAction::Reboot);
        // A VM that boots anyway is not rebooted on top.
        assert_eq!(power_action(&s, Some(1), Power::Off), PowerAction::Boot);
        s.power = PowerState::Stopped as i32;
        assert_eq!(power_action(&s, Some(1), Power::On), PowerAction::PowerOff);
        assert_eq!(power_action(&s, Some(1), Power::Off), PowerAction::Nothing);
        s.power = PowerState::Running as i32;
        assert_eq!(power_action(&s, Some(3), Power::On), PowerAction::Nothing);
    }
}

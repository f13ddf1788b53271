//! Instances as QEMU virtual machines, driven directly (no libvirt).
//!
//! * Per instance a directory `<vm_dir>/<assignment id>/` holds everything: the desired spec
//!   (`assignment.pb`), what the runtime decided (`meta.json`: host ports, the last applied
//!   reboot count, QEMU's pid, the devices bound to vfio-pci), the copy-on-write overlay
//!   (`overlay.qcow2` over the image's base disk, or blank), the cloud-init NoCloud seed
//!   (`seed.iso`), the QMP socket (`qmp.sock`), the serial console (`serial.log`) and QEMU's own
//!   output (`qemu.log`).
//! * QEMU runs in its own process group, so it outlives the agent: after an agent restart
//!   [`QemuRuntime::restore`] takes the directories back and running VMs are re-adopted through
//!   their pid and QMP socket, never restarted. A VM whose QEMU is gone while its spec wants it
//!   running is `FAILED`, with QEMU's exit status and the last lines of its output and console.
//! * Power: [`launch::power_action`] decides; `STOPPED` is `system_powerdown`, then `quit` after
//!   [`QemuSettings::powerdown_timeout`] (the overlay is kept); back to running boots the same
//!   overlay; a reboot count past the applied one is `system_reset`. Removal quits QEMU and
//!   deletes the directory.
//! * Networking: QEMU user-mode networking with `hostfwd` for SSH (guest port 22) and the spec's
//!   ports on host ports this runtime allocates from [`QemuSettings::port_range`] (kept across
//!   stop/start while free), reported as observed ports. The production option — a bridge and a
//!   tap device per org — is described in ARCHITECTURE.md.
//! * GPUs: [`passthrough`] plans VFIO from a sysfs snapshot; on a host with real GPUs
//!   ([`QemuSettings::passthrough`]) the group is bound to vfio-pci before boot and given back on
//!   power-off and removal. On a simulated host the VM boots without devices.
//! * The serial console is shipped like pod output (`LOG_SOURCE_CONSOLE`).

pub mod launch;
pub mod passthrough;
pub mod qmp;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_proto::node::v1::assignment::Kind;
use kiln_proto::node::v1::{
    Assignment, InstanceSpec, LogSource, ObservedAssignment, ObservedPort, ObservedState, Protocol,
};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::logs::LogShipper;
use crate::runtime::{RuntimeError, now_unix_ms};
use crate::state::{AppliedState, SpecKind};
use launch::{Accel, Forward, Launch, Power, PowerAction};
use qmp::{Qmp, QmpError};

const SPEC_FILE: &str = "assignment.pb";
const META_FILE: &str = "meta.json";
const OVERLAY_FILE: &str = "overlay.qcow2";
const SEED_FILE: &str = "seed.iso";
const QMP_FILE: &str = "qmp.sock";
const SERIAL_FILE: &str = "serial.log";
const QEMU_LOG_FILE: &str = "qemu.log";
/// Written by this agent process when it reaps a QEMU it started.
const EXIT_FILE: &str = "exit-status";
/// How long a removed instance is still reported (`STOPPED`).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// GPU passthrough on a host with real GPUs.
#[derive(Debug, Clone)]
pub struct PassthroughSettings {
    /// `/sys` (a tree of the same shape in tests).
    pub sysfs_root: PathBuf,
    /// GPU UUID → PCI bus id, from the inventory.
    pub gpu_bus_ids: BTreeMap<String, String>,
}

/// How the QEMU runtime runs instances.
#[derive(Debug, Clone)]
pub struct QemuSettings {
    /// Where the per-instance directories live.
    pub vm_dir: PathBuf,
    /// Relative `VmImage` paths are resolved here (`--vm-image-dir`).
    pub image_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    pub genisoimage: PathBuf,
    /// The host address forwarded guest ports listen on.
    pub host_address: String,
    pub port_range: RangeInclusive<u16>,
    /// `None`: KVM when `/dev/kvm` can be opened, TCG otherwise.
    pub accel: Option<Accel>,
    /// Memory for a spec that names none.
    pub default_memory_mib: u64,
    /// The size of a blank disk (an image without a base disk) when the spec names none.
    pub blank_disk_gib: u64,
    /// ACPI powerdown, then this long, then `quit`.
    pub powerdown_timeout: Duration,
    /// Bound on one QMP exchange.
    pub qmp_timeout: Duration,
    /// How long a boot may take to answer on QMP.
    pub start_timeout: Duration,
    /// How long `apply` waits for the change before answering.
    pub apply_wait: Duration,
    /// `None` on simulated hosts: VMs boot without their GPUs.
    pub passthrough: Option<PassthroughSettings>,
    /// How often a console is read for new lines.
    pub console_poll: Duration,
}

impl QemuSettings {
    pub fn new(vm_dir: impl Into<PathBuf>, image_dir: impl Into<PathBuf>) -> Self {
        Self {
            vm_dir: vm_dir.into(),
            image_dir: image_dir.into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            genisoimage: "genisoimage".into(),
            host_address: "0.0.0.0".into(),
            port_range: 20000..=29999,
            accel: None,
            default_memory_mib: 1024,
            blank_disk_gib: 10,
            powerdown_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(30),
            apply_wait: Duration::from_secs(5),
            passthrough: None,
            console_poll: Duration::from_millis(500),
        }
    }

    fn accel(&self) -> Accel {
        self.accel.unwrap_or_else(|| {
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if usable { Accel::Kvm } else { Accel::Tcg }
        })
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.image_dir.join(p)
        }
    }
}

/// Why a VM could not be made to match its spec.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("the instance spec names no image files (a control plane before proto minor 4)")]
    NoImage,
    #[error("image file {0} is missing")]
    ImageFile(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Tool { program: String, stderr: String },
    #[error(transparent)]
    Ports(#[from] launch::NoFreePort),
    #[error(transparent)]
    Passthrough(#[from] passthrough::PassthroughError),
    #[error("QEMU exited while starting ({status}): {output}")]
    Exited { status: String, output: String },
    #[error("QEMU did not answer on QMP within {timeout:?}: {last}")]
    NoQmp { timeout: Duration, last: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// What the runtime decided for an instance, kept next to its disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The host ports of the last boot.
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// The reboot count last applied; `None` before the first boot.
    #[serde(default)]
    pub applied_reboot_count: Option<u64>,
    /// The QEMU of the last boot.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Devices bound to vfio-pci for this VM: address and the driver they had.
    #[serde(default)]
    pub bound: Vec<(String, Option<String>)>,
}

struct Vm {
    assignment: Assignment,
    meta: Meta,
}

#[derive(Debug, Clone)]
enum Progress {
    Starting(String),
    Stopping(String),
    Failed(String),
}

struct Inner {
    settings: QemuSettings,
    vms: Mutex<BTreeMap<String, Vm>>,
    progress: Mutex<BTreeMap<String, (u64, Progress)>>,
    removed: Mutex<BTreeMap<String, (u64, Instant)>>,
    /// Per instance, the generation last booted and how long the boot took in this runtime
    /// (overlay, seed, QEMU up and answering QMP): reported as `runtime_ms`.
    boot_ms: Mutex<BTreeMap<String, (u64, u64)>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    consoles: Mutex<BTreeSet<String>>,
    logs: LogShipper,
    changes: Arc<tokio::sync::Notify>,
}

/// Runs instances as QEMU VMs. Cheap to clone (shared state).
#[derive(Clone)]
pub struct QemuRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QemuRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuRuntime")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

fn instance_of(a: &Assignment) -> Option<&InstanceSpec> {
    match &a.kind {
        Some(Kind::Instance(i)) => Some(i),
        _ => None,
    }
}

fn observed(
    id: &str,
    generation: u64,
    state: ObservedState,
    reason: impl Into<String>,
) -> ObservedAssignment {
    ObservedAssignment {
        assignment_id: id.to_owned(),
        generation,
        state: state as i32,
        reason: reason.into(),
        exit_code: None,
        ports: Vec::new(),
        observed_at_unix_ms: now_unix_ms(),
        runtime_ms: 0,
    }
}

/// The last `n` non-empty lines of a file, joined with " | " (for a reason).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Whether `pid` is a live (not zombie) QEMU serving `qmp_socket`.
fn qemu_alive(pid: u32, qmp_socket: &Path) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    // The pid may have been reused by another process: it must be this VM's QEMU.
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&qmp_socket.display().to_string() as &str))
        .unwrap_or(false)
}

fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

fn port_free(host: &str, f: (u32, i32), port: u16) -> bool {
    if f.1 == Protocol::Udp as i32 {
        std::net::UdpSocket::bind((host, port)).is_ok()
    } else {
        std::net::TcpListener::bind((host, port)).is_ok()
    }
}

async fn run_tool(program: &Path, args: &[&std::ffi::OsStr]) -> Result<String, QemuError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(io(format!("cannot run {}", program.display())))?;
    if !out.status.success() {
        return Err(QemuError::Tool {
            program: program.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl QemuRuntime {
    /// A runtime over `settings.vm_dir` (created if missing). `logs` ships the consoles;
    /// `changes` is woken when a VM's state changes.
    pub fn new(
        settings: QemuSettings,
        logs: LogShipper,
        changes: Arc<tokio::sync::Notify>,
    ) -> Result<Self, QemuError> {
        crate::fsutil::ensure_dir(&settings.vm_dir)
            .map_err(io(format!("cannot create {}", settings.vm_dir.display())))?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                vms: Mutex::default(),
                progress: Mutex::default(),
                removed: Mutex::default(),
                boot_ms: Mutex::default(),
                locks: Mutex::default(),
                consoles: Mutex::default(),
                logs,
                changes,
            }),
        })
    }

    pub fn settings(&self) -> &QemuSettings {
        &self.inner.settings
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.inner.settings.vm_dir.join(id)
    }

    /// The directory holding an instance's overlay, seed, socket and logs.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir(id)
    }

    /// The pid of the instance's QEMU while it runs.
    pub fn qemu_pid(&self, id: &str) -> Option<u32> {
        let pid = self
            .inner
            .vms
            .lock()
            .expect("not poisoned")
            .get(id)?
            .meta
            .pid?;
        qemu_alive(pid, &self.dir(id).join(QMP_FILE)).then_some(pid)
    }

    /// Takes back the instances a previous run applied (their directories), re-adopting running
    /// VMs as they are; stops and deletes VMs no applied assignment wants. Returns the applied
    /// instances whose spec was not kept (the agent must ask the control plane for them again).
    pub fn restore(&self, applied: &AppliedState) -> Vec<String> {
        let dirs = std::fs::read_dir(&self.inner.settings.vm_dir)
            .map(|d| d.filter_map(Result::ok).collect::<Vec<_>>())
            .unwrap_or_default();
        let mut adopted = Vec::new();
        for entry in dirs {
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let spec = std::fs::read(dir.join(SPEC_FILE))
                .ok()
                .and_then(|b| Assignment::decode(b.as_slice()).ok());
            let meta: Meta = std::fs::read(dir.join(META_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let wanted = spec.filter(|a| {
                applied
                    .assignments
                    .get(&id)
                    .is_some_and(|x| x.generation == a.generation && x.kind == SpecKind::Instance)
            });
            match wanted {
                Some(assignment) => {
                    if let Some(pid) = meta.pid
                        && qemu_alive(pid, &dir.join(QMP_FILE))
                    {
                        tracing::info!(assignment = %id, pid, "re-adopting a running VM");
                        adopted.push(id.clone());
                    }
                    self.inner
                        .vms
                        .lock()
                        .expect("not poisoned")
                        .insert(id, Vm { assignment, meta });
                }
                None => {
                    tracing::info!(assignment = %id, "removing a VM no assignment wants");
                    if let Some(pid) = meta.pid
                        && qemu_alive(pid, &dir.join(QMP_FILE))
                    {
                        kill(pid);
                    }
                    self.release_devices(&meta);
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        for id in adopted {
            self.follow_console(&id);
        }
        let vms = self.inner.vms.lock().expect("not poisoned");
        applied
            .assignments
            .iter()
            .filter(|(id, x)| x.kind == SpecKind::Instance && !vms.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether this runtime holds the assignment.
    pub fn holds(&self, id: &str) -> bool {
        self.inner
            .vms
            .lock()
            .expect("not poisoned")
            .contains_key(id)
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .lock()
            .expect("not poisoned")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn set_progress(&self, id: &str, generation: u64, p: Option<Progress>) {
        let mut progress = self.inner.progress.lock().expect("not poisoned");
        match p {
            Some(p) => {
                progress.insert(id.to_owned(), (generation, p));
            }
            None => {
                progress.remove(id);
            }
        }
    }

    fn persist(&self, id: &str) -> Result<(), QemuError> {
        let dir = self.dir(id);
        let (spec, meta) = {
            let vms = self.inner.vms.lock().expect("not poisoned");
            let Some(vm) = vms.get(id) else { return Ok(()) };
            (
                vm.assignment.encode_to_vec(),
                serde_json::to_vec_pretty(&vm.meta).unwrap_or_default(),
            )
        };
        crate::fsutil::ensure_dir(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        // The spec holds the tenant's keys only (public), but the directory is the tenant's.
        crate::fsutil::write_atomic(&dir.join(SPEC_FILE), &spec, 0o600)
            .map_err(io("cannot keep the instance spec"))?;
        crate::fsutil::write_atomic(&dir.join(META_FILE), &meta, 0o600)
            .map_err(io("cannot keep the instance's state"))
    }

    fn meta(&self, id: &str) -> Option<Meta> {
        self.inner
            .vms
            .lock()
            .expect("not poisoned")
            .get(id)
            .map(|v| v.meta.clone())
    }

    fn update_meta(&self, id: &str, f: impl FnOnce(&mut Meta)) -> Result<(), QemuError> {
        if let Some(vm) = self.inner.vms.lock().expect("not poisoned").get_mut(id) {
            f(&mut vm.meta);
        }
        self.persist(id)
    }

    /// Records the instance and makes the VM match it, waiting up to `apply_wait`.
    pub async fn apply(&self, assignment: &Assignment) -> ObservedAssignment {
        let id = assignment.assignment_id.clone();
        self.inner.removed.lock().expect("not poisoned").remove(&id);
        {
            let mut vms = self.inner.vms.lock().expect("not poisoned");
            let meta = vms.get(&id).map(|v| v.meta.clone()).unwrap_or_default();
            vms.insert(
                id.clone(),
                Vm {
                    assignment: assignment.clone(),
                    meta,
                },
            );
        }
        if let Err(e) = self.persist(&id) {
            return observed(
                &id,
                assignment.generation,
                ObservedState::Failed,
                e.to_string(),
            );
        }
        self.set_progress(
            &id,
            assignment.generation,
            Some(Progress::Starting("applying".into())),
        );
        let this = self.clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move { this.converge(&task_id).await });
        let _ = tokio::time::timeout(self.inner.settings.apply_wait, task).await;
        self.observe_one(&id).await
    }

    /// Runs the power decision for one instance. Failures end up in `progress`.
    async fn converge(&self, id: &str) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(a) = self
            .inner
            .vms
            .lock()
            .expect("not poisoned")
            .get(id)
            .map(|v| v.assignment.clone())
        else {
            return;
        };
        let generation = a.generation;
        let result = self.converge_locked(&a).await;
        let still = self
            .inner
            .vms
            .lock()
            .expect("not poisoned")
            .get(id)
            .is_some_and(|v| v.assignment.generation == generation);
        if still {
            match result {
                Ok(()) => self.set_progress(id, generation, None),
                Err(e) => {
                    tracing::warn!(assignment = id, generation, error = %e, "instance failed");
                    self.set_progress(id, generation, Some(Progress::Failed(e.to_string())));
                }
            }
        }
        self.inner.changes.notify_one();
    }

    async fn converge_locked(&self, a: &Assignment) -> Result<(), QemuError> {
        let id = &a.assignment_id;
        let spec = instance_of(a).cloned().unwrap_or_default();
        let meta = self.meta(id).unwrap_or_default();
        let qmp_path = self.dir(id).join(QMP_FILE);
        let alive = meta.pid.filter(|p| qemu_alive(*p, &qmp_path));
        let now = match alive {
            Some(_) => match self.qmp(id).await {
                Ok(mut q) => match q.status().await {
                    Ok(s) if s == "shutdown" => Power::Off,
                    _ => Power::On,
                },
                Err(_) => Power::On,
            },
            None => Power::Off,
        };
        match launch::power_action(&spec, meta.applied_reboot_count, now) {
            PowerAction::Nothing => {
                if meta.applied_reboot_count.is_none() || now == Power::Off {
                    self.update_meta(id, |m| m.applied_reboot_count = Some(spec.reboot_count))?;
                }
                Ok(())
            }
            PowerAction::Boot => {
                self.set_progress(id, a.generation, Some(Progress::Starting("booting".into())));
                if let Some(pid) = alive {
                    // The guest powered itself off: QEMU is still up with the disk open.
                    self.quit(id, pid).await;
                }
                let started = Instant::now();
                self.boot(a, &spec).await?;
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.inner
                    .boot_ms
                    .lock()
                    .expect("not poisoned")
                    .insert(id.clone(), (a.generation, ms));
                Ok(())
            }
            PowerAction::PowerOff => {
                self.set_progress(
                    id,
                    a.generation,
                    Some(Progress::Stopping("powering off".into())),
                );
                if let Some(pid) = alive {
                    self.power_off(id, pid).await;
                }
                let meta = self.meta(id).unwrap_or_default();
                self.release_devices(&meta);
                self.update_meta(id, |m| {
                    m.bound.clear();
                    m.applied_reboot_count = Some(spec.reboot_count);
                })
            }
            PowerAction::Reboot => {
                tracing::info!(assignment = %id, reboot_count = spec.reboot_count, "rebooting");
                self.qmp(id).await?.execute("system_reset", None).await?;
                self.update_meta(id, |m| m.applied_reboot_count = Some(spec.reboot_count))
            }
        }
    }

    async fn qmp(&self, id: &str) -> Result<Qmp, QmpError> {
        Qmp::connect(
            &self.dir(id).join(QMP_FILE),
            self.inner.settings.qmp_timeout,
        )
        .await
    }

    /// Waits until `pid` is gone or `timeout` passes; whether it is gone.
    async fn wait_gone(&self, id: &str, pid: u32, timeout: Duration) -> bool {
        let qmp_path = self.dir(id).join(QMP_FILE);
        let deadline = Instant::now() + timeout;
        loop {
            if !qemu_alive(pid, &qmp_path) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// ACPI powerdown; after `powerdown_timeout` (or once the guest is down) `quit`.
    async fn power_off(&self, id: &str, pid: u32) {
        let timeout = self.inner.settings.powerdown_timeout;
        if let Ok(mut q) = self.qmp(id).await {
            let _ = q.execute("system_powerdown", None).await;
            let deadline = Instant::now() + timeout;
            // With -no-shutdown a guest that powered off leaves QEMU in status "shutdown".
            while Instant::now() < deadline {
                match q.status().await {
                    Ok(s) if s == "shutdown" => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(_) => break,
                }
            }
            if Instant::now() >= deadline {
                tracing::info!(
                    assignment = id,
                    ?timeout,
                    "the guest ignored ACPI powerdown; quitting QEMU"
                );
            }
        }
        self.quit(id, pid).await;
    }

    /// `quit` over QMP, then SIGKILL if QEMU is still there.
    async fn quit(&self, id: &str, pid: u32) {
        if let Ok(mut q) = self.qmp(id).await {
            let _ = q.execute("quit", None).await;
        }
        if !self.wait_gone(id, pid, Duration::from_secs(10)).await {
            kill(pid);
            self.wait_gone(id, pid, Duration::from_secs(5)).await;
        }
    }

    fn release_devices(&self, meta: &Meta) {
        if meta.bound.is_empty() {
            return;
        }
        let Some(pt) = &self.inner.settings.passthrough else {
            return;
        };
        let plan = passthrough::PassthroughPlan {
            bind: meta
                .bound
                .iter()
                .map(|(address, original_driver)| passthrough::Rebind {
                    address: address.clone(),
                    original_driver: original_driver.clone(),
                })
                .collect(),
            ..Default::default()
        };
        if let Err(e) = passthrough::release(&pt.sysfs_root, &plan) {
            tracing::warn!(error = %e, "could not give passed-through devices back to the host");
        }
    }

    /// Creates what is missing (overlay, seed, ports, device binding) and starts QEMU on it.
    async fn boot(&self, a: &Assignment, spec: &InstanceSpec) -> Result<(), QemuError> {
        let s = &self.inner.settings;
        let id = &a.assignment_id;
        let dir = self.dir(id);
        crate::fsutil::ensure_dir(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let image = spec.image_source.as_ref().ok_or(QemuError::NoImage)?;
        let file = |p: &str| {
            let p = s.resolve(p);
            if p.is_file() {
                Ok(p)
            } else {
                Err(QemuError::ImageFile(p))
            }
        };
        let kernel = if image.kernel.is_empty() {
            None
        } else {
            let initrd = (!image.initrd.is_empty())
                .then(|| file(&image.initrd))
                .transpose()?;
            let args = if image.kernel_args.is_empty() {
                "console=ttyS0".to_owned()
            } else {
                image.kernel_args.clone()
            };
            Some((file(&image.kernel)?, initrd, args))
        };
        let overlay = dir.join(OVERLAY_FILE);
        if !overlay.exists() {
            self.create_overlay(&overlay, &image.disk, spec.disk_gib)
                .await?;
        }
        let seed = dir.join(SEED_FILE);
        self.write_seed(&dir, &seed, id, spec).await?;

        let meta = self.meta(id).unwrap_or_default();
        let taken: BTreeSet<u16> = self
            .inner
            .vms
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(other, _)| *other != id)
            .flat_map(|(_, v)| v.meta.forwards.iter().map(|f| f.host_port))
            .collect();
        let wanted = launch::wanted_ports(spec);
        let forwards =
            launch::choose_ports(&wanted, &meta.forwards, s.port_range.clone(), &taken, |p| {
                wanted.iter().all(|w| port_free(&s.host_address, *w, p))
            })?;

        let (vfio, numa_node, bound) = self.plan_devices(id, spec)?;
        self.update_meta(id, |m| {
            m.forwards = forwards.clone();
            m.bound = bound;
        })?;

        let qmp_path = dir.join(QMP_FILE);
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(dir.join(EXIT_FILE));
        let launch = Launch {
            name: id.clone(),
            accel: s.accel(),
            vcpus: launch::vcpus(spec.cpu_millis),
            memory_mib: launch::memory_mib(spec, s.default_memory_mib),
            kernel,
            overlay,
            seed,
            qmp_socket: qmp_path.clone(),
            serial_log: dir.join(SERIAL_FILE),
            host_address: s.host_address.clone(),
            forwards,
            vfio,
            numa_node,
        };
        let log_path = dir.join(QEMU_LOG_FILE);
        let log = std::fs::File::create(&log_path).map_err(io("cannot create qemu.log"))?;
        let log2 = log.try_clone().map_err(io("cannot open qemu.log"))?;
        let mut child = tokio::process::Command::new(&s.qemu_binary)
            .args(launch::argv(&launch))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: the agent's signals (and its restarts) leave the VM alone.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(io(format!("cannot start {}", s.qemu_binary.display())))?;
        let pid = child.id().unwrap_or(0);
        let spawned = Instant::now();
        tracing::info!(assignment = %id, pid, accel = ?launch.accel, vcpus = launch.vcpus, memory_mib = launch.memory_mib, "QEMU started");
        self.update_meta(id, |m| {
            m.pid = Some(pid);
            m.applied_reboot_count = Some(spec.reboot_count);
        })?;
        // Reap it when it exits, and say how, for the FAILED reason.
        let exit_file = dir.join(EXIT_FILE);
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await
                && exit_file.parent().is_some_and(Path::is_dir)
            {
                let _ = std::fs::write(&exit_file, status.to_string());
            }
        });

        // Up once QMP answers.
        let deadline = Instant::now() + s.start_timeout;
        let mut last: String;
        loop {
            if !qemu_alive(pid, &qmp_path) {
                // The reaper writes the status right after the exit.
                let until = Instant::now() + Duration::from_secs(2);
                while !dir.join(EXIT_FILE).exists() && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Without an exit status, say what is known: how long after the spawn, and
                // what /proc shows of the pid (a zombie, nothing, or someone else).
                let status = std::fs::read_to_string(dir.join(EXIT_FILE)).unwrap_or_else(|_| {
                    let proc_state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|st| {
                            st.rsplit_once(')')
                                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
                        })
                        .unwrap_or_else(|| "no such process".into());
                    format!(
                        "no exit status {} ms after the spawn; /proc/{pid}: {proc_state}",
                        spawned.elapsed().as_millis()
                    )
                });
                return Err(QemuError::Exited {
                    status,
                    output: tail(&log_path, 5),
                });
            }
            match Qmp::connect(&qmp_path, s.qmp_timeout).await {
                Ok(mut q) => match q.status().await {
                    Ok(_) => break,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                kill(pid);
                return Err(QemuError::NoQmp {
                    timeout: s.start_timeout,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.follow_console(id);
        Ok(())
    }

    /// The `-device vfio-pci` hosts, NUMA node and bound devices for the spec's GPUs (nothing on
    /// a simulated host).
    #[allow(clippy::type_complexity)]
    fn plan_devices(
        &self,
        id: &str,
        spec: &InstanceSpec,
    ) -> Result<(Vec<String>, Option<u32>, Vec<(String, Option<String>)>), QemuError> {
        if spec.gpu_uuids.is_empty() {
            return Ok((Vec::new(), None, Vec::new()));
        }
        let Some(pt) = &self.inner.settings.passthrough else {
            tracing::info!(assignment = id, gpus = ?spec.gpu_uuids, "simulated GPUs: booting without passthrough devices");
            return Ok((Vec::new(), None, Vec::new()));
        };
        let snapshot = passthrough::read_sysfs(&pt.sysfs_root)
            .map_err(io(format!("cannot read {}", pt.sysfs_root.display())))?;
        let gpus: Vec<(String, Option<String>)> = spec
            .gpu_uuids
            .iter()
            .map(|u| (u.clone(), pt.gpu_bus_ids.get(u).cloned()))
            .collect();
        let plan = passthrough::plan(&snapshot, &gpus)?;
        passthrough::bind(&pt.sysfs_root, &plan)
            .map_err(io("cannot bind the GPU's IOMMU group to vfio-pci"))?;
        let bound = plan
            .bind
            .iter()
            .map(|b| (b.address.clone(), b.original_driver.clone()))
            .collect();
        Ok((plan.vfio_hosts, plan.numa_node, bound))
    }

    async fn create_overlay(
        &self,
        overlay: &Path,
        base: &str,
        disk_gib: u64,
    ) -> Result<(), QemuError> {
        let s = &self.inner.settings;
        let tmp = overlay.with_extension("qcow2.tmp");
        let mut args: Vec<std::ffi::OsString> =
            vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        if base.is_empty() {
            let gib = if disk_gib > 0 {
                disk_gib
            } else {
                s.blank_disk_gib
            };
            args.push(tmp.clone().into());
            args.push(format!("{gib}G").into());
        } else {
            let base = s.resolve(base);
            if !base.is_file() {
                return Err(QemuError::ImageFile(base));
            }
            let info = run_tool(
                &s.qemu_img,
                &["info".as_ref(), "--output=json".as_ref(), base.as_os_str()],
            )
            .await?;
            let info: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
            let format = info["format"].as_str().unwrap_or("raw").to_owned();
            let base_size = info["virtual-size"].as_u64().unwrap_or(0);
            args.extend([
                "-b".into(),
                base.into_os_string(),
                "-F".into(),
                format.into(),
                tmp.clone().into(),
            ]);
            // The overlay is the instance's own size; never smaller than its base.
            if disk_gib > 0 && disk_gib.saturating_mul(1 << 30) >= base_size {
                args.push(format!("{disk_gib}G").into());
            }
        }
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        run_tool(&s.qemu_img, &refs).await?;
        std::fs::rename(&tmp, overlay).map_err(io("cannot place the overlay"))
    }

    async fn write_seed(
        &self,
        dir: &Path,
        seed: &Path,
        id: &str,
        spec: &InstanceSpec,
    ) -> Result<(), QemuError> {
        let src = dir.join("seed");
        crate::fsutil::ensure_dir(&src).map_err(io("cannot create the seed directory"))?;
        let name = launch::hostname(&spec.hostname, &launch::hostname(id, "instance"));
        std::fs::write(
            src.join("user-data"),
            launch::user_data(&name, &spec.ssh_authorized_keys),
        )
        .map_err(io("cannot write user-data"))?;
        std::fs::write(src.join("meta-data"), launch::meta_data(id, &name))
            .map_err(io("cannot write meta-data"))?;
        let tmp = seed.with_extension("iso.tmp");
        let (ud, md) = (src.join("user-data"), src.join("meta-data"));
        run_tool(
            &self.inner.settings.genisoimage,
            &[
                "-quiet".as_ref(),
                "-volid".as_ref(),
                "cidata".as_ref(),
                "-joliet".as_ref(),
                "-rock".as_ref(),
                "-output".as_ref(),
                tmp.as_os_str(),
                ud.as_os_str(),
                md.as_os_str(),
            ],
        )
        .await?;
        std::fs::rename(&tmp, seed).map_err(io("cannot place the seed"))
    }

    /// Ships the console's new lines while the instance is held (from its current end: what was
    /// written before is not shipped again).
    fn follow_console(&self, id: &str) {
        if !self
            .inner
            .consoles
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned())
        {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let id = id.to_owned();
        let path = self.dir(&id).join(SERIAL_FILE);
        let poll = self.inner.settings.console_poll;
        tokio::spawn(async move {
            let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let mut partial = String::new();
            loop {
                tokio::time::sleep(poll).await;
                let Some(inner) = weak.upgrade() else { return };
                if !inner.vms.lock().expect("not poisoned").contains_key(&id) {
                    inner.consoles.lock().expect("not poisoned").remove(&id);
                    return;
                }
                let Ok(mut f) = std::fs::File::open(&path) else {
                    continue;
                };
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    // A new boot truncated the console.
                    offset = 0;
                    partial.clear();
                }
                if len == offset || f.seek(std::io::SeekFrom::Start(offset)).is_err() {
                    continue;
                }
                let mut buf = Vec::new();
                if f.take(1 << 20).read_to_end(&mut buf).is_err() {
                    continue;
                }
                offset += buf.len() as u64;
                partial.push_str(&String::from_utf8_lossy(&buf));
                let at = i128::from(now_unix_ms());
                while let Some(n) = partial.find('\n') {
                    let line: String = partial.drain(..=n).collect();
                    let line = line.trim_end_matches(['\n', '\r']);
                    inner.logs.ship(&id, LogSource::Console, line, at);
                }
            }
        });
    }

    /// Quits the VM and deletes its overlay, seed, socket and logs.
    pub async fn remove(&self, id: &str, generation: u64) -> Result<(), RuntimeError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let meta = {
            let mut vms = self.inner.vms.lock().expect("not poisoned");
            if vms
                .get(id)
                .is_some_and(|v| v.assignment.generation > generation)
            {
                return Ok(());
            }
            vms.remove(id).map(|v| v.meta).unwrap_or_default()
        };
        self.inner.progress.lock().expect("not poisoned").remove(id);
        self.inner.boot_ms.lock().expect("not poisoned").remove(id);
        let dir = self.dir(id);
        if let Some(pid) = meta.pid
            && qemu_alive(pid, &dir.join(QMP_FILE))
        {
            self.quit(id, pid).await;
        }
        self.release_devices(&meta);
        // The reaper of the QEMU that just quit may still write its exit status into the
        // directory while it is being deleted: a second pass takes that too.
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(RuntimeError::Remove {
                        assignment_id: id.to_owned(),
                        message: format!("cannot delete {}: {e}", dir.display()),
                    });
                }
            }
        }
        self.inner
            .removed
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned(), (generation, Instant::now()));
        tracing::info!(assignment = id, "instance removed");
        Ok(())
    }

    async fn observe_one(&self, id: &str) -> ObservedAssignment {
        let Some((a, meta)) = self
            .inner
            .vms
            .lock()
            .expect("not poisoned")
            .get(id)
            .map(|v| (v.assignment.clone(), v.meta.clone()))
        else {
            let generation = self
                .inner
                .removed
                .lock()
                .expect("not poisoned")
                .get(id)
                .map(|(g, _)| *g)
                .unwrap_or(0);
            return observed(
                id,
                generation,
                ObservedState::Stopped,
                "stopped and removed",
            );
        };
        let generation = a.generation;
        let progress = self
            .inner
            .progress
            .lock()
            .expect("not poisoned")
            .get(id)
            .filter(|(g, _)| *g == generation)
            .map(|(_, p)| p.clone());
        match progress {
            Some(Progress::Starting(r)) => {
                return observed(id, generation, ObservedState::Starting, r);
            }
            Some(Progress::Stopping(r)) => {
                return observed(id, generation, ObservedState::Stopping, r);
            }
            Some(Progress::Failed(r)) => {
                return observed(id, generation, ObservedState::Failed, r);
            }
            None => {}
        }
        let spec = instance_of(&a).cloned().unwrap_or_default();
        let wants_running = launch::wants_running(&spec);
        let dir = self.dir(id);
        let alive = meta.pid.filter(|p| qemu_alive(*p, &dir.join(QMP_FILE)));
        let Some(pid) = alive else {
            if !wants_running {
                return observed(id, generation, ObservedState::Stopped, "powered off");
            }
            let status = std::fs::read_to_string(dir.join(EXIT_FILE))
                .unwrap_or_else(|_| "no longer running".into());
            let mut reason = format!(
                "QEMU (pid {}) exited unexpectedly: {status}",
                meta.pid.unwrap_or(0)
            );
            let qemu = tail(&dir.join(QEMU_LOG_FILE), 3);
            if !qemu.is_empty() {
                reason.push_str(&format!("; qemu: {qemu}"));
            }
            let console = tail(&dir.join(SERIAL_FILE), 5);
            if !console.is_empty() {
                reason.push_str(&format!("; console: {console}"));
            }
            return observed(id, generation, ObservedState::Failed, reason);
        };
        // QMP serves one client: while a change holds the instance, say what it does.
        let lock = self.lock_for(id);
        let Ok(_guard) = lock.try_lock() else {
            return observed(id, generation, ObservedState::Starting, "changing");
        };
        let status = match self.qmp(id).await {
            Ok(mut q) => q.status().await,
            Err(e) => Err(e),
        };
        let mut o = match status {
            Ok(s) if s == "shutdown" => observed(
                id,
                generation,
                ObservedState::Stopped,
                "the guest powered itself off",
            ),
            Ok(_) if !wants_running => {
                observed(id, generation, ObservedState::Stopping, "powering off")
            }
            Ok(s) if s == "running" => observed(id, generation, ObservedState::Running, ""),
            Ok(s) => observed(
                id,
                generation,
                ObservedState::Running,
                format!("QEMU status {s}"),
            ),
            Err(e) => observed(
                id,
                generation,
                ObservedState::Unspecified,
                format!("QEMU (pid {pid}) runs but QMP does not answer: {e}"),
            ),
        };
        if o.state == ObservedState::Running as i32 {
            o.runtime_ms = self
                .inner
                .boot_ms
                .lock()
                .expect("not poisoned")
                .get(id)
                .filter(|(g, _)| *g == generation)
                .map_or(0, |(_, ms)| *ms);
            o.ports = meta
                .forwards
                .iter()
                .map(|f| ObservedPort {
                    port: f.guest_port,
                    protocol: f.protocol,
                    host_port: u32::from(f.host_port),
                })
                .collect();
        }
        o
    }

    /// Every instance this runtime has, plus the recently removed ones (`STOPPED`).
    pub async fn observe_all(&self) -> Vec<ObservedAssignment> {
        let ids: Vec<String> = self
            .inner
            .vms
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.observe_one(&id).await);
        }
        let mut removed = self.inner.removed.lock().expect("not poisoned");
        removed.retain(|_, (_, at)| at.elapsed() < TOMBSTONE_TTL);
        for (id, (generation, _)) in removed.iter() {
            out.push(observed(
                id,
                *generation,
                ObservedState::Stopped,
                "stopped and removed",
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_are_short_and_skip_blank_lines() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        std::fs::write(&p, "a\n\nb\n  \nc\nd\n").unwrap();
        assert_eq!(tail(&p, 3), "b | c | d");
        assert_eq!(tail(&t.path().join("missing"), 3), "");
    }

    #[test]
    fn a_live_process_that_is_not_the_vms_qemu_is_not_taken_for_it() {
        assert!(!qemu_alive(
            std::process::id(),
            Path::new("/nonexistent/qmp.sock")
        ));
        assert!(!qemu_alive(u32::MAX, Path::new("/x")));
    }

    #[test]
    fn meta_round_trips_and_tolerates_missing_fields() {
        let m: Meta = serde_json::from_str("{}").unwrap();
        assert_eq!(m, Meta::default());
        let m = Meta {
            forwards: vec![Forward {
                guest_port: 22,
                protocol: Protocol::Tcp as i32,
                host_port: 20001,
            }],
            applied_reboot_count: Some(3),
            pid: Some(42),
            bound: vec![("0000:3b:00.0".into(), Some("nvidia".into()))],
        };
        let back: Meta = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}

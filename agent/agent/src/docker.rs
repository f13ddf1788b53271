//! Pods as Docker containers, through the engine's API (bollard).
//!
//! * [`DockerRuntime::apply`] records the pod's desired spec (kept on disk, so a container
//!   removed while the agent was down can be recreated), then converges it in the background:
//!   pull the image unless present (progress reported as `STARTING`, "pulling image 43%"),
//!   make sure the pod network exists, create the container, start it. `apply` waits a short
//!   while for that so a local image answers `RUNNING` at once.
//! * Containers are named `<prefix><assignment id>` and labelled `kiln.managed=true`,
//!   `kiln.node`, `kiln.assignment`, `kiln.generation` (and `kiln.org` once the spec carries an
//!   org). Only containers with this node's label are ever touched, so several (simulated)
//!   agents can share one engine.
//! * Hardening: no privileged mode, no host network/PID/IPC namespaces, `CapDrop ALL`,
//!   `no-new-privileges`, CPU and memory limits, an init process (signals reach the workload),
//!   an optional read-only root filesystem, a bridge network per org (`kiln-org-<org>`, or
//!   `kiln-pods` while the spec names no org): Docker isolates different bridges from each other.
//! * GPUs: `NVIDIA_VISIBLE_DEVICES` (the assigned GPU or MIG device UUIDs) and
//!   `NVIDIA_DRIVER_CAPABILITIES=compute,utility` always; on an NVML host also a device request
//!   (driver "nvidia") for exactly those UUIDs.
//! * Restart policy (`PodSpec.restart_policy`): `on-failure` (the default) is Docker's
//!   `on-failure` with at most [`DockerSettings::max_restarts`] retries, `always` is Docker's
//!   `always`, `never` is `no`; restarts show in the reason, and a pod that exited for good is
//!   `FAILED` with its exit code (`STOPPED` for exit 0), OOM said as such.
//! * Secret env values arrive opened in `env`; a pod whose `env_sealed` is not empty (the
//!   control plane could not open them) fails with that reason instead of running without them.
//! * Output: every container of an assignment is tailed into [`LogShipper`] for `PushLogs`.
//! * Docker's event stream (start, die, oom, destroy of this node's containers) wakes the
//!   agent's observed-state report ([`DockerRuntime::changes`]), so a crash reaches the control
//!   plane at once rather than at the next periodic report.
//! * Each observation carries how long the agent spent in Docker calls for it (`runtime_ms`: the
//!   last converge's pull/network/create/start, plus the observation's own inspect).
//! * A reconcile loop (at start and every [`DockerSettings::reconcile_interval`]) adopts
//!   containers of the applied generation, replaces older ones, recreates missing ones and
//!   removes this node's containers that no assignment wants.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, DeviceRequest,
    HostConfig, NetworkCreateRequest, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    InspectNetworkOptions, ListContainersOptions, RemoveContainerOptions, StartContainerOptions,
    StopContainerOptions,
};
use futures::StreamExt;
use kiln_proto::node::v1::assignment::Kind;
use kiln_proto::node::v1::gpu_allocation::Kind as GpuKind;
use kiln_proto::node::v1::{
    Assignment, AssignmentSnapshot, ObservedAssignment, ObservedPort, ObservedState, PodSpec,
    Protocol, RestartPolicy as PodRestart,
};
use prost::Message;

use crate::logs::LogShipper;
use crate::runtime::{RuntimeError, now_unix_ms};
use crate::state::{AppliedState, SpecKind};

/// Label on every container and network this agent manages.
pub const LABEL_MANAGED: &str = "kiln.managed";
/// The node (agent identity) a container belongs to.
pub const LABEL_NODE: &str = "kiln.node";
pub const LABEL_ASSIGNMENT: &str = "kiln.assignment";
pub const LABEL_GENERATION: &str = "kiln.generation";
pub const LABEL_ORG: &str = "kiln.org";
/// The default Docker socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// The file, in the state directory, holding the desired pod specs.
pub const SPECS_FILE: &str = "pods.pb";
/// How long a removed pod is still reported (`STOPPED`), so the control plane sees the stop.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// How the Docker runtime runs pods.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// The engine's Unix socket.
    pub socket: PathBuf,
    /// This node's id: the `kiln.node` label, the scope of everything the runtime touches.
    pub node_id: String,
    /// Whether to add an NVIDIA device request (true on NVML hosts, false on simulated ones).
    pub gpu_device_requests: bool,
    /// The host address published ports bind to (Docker picks an ephemeral host port).
    pub publish_address: String,
    /// The bridge network for pods whose org is not known.
    pub default_network: String,
    /// Per-org networks are `<prefix><org>`.
    pub org_network_prefix: String,
    /// Containers are named `<prefix><assignment id>`.
    pub container_prefix: String,
    /// SIGTERM, then this long, then SIGKILL.
    pub stop_timeout: Duration,
    pub reconcile_interval: Duration,
    /// Docker `on-failure` retries before a pod is failed.
    pub max_restarts: u32,
    pub read_only_rootfs: bool,
    /// Run Docker's init (tini) as PID 1, so SIGTERM reaches the workload and zombies are reaped.
    pub init: bool,
    /// Where the desired specs are kept; `None` keeps them in memory only.
    pub specs_path: Option<PathBuf>,
    /// How long `apply` waits for the container to be started before answering `STARTING`.
    pub apply_wait: Duration,
    /// Bound on an image pull.
    pub pull_timeout: Duration,
}

impl DockerSettings {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            node_id: node_id.into(),
            gpu_device_requests: false,
            publish_address: "0.0.0.0".into(),
            default_network: "kiln-pods".into(),
            org_network_prefix: "kiln-org-".into(),
            container_prefix: "kiln-".into(),
            stop_timeout: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(10),
            max_restarts: 3,
            read_only_rootfs: false,
            init: true,
            specs_path: None,
            apply_wait: Duration::from_secs(5),
            pull_timeout: Duration::from_secs(1800),
        }
    }

    pub fn container_name(&self, assignment_id: &str) -> String {
        format!("{}{assignment_id}", self.container_prefix)
    }

    /// The bridge network a pod of `org` joins.
    pub fn network_for(&self, org: Option<&str>) -> String {
        match org.filter(|o| !o.is_empty()) {
            Some(org) => format!("{}{}", self.org_network_prefix, sanitize(org)),
            None => self.default_network.clone(),
        }
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The org a pod belongs to (`PodSpec.org_id`, minor 2; none from older control planes, whose
/// pods share the `kiln-pods` network).
pub fn pod_org(assignment: &Assignment) -> Option<String> {
    match &assignment.kind {
        Some(Kind::Pod(pod)) if !pod.org_id.is_empty() => Some(pod.org_id.clone()),
        _ => None,
    }
}

/// Why the Docker engine cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no Docker socket at {}", .0.display())]
    NoSocket(PathBuf),
    #[error("the Docker engine at {} does not answer: {source}", socket.display())]
    Engine {
        socket: PathBuf,
        #[source]
        source: DockerError,
    },
}

/// A pod's `NVIDIA_VISIBLE_DEVICES` value: the GPU or MIG device UUIDs, comma-separated; `None`
/// for a CPU-only pod. A MIG slice whose device does not exist yet (no `mig_device_uuid`) needs
/// a device request for its device, which this agent cannot make; on a simulated host its
/// parent GPU stands in.
pub fn visible_devices(pod: &PodSpec, device_requests: bool) -> Result<Option<String>, String> {
    match pod.gpus.as_ref().and_then(|g| g.kind.as_ref()) {
        None => Ok(None),
        Some(GpuKind::Whole(w)) => Ok(Some(w.gpu_uuids.join(","))),
        Some(GpuKind::Share(s)) => Ok(Some(s.gpu_uuid.clone())),
        Some(GpuKind::Mig(m)) if !m.mig_device_uuid.is_empty() => {
            Ok(Some(m.mig_device_uuid.clone()))
        }
        Some(GpuKind::Mig(m)) if device_requests => Err(format!(
            "the MIG slice {} at {} on {} has no device yet, and this agent does not create MIG \
             slices",
            m.profile, m.start, m.gpu_uuid
        )),
        Some(GpuKind::Mig(m)) => Ok(Some(m.gpu_uuid.clone())),
    }
}

fn port_key(port: u32, protocol: i32) -> String {
    let proto = if protocol == Protocol::Udp as i32 {
        "udp"
    } else {
        "tcp"
    };
    format!("{port}/{proto}")
}

/// Docker's restart policy for a pod's.
fn restart_policy(pod: &PodSpec, settings: &DockerSettings) -> RestartPolicy {
    match pod.restart_policy() {
        PodRestart::Always => RestartPolicy {
            name: Some(RestartPolicyNameEnum::ALWAYS),
            maximum_retry_count: None,
        },
        PodRestart::Never => RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        },
        PodRestart::OnFailure | PodRestart::Unspecified => RestartPolicy {
            name: Some(RestartPolicyNameEnum::ON_FAILURE),
            maximum_retry_count: Some(i64::from(settings.max_restarts)),
        },
    }
}

/// The container-create body for a pod: everything Docker is told, in one pure function so
/// tests can check it without an engine (or a GPU).
pub fn container_config(
    settings: &DockerSettings,
    assignment: &Assignment,
    pod: &PodSpec,
) -> Result<ContainerCreateBody, String> {
    if !pod.env_sealed.is_empty() {
        let mut keys: Vec<&str> = pod.env_sealed.keys().map(String::as_str).collect();
        keys.sort_unstable();
        return Err(format!(
            "the secret env values {} could not be delivered: the control plane could not open \
             them (kiln-scheduler needs the API's KILN_SECRETS_KEY)",
            keys.join(", ")
        ));
    }
    let org = pod_org(assignment);
    let mut labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_NODE.to_owned(), settings.node_id.clone()),
        (
            LABEL_ASSIGNMENT.to_owned(),
            assignment.assignment_id.clone(),
        ),
        (
            LABEL_GENERATION.to_owned(),
            assignment.generation.to_string(),
        ),
    ]);
    if let Some(org) = &org {
        labels.insert(LABEL_ORG.to_owned(), org.clone());
    }
    let mut env: BTreeMap<String, String> = pod
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let devices = visible_devices(pod, settings.gpu_device_requests)?;
    let mut device_requests = None;
    if let Some(devices) = &devices {
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), devices.clone());
        env.insert(
            "NVIDIA_DRIVER_CAPABILITIES".into(),
            "compute,utility".into(),
        );
        if settings.gpu_device_requests {
            device_requests = Some(vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(devices.split(',').map(str::to_owned).collect()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]);
        }
    }
    let mut exposed = HashMap::new();
    let mut bindings = HashMap::new();
    for p in &pod.ports {
        let key = port_key(p.port, p.protocol);
        exposed.insert(key.clone(), HashMap::new());
        bindings.insert(
            key,
            Some(vec![PortBinding {
                host_ip: Some(settings.publish_address.clone()),
                host_port: Some(String::new()),
            }]),
        );
    }
    let host_config = HostConfig {
        nano_cpus: (pod.cpu_millis > 0).then(|| i64::from(pod.cpu_millis) * 1_000_000),
        memory: (pod.memory_mib > 0)
            .then(|| i64::try_from(pod.memory_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
        // No swap beyond the memory limit: the limit is the limit.
        memory_swap: (pod.memory_mib > 0)
            .then(|| i64::try_from(pod.memory_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: None,
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        readonly_rootfs: Some(settings.read_only_rootfs),
        network_mode: Some(settings.network_for(org.as_deref())),
        pid_mode: Some(String::new()),
        ipc_mode: Some("private".into()),
        init: Some(settings.init),
        port_bindings: Some(bindings),
        publish_all_ports: Some(false),
        restart_policy: Some(restart_policy(pod, settings)),
        device_requests,
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(pod.image.clone()),
        // The command replaces the image's entrypoint; empty keeps the image's own.
        entrypoint: (!pod.command.is_empty()).then(|| pod.command.clone()),
        cmd: (!pod.command.is_empty()).then(Vec::new),
        env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        exposed_ports: Some(exposed),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// What the converge task last said about an assignment that has no usable container yet.
#[derive(Debug, Clone)]
enum Progress {
    Starting(String),
    Failed(String),
}

struct Inner {
    docker: Docker,
    settings: DockerSettings,
    desired: Mutex<BTreeMap<String, Assignment>>,
    progress: Mutex<BTreeMap<String, (u64, Progress)>>,
    removed: Mutex<BTreeMap<String, (u64, Instant)>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per assignment: the generation last converged and the milliseconds it spent in Docker.
    runtime_ms: Mutex<BTreeMap<String, (u64, u64)>>,
    logs: LogShipper,
    changes: Arc<tokio::sync::Notify>,
}

/// Runs pods as Docker containers. Cheap to clone (shared state).
#[derive(Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn docker_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        e => e.to_string(),
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

/// The image reference to pull: a bare name means its `latest` tag (Docker would pull every
/// tag otherwise).
fn pull_reference(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// A container's state, as the contract says it.
pub fn observe_container(
    id: &str,
    generation: u64,
    c: &ContainerInspectResponse,
    ports: &[kiln_proto::node::v1::PortSpec],
) -> ObservedAssignment {
    let state = c.state.clone().unwrap_or_default();
    let restarts = c.restart_count.unwrap_or(0);
    let restarted = |s: String| {
        if restarts > 0 {
            format!(
                "{s} (restarted {restarts} time{})",
                if restarts == 1 { "" } else { "s" }
            )
        } else {
            s
        }
    };
    let exit = state.exit_code.unwrap_or(0);
    let mut o = match state.status {
        Some(ContainerStateStatusEnum::RUNNING) => observed(
            id,
            generation,
            ObservedState::Running,
            restarted(String::new()),
        ),
        Some(ContainerStateStatusEnum::PAUSED) => {
            observed(id, generation, ObservedState::Running, "paused")
        }
        Some(ContainerStateStatusEnum::CREATED) => {
            observed(id, generation, ObservedState::Starting, "container created")
        }
        Some(ContainerStateStatusEnum::RESTARTING) => observed(
            id,
            generation,
            ObservedState::Starting,
            format!("container exited {exit}; restarting (restart {restarts})"),
        ),
        Some(ContainerStateStatusEnum::REMOVING) => observed(
            id,
            generation,
            ObservedState::Stopping,
            "container removing",
        ),
        Some(ContainerStateStatusEnum::EXITED) | Some(ContainerStateStatusEnum::DEAD) => {
            let (st, reason) = if state.oom_killed == Some(true) {
                (
                    ObservedState::Failed,
                    format!("container exited {exit}: out of memory"),
                )
            } else if exit == 0 && state.status != Some(ContainerStateStatusEnum::DEAD) {
                (ObservedState::Stopped, "container exited 0".to_owned())
            } else {
                (ObservedState::Failed, format!("container exited {exit}"))
            };
            let mut o = observed(id, generation, st, restarted(reason));
            o.exit_code = Some(i32::try_from(exit).unwrap_or(-1));
            o
        }
        _ => observed(
            id,
            generation,
            ObservedState::Starting,
            "container state unknown",
        ),
    };
    if let Some(map) = c.network_settings.as_ref().and_then(|n| n.ports.as_ref()) {
        for p in ports {
            let host_port = map
                .get(&port_key(p.port, p.protocol))
                .and_then(|b| b.as_ref())
                .and_then(|b| {
                    b.iter()
                        .filter_map(|b| b.host_port.as_deref()?.parse::<u32>().ok())
                        .next()
                });
            if let Some(host_port) = host_port {
                o.ports.push(ObservedPort {
                    port: p.port,
                    protocol: if p.protocol == Protocol::Udp as i32 {
                        Protocol::Udp as i32
                    } else {
                        Protocol::Tcp as i32
                    },
                    host_port,
                });
            }
        }
    }
    o
}

fn pod_of(a: &Assignment) -> Option<&PodSpec> {
    match &a.kind {
        Some(Kind::Pod(p)) => Some(p),
        _ => None,
    }
}

fn load_specs(path: &Path) -> std::io::Result<Vec<Assignment>> {
    match std::fs::read(path) {
        Ok(bytes) => AssignmentSnapshot::decode(bytes.as_slice())
            .map(|s| s.assignments)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

impl DockerRuntime {
    /// Connects to the engine (negotiating the API version) and checks that it answers.
    pub async fn connect(settings: DockerSettings) -> Result<Self, ConnectError> {
        if !settings.socket.exists() {
            return Err(ConnectError::NoSocket(settings.socket.clone()));
        }
        let engine = |source| ConnectError::Engine {
            socket: settings.socket.clone(),
            source,
        };
        let docker = Docker::connect_with_socket(
            &settings.socket.to_string_lossy(),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(engine)?;
        let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .map_err(|_| engine(DockerError::RequestTimeoutError))?
            .map_err(engine)?;
        tokio::time::timeout(Duration::from_secs(5), docker.ping())
            .await
            .map_err(|_| engine(DockerError::RequestTimeoutError))?
            .map_err(engine)?;
        Ok(Self {
            inner: Arc::new(Inner {
                docker,
                settings,
                desired: Mutex::default(),
                progress: Mutex::default(),
                removed: Mutex::default(),
                locks: Mutex::default(),
                runtime_ms: Mutex::default(),
                logs: LogShipper::new(),
                changes: Arc::default(),
            }),
        })
    }

    /// The pods' output, for `PushLogs` (`None` after the first call: one consumer).
    pub fn log_lines(&self) -> Option<tokio::sync::mpsc::Receiver<kiln_proto::node::v1::LogLine>> {
        self.inner.logs.lines()
    }

    /// The shipper the pods' output goes through (shared with other runtimes, one channel).
    pub fn log_shipper(&self) -> LogShipper {
        self.inner.logs.clone()
    }

    /// Notified when one of this node's containers starts, dies, is OOM-killed or removed.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.inner.changes.clone()
    }

    /// Follows Docker's event stream for this node's containers (resubscribing after an
    /// engine restart) and wakes [`Self::changes`], until the runtime is dropped elsewhere.
    pub fn spawn_event_watch(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let (docker, node, changes) = {
                    let Some(inner) = weak.upgrade() else { return };
                    (
                        inner.docker.clone(),
                        inner.settings.node_id.clone(),
                        inner.changes.clone(),
                    )
                };
                let filters = HashMap::from([
                    ("type".to_owned(), vec!["container".to_owned()]),
                    ("label".to_owned(), vec![format!("{LABEL_NODE}={node}")]),
                    (
                        "event".to_owned(),
                        ["start", "die", "oom", "destroy"]
                            .map(str::to_owned)
                            .to_vec(),
                    ),
                ]);
                let mut events = docker.events(Some(EventsOptions {
                    filters: Some(filters),
                    ..Default::default()
                }));
                while let Some(event) = events.next().await {
                    if event.is_err() {
                        break;
                    }
                    if weak.strong_count() == 0 {
                        return;
                    }
                    changes.notify_one();
                }
                // The engine went away (or restarted): try again shortly.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    /// Takes back the pods a previous run applied (their specs from [`SPECS_FILE`]), and
    /// returns the applied pods whose spec was not kept (the agent must ask the control plane
    /// for them again).
    pub fn restore(&self, applied: &AppliedState) -> Vec<String> {
        let specs = match &self.inner.settings.specs_path {
            Some(path) => load_specs(path).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "could not read the kept pod specs");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let mut desired = self.inner.desired.lock().expect("not poisoned");
        for a in specs {
            if applied
                .assignments
                .get(&a.assignment_id)
                .is_some_and(|x| x.generation == a.generation && x.kind == SpecKind::Pod)
            {
                desired.insert(a.assignment_id.clone(), a);
            }
        }
        applied
            .assignments
            .iter()
            .filter(|(id, x)| x.kind == SpecKind::Pod && !desired.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn docker(&self) -> &Docker {
        &self.inner.docker
    }

    pub fn settings(&self) -> &DockerSettings {
        &self.inner.settings
    }

    /// Runs [`Self::reconcile`] now and then every `reconcile_interval`, until the runtime is
    /// dropped everywhere else.
    pub fn spawn_reconciler(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.settings.reconcile_interval;
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                DockerRuntime { inner }.reconcile().await;
                tokio::time::sleep(interval).await;
            }
        })
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

    fn persist(&self) {
        let Some(path) = &self.inner.settings.specs_path else {
            return;
        };
        let snapshot = AssignmentSnapshot {
            assignments: self
                .inner
                .desired
                .lock()
                .expect("not poisoned")
                .values()
                .cloned()
                .collect(),
        };
        // The specs hold the pods' env (secrets included): owner-only.
        if let Err(e) = crate::fsutil::write_atomic(path, &snapshot.encode_to_vec(), 0o600) {
            tracing::error!(path = %path.display(), error = %e, "could not keep the pod specs");
        }
    }

    fn set_progress(&self, id: &str, generation: u64, p: Progress) {
        self.inner
            .progress
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned(), (generation, p));
    }

    fn desired_generation(&self, id: &str) -> Option<u64> {
        self.inner
            .desired
            .lock()
            .expect("not poisoned")
            .get(id)
            .map(|a| a.generation)
    }

    /// Records the pod and converges it, waiting up to `apply_wait`.
    pub async fn apply(&self, assignment: &Assignment) -> ObservedAssignment {
        let id = assignment.assignment_id.clone();
        self.inner.removed.lock().expect("not poisoned").remove(&id);
        self.inner
            .desired
            .lock()
            .expect("not poisoned")
            .insert(id.clone(), assignment.clone());
        self.inner
            .progress
            .lock()
            .expect("not poisoned")
            .remove(&id);
        self.persist();
        self.set_progress(
            &id,
            assignment.generation,
            Progress::Starting("creating container".into()),
        );
        let this = self.clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move { this.converge(&task_id).await });
        let _ = tokio::time::timeout(self.inner.settings.apply_wait, task).await;
        let observed = self.observe_one(&id).await;
        // This observation's inspect is Docker time on the way to running too: later
        // observations of this generation report it with the converge's.
        let inspect_ms = observed
            .runtime_ms
            .saturating_sub(self.converge_ms(&id, assignment.generation));
        if let Some((g, ms)) = self
            .inner
            .runtime_ms
            .lock()
            .expect("not poisoned")
            .get_mut(&id)
            && *g == assignment.generation
        {
            *ms = ms.saturating_add(inspect_ms);
        }
        observed
    }

    /// The Docker time recorded for this generation so far (0 if none).
    fn converge_ms(&self, id: &str, generation: u64) -> u64 {
        self.inner
            .runtime_ms
            .lock()
            .expect("not poisoned")
            .get(id)
            .filter(|(g, _)| *g == generation)
            .map(|(_, ms)| *ms)
            .unwrap_or(0)
    }

    /// Stops (SIGTERM, `stop_timeout`, SIGKILL) and removes the pod's container.
    pub async fn remove(&self, id: &str, generation: u64) -> Result<(), RuntimeError> {
        {
            let mut desired = self.inner.desired.lock().expect("not poisoned");
            if desired.get(id).is_some_and(|a| a.generation > generation) {
                return Ok(());
            }
            desired.remove(id);
        }
        self.persist();
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.inner.progress.lock().expect("not poisoned").remove(id);
        let name = self.inner.settings.container_name(id);
        self.stop_and_remove(&name)
            .await
            .map_err(|e| RuntimeError::Remove {
                assignment_id: id.to_owned(),
                message: docker_message(&e),
            })?;
        self.inner
            .removed
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned(), (generation, Instant::now()));
        self.inner.logs.forget(id);
        Ok(())
    }

    async fn stop_and_remove(&self, name: &str) -> Result<(), DockerError> {
        let docker = &self.inner.docker;
        let t = i32::try_from(self.inner.settings.stop_timeout.as_secs()).unwrap_or(i32::MAX);
        match docker
            .stop_container(
                name,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // 304: already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => {
                tracing::warn!(container = name, error = %e, "graceful stop failed; removing by force")
            }
        }
        match docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: a removal is already in progress.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes the node match one assignment: create (pulling first) or start its container,
    /// replacing one of another generation. Failures end up in `progress`.
    async fn converge(&self, id: &str) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(a) = self
            .inner
            .desired
            .lock()
            .expect("not poisoned")
            .get(id)
            .cloned()
        else {
            return;
        };
        let generation = a.generation;
        let started = Instant::now();
        let converged = self.converge_locked(&a).await;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner
            .runtime_ms
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned(), (generation, ms));
        if let Err(reason) = converged {
            tracing::warn!(assignment = id, generation, %reason, "pod failed to start");
            if self.desired_generation(id) == Some(generation) {
                self.set_progress(id, generation, Progress::Failed(reason));
            }
        }
    }

    async fn converge_locked(&self, a: &Assignment) -> Result<(), String> {
        let docker = &self.inner.docker;
        let settings = &self.inner.settings;
        let id = &a.assignment_id;
        let name = settings.container_name(id);
        let Some(pod) = pod_of(a) else {
            return Err("not a pod".into());
        };
        match docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => {
                let same = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.as_ref())
                    .and_then(|l| l.get(LABEL_GENERATION))
                    .is_some_and(|g| *g == a.generation.to_string());
                if same {
                    // Adopt it; start it only if it was never started.
                    if c.state.and_then(|s| s.status) == Some(ContainerStateStatusEnum::CREATED) {
                        self.start(&name).await?;
                    }
                    self.clear_progress(id, a.generation);
                    return Ok(());
                }
                self.set_progress(
                    id,
                    a.generation,
                    Progress::Starting("replacing the container of an older generation".into()),
                );
                self.stop_and_remove(&name).await.map_err(|e| {
                    format!("could not remove the old container: {}", docker_message(&e))
                })?;
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("docker: {}", docker_message(&e))),
        }
        let config = container_config(settings, a, pod)?;
        self.ensure_image(id, a.generation, &pod.image).await?;
        let network = config
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default();
        self.ensure_network(&network, pod_org(a).as_deref()).await?;
        self.set_progress(
            id,
            a.generation,
            Progress::Starting("creating container".into()),
        );
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    platform: String::new(),
                }),
                config,
            )
            .await
            .map_err(|e| format!("could not create the container: {}", docker_message(&e)))?;
        self.start(&name).await?;
        // Tail at once: a short-lived container's output is there before any observation.
        self.inner.logs.follow(docker, id, &name);
        self.clear_progress(id, a.generation);
        tracing::info!(assignment = %id, generation = a.generation, container = %name, "pod container started");
        Ok(())
    }

    fn clear_progress(&self, id: &str, generation: u64) {
        let mut p = self.inner.progress.lock().expect("not poisoned");
        if p.get(id).is_some_and(|(g, _)| *g == generation) {
            p.remove(id);
        }
    }

    async fn start(&self, name: &str) -> Result<(), String> {
        self.inner
            .docker
            .start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(|e| format!("could not start the container: {}", docker_message(&e)))
    }

    async fn ensure_image(&self, id: &str, generation: u64, image: &str) -> Result<(), String> {
        let docker = &self.inner.docker;
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("docker: {}", docker_message(&e))),
        }
        let cannot =
            |m: String| format!("image {image} not found locally and cannot be pulled: {m}");
        self.set_progress(id, generation, Progress::Starting("pulling image".into()));
        let mut stream = docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(pull_reference(image)),
                ..Default::default()
            }),
            None,
            None,
        );
        let mut layers: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + self.inner.settings.pull_timeout;
        loop {
            let item = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => return Err(cannot("the pull timed out".into())),
                Ok(None) => break,
                Ok(Some(item)) => item,
            };
            if self.desired_generation(id) != Some(generation) {
                return Err("the pod was removed or changed while its image was pulling".into());
            }
            let info = item.map_err(|e| cannot(docker_message(&e)))?;
            if let Some(err) = info.error_detail.and_then(|d| d.message).or(info.error) {
                return Err(cannot(err));
            }
            let (Some(layer), Some(status)) = (info.id, info.status) else {
                continue;
            };
            let entry = layers.entry(layer).or_insert((0, 0));
            match status.as_str() {
                "Downloading" => {
                    if let Some(d) = info.progress_detail {
                        *entry = (d.current.unwrap_or(0), d.total.unwrap_or(entry.1));
                    }
                }
                "Download complete" | "Pull complete" | "Already exists" | "Extracting" => {
                    entry.0 = entry.1;
                }
                _ => {}
            }
            let (current, total) = layers
                .values()
                .fold((0i64, 0i64), |(c, t), (lc, lt)| (c + lc, t + lt));
            if total > 0 {
                let pct = (current.saturating_mul(100) / total).clamp(0, 100);
                self.set_progress(
                    id,
                    generation,
                    Progress::Starting(format!("pulling image {pct}%")),
                );
            }
        }
        // A pull that "succeeded" without the image is still a failure.
        docker
            .inspect_image(image)
            .await
            .map(|_| ())
            .map_err(|e| cannot(docker_message(&e)))
    }

    async fn ensure_network(&self, name: &str, org: Option<&str>) -> Result<(), String> {
        let docker = &self.inner.docker;
        match docker
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("docker: {}", docker_message(&e))),
        }
        let mut labels = HashMap::from([(LABEL_MANAGED.to_owned(), "true".to_owned())]);
        if let Some(org) = org {
            labels.insert(LABEL_ORG.to_owned(), org.to_owned());
        }
        match docker
            .create_network(NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some("bridge".into()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
        {
            Ok(_) => Ok(()),
            // Created meanwhile by another pod.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(format!(
                "could not create the network {name}: {}",
                docker_message(&e)
            )),
        }
    }

    /// This node's containers, by assignment id.
    async fn list_managed(&self) -> Result<BTreeMap<String, (String, u64)>, DockerError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_NODE}={}", self.inner.settings.node_id),
            ],
        )]);
        let list = self
            .inner
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?;
                let id = labels.get(LABEL_ASSIGNMENT)?.clone();
                let generation = labels
                    .get(LABEL_GENERATION)
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(0);
                Some((id, (c.id?, generation)))
            })
            .collect())
    }

    /// Makes the engine match the desired pods: adopts, replaces, recreates, removes.
    pub async fn reconcile(&self) {
        let containers = match self.list_managed().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "could not list pod containers");
                return;
            }
        };
        let desired: Vec<(String, u64)> = self
            .inner
            .desired
            .lock()
            .expect("not poisoned")
            .values()
            .map(|a| (a.assignment_id.clone(), a.generation))
            .collect();
        for (id, (container, _)) in &containers {
            if self.desired_generation(id).is_none() {
                let lock = self.lock_for(id);
                let _guard = lock.lock().await;
                if self.desired_generation(id).is_none() {
                    tracing::info!(assignment = %id, %container, "removing a pod container no assignment wants");
                    if let Err(e) = self.stop_and_remove(container).await {
                        tracing::warn!(assignment = %id, error = %e, "could not remove a stray pod container");
                    }
                }
            }
        }
        for (id, generation) in desired {
            let failed = matches!(
                self.inner.progress.lock().expect("not poisoned").get(&id),
                Some((g, Progress::Failed(_))) if *g == generation
            );
            let matches = containers.get(&id).is_some_and(|(_, g)| *g == generation);
            if !matches && !failed {
                if !containers.contains_key(&id) {
                    tracing::info!(assignment = %id, generation, "pod container missing; recreating");
                }
                self.converge(&id).await;
            }
        }
    }

    async fn observe_one(&self, id: &str) -> ObservedAssignment {
        let Some(a) = self
            .inner
            .desired
            .lock()
            .expect("not poisoned")
            .get(id)
            .cloned()
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
        let progress = self
            .inner
            .progress
            .lock()
            .expect("not poisoned")
            .get(id)
            .filter(|(g, _)| *g == a.generation)
            .map(|(_, p)| p.clone());
        match progress {
            Some(Progress::Starting(r)) => {
                return observed(id, a.generation, ObservedState::Starting, r);
            }
            Some(Progress::Failed(r)) => {
                return observed(id, a.generation, ObservedState::Failed, r);
            }
            None => {}
        }
        let name = self.inner.settings.container_name(id);
        let inspect_started = Instant::now();
        let inspected = self
            .inner
            .docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await;
        let inspect_ms = u64::try_from(inspect_started.elapsed().as_millis()).unwrap_or(0);
        match inspected {
            Ok(c) => {
                let generation = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.as_ref())
                    .and_then(|l| l.get(LABEL_GENERATION))
                    .and_then(|g| g.parse::<u64>().ok());
                if generation != Some(a.generation) {
                    return observed(
                        id,
                        a.generation,
                        ObservedState::Starting,
                        "replacing the container of another generation",
                    );
                }
                let ports = pod_of(&a).map(|p| p.ports.as_slice()).unwrap_or(&[]);
                let started = c.state.as_ref().and_then(|s| s.status)
                    != Some(ContainerStateStatusEnum::CREATED);
                if started {
                    // Tails end when a container stops; a restarted one is followed again.
                    self.inner.logs.follow(&self.inner.docker, id, &name);
                }
                let mut o = observe_container(id, a.generation, &c, ports);
                o.runtime_ms = self
                    .inner
                    .runtime_ms
                    .lock()
                    .expect("not poisoned")
                    .get(id)
                    .filter(|(g, _)| *g == a.generation)
                    // The converge's Docker calls, and this observation's own inspect.
                    .map(|(_, ms)| ms.saturating_add(inspect_ms))
                    .unwrap_or(0);
                o
            }
            Err(e) if is_not_found(&e) => observed(
                id,
                a.generation,
                ObservedState::Starting,
                "container missing; recreating it",
            ),
            Err(e) => observed(
                id,
                a.generation,
                ObservedState::Unspecified,
                format!("cannot see the container: {}", docker_message(&e)),
            ),
        }
    }

    /// Every pod this runtime has, plus the recently removed ones (`STOPPED`).
    pub async fn observe_all(&self) -> Vec<ObservedAssignment> {
        let ids: Vec<String> = self
            .inner
            .desired
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

    /// Whether this runtime holds the assignment.
    pub fn holds(&self, id: &str) -> bool {
        self.desired_generation(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::node::v1::{GpuAllocation, MigSlice, PortSpec, WholeGpus};

    fn pod() -> PodSpec {
        PodSpec {
            org_id: String::new(),
            image: "kiln/x:1".into(),
            command: vec!["/bin/app".into(), "--serve".into()],
            env: [("A".to_owned(), "1".to_owned())].into(),
            ports: vec![PortSpec {
                port: 8000,
                protocol: Protocol::Tcp as i32,
                name: "http".into(),
            }],
            cpu_millis: 1500,
            memory_mib: 512,
            gpus: Some(GpuAllocation {
                kind: Some(GpuKind::Whole(WholeGpus {
                    gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
                })),
            }),
            restart_policy: 0,
            env_sealed: Default::default(),
        }
    }

    fn assignment(pod: PodSpec) -> Assignment {
        Assignment {
            trace_parent: String::new(),
            assignment_id: "asg_1".into(),
            generation: 4,
            kind: Some(Kind::Pod(pod)),
        }
    }

    #[test]
    fn create_options_are_hardened_and_limited() {
        let s = DockerSettings::new("node_x");
        let c = container_config(&s, &assignment(pod()), &pod()).unwrap();
        let labels = c.labels.unwrap();
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!(labels[LABEL_NODE], "node_x");
        assert_eq!(labels[LABEL_ASSIGNMENT], "asg_1");
        assert_eq!(labels[LABEL_GENERATION], "4");
        assert!(!labels.contains_key(LABEL_ORG));
        let env = c.env.unwrap();
        assert!(env.contains(&"A=1".to_owned()));
        assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b".to_owned()));
        assert!(env.contains(&"NVIDIA_DRIVER_CAPABILITIES=compute,utility".to_owned()));
        assert_eq!(c.entrypoint.unwrap(), ["/bin/app", "--serve"]);
        let h = c.host_config.unwrap();
        assert_eq!(h.nano_cpus, Some(1_500_000_000));
        assert_eq!(h.memory, Some(512 << 20));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(h.cap_add, None);
        assert_eq!(h.security_opt.unwrap(), ["no-new-privileges:true"]);
        assert_eq!(h.network_mode.as_deref(), Some("kiln-pods"));
        assert_eq!(h.readonly_rootfs, Some(false));
        assert_eq!(
            h.device_requests, None,
            "no device request on a simulated host"
        );
        let b = &h.port_bindings.unwrap()["8000/tcp"].clone().unwrap()[0];
        assert_eq!(b.host_ip.as_deref(), Some("0.0.0.0"));
        assert_eq!(b.host_port.as_deref(), Some(""));
        let r = h.restart_policy.unwrap();
        assert_eq!(r.name, Some(RestartPolicyNameEnum::ON_FAILURE));
        assert_eq!(r.maximum_retry_count, Some(3));
    }

    #[test]
    fn restart_policies_map_to_dockers() {
        let s = DockerSettings::new("n");
        let policy = |p: PodRestart| {
            let mut spec = pod();
            spec.restart_policy = p as i32;
            let c = container_config(&s, &assignment(spec.clone()), &spec).unwrap();
            c.host_config.unwrap().restart_policy.unwrap()
        };
        assert_eq!(
            policy(PodRestart::Always).name,
            Some(RestartPolicyNameEnum::ALWAYS)
        );
        assert_eq!(
            policy(PodRestart::Never).name,
            Some(RestartPolicyNameEnum::NO)
        );
        let r = policy(PodRestart::OnFailure);
        assert_eq!(r.name, Some(RestartPolicyNameEnum::ON_FAILURE));
        assert_eq!(r.maximum_retry_count, Some(3));
    }

    #[test]
    fn sealed_env_values_are_never_passed_on() {
        let mut spec = pod();
        spec.env_sealed = [("TOKEN".to_owned(), "c2VhbGVk".to_owned())].into();
        let err = container_config(&DockerSettings::new("n"), &assignment(spec.clone()), &spec)
            .unwrap_err();
        assert!(err.contains("TOKEN could not be delivered"), "{err}");
    }

    #[test]
    fn nvml_hosts_request_exactly_the_assigned_devices() {
        let s = DockerSettings {
            gpu_device_requests: true,
            ..DockerSettings::new("n")
        };
        let c = container_config(&s, &assignment(pod()), &pod()).unwrap();
        let d = c.host_config.unwrap().device_requests.unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(d[0].device_ids.as_ref().unwrap(), &["GPU-a", "GPU-b"]);
        let mut mig = pod();
        mig.gpus = Some(GpuAllocation {
            kind: Some(GpuKind::Mig(MigSlice {
                gpu_uuid: "GPU-a".into(),
                profile: "1g.10gb".into(),
                start: 0,
                mig_device_uuid: "MIG-123".into(),
            })),
        });
        let c = container_config(&s, &assignment(mig.clone()), &mig).unwrap();
        let d = c.host_config.unwrap().device_requests.unwrap();
        assert_eq!(d[0].device_ids.as_ref().unwrap(), &["MIG-123"]);
        assert!(
            c.env
                .unwrap()
                .contains(&"NVIDIA_VISIBLE_DEVICES=MIG-123".into())
        );
        if let Some(GpuKind::Mig(m)) = mig.gpus.as_mut().and_then(|g| g.kind.as_mut()) {
            m.mig_device_uuid.clear();
        }
        assert!(container_config(&s, &assignment(mig.clone()), &mig).is_err());
    }

    #[test]
    fn cpu_only_pods_get_no_gpu_env_and_orgs_get_their_network() {
        let mut p = pod();
        p.gpus = None;
        p.command.clear();
        let s = DockerSettings::new("n");
        let c = container_config(&s, &assignment(p.clone()), &p).unwrap();
        assert!(!c.env.unwrap().iter().any(|e| e.starts_with("NVIDIA_")));
        assert_eq!(c.entrypoint, None);
        assert_eq!(s.network_for(Some("org_ABC")), "kiln-org-org_abc");
        assert_eq!(s.network_for(None), "kiln-pods");
    }

    #[test]
    fn bare_image_names_pull_latest() {
        assert_eq!(pull_reference("busybox"), "busybox:latest");
        assert_eq!(pull_reference("kiln/x:1"), "kiln/x:1");
        assert_eq!(pull_reference("reg:5000/x"), "reg:5000/x:latest");
        assert_eq!(pull_reference("x@sha256:ab"), "x@sha256:ab");
    }

    #[test]
    fn container_states_map_to_observed_states() {
        use bollard::models::ContainerState;
        let c = |status, exit, oom| ContainerInspectResponse {
            state: Some(ContainerState {
                status: Some(status),
                exit_code: Some(exit),
                oom_killed: Some(oom),
                ..Default::default()
            }),
            ..Default::default()
        };
        let o = observe_container("a", 1, &c(ContainerStateStatusEnum::RUNNING, 0, false), &[]);
        assert_eq!(o.state, ObservedState::Running as i32);
        let o = observe_container("a", 1, &c(ContainerStateStatusEnum::CREATED, 0, false), &[]);
        assert_eq!(o.state, ObservedState::Starting as i32);
        let o = observe_container("a", 1, &c(ContainerStateStatusEnum::EXITED, 0, false), &[]);
        assert_eq!(o.state, ObservedState::Stopped as i32);
        let o = observe_container("a", 1, &c(ContainerStateStatusEnum::EXITED, 3, false), &[]);
        assert_eq!(o.state, ObservedState::Failed as i32);
        assert_eq!(o.reason, "container exited 3");
        assert_eq!(o.exit_code, Some(3));
        let o = observe_container("a", 1, &c(ContainerStateStatusEnum::EXITED, 137, true), &[]);
        assert_eq!(o.reason, "container exited 137: out of memory");
        assert_eq!(o.state, ObservedState::Failed as i32);
    }
}

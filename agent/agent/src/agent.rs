//! The agent: start-up checks, joining, and the session loop that dials the control plane.
//!
//! One session is: connect → `Register` → then, concurrently, heartbeats, a `StreamMetrics`
//! client stream, and `WatchAssignments` from the persisted applied revision (with observed-state
//! reports after each applied event and on a timer). Any failure ends the session, and the next
//! one starts after an exponential backoff with full jitter. A credential the control plane
//! rejects ends the agent (exit code 3): spinning on it would help nobody.

// The contract only grows (fields are added, never changed): building the wire messages with
// `..Default::default()` keeps this crate compiling, and correct, when a field is added.
#![allow(clippy::needless_update)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_inventory::{GpuSource, HostInventory, InventoryError, SourceKind};
use kiln_proto::node::v1 as pb;
use kiln_proto::node::v1::node_control_client::NodeControlClient;
use tokio::sync::{Mutex, watch};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument as _;

use crate::backoff::{Backoff, StuckDetector};
use crate::config::{Config, ConfigError};
use crate::credential::{Credential, CredentialError};
use crate::runtime::{Runtime, now_unix_ms};
use crate::state::{Action, AppliedState, StateError, Step};
use crate::{capacity, convert, load};

/// How long a TCP (and HTTP/2) connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most lines sent in one `LogBatch`.
const LOG_BATCH_LINES: usize = 512;
/// Pause before pushing output again after the control plane refused it.
const LOG_RETRY: Duration = Duration::from_secs(5);

/// Completes when the runtime says a workload changed; never without a runtime that says so.
async fn runtime_changed(changes: Option<&tokio::sync::Notify>) {
    match changes {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// HTTP/2 PING interval and how long to wait for its answer: a cut network is noticed within
/// about ten seconds even while no call is in flight.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on each unary call.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat interval when the server names none, and the range its answer is clamped to.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
const MAX_HEARTBEAT: Duration = Duration::from_secs(300);
/// Heartbeats the watch stream may stay behind the server's latest revision before the session
/// is restarted.
const STUCK_AFTER_HEARTBEATS: u32 = 3;
/// How long a stop waits for the metrics stream's summary.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How a run of the agent ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Asked to stop (SIGTERM/SIGINT).
    Stopped,
    /// The control plane rejected the node credential: revoked, or the node retired.
    Revoked { message: String },
}

/// Why the agent refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{0} (for kiln-agent: `[gpu.simulated] inventory = \"…\"` in the config file, or \
         --simulated-inventory)"
    )]
    NoGpuSource(InventoryError),
    #[error(transparent)]
    Gpu(InventoryError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("could not create the state directory {}", dir.display())]
    StateDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "this node has no credential ({}) and no bootstrap token: ask an operator for one \
         (`kiln admin node-token`) and pass it in KILN_AGENT_BOOTSTRAP_TOKEN or \
         `bootstrap_token_file`",
        credential.display()
    )]
    NoCredential { credential: std::path::PathBuf },
    #[error("the control plane refused the bootstrap token: {message}")]
    JoinRefused { message: String },
    #[error("invalid control-plane address {url:?}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the node credential cannot be sent as gRPC metadata (it is not ASCII text)")]
    BadCredential,
}

impl AgentError {
    /// The process exit code: every start-up refusal is 2.
    pub fn exit_code(&self) -> i32 {
        2
    }
}

/// Why a session ended (the agent reconnects after any of these, except a rejected credential).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("could not connect to the control plane")]
    Connect(#[source] tonic::transport::Error),
    #[error("{call} failed: {}: {}", status.code(), status.message())]
    Rpc { call: &'static str, status: Status },
    #[error("{call} timed out after {}s", RPC_TIMEOUT.as_secs())]
    Timeout { call: &'static str },
    #[error(
        "the control plane speaks protocol {server}, this agent {agent}: a different major version"
    )]
    Incompatible {
        server: pb::ProtocolVersion,
        agent: pb::ProtocolVersion,
    },
    #[error("the assignment stream ended")]
    WatchEnded,
    #[error(
        "the assignment stream looks stuck: the control plane has revision {latest}, this agent \
         has applied {applied} for {STUCK_AFTER_HEARTBEATS}+ heartbeats"
    )]
    WatchStuck { latest: u64, applied: u64 },
    #[error("the control plane closed the metrics stream")]
    MetricsClosed,
    #[error("could not read the GPU inventory")]
    Inventory(#[source] InventoryError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl SessionError {
    /// Whether the control plane rejected the credential (UNAUTHENTICATED on a call that
    /// carried it).
    pub fn is_revoked(&self) -> bool {
        matches!(self, SessionError::Rpc { status, .. } if status.code() == Code::Unauthenticated)
    }
}

/// Sends `authorization: Bearer <credential>` on every call it wraps.
#[derive(Clone)]
pub struct Bearer(AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert(kiln_proto::auth::AUTHORIZATION, self.0.clone());
        Ok(request)
    }
}

type Client = NodeControlClient<InterceptedService<Channel, Bearer>>;

/// A stop request that every part of the agent can wait for.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when a stop is requested (or the sender is gone).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// The control plane's address as a tonic endpoint with bounded connects and HTTP/2 keepalive.
pub fn endpoint(url: &str) -> Result<Endpoint, AgentError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|source| AgentError::Endpoint {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .tcp_nodelay(true))
}

async fn rpc<T>(
    call: &'static str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(SessionError::Rpc { call, status }),
        Err(_) => Err(SessionError::Timeout { call }),
    }
}

/// Starts the agent and runs it until it is stopped or its credential is rejected.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<Outcome, AgentError> {
    let opened = kiln_inventory::open_source(&config.gpu).map_err(|e| match e {
        InventoryError::NoSource { .. } => AgentError::NoGpuSource(e),
        e => AgentError::Gpu(e),
    })?;
    match &opened.kind {
        SourceKind::Nvml => tracing::info!("GPU source: NVML"),
        SourceKind::Simulated { inventory } => tracing::info!(
            inventory = %inventory.display(),
            nvml = %opened.nvml_unavailable.as_ref().map(|e| e.to_string()).unwrap_or_default(),
            "GPU source: simulated inventory (NVML not used)"
        ),
    }
    let source: Arc<dyn GpuSource> = Arc::from(opened.source);
    let host = source.inventory().map_err(AgentError::Gpu)?;

    crate::fsutil::ensure_dir(&config.state_dir).map_err(|source| AgentError::StateDir {
        dir: config.state_dir.clone(),
        source,
    })?;
    let credential_path = config.credential_path();
    let credential = match Credential::load(&credential_path)? {
        Some(c) => {
            if c.control_plane != config.control_plane {
                tracing::warn!(
                    issued_by = %c.control_plane,
                    control_plane = %config.control_plane,
                    "the node credential was issued by another control-plane address"
                );
            }
            tracing::info!(node = %c.node_id, path = %credential_path.display(), "using the stored node credential");
            c
        }
        None => {
            let Some(token) = config.bootstrap_token()? else {
                return Err(AgentError::NoCredential {
                    credential: credential_path,
                });
            };
            match join(&config, &token, &host.hostname, &shutdown).await? {
                Some(c) => {
                    c.save(&credential_path)?;
                    tracing::info!(node = %c.node_id, path = %credential_path.display(), "joined the fleet; node credential saved");
                    c
                }
                None => return Ok(Outcome::Stopped),
            }
        }
    };

    let bearer = kiln_proto::auth::bearer(&credential.node_credential)
        .map_err(|_| AgentError::BadCredential)?;
    let state_path = config.state_path();
    let mut state = AppliedState::load(&state_path)?;
    if state.node_id != credential.node_id {
        if state.applied_revision > 0 || !state.assignments.is_empty() {
            tracing::warn!(
                state_node = %state.node_id,
                node = %credential.node_id,
                "the applied state belongs to another node identity; starting from nothing"
            );
        }
        state = AppliedState {
            node_id: credential.node_id.clone(),
            ..AppliedState::default()
        };
        state.save(&state_path)?;
    }
    tracing::info!(
        applied_revision = state.applied_revision,
        assignments = state.assignments.len(),
        "applied state loaded"
    );

    let docker = docker_runtime(&config, &opened.kind, &credential.node_id).await;
    if let Some(d) = &docker {
        let lost = d.restore(&state);
        if !lost.is_empty() {
            // Applied before this agent kept pod specs (or the file was lost): forget them and
            // start from a snapshot, which sends them again.
            tracing::warn!(pods = ?lost, "no kept spec for some applied pods; asking the control plane for a snapshot");
            for id in &lost {
                state.assignments.remove(id);
            }
            state.applied_revision = 0;
            state.save(&state_path)?;
        }
        d.spawn_reconciler();
        d.spawn_event_watch();
    }
    let changes = docker.as_ref().map(|d| d.changes()).unwrap_or_default();
    // One channel for all workloads' output: pods' and instances' consoles.
    let shipper = docker.as_ref().map(|d| d.log_shipper()).unwrap_or_default();
    let qemu = qemu_runtime(
        &config,
        &source,
        &opened.kind,
        shipper.clone(),
        changes.clone(),
    );
    if let Some(q) = &qemu {
        let lost = q.restore(&state);
        if !lost.is_empty() {
            tracing::warn!(instances = ?lost, "no kept spec for some applied instances; asking the control plane for a snapshot");
            for id in &lost {
                state.assignments.remove(id);
            }
            state.applied_revision = 0;
            state.save(&state_path)?;
        }
    }
    let changes = Some(changes);
    let log_lines = shipper.lines().map(|rx| Arc::new(Mutex::new(rx)));
    let runtime = crate::runtime::NodeRuntime::restore(docker, qemu, &state);
    let agent = Agent {
        endpoint: endpoint(&config.control_plane)?,
        bearer: Bearer(bearer),
        node_id: credential.node_id.clone(),
        capacity: capacity::host_capacity(&config.capacity, &config.state_dir),
        metrics_interval: config.metrics_interval(),
        observed_interval: config.observed_interval(),
        public_address: config.runtime.advertised_address(),
        state_path,
        sampler: Sampler {
            node_id: credential.node_id.clone(),
            source: source.clone(),
            pending_xids: Arc::default(),
        },
        source,
        host: std::sync::Mutex::new(host),
        runtime,
        applied: AtomicU64::new(state.applied_revision),
        state: Mutex::new(state),
        metrics_unsupported: AtomicBool::new(false),
        observed_unsupported: AtomicBool::new(false),
        changes,
        log_lines,
        logs_unsupported: AtomicBool::new(false),
    };
    agent.set_loads(&*agent.state.lock().await);
    Ok(agent.run_sessions(&shutdown).await)
}

/// The QEMU runtime for instances, per `[runtime] qemu`: `None` when disabled or when QEMU is
/// not installed (instances then stay pending).
fn qemu_runtime(
    config: &Config,
    source: &Arc<dyn kiln_inventory::GpuSource>,
    gpu: &SourceKind,
    logs: crate::logs::LogShipper,
    changes: Arc<tokio::sync::Notify>,
) -> Option<crate::qemu::QemuRuntime> {
    if config.runtime.qemu == crate::config::QemuPolicy::Disabled {
        tracing::info!("instances: QEMU disabled by configuration; instances stay pending");
        return None;
    }
    let image_dir = if config.runtime.vm_image_dir.as_os_str().is_empty() {
        config.state_dir.join("vm-images")
    } else {
        config.runtime.vm_image_dir.clone()
    };
    let mut settings = crate::qemu::QemuSettings::new(config.state_dir.join("vms"), image_dir);
    settings.host_address = config.runtime.publish_address.clone();
    settings.port_range = config.runtime.vm_port_min..=config.runtime.vm_port_max;
    settings.powerdown_timeout = Duration::from_millis(config.runtime.vm_powerdown_timeout_ms);
    settings.start_timeout = Duration::from_millis(config.runtime.vm_start_timeout_ms);
    settings.accel = match config.runtime.vm_accel {
        crate::config::VmAccel::Auto => None,
        crate::config::VmAccel::Kvm => Some(crate::qemu::launch::Accel::Kvm),
        crate::config::VmAccel::Tcg => Some(crate::qemu::launch::Accel::Tcg),
    };
    if matches!(gpu, SourceKind::Nvml) {
        settings.passthrough = Some(crate::qemu::PassthroughSettings {
            sysfs_root: "/sys".into(),
            gpu_bus_ids: source
                .inventory()
                .map(|inv| {
                    inv.gpus
                        .iter()
                        .map(|g| (g.uuid.clone(), g.pci_bus_id.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let installed = std::process::Command::new(&settings.qemu_binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        tracing::warn!(
            "instances: {} is not installed; instances stay pending (set `[runtime] qemu = \"disabled\"` to silence this)",
            settings.qemu_binary.display()
        );
        return None;
    }
    match crate::qemu::QemuRuntime::new(settings, logs, changes) {
        Ok(q) => {
            tracing::info!(vm_dir = %q.settings().vm_dir.display(), image_dir = %q.settings().image_dir.display(), passthrough = q.settings().passthrough.is_some(), "instances: running in QEMU");
            Some(q)
        }
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "instances: QEMU is not usable; instances stay pending");
            None
        }
    }
}

/// The Docker runtime for pods, per `[runtime] docker`: `None` when disabled or when the
/// engine does not answer (pods then stay pending, and a warning says why).
async fn docker_runtime(
    config: &Config,
    gpu: &SourceKind,
    node_id: &str,
) -> Option<crate::docker::DockerRuntime> {
    if config.runtime.docker == crate::config::DockerPolicy::Disabled {
        tracing::info!("pods: Docker disabled by configuration; pods stay pending");
        return None;
    }
    let settings = crate::docker::DockerSettings {
        socket: config.runtime.docker_socket.clone(),
        gpu_device_requests: matches!(gpu, SourceKind::Nvml),
        publish_address: config.runtime.publish_address.clone(),
        reconcile_interval: Duration::from_millis(config.runtime.reconcile_interval_ms),
        read_only_rootfs: config.runtime.read_only_rootfs,
        specs_path: Some(config.state_dir.join(crate::docker::SPECS_FILE)),
        ..crate::docker::DockerSettings::new(node_id)
    };
    match crate::docker::DockerRuntime::connect(settings).await {
        Ok(d) => {
            tracing::info!(socket = %config.runtime.docker_socket.display(), gpu_device_requests = d.settings().gpu_device_requests, "pods: running in Docker");
            Some(d)
        }
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "pods: Docker is not usable; pods stay pending (set `[runtime] docker = \"disabled\"` to silence this)");
            None
        }
    }
}

/// Trades the bootstrap token for a credential, retrying while the control plane is
/// unreachable. `Ok(None)` when stopped meanwhile.
async fn join(
    config: &Config,
    token: &str,
    hostname: &str,
    shutdown: &Shutdown,
) -> Result<Option<Credential>, AgentError> {
    let endpoint = endpoint(&config.control_plane)?;
    let mut backoff = Backoff::default();
    loop {
        let attempt = async {
            let channel = endpoint.connect().await.map_err(SessionError::Connect)?;
            let mut client = NodeControlClient::new(channel);
            rpc(
                "Join",
                client.join(pb::JoinRequest {
                    bootstrap_token: token.to_owned(),
                    hostname: hostname.to_owned(),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    protocol_version: Some(pb::PROTOCOL_VERSION),
                    ..Default::default()
                }),
            )
            .await
        };
        let result = tokio::select! {
            r = attempt => r,
            () = shutdown.wait() => return Ok(None),
        };
        match result {
            Ok(r) => {
                return Ok(Some(Credential {
                    node_id: r.node_id,
                    node_credential: r.node_credential,
                    control_plane: config.control_plane.clone(),
                }));
            }
            Err(SessionError::Rpc { status, .. })
                if matches!(
                    status.code(),
                    Code::Unauthenticated
                        | Code::InvalidArgument
                        | Code::FailedPrecondition
                        | Code::PermissionDenied
                ) =>
            {
                return Err(AgentError::JoinRefused {
                    message: status.message().to_owned(),
                });
            }
            Err(e) => {
                let delay = backoff.next_delay(Duration::ZERO, &mut rand::thread_rng());
                tracing::warn!(error = %error_chain(&e), retry_in_ms = delay.as_millis() as u64, "could not join yet");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => return Ok(None),
                }
            }
        }
    }
}

/// An error and its sources, `: `-separated, for one log field.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Reads the GPUs for heartbeats and metrics reports. Shared with the metrics stream, which
/// tonic drives on its own task.
#[derive(Clone)]
struct Sampler {
    node_id: String,
    source: Arc<dyn GpuSource>,
    /// XID events a heartbeat's sample consumed, for the next metrics report (each XID is
    /// reported by one sample only).
    pending_xids: Arc<std::sync::Mutex<Vec<(String, pb::XidEvent)>>>,
}

impl Sampler {
    /// Per-GPU health for a heartbeat, keeping any XID events for the next metrics report.
    fn health(&self) -> Vec<pb::GpuHealthStatus> {
        match self.source.sample() {
            Ok(samples) => {
                let now = now_unix_ms();
                let mut pending = self.pending_xids.lock().expect("not poisoned");
                for s in &samples {
                    for x in convert::sample(s, now).xid_events {
                        pending.push((s.uuid.clone(), x));
                    }
                }
                convert::health_statuses(&samples)
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not sample GPU health for the heartbeat");
                Vec::new()
            }
        }
    }

    fn metrics_report(&self) -> Option<pb::MetricsReport> {
        let samples = match self.source.sample() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not sample the GPUs; skipping this metrics report");
                return None;
            }
        };
        let now = now_unix_ms();
        let mut samples: Vec<pb::GpuSample> =
            samples.iter().map(|s| convert::sample(s, now)).collect();
        for (uuid, xid) in self.pending_xids.lock().expect("not poisoned").drain(..) {
            if let Some(s) = samples.iter_mut().find(|s| s.uuid == uuid) {
                s.xid_events.insert(0, xid);
            }
        }
        Some(pb::MetricsReport {
            node_id: self.node_id.clone(),
            sampled_at_unix_ms: now,
            samples,
            ..Default::default()
        })
    }
}

/// A joined agent's long-lived parts, shared by the concurrent halves of a session.
struct Agent<R: Runtime> {
    endpoint: Endpoint,
    bearer: Bearer,
    node_id: String,
    capacity: pb::HostCapacity,
    metrics_interval: Duration,
    observed_interval: Duration,
    /// Registered as where tenants reach this host's published ports.
    public_address: String,
    state_path: std::path::PathBuf,
    source: Arc<dyn GpuSource>,
    /// The inventory as last registered (for GPU UUID → index).
    host: std::sync::Mutex<HostInventory>,
    runtime: R,
    /// The persisted applied revision, for heartbeats.
    applied: AtomicU64,
    /// Only the watch half changes it.
    state: Mutex<AppliedState>,
    sampler: Sampler,
    metrics_unsupported: AtomicBool,
    observed_unsupported: AtomicBool,
    /// Woken when the runtime sees a workload change (a container died): report at once.
    changes: Option<Arc<tokio::sync::Notify>>,
    /// Workload output waiting for `PushLogs`.
    log_lines: Option<Arc<Mutex<tokio::sync::mpsc::Receiver<pb::LogLine>>>>,
    logs_unsupported: AtomicBool,
}

impl<R: Runtime> Agent<R> {
    async fn run_sessions(&self, shutdown: &Shutdown) -> Outcome {
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            match self.session(shutdown).await {
                Ok(()) => return Outcome::Stopped,
                Err(e) if e.is_revoked() => {
                    let message = match &e {
                        SessionError::Rpc { status, .. } => status.message().to_owned(),
                        _ => e.to_string(),
                    };
                    tracing::error!(
                        node = %self.node_id,
                        error = %error_chain(&e),
                        "the control plane rejected this node's credential: it was revoked (or the node retired); \
                         this node must join again with a new bootstrap token (remove credential.json from the \
                         state directory and start with KILN_AGENT_BOOTSTRAP_TOKEN set)"
                    );
                    return Outcome::Revoked { message };
                }
                Err(e) => {
                    if shutdown.requested() {
                        return Outcome::Stopped;
                    }
                    let lasted = started.elapsed();
                    let delay = backoff.next_delay(lasted, &mut rand::thread_rng());
                    tracing::warn!(
                        error = %error_chain(&e),
                        session_s = lasted.as_secs(),
                        retry_in_ms = delay.as_millis() as u64,
                        "session with the control plane ended; reconnecting"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => return Outcome::Stopped,
                    }
                }
            }
        }
    }

    /// One session; `Ok(())` only when stopped.
    async fn session(&self, shutdown: &Shutdown) -> Result<(), SessionError> {
        let connected = tokio::select! {
            r = self.connect_and_register() => r?,
            () = shutdown.wait() => return Ok(()),
        };
        let (client, heartbeat_interval) = connected;
        tokio::select! {
            r = self.heartbeats(client.clone(), heartbeat_interval) => r,
            r = self.watch(client.clone()) => r,
            r = self.metrics(client.clone(), shutdown) => r,
            r = self.push_logs(client.clone(), shutdown) => r,
            () = async { shutdown.wait().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
        }
    }

    async fn connect_and_register(&self) -> Result<(Client, Duration), SessionError> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(SessionError::Connect)?;
        let mut client = NodeControlClient::with_interceptor(channel, self.bearer.clone());
        let host = self.source.inventory().map_err(SessionError::Inventory)?;
        let inventory = convert::host_inventory(&host);
        let gpus = host.gpus.len();
        *self.host.lock().expect("not poisoned") = host;
        let reply = rpc(
            "Register",
            client.register(pb::RegisterRequest {
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol_version: Some(pb::PROTOCOL_VERSION),
                inventory: Some(inventory),
                capacity: Some(self.capacity),
                public_address: self.public_address.clone(),
                ..Default::default()
            }),
        )
        .await?;
        if let Some(server) = reply.protocol_version
            && !server.is_compatible_with(&pb::PROTOCOL_VERSION)
        {
            return Err(SessionError::Incompatible {
                server,
                agent: pb::PROTOCOL_VERSION,
            });
        }
        let interval = match reply.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms.into()).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT),
        };
        tracing::info!(
            node = %reply.node_id,
            gpus,
            heartbeat_interval_ms = interval.as_millis() as u64,
            node_state = node_state_name(reply.node_state),
            server_protocol = %reply.protocol_version.map(|v| v.to_string()).unwrap_or_default(),
            "registered with the control plane"
        );
        Ok((client, interval))
    }

    async fn heartbeats(&self, mut client: Client, first: Duration) -> Result<(), SessionError> {
        let mut interval = first;
        let mut stuck = StuckDetector::new(STUCK_AFTER_HEARTBEATS);
        let mut last_state = None;
        loop {
            let gpu_health = self.sampler.health();
            let applied = self.applied.load(Ordering::Acquire);
            let reply = rpc(
                "Heartbeat",
                client.heartbeat(pb::HeartbeatRequest {
                    node_id: self.node_id.clone(),
                    sent_at_unix_ms: now_unix_ms(),
                    last_applied_revision: applied,
                    gpu_health,
                    ..Default::default()
                }),
            )
            .await?;
            if last_state != Some(reply.node_state) {
                tracing::info!(node_state = node_state_name(reply.node_state), "node state");
                last_state = Some(reply.node_state);
            }
            if reply.next_interval_ms > 0 {
                interval = Duration::from_millis(reply.next_interval_ms.into())
                    .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
            }
            let applied = self.applied.load(Ordering::Acquire);
            if stuck.observe(reply.latest_revision, applied) {
                return Err(SessionError::WatchStuck {
                    latest: reply.latest_revision,
                    applied,
                });
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// The metrics client stream. Ends the session if the server closes it; on a stop it
    /// closes the stream itself and waits for the server's summary.
    async fn metrics(&self, mut client: Client, shutdown: &Shutdown) -> Result<(), SessionError> {
        if self.metrics_unsupported.load(Ordering::Relaxed) {
            shutdown.wait().await;
            return Ok(());
        }
        let period = self.metrics_interval;
        let sampler = self.sampler.clone();
        let stop = shutdown.clone();
        let reports = futures::stream::unfold(true, move |first| {
            let sampler = sampler.clone();
            let shutdown = stop.clone();
            async move {
                loop {
                    if !first {
                        tokio::select! {
                            () = tokio::time::sleep(period) => {}
                            () = shutdown.wait() => return None,
                        }
                    }
                    if shutdown.requested() {
                        return None;
                    }
                    if let Some(report) = sampler.metrics_report() {
                        return Some((report, false));
                    }
                    if first {
                        // Sampling failed: wait a period before trying again.
                        tokio::select! {
                            () = tokio::time::sleep(period) => {}
                            () = shutdown.wait() => return None,
                        }
                    }
                }
            }
        })
        .boxed();
        match client.stream_metrics(reports).await {
            Ok(summary) => {
                let summary = summary.into_inner();
                tracing::info!(
                    reports = summary.reports_received,
                    samples = summary.samples_received,
                    "metrics stream closed"
                );
                if shutdown.requested() {
                    Ok(())
                } else {
                    Err(SessionError::MetricsClosed)
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "this control plane does not take metrics (StreamMetrics is unimplemented); not sending any"
                );
                self.metrics_unsupported.store(true, Ordering::Relaxed);
                shutdown.wait().await;
                Ok(())
            }
            Err(status) => Err(SessionError::Rpc {
                call: "StreamMetrics",
                status,
            }),
        }
    }

    /// The `PushLogs` client stream: workload output as it comes, in batches of what is ready.
    /// A control plane that keeps no logs (UNAVAILABLE) is asked again after a pause; one
    /// without the call (UNIMPLEMENTED) is not asked again. Never ends the session itself.
    async fn push_logs(&self, mut client: Client, shutdown: &Shutdown) -> Result<(), SessionError> {
        let Some(lines) = self.log_lines.clone() else {
            shutdown.wait().await;
            return Ok(());
        };
        loop {
            if self.logs_unsupported.load(Ordering::Relaxed) {
                // Drop output rather than let the runtime's channel fill up.
                let mut rx = lines.lock().await;
                loop {
                    tokio::select! {
                        line = rx.recv() => if line.is_none() { break },
                        () = shutdown.wait() => return Ok(()),
                    }
                }
                shutdown.wait().await;
                return Ok(());
            }
            let stop = shutdown.clone();
            let source = lines.clone();
            let batches = futures::stream::unfold((), move |()| {
                let source = source.clone();
                let stop = stop.clone();
                async move {
                    let mut rx = source.lock().await;
                    let first = tokio::select! {
                        line = rx.recv() => line?,
                        () = stop.wait() => return None,
                    };
                    let mut batch = vec![first];
                    while batch.len() < LOG_BATCH_LINES {
                        match rx.try_recv() {
                            Ok(line) => batch.push(line),
                            Err(_) => break,
                        }
                    }
                    Some((pb::LogBatch { lines: batch }, ()))
                }
            })
            .boxed();
            match client.push_logs(batches).await {
                Ok(ack) => {
                    tracing::debug!(accepted = ack.into_inner().accepted, "log stream closed");
                    if shutdown.requested() {
                        return Ok(());
                    }
                }
                Err(status) if status.code() == Code::Unimplemented => {
                    tracing::warn!(
                        "this control plane does not take workload output (PushLogs is unimplemented); dropping it"
                    );
                    self.logs_unsupported.store(true, Ordering::Relaxed);
                    continue;
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "workload output not taken; trying again shortly");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(LOG_RETRY) => {}
                () = shutdown.wait() => return Ok(()),
            }
        }
    }

    /// The assignment stream, resumed from the persisted revision, with observed-state
    /// reports after each applied event and on a timer.
    async fn watch(&self, mut client: Client) -> Result<(), SessionError> {
        let from_revision = self.state.lock().await.applied_revision;
        let mut stream = client
            .watch_assignments(pb::WatchRequest {
                node_id: self.node_id.clone(),
                from_revision,
                ..Default::default()
            })
            .await
            .map_err(|status| SessionError::Rpc {
                call: "WatchAssignments",
                status,
            })?
            .into_inner();
        tracing::info!(from_revision, "watching assignments");
        let mut first = true;
        let mut timer = tokio::time::interval(self.observed_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.message() => {
                    let event = message
                        .map_err(|status| SessionError::Rpc { call: "WatchAssignments", status })?
                        .ok_or(SessionError::WatchEnded)?;
                    let (applied, traced) = self.apply_event(event, first).await?;
                    first = false;
                    match (applied, traced) {
                        // The report of a traced assignment goes on in its trace.
                        (true, Some(span)) => {
                            self.report_observed(&mut client).instrument(span).await?;
                        }
                        (true, None) => self.report_observed(&mut client).await?,
                        (false, _) => {}
                    }
                }
                _ = timer.tick() => self.report_observed(&mut client).await?,
                () = runtime_changed(self.changes.as_deref()) => {
                    self.report_observed(&mut client).await?;
                }
            }
        }
    }

    /// Applies one event if it is new; true when it was applied (and persisted), with the span
    /// of the last assignment applied under a trace the control plane sent (`trace_parent`).
    async fn apply_event(
        &self,
        event: pb::AssignmentEvent,
        first: bool,
    ) -> Result<(bool, Option<tracing::Span>), SessionError> {
        let mut state = self.state.lock().await;
        let plan = match state.plan_in_stream(&event, first) {
            Step::AlreadyApplied {
                revision,
                applied_revision,
            } => {
                tracing::debug!(
                    revision,
                    applied_revision,
                    "ignoring an assignment event at or below the applied revision"
                );
                return Ok((false, None));
            }
            Step::Apply(plan) => plan,
        };
        if plan.revision < state.applied_revision {
            tracing::warn!(
                revision = plan.revision,
                applied_revision = state.applied_revision,
                "the control plane's revisions went backwards; resynchronising from its snapshot"
            );
        }
        for r in &plan.refused {
            tracing::warn!(
                revision = plan.revision,
                assignment = %r.assignment_id,
                offered_generation = r.offered_generation,
                applied_generation = r.applied_generation,
                "refusing an older {} than the applied generation",
                r.what
            );
        }
        let mut traced = None;
        for action in &plan.actions {
            match action {
                Action::Apply(a) => {
                    let observed = if a.trace_parent.is_empty() {
                        self.runtime.apply(a).await
                    } else {
                        let span = tracing::info_span!(
                            "apply assignment",
                            assignment = %a.assignment_id,
                            generation = a.generation
                        );
                        kiln_telemetry::set_remote_parent(&span, &a.trace_parent);
                        traced = Some(span.clone());
                        self.runtime.apply(a).instrument(span).await
                    };
                    tracing::debug!(assignment = %a.assignment_id, generation = a.generation, state = observed.state, reason = %observed.reason, "runtime applied assignment");
                }
                Action::Remove {
                    assignment_id,
                    generation,
                } => {
                    if let Err(e) = self.runtime.remove(assignment_id, *generation).await {
                        tracing::error!(error = %error_chain(&e), assignment = %assignment_id, "runtime could not remove assignment");
                    }
                }
            }
        }
        self.set_loads(&plan.next);
        plan.next.save(&self.state_path)?;
        *state = plan.next;
        self.applied.store(plan.revision, Ordering::Release);
        tracing::info!(
            revision = plan.revision,
            assignment = %plan.subject,
            kind = plan.kind.as_str(),
            "applied assignment event"
        );
        Ok((true, traced))
    }

    /// Tells the GPU source what is placed on each GPU now.
    fn set_loads(&self, state: &AppliedState) {
        let host = self.host.lock().expect("not poisoned");
        for (assignment, uuid) in load::unknown_gpus(&host, state) {
            tracing::warn!(%assignment, gpu = %uuid, "assignment names a GPU this host does not have");
        }
        for (index, l) in load::gpu_loads(&host, state) {
            if let Err(e) = self.source.set_load(index, l) {
                tracing::warn!(error = %error_chain(&e), gpu = index, "could not set GPU load");
            }
        }
    }

    async fn report_observed(&self, client: &mut Client) -> Result<(), SessionError> {
        if self.observed_unsupported.load(Ordering::Relaxed) {
            return Ok(());
        }
        let applied_revision = self.applied.load(Ordering::Acquire);
        let assignments = self.runtime.observe_all().await;
        let count = assignments.len();
        let mut request = tonic::Request::new(pb::ObservedReport {
            node_id: self.node_id.clone(),
            applied_revision,
            assignments,
            complete: true,
            ..Default::default()
        });
        // Under a traced assignment's span, the fleet service's handling joins its trace.
        if let Some(value) =
            kiln_telemetry::current_traceparent().and_then(|t| AsciiMetadataValue::try_from(t).ok())
        {
            request
                .metadata_mut()
                .insert(kiln_telemetry::TRACEPARENT, value);
        }
        match rpc("ReportObserved", client.report_observed(request)).await {
            Ok(ack) => {
                tracing::debug!(
                    applied_revision,
                    assignments = count,
                    recorded_revision = ack.recorded_revision,
                    "reported observed state"
                );
                Ok(())
            }
            Err(SessionError::Rpc { status, .. }) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "this control plane does not take observed state (ReportObserved is unimplemented); not sending any"
                );
                self.observed_unsupported.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

fn node_state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state).unwrap_or(pb::NodeState::Unspecified) {
        pb::NodeState::Unspecified => "unspecified",
        pb::NodeState::Ready => "ready",
        pb::NodeState::Cordoned => "cordoned",
        pb::NodeState::Draining => "draining",
        pb::NodeState::Unreachable => "unreachable",
        pb::NodeState::Lost => "lost",
        pb::NodeState::Retired => "retired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_means_revoked_and_nothing_else_does() {
        let e = SessionError::Rpc {
            call: "Heartbeat",
            status: Status::unauthenticated("revoked"),
        };
        assert!(e.is_revoked());
        for status in [
            Status::unavailable("down"),
            Status::permission_denied("x"),
            Status::unimplemented("x"),
        ] {
            assert!(
                !SessionError::Rpc {
                    call: "Heartbeat",
                    status
                }
                .is_revoked()
            );
        }
        assert!(!SessionError::WatchEnded.is_revoked());
    }

    #[test]
    fn endpoint_accepts_the_configured_address() {
        assert!(endpoint("http://127.0.0.1:7070").is_ok());
        assert!(endpoint("not a url").is_err());
    }
}

//! The control-plane side of the node-agent contract (`kiln.node.v1.NodeControl`).
//!
//! [`NodeControlService`] is a tonic service over the [`Store`]. Postgres holds every fact; the
//! service keeps only caches that may be lost (credential lookups for a few seconds) and the
//! [`WatchHub`], which wakes the assignment streams this replica holds when any replica (or the
//! scheduler, or the lifecycle controller) appends to a node's log. So any number of replicas
//! can serve agents behind a load balancer, and `kiln-scheduler` hosts it beside its own loops.
//!
//! * `Join` spends a one-time bootstrap token and mints the node's long-lived credential.
//! * Every other call is authenticated by that credential ([`NodeControlService::authenticate`]);
//!   a `node_id` in the request must be the credential's node.
//! * `Register` records the inventory; `Heartbeat` keeps the node online and carries GPU health;
//!   `StreamMetrics` records the newest sample per GPU and XID events; `ReportObserved` records
//!   what the agent sees; `WatchAssignments` replays the node's log from the agent's revision
//!   and follows it (see [`watch`]).

pub mod convert;
pub mod credentials;
pub mod hub;
pub mod logs;
pub mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_auth::OpaqueSecret;
use kiln_auth::SecretDigest;
use kiln_domain::NodeId;
use kiln_proto::node::v1::node_control_server::{NodeControl, NodeControlServer};
use kiln_proto::node::v1::{
    AssignmentEvent, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LogAck,
    LogBatch, MetricsReport, MetricsSummary, ObservedAck, ObservedReport, PROTOCOL_VERSION,
    RegisterRequest, RegisterResponse, WatchRequest,
};
use kiln_store::{AuditEvent, JoinError, NewNode, Store, StoreError};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

pub use credentials::CredentialCache;
pub use hub::WatchHub;

/// The text a node credential starts with (`kiln_ncr_…`). Distinct from bootstrap tokens
/// (`kiln_nbt_…`) and API keys (`kiln_` + 43), so a secret pasted in the wrong place is obvious.
pub const NODE_CREDENTIAL_PREFIX: &str = "kiln_ncr";

/// Longest hostname accepted (DNS's limit).
const MAX_HOSTNAME: usize = 253;
const MAX_AGENT_VERSION: usize = 64;

/// How long an unchanged GPU health report is skipped before it is written again.
const HEALTH_REWRITE: Duration = Duration::from_secs(60);

/// How the service talks to agents.
#[derive(Debug, Clone, Copy)]
pub struct FleetConfig {
    /// How often agents are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a verified credential is trusted without asking Postgres again. Revocations
    /// evict at once through `kiln_node_credentials`; this bounds how long a revocation whose
    /// notice was missed keeps working.
    pub credential_cache_ttl: Duration,
    /// How often an idle assignment stream re-reads the log even without a wake-up.
    pub stream_recheck: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            credential_cache_ttl: Duration::from_secs(60),
            stream_recheck: Duration::from_secs(30),
        }
    }
}

/// The `NodeControl` gRPC service.
#[derive(Clone, Debug)]
pub struct NodeControlService {
    store: Store,
    /// Where heartbeats and samples are written: may be a relaxed-durability pool
    /// ([`Store::connect_relaxed`]), since the next report restates them.
    liveness: Store,
    /// The GPU health last written per node, so an unchanged report costs no statement.
    health_written: Arc<Mutex<HashMap<NodeId, (u64, Instant)>>>,
    config: FleetConfig,
    hub: WatchHub,
    credentials: CredentialCache,
    /// Opens pods' sealed secret env values as assignments stream to their node.
    secrets: Option<kiln_auth::SecretBox>,
    /// Where pushed workload output goes; `None`: `PushLogs` is UNAVAILABLE.
    logs: Option<kiln_logs::LogStore>,
    /// Set when the server begins to shut down: the streams it holds end with UNAVAILABLE, so
    /// agents reconnect (through the load balancer, to another replica) instead of holding
    /// this one open.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl NodeControlService {
    /// The service, with its hub. Run [`WatchHub::run`] (as [`serve`] does) so streams hear of
    /// changes made elsewhere without waiting for their re-check timer.
    pub fn new(store: Store, config: FleetConfig) -> Self {
        let credentials = CredentialCache::new(config.credential_cache_ttl);
        Self {
            liveness: store.clone(),
            store,
            health_written: Arc::default(),
            config,
            hub: WatchHub::new(credentials.clone()),
            credentials,
            secrets: None,
            logs: None,
            stopping: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// End the streams this service holds (and refuse new ones): the server is shutting down.
    /// [`serve_service`] calls it when its shutdown future completes.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Completes once the service is shutting down.
    fn stopping(&self) -> impl Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stopping| *stopping).await;
        }
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Open pods' secret env values with the deployment's secrets key (`KILN_SECRETS_KEY`, the
    /// one the API seals them with). Without it, pods with secrets fail on their node.
    pub fn with_secrets(mut self, secrets: kiln_auth::SecretBox) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Keep the output agents push in `logs`.
    pub fn with_logs(mut self, logs: kiln_logs::LogStore) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Write heartbeats and metrics samples through `store` (e.g. a relaxed-durability pool).
    pub fn with_liveness_store(mut self, store: Store) -> Self {
        self.liveness = store;
        self
    }

    /// Whether this GPU health differs from what this replica last wrote for the node (or that
    /// was long enough ago to write again, in case another replica wrote something else).
    fn health_changed(&self, node: NodeId, health: &[kiln_store::GpuHealthReport]) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for r in health {
            (&r.uuid, r.health, &r.reason).hash(&mut h);
        }
        let digest = h.finish();
        let mut written = self
            .health_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match written.get(&node) {
            Some((d, at)) if *d == digest && at.elapsed() < HEALTH_REWRITE => false,
            _ => {
                written.insert(node, (digest, Instant::now()));
                true
            }
        }
    }

    fn forget_health(&self, node: NodeId) {
        let mut written = self
            .health_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        written.remove(&node);
    }

    pub fn hub(&self) -> &WatchHub {
        &self.hub
    }

    /// The tonic server wrapper, ready to add to a `Server` router.
    pub fn into_server(self) -> NodeControlServer<Self> {
        NodeControlServer::new(self)
    }

    /// The node a call's credential belongs to. Unknown, malformed or revoked credentials are
    /// UNAUTHENTICATED, with the way out in the message.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let Some(credential) = kiln_proto::auth::credential(request.metadata()) else {
            return Err(Status::unauthenticated(
                "missing node credential (authorization: Bearer <node credential>)",
            ));
        };
        let digest = SecretDigest::of(credential);
        if let Some(node) = self.credentials.get(&digest) {
            return Ok(node);
        }
        match self.store.node_authenticate(&digest).await {
            Ok(Some(node)) => {
                self.credentials.insert(&digest, node);
                Ok(node)
            }
            Ok(None) => {
                tracing::warn!(remote = ?request.remote_addr(), "node credential refused");
                Err(Status::unauthenticated(
                    "the node credential is unknown or was revoked; join again with a new \
                     bootstrap token (kiln admin node-token)",
                ))
            }
            Err(e) => Err(internal("authenticate", &e)),
        }
    }
}

/// A request's `node_id`, when set, must be the credential's node.
fn check_node(node: NodeId, claimed: &str) -> Result<(), Status> {
    if claimed.is_empty() || claimed == node.to_string() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "this credential belongs to {node}, not {claimed}"
        )))
    }
}

fn store_status(what: &str, e: StoreError) -> Status {
    match e {
        StoreError::NotFound { what } => Status::not_found(format!("{what} not found")),
        e => internal(what, &e),
    }
}

/// Serve `NodeControl` on `listener` until `shutdown` completes, with the watch hub listening.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    config: FleetConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = NodeControlService::new(store.clone(), config);
    serve_service(listener, service, store.pool().clone(), shutdown).await
}

/// Serve an existing service (its hub listening on `pool`) until `shutdown` completes.
pub async fn serve_service(
    listener: TcpListener,
    service: NodeControlService,
    pool: sqlx::PgPool,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let hub = tokio::spawn(service.hub().clone().run(pool));
    // Streams end first (they would hold the graceful drain open for good); unary calls in
    // flight finish.
    let stopping = service.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.begin_shutdown();
    };
    let served = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await;
    hub.abort();
    served
}

/// What a stream gets when this replica shuts down: the agent reconnects, to another one.
fn shutting_down() -> Status {
    Status::unavailable("this control-plane replica is shutting down; reconnect")
}

/// Log an unexpected failure with its chain and answer a generic INTERNAL.
fn internal(what: &str, err: &dyn std::error::Error) -> Status {
    let mut chain = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        chain.push_str(": ");
        chain.push_str(&e.to_string());
        src = e.source();
    }
    tracing::error!(error = %chain, "{what} failed");
    Status::internal("internal error; it has been logged")
}

impl NodeControlService {
    async fn join_inner(&self, request: Request<JoinRequest>) -> Result<JoinResponse, Status> {
        let remote = request.remote_addr();
        let join = request.into_inner();
        // Check the cheap things before the token is spent, so a malformed request does not
        // burn a good token.
        if let Some(agent) = &join.protocol_version
            && !agent.is_compatible_with(&PROTOCOL_VERSION)
        {
            return Err(Status::failed_precondition(format!(
                "the agent speaks protocol {agent}; this control plane speaks {PROTOCOL_VERSION}"
            )));
        }
        let hostname = join.hostname.trim();
        if hostname.is_empty() || hostname.len() > MAX_HOSTNAME {
            return Err(Status::invalid_argument(format!(
                "hostname must be 1 to {MAX_HOSTNAME} bytes"
            )));
        }
        let agent_version = join.agent_version.trim();
        if agent_version.len() > MAX_AGENT_VERSION {
            return Err(Status::invalid_argument(format!(
                "agent_version must be at most {MAX_AGENT_VERSION} bytes"
            )));
        }

        let token = SecretDigest::of(join.bootstrap_token.trim());
        let credential = OpaqueSecret::generate(NODE_CREDENTIAL_PREFIX);
        let mut tx = self.store.begin().await.map_err(|e| internal("join", &e))?;
        let joined = self
            .store
            .node_join(
                &mut tx,
                NewNode {
                    token: &token,
                    hostname,
                    agent_version,
                    credential: &credential.digest(),
                },
            )
            .await;
        let node_id = match joined {
            Ok(id) => id,
            Err(JoinError::Store(e)) => return Err(internal("join", &e)),
            Err(refused) => {
                tracing::warn!(
                    reason = %refused,
                    hostname,
                    agent_version,
                    remote = ?remote,
                    "node join refused"
                );
                return Err(Status::unauthenticated(format!(
                    "{refused}; ask an operator for a new one (kiln admin node-token)"
                )));
            }
        };
        let event = AuditEvent {
            org_id: None,
            actor_user: None,
            actor_api_key: None,
            action: "node.join",
            target: Some(node_id.to_string()),
            ip: remote.map(|a| a.ip().to_string()),
            details: serde_json::json!({ "hostname": hostname, "agent_version": agent_version }),
        };
        self.store
            .audit_record(&mut tx, &event)
            .await
            .map_err(|e| internal("join", &e))?;
        tx.commit().await.map_err(|e| internal("join", &e))?;
        tracing::info!(node = %node_id, hostname, agent_version, "node joined");
        Ok(JoinResponse {
            node_id: node_id.to_string(),
            node_credential: credential.expose().to_owned(),
            protocol_version: Some(PROTOCOL_VERSION),
        })
    }
}

impl NodeControlService {
    /// `ReportObserved`'s work, in whatever span the caller runs it.
    async fn observed(
        &self,
        request: Request<ObservedReport>,
    ) -> Result<Response<ObservedAck>, Status> {
        let node = self.authenticate(&request).await?;
        let report = request.into_inner();
        check_node(node, &report.node_id)?;
        let rows = convert::observed(&report)?;
        let outcome = self
            .store
            .observed_report(node, report.applied_revision, &rows, report.complete)
            .await
            .map_err(|e| store_status("report observed", e))?;
        if outcome.refused > 0 {
            tracing::warn!(%node, refused = outcome.refused, "observed report names other nodes' assignments");
            return Err(Status::permission_denied(format!(
                "{} entries name assignments of another node and were ignored; the rest were recorded",
                outcome.refused
            )));
        }
        Ok(Response::new(ObservedAck {
            recorded_revision: outcome.recorded_revision,
        }))
    }
}

#[tonic::async_trait]
impl NodeControl for NodeControlService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.join_inner(request).await.map(Response::new)
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let node = self.authenticate(&request).await?;
        let register = request.into_inner();
        let version = register.protocol_version.unwrap_or_default();
        if !version.is_compatible_with(&PROTOCOL_VERSION) {
            return Err(Status::failed_precondition(format!(
                "the agent speaks protocol {version}; this control plane speaks {PROTOCOL_VERSION}"
            )));
        }
        let registration = convert::registration(&register)?;
        let public_address = convert::public_address(&register.public_address)?;
        // A (re)registration starts over: the next heartbeat writes its GPU health.
        self.forget_health(node);
        let status = self
            .store
            .node_register(node, &registration)
            .await
            .map_err(|e| store_status("register", e))?;
        self.store
            .node_set_public_address(node, public_address)
            .await
            .map_err(|e| store_status("register", e))?;
        tracing::info!(
            %node,
            hostname = registration.hostname,
            gpus = registration.gpus.len(),
            agent_version = registration.agent_version,
            protocol = %version,
            "node registered"
        );
        Ok(Response::new(RegisterResponse {
            node_id: node.to_string(),
            heartbeat_interval_ms: millis(self.config.heartbeat_interval),
            protocol_version: Some(PROTOCOL_VERSION),
            node_state: convert::node_state(&status.state) as i32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let node = self.authenticate(&request).await?;
        let beat = request.into_inner();
        check_node(node, &beat.node_id)?;
        let mut health = convert::health_reports(&beat.gpu_health)?;
        if !self.health_changed(node, &health) {
            health.clear();
        }
        let status = self
            .liveness
            .node_heartbeat(node, beat.last_applied_revision, &health)
            .await
            .map_err(|e| {
                self.forget_health(node);
                store_status("heartbeat", e)
            })?;
        if let Some(was) = &status.recovered_from {
            tracing::info!(%node, was, state = status.state, "node is back");
        }
        Ok(Response::new(HeartbeatResponse {
            node_state: convert::node_state(&status.state) as i32,
            next_interval_ms: millis(self.config.heartbeat_interval),
            latest_revision: status.assignment_revision,
        }))
    }

    async fn stream_metrics(
        &self,
        request: Request<Streaming<MetricsReport>>,
    ) -> Result<Response<MetricsSummary>, Status> {
        let node = self.authenticate(&request).await?;
        let mut reports = request.into_inner();
        let mut summary = MetricsSummary::default();
        let mut stopping = std::pin::pin!(self.stopping());
        loop {
            let report = tokio::select! {
                report = reports.message() => report?,
                () = &mut stopping => return Err(shutting_down()),
            };
            let Some(report) = report else { break };
            check_node(node, &report.node_id)?;
            let samples = convert::samples(&report)?;
            self.liveness
                .node_metrics(node, &samples)
                .await
                .map_err(|e| store_status("metrics", e))?;
            record_gpu_metrics(node, &samples);
            summary.reports_received += 1;
            summary.samples_received += samples.len() as u64;
        }
        Ok(Response::new(summary))
    }

    type WatchAssignmentsStream = BoxStream<'static, Result<AssignmentEvent, Status>>;

    async fn watch_assignments(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let node = self.authenticate(&request).await?;
        if self.is_stopping() {
            return Err(shutting_down());
        }
        let watch = request.into_inner();
        check_node(node, &watch.node_id)?;
        let events = watch::stream(
            self.store.clone(),
            self.hub.clone(),
            node,
            watch.from_revision,
            self.config.stream_recheck,
            self.secrets.clone(),
        );
        // Ends with UNAVAILABLE when this replica shuts down (nothing more when the stream
        // ended on its own).
        let stopped = self.stopping.clone();
        let farewell = futures::stream::once(async move { *stopped.borrow() })
            .filter_map(|stopped| async move { stopped.then(|| Err(shutting_down())) });
        let events = events.take_until(self.stopping()).chain(farewell);
        Ok(Response::new(events.boxed()))
    }

    async fn report_observed(
        &self,
        request: Request<ObservedReport>,
    ) -> Result<Response<ObservedAck>, Status> {
        // A report sent under a traced assignment (gRPC metadata `traceparent`) is handled in
        // that trace.
        let parent = request
            .metadata()
            .get(kiln_telemetry::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match parent {
            Some(parent) => {
                let span = tracing::info_span!("ReportObserved", otel.kind = "server");
                kiln_telemetry::set_remote_parent(&span, &parent);
                self.observed(request).instrument(span).await
            }
            None => self.observed(request).await,
        }
    }

    async fn push_logs(
        &self,
        request: Request<Streaming<LogBatch>>,
    ) -> Result<Response<LogAck>, Status> {
        let node = self.authenticate(&request).await?;
        let Some(logs) = &self.logs else {
            return Err(Status::unavailable(
                "this control plane keeps no workload logs",
            ));
        };
        let mut stream = request.into_inner();
        let mut owners = logs::Owners::default();
        let mut accepted = 0u64;
        let mut stopping = std::pin::pin!(self.stopping());
        loop {
            let batch = tokio::select! {
                batch = stream.message() => batch?,
                () = &mut stopping => return Err(shutting_down()),
            };
            let Some(batch) = batch else { break };
            accepted += logs::store_batch(&self.store, logs, node, &mut owners, batch).await?;
        }
        Ok(Response::new(LogAck { accepted }))
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Per-GPU gauges from an agent's samples (`node`, `gpu` labels), as a DCGM exporter would
/// show them, and a counter of XID events per node.
fn record_gpu_metrics(node: NodeId, samples: &[kiln_store::GpuSampleReport]) {
    let node = node.to_string();
    for s in samples {
        let labels = [("node", node.clone()), ("gpu", s.uuid.clone())];
        if let Some(u) = s.sm_util_pct {
            metrics::gauge!("kiln_gpu_utilization_ratio", &labels).set(f64::from(u) / 100.0);
        }
        if let Some(m) = s.memory_used_mib {
            metrics::gauge!("kiln_gpu_memory_used_bytes", &labels).set(m as f64 * 1048576.0);
        }
        if let Some(t) = s.temperature_c {
            metrics::gauge!("kiln_gpu_temperature_celsius", &labels).set(f64::from(t));
        }
        if let Some(p) = s.power_w {
            metrics::gauge!("kiln_gpu_power_watts", &labels).set(p);
        }
        if !s.xids.is_empty() {
            metrics::counter!("kiln_gpu_xid_events_total", "node" => node.clone())
                .increment(s.xids.len() as u64);
        }
    }
}

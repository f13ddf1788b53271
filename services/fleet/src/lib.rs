//! The control-plane side of the node-agent contract (`kiln.node.v1.NodeControl`).
//!
//! [`NodeControlService`] is a plain tonic service over the [`Store`], with no state of its own,
//! so any number of replicas can serve it and the scheduler can host it beside its own work
//! ([`serve`] is the stand-alone way). Today only `Join` is real: it spends a one-time bootstrap
//! token and mints the node's long-lived credential. The other RPCs answer UNIMPLEMENTED, which
//! the contract tells agents to read as "not supported by this control plane".

use std::future::Future;

use futures::stream::BoxStream;
use kiln_auth::OpaqueSecret;
use kiln_auth::SecretDigest;
use kiln_proto::node::v1::node_control_server::{NodeControl, NodeControlServer};
use kiln_proto::node::v1::{
    AssignmentEvent, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, MetricsReport,
    MetricsSummary, ObservedAck, ObservedReport, PROTOCOL_VERSION, RegisterRequest,
    RegisterResponse, WatchRequest,
};
use kiln_store::{AuditEvent, JoinError, NewNode, Store};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// The text a node credential starts with (`kiln_ncr_…`). Distinct from bootstrap tokens
/// (`kiln_nbt_…`) and API keys (`kiln_` + 43), so a secret pasted in the wrong place is obvious.
pub const NODE_CREDENTIAL_PREFIX: &str = "kiln_ncr";

/// Longest hostname accepted (DNS's limit).
const MAX_HOSTNAME: usize = 253;
const MAX_AGENT_VERSION: usize = 64;

const NOT_YET: &str = "arrives with the node-agent issue";

/// The `NodeControl` gRPC service.
#[derive(Clone, Debug)]
pub struct NodeControlService {
    store: Store,
}

impl NodeControlService {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The tonic server wrapper, ready to add to a `Server` router.
    pub fn into_server(self) -> NodeControlServer<Self> {
        NodeControlServer::new(self)
    }
}

/// Serve `NodeControl` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(NodeControlService::new(store).into_server())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
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

#[tonic::async_trait]
impl NodeControl for NodeControlService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.join_inner(request).await.map(Response::new)
    }

    async fn register(
        &self,
        _request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn heartbeat(
        &self,
        _request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn stream_metrics(
        &self,
        _request: Request<Streaming<MetricsReport>>,
    ) -> Result<Response<MetricsSummary>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    type WatchAssignmentsStream = BoxStream<'static, Result<AssignmentEvent, Status>>;

    async fn watch_assignments(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn report_observed(
        &self,
        _request: Request<ObservedReport>,
    ) -> Result<Response<ObservedAck>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
}

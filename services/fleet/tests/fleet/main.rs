//! The node-control service end to end: a real tonic server on a loopback port over a per-test
//! database, called by the generated client, with tokens minted through the store as the
//! operator API does.

mod join;
mod logs;
mod talk;
mod watch;

use std::time::Duration;

use kiln_fleet::FleetConfig;
use kiln_proto::node::v1::node_control_client::NodeControlClient;
use kiln_proto::node::v1::{
    Gpu, HostCapacity, HostInventory, JoinRequest, PROTOCOL_VERSION, RegisterRequest,
};
use kiln_store::Store;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::Request;
use tonic::transport::Channel;

/// A running `NodeControl` server; dropping it shuts the server down.
pub struct Fleet {
    pub store: Store,
    pub client: NodeControlClient<Channel>,
    pub addr: std::net::SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

impl Fleet {
    pub async fn start(pool: PgPool) -> Self {
        Self::start_with(Store::new(pool)).await
    }

    /// Another server over the same database: a second replica.
    pub async fn start_with(store: Store) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let config = FleetConfig {
            heartbeat_interval: Duration::from_secs(1),
            // Long, so a test only passes if revocation notices evict credentials.
            credential_cache_ttl: Duration::from_secs(600),
            // Long, so a test only passes if the NOTIFY fan-out wakes streams.
            stream_recheck: Duration::from_secs(600),
        };
        tokio::spawn(kiln_fleet::serve(listener, store.clone(), config, async {
            let _ = rx.await;
        }));
        let client = NodeControlClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to the fleet server");
        Self {
            store,
            client,
            addr,
            _shutdown: tx,
        }
    }

    /// Mint a bootstrap token as the operator API does; returns the secret.
    pub async fn token(&self, ttl: Duration) -> String {
        kiln_testkit::fleet::bootstrap_token(&self.store, ttl).await
    }

    pub async fn join(
        &self,
        token: &str,
        hostname: &str,
    ) -> Result<(String, String), tonic::Status> {
        let r = self
            .client
            .clone()
            .join(JoinRequest {
                bootstrap_token: token.into(),
                hostname: hostname.into(),
                agent_version: "0.1.0".into(),
                protocol_version: Some(PROTOCOL_VERSION),
            })
            .await?
            .into_inner();
        Ok((r.node_id, r.node_credential))
    }

    /// A joined and registered node with `gpus` simulated GPUs: (node id, credential).
    pub async fn node(&self, hostname: &str, gpus: u32) -> (String, String) {
        let token = self.token(Duration::from_secs(600)).await;
        let (node, credential) = self.join(&token, hostname).await.expect("join");
        self.client
            .clone()
            .register(authed(&credential, register(hostname, gpus)))
            .await
            .expect("register");
        (node, credential)
    }
}

/// A request carrying a node credential.
pub fn authed<T>(credential: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        kiln_proto::auth::AUTHORIZATION,
        kiln_proto::auth::bearer(credential).unwrap(),
    );
    r
}

pub fn gpu_uuid(hostname: &str, index: u32) -> String {
    format!("GPU-{hostname}-{index}")
}

/// A registration of `gpus` H100s, all NVLink-connected.
pub fn register(hostname: &str, gpus: u32) -> RegisterRequest {
    let all: Vec<String> = (0..gpus).map(|i| gpu_uuid(hostname, i)).collect();
    RegisterRequest {
        agent_version: "0.1.0".into(),
        protocol_version: Some(PROTOCOL_VERSION),
        inventory: Some(HostInventory {
            hostname: hostname.into(),
            driver_version: "550.90.07".into(),
            cuda_version: "12.4".into(),
            gpus: (0..gpus)
                .map(|i| Gpu {
                    index: i,
                    uuid: gpu_uuid(hostname, i),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_mib: 81559,
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
                    numa_node: Some(i / 4),
                    mig_capable: true,
                    nvlink_peer_uuids: all
                        .iter()
                        .filter(|u| **u != gpu_uuid(hostname, i))
                        .cloned()
                        .collect(),
                    ..Gpu::default()
                })
                .collect(),
        }),
        capacity: Some(HostCapacity {
            cpu_cores: 64,
            memory_mib: 512 * 1024,
            disk_gib: 2000,
        }),
        public_address: String::new(),
    }
}

//! Fleet fixtures for tests that need nodes, GPUs and assignments without running agents:
//! rows written through the same store methods the node-control service uses.

use std::time::Duration;

use kiln_auth::{OpaqueSecret, SecretDigest};
use kiln_domain::{AssignmentId, Email, NodeId, Permission, PersonName, SessionId};
use kiln_store::{
    AssignmentKind, AssignmentPut, GpuRegistration, NewNode, NewNodeToken, NodeRegistration,
    OrgScope, Principal, Store,
};

/// Mint a one-time bootstrap token as `POST /v1/admin/node-tokens` does; answers the secret.
pub async fn bootstrap_token(store: &Store, ttl: Duration) -> String {
    let secret = OpaqueSecret::generate("kiln_nbt");
    let mut tx = store.begin().await.unwrap();
    store
        .node_token_create(
            &mut tx,
            NewNodeToken {
                digest: &secret.digest(),
                created_by: None,
                ttl,
                note: "test",
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    secret.expose().to_owned()
}

/// The UUID `registered_node` gives GPU `index` of `hostname`.
pub fn gpu_uuid(hostname: &str, index: u32) -> String {
    format!("GPU-{hostname}-{index}")
}

/// A joined, registered and heartbeating node `hostname` with `gpus` NVLinked H100 80GB GPUs
/// (two NUMA nodes, MIG mode `mig`), 64 cores, 512 GiB and 2 TB of disk. Its credential is
/// `cred-<hostname>`.
pub async fn registered_node(store: &Store, hostname: &str, gpus: u32, mig: bool) -> NodeId {
    let token = OpaqueSecret::generate("kiln_nbt");
    let mut tx = store.begin().await.unwrap();
    store
        .node_token_create(
            &mut tx,
            NewNodeToken {
                digest: &token.digest(),
                created_by: None,
                ttl: Duration::from_secs(60),
                note: "",
            },
        )
        .await
        .unwrap();
    let id = store
        .node_join(
            &mut tx,
            NewNode {
                token: &token.digest(),
                hostname,
                agent_version: "test",
                credential: &SecretDigest::of(&format!("cred-{hostname}")),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let uuids: Vec<String> = (0..gpus).map(|i| gpu_uuid(hostname, i)).collect();
    let gpus = (0..gpus)
        .map(|i| GpuRegistration {
            uuid: uuids[i as usize].clone(),
            index: i,
            model: "NVIDIA H100 80GB HBM3".into(),
            gpu_type: Some("h100-80gb".into()),
            memory_mib: 81559,
            pci_bus_id: format!("00000000:{:02X}:00.0", i + 0x18),
            numa_node: Some(i / 4),
            iommu_group: None,
            mig_capable: true,
            mig_enabled: mig,
            mig_instances: vec![],
            nvlink_peers: uuids
                .iter()
                .filter(|u| **u != uuids[i as usize])
                .cloned()
                .collect(),
        })
        .collect();
    store
        .node_register(
            id,
            &NodeRegistration {
                hostname: hostname.into(),
                agent_version: "test".into(),
                protocol_minor: 1,
                driver_version: "550".into(),
                cuda_version: "12.4".into(),
                cpu_cores: 64,
                memory_mib: 512 * 1024,
                disk_gib: 2000,
                gpus,
            },
        )
        .await
        .unwrap();
    store.node_heartbeat(id, 0, &[]).await.unwrap();
    id
}

/// A new user `who` and a scope of their personal org with `permission`.
pub async fn org_scope(store: &Store, who: &str, permission: Permission) -> OrgScope {
    let mut tx = store.begin().await.unwrap();
    let (user, org) = store
        .user_create_with_personal_org(
            &mut tx,
            &Email::parse("email", &format!("{who}@example.com")).unwrap(),
            &PersonName::parse("name", who).unwrap(),
            "not-a-real-hash",
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let principal = Principal::User {
        user_id: user.id,
        session_id: SessionId::new(),
        is_operator: false,
    };
    store
        .authorize(&principal, org.id, permission)
        .await
        .unwrap()
}

/// Put an assignment with `spec` (an encoded `kiln.node.v1.Assignment`) on `node`, as the
/// scheduler does; answers (revision, generation).
pub async fn put_assignment(
    store: &Store,
    node: NodeId,
    id: AssignmentId,
    spec: &[u8],
) -> (u64, u64) {
    let mut tx = store.begin().await.unwrap();
    let r = store
        .assignment_put(
            &mut tx,
            AssignmentPut {
                id,
                node,
                kind: AssignmentKind::Pod,
                spec,
                gpu_uuids: &[],
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r
}

//! Rows for the gateway to route by, written as the API, the scheduler and an agent would
//! leave them: an org with an API key, a node, and an endpoint whose one running replica
//! publishes port 8000 at an address the test (or benchmark) serves itself.

use std::net::SocketAddr;

use kiln_auth::ApiKeySecret;
use kiln_store::EndpointLimits;
use sqlx::PgPool;
use uuid::Uuid;

/// What [`seed_running_endpoint`] made.
pub struct SeededEndpoint {
    pub org_id: Uuid,
    pub endpoint_id: Uuid,
    /// The endpoint's public id (`ep_…`), as in its URL.
    pub endpoint: String,
    pub replica_id: Uuid,
    pub key: ApiKeySecret,
}

/// An org with one API key, a node at 127.0.0.1 and an endpoint with `limits` whose one
/// running replica is reached at `replica`.
pub async fn seed_running_endpoint(
    pool: &PgPool,
    replica: SocketAddr,
    limits: &EndpointLimits,
) -> Result<SeededEndpoint, sqlx::Error> {
    let (org, node, endpoint, workload, assignment) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let key = ApiKeySecret::generate();
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
        .bind(org)
        .bind(format!("org-{}", org.simple()))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO api_keys (id, org_id, name, prefix, secret_hash, role)
         VALUES ($1, $2, 'seeded', $3, $4, 'member')",
    )
    .bind(Uuid::now_v7())
    .bind(org)
    .bind(key.visible_prefix())
    .bind(key.digest().as_bytes().to_vec())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO nodes (id, hostname, agent_version, credential_hash, public_address)
         VALUES ($1, $2, 'seeded', $3, '127.0.0.1')",
    )
    .bind(node)
    .bind(format!("host-{}", node.simple()))
    .bind(Uuid::new_v4().as_bytes().to_vec())
    .execute(&mut *tx)
    .await?;
    let spec = serde_json::json!({"replica": {
        "tier": "on_demand", "gpu_mode": "none", "gpu_type": null, "gpu_count": 0,
        "mig_profile": null, "share_memory_mib": null, "cpu_millis": 100, "memory_mib": 128,
        "disk_gib": 1, "spec": {"image": "kiln/demo-model:1", "ports": [8000]}}});
    sqlx::query(
        "INSERT INTO endpoints (id, org_id, name, spec, port, min_replicas, max_replicas,
             desired_replicas, key_rate_per_s, key_burst, key_concurrency, total_rate_per_s,
             total_burst, total_concurrency)
         VALUES ($1, $2, 'seeded', $3, 8000, 1, 1, 1, $4, $5, $6, $7, $8, $9)",
    )
    .bind(endpoint)
    .bind(org)
    .bind(&spec)
    .bind(limits.per_key_rate.per_second)
    .bind(limits.per_key_rate.burst)
    .bind(limits.per_key_concurrency)
    .bind(limits.total_rate.map(|r| r.per_second))
    .bind(limits.total_rate.map(|r| r.burst))
    .bind(limits.total_concurrency)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO workloads (id, org_id, kind, name, state, gpu_mode, cpu_millis, memory_mib,
             node_id, assignment_id, endpoint_id)
         VALUES ($1, $2, 'endpoint_replica', 'seeded-0', 'running', 'none', 100, 128, $3, $4, $5)",
    )
    .bind(workload)
    .bind(org)
    .bind(node)
    .bind(assignment)
    .bind(endpoint)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO node_observed (assignment_id, node_id, generation, state, ports, observed_at)
         VALUES ($1, $2, 1, 'running', $3, now())",
    )
    .bind(assignment)
    .bind(node)
    .bind(serde_json::json!([{"port": 8000, "protocol": "tcp", "host_port": replica.port()}]))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SeededEndpoint {
        org_id: org,
        endpoint_id: endpoint,
        endpoint: format!("ep_{}", endpoint.simple()),
        replica_id: workload,
        key,
    })
}

//! `Join`: a one-time token buys one node its credential.

use std::time::Duration;

use kiln_auth::{OpaqueSecret, SecretDigest};
use kiln_domain::NodeId;
use kiln_proto::node::v1::HeartbeatRequest;
use sqlx::PgPool;
use tonic::Code;

use crate::Fleet;

#[track_caller]
fn assert_refused(r: Result<(String, String), tonic::Status>, says: &str) {
    let status = r.expect_err("the join must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_token_joins_one_node_once_and_the_credential_authenticates_until_revoked(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let token = fleet.token(Duration::from_secs(3600)).await;

    let (node_id, credential) = fleet.join(&token, "gpu-01").await.expect("join");
    let node: NodeId = node_id.parse().expect("a node_… id");
    assert!(credential.starts_with("kiln_ncr_"), "{credential}");

    let record = fleet.store.node_get(node).await.unwrap();
    assert_eq!(record.hostname, "gpu-01");
    assert_eq!(record.state, "ready");
    assert_eq!(record.agent_version, "0.1.0");

    // The same token again: refused, and no second node appears.
    assert_refused(fleet.join(&token, "gpu-02").await, "already used");
    let (nodes,): (i64,) = sqlx::query_as("SELECT count(*) FROM nodes")
        .fetch_one(fleet.store.pool())
        .await
        .unwrap();
    assert_eq!(nodes, 1);

    // The credential authenticates; the database holds only its digest.
    let digest = SecretDigest::of(&credential);
    assert_eq!(
        fleet.store.node_authenticate(&digest).await.unwrap(),
        Some(node)
    );
    assert_eq!(
        fleet
            .store
            .node_authenticate(&SecretDigest::of("kiln_ncr_forged"))
            .await
            .unwrap(),
        None
    );

    let mut tx = fleet.store.begin().await.unwrap();
    let revoked = fleet
        .store
        .node_credential_revoke(&mut tx, node)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(revoked.credential_revoked_at.is_some());
    assert_eq!(fleet.store.node_authenticate(&digest).await.unwrap(), None);

    // The join was audited.
    let (joins,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_events WHERE action = 'node.join' AND target = $1",
    )
    .bind(&node_id)
    .fetch_one(fleet.store.pool())
    .await
    .unwrap();
    assert_eq!(joins, 1);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn expired_and_forged_tokens_are_refused(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let token = fleet.token(Duration::from_secs(60)).await;
    sqlx::query(
        "UPDATE node_bootstrap_tokens
         SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 hour'",
    )
    .execute(fleet.store.pool())
    .await
    .unwrap();
    assert_refused(fleet.join(&token, "gpu-01").await, "expired");

    let forged = OpaqueSecret::generate("kiln_nbt");
    assert_refused(fleet.join(forged.expose(), "gpu-01").await, "unknown");
    assert_refused(fleet.join("", "gpu-01").await, "unknown");

    let (nodes,): (i64,) = sqlx::query_as("SELECT count(*) FROM nodes")
        .fetch_one(fleet.store.pool())
        .await
        .unwrap();
    assert_eq!(nodes, 0);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_agents_racing_with_one_token_join_one_node(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let token = fleet.token(Duration::from_secs(3600)).await;
    let (a, b) = tokio::join!(fleet.join(&token, "gpu-a"), fleet.join(&token, "gpu-b"));
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{a:?} {b:?}"
    );
    let loser = if a.is_ok() { b } else { a };
    assert_refused(loser, "already used");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_bad_request_does_not_burn_the_token_and_other_rpcs_need_a_credential(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let token = fleet.token(Duration::from_secs(3600)).await;
    let status = fleet.join(&token, "  ").await.expect_err("no hostname");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    fleet
        .join(&token, "gpu-01")
        .await
        .expect("the token is still good");

    let status = fleet
        .client
        .clone()
        .heartbeat(HeartbeatRequest::default())
        .await
        .expect_err("no credential");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

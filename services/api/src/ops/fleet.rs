//! The fleet, for operators: bootstrap tokens for joining nodes, the nodes, their credentials.
//!
//! These are deployment-wide, not tenant data, so there is no `OrgScope`; every operation starts
//! with [`require_operator`]. Anyone else gets 404 — the same answer as an unknown path — so the
//! admin surface is invisible to tenants rather than merely forbidden.

use std::time::Duration;

use kiln_auth::OpaqueSecret;
use kiln_domain::NodeId;
use kiln_store::{AuditEvent, NewNodeToken};
use sqlx::PgConnection;

use super::{Checks, page};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::*;

/// The text a bootstrap token starts with (`kiln_nbt_…`); long enough that it is never mistaken
/// for an API key (`kiln_` + 43).
pub const NODE_TOKEN_PREFIX: &str = "kiln_nbt";
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 3600;
pub const MIN_TOKEN_TTL_SECS: i64 = 60;
pub const MAX_TOKEN_TTL_SECS: i64 = 7 * 24 * 3600;
const MAX_NOTE_CHARS: usize = 200;

/// Operators only; everyone else sees nothing here.
pub fn require_operator(caller: &Caller) -> Result<(), ApiError> {
    if caller.principal.is_operator() {
        Ok(())
    } else {
        Err(ApiError::NotFound("resource"))
    }
}

/// A node id from a path: anything malformed is a node that does not exist.
pub fn parse_node(raw: &str) -> Result<NodeId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("node"))
}

fn audit(
    caller: &Caller,
    action: &'static str,
    target: String,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        org_id: None,
        actor_user: caller.principal.user_id(),
        actor_api_key: None,
        action,
        target: Some(target),
        ip: caller.client.ip.clone(),
        details,
    }
}

/// Issue a one-time bootstrap token; the answer is the only time the secret is shown.
pub async fn token_create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    input: &CreateNodeTokenInput,
) -> Result<NodeTokenCreatedView, ApiError> {
    require_operator(caller)?;
    let mut checks = Checks::default();
    let ttl = input.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if !(MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        checks.push(
            "ttl_secs",
            format!("must be between {MIN_TOKEN_TTL_SECS} and {MAX_TOKEN_TTL_SECS} (7 days)"),
        );
    }
    let note = input.note.as_deref().unwrap_or("").trim().to_owned();
    if note.chars().count() > MAX_NOTE_CHARS {
        checks.push(
            "note",
            format!("must be at most {MAX_NOTE_CHARS} characters"),
        );
    }
    checks.finish()?;
    let secret = OpaqueSecret::generate(NODE_TOKEN_PREFIX);
    let record = state
        .store
        .node_token_create(
            conn,
            NewNodeToken {
                digest: &secret.digest(),
                created_by: caller.principal.user_id(),
                ttl: Duration::from_secs(ttl as u64),
                note: &note,
            },
        )
        .await?;
    let event = audit(
        caller,
        "node_token.create",
        record.id.to_string(),
        serde_json::json!({ "ttl_secs": ttl, "note": record.note }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(NodeTokenCreatedView {
        id: record.id.to_string(),
        token: secret.expose().to_owned(),
        note: record.note,
        created_at: ts(record.created_at),
        expires_at: ts(record.expires_at),
    })
}

pub async fn list(
    state: &AppState,
    caller: &Caller,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<NodeList, ApiError> {
    require_operator(caller)?;
    let page = page::<NodeId>(limit, cursor, |n| n.as_uuid())?;
    let p = state.store.node_list(page).await?;
    Ok(NodeList {
        items: p.items.iter().map(NodeView::from).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn get(state: &AppState, caller: &Caller, node: &str) -> Result<NodeView, ApiError> {
    require_operator(caller)?;
    let node = parse_node(node)?;
    Ok((&state.store.node_get(node).await?).into())
}

/// Revoke a node's credential: its agent is refused from its next call and must join again.
pub async fn credential_revoke(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    node: &str,
) -> Result<NodeView, ApiError> {
    require_operator(caller)?;
    let node = parse_node(node)?;
    let record = state.store.node_credential_revoke(conn, node).await?;
    let event = audit(
        caller,
        "node.credential_revoke",
        record.id.to_string(),
        serde_json::json!({ "hostname": record.hostname }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok((&record).into())
}

//! `/v1/admin/…`: the operator surface (the fleet). Anyone but an operator gets 404 on every
//! route here, before the body is even read, so the surface cannot be discovered by probing.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;

use super::extract::{Auth, IdempotencyKey, JsonBody, ListParams, ListQuery};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops;
use crate::state::{AppState, Caller};
use crate::views::*;

/// An authenticated operator (401 without credentials, 404 for anyone else).
pub struct Operator(pub Caller);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Auth(caller) = Auth::from_request_parts(parts, state).await?;
        ops::fleet::require_operator(&caller)?;
        Ok(Operator(caller))
    }
}

/// Issue a one-time bootstrap token for a node agent to join with. The answer holds the secret
/// `token`, shown this once.
#[utoipa::path(post, path = "/v1/admin/node-tokens", tag = "admin", request_body = CreateNodeTokenInput,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = NodeTokenCreatedView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn node_token_create(
    State(state): State<AppState>,
    Operator(caller): Operator,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreateNodeTokenInput>,
) -> Result<Response, ApiError> {
    let (st, input, label) = (state.clone(), body.value, caller.principal.label());
    idempotent(
        &state,
        None,
        label,
        key,
        body.fingerprint,
        StatusCode::CREATED,
        move |conn| {
            Box::pin(async move { ops::fleet::token_create(&st, conn, &caller, &input).await })
        },
    )
    .await
}

/// Nodes that joined the fleet, oldest first.
#[utoipa::path(get, path = "/v1/admin/nodes", tag = "admin", params(ListParams),
    responses((status = 200, body = NodeList), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn node_list(
    State(state): State<AppState>,
    Operator(caller): Operator,
    ListQuery(q): ListQuery,
) -> Result<Json<NodeList>, ApiError> {
    ops::fleet::list(&state, &caller, q.limit, q.cursor.as_deref())
        .await
        .map(Json)
}

/// One node.
#[utoipa::path(get, path = "/v1/admin/nodes/{node}", tag = "admin", params(("node" = String, Path)),
    responses((status = 200, body = NodeView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn node_get(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    ops::fleet::get(&state, &caller, &node).await.map(Json)
}

/// Revoke a node's credential: its agent is refused from its next call and must join again with
/// a new bootstrap token. Revoking twice is harmless.
#[utoipa::path(post, path = "/v1/admin/nodes/{node}/revoke-credential", tag = "admin", params(("node" = String, Path)),
    responses((status = 200, body = NodeView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn node_credential_revoke(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let mut tx = state.store.begin().await?;
    let view = ops::fleet::credential_revoke(&state, &mut tx, &caller, &node).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(Json(view))
}

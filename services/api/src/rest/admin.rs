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

/// Nodes that joined the fleet, oldest first, each with its GPUs (health, utilisation, MIG
/// instances, what runs on each) and a GPU summary.
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

/// One node in full: its GPUs with health, utilisation, MIG instances and what runs on each,
/// and its newest GPU events.
#[utoipa::path(get, path = "/v1/admin/nodes/{node}", tag = "admin", params(("node" = String, Path)),
    responses((status = 200, body = NodeDetailView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn node_get(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<Json<NodeDetailView>, ApiError> {
    ops::fleet::get(&state, &caller, &node).await.map(Json)
}

/// Revoke a node's credential, which retires the node: its agent is refused from its next call
/// and must join again with a new bootstrap token. Revoking twice is harmless.
#[utoipa::path(post, path = "/v1/admin/nodes/{node}/revoke-credential", tag = "admin", params(("node" = String, Path)),
    responses((status = 200, body = NodeView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn node_credential_revoke(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    ops::fleet::credential_revoke(&state, &caller, &node)
        .await
        .map(Json)
}

/// Cordon a node: it keeps its work and takes no new work. Answers the node; its `state` is
/// `cordoned` while it is online. Audited as `node.cordon`.
#[utoipa::path(post, path = "/v1/admin/nodes/{node}/cordon", tag = "admin", params(("node" = String, Path)),
    responses((status = 202, body = NodeView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The node is retired")),
    security(("bearer" = [])))]
pub async fn node_cordon(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let view = ops::fleet::cordon(&state, &caller, &node).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Uncordon a node: it takes new work again (this also ends a drain). Audited as
/// `node.uncordon`.
#[utoipa::path(post, path = "/v1/admin/nodes/{node}/uncordon", tag = "admin", params(("node" = String, Path)),
    responses((status = 202, body = NodeView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The node is retired")),
    security(("bearer" = [])))]
pub async fn node_uncordon(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let view = ops::fleet::uncordon(&state, &caller, &node).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Drain a node: it takes no new work, and its work is moved or stopped per its kind (which
/// happens after the answer). Audited as `node.drain`.
#[utoipa::path(post, path = "/v1/admin/nodes/{node}/drain", tag = "admin", params(("node" = String, Path)),
    responses((status = 202, body = NodeView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "The node is retired")),
    security(("bearer" = [])))]
pub async fn node_drain(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(node): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let view = ops::fleet::drain(&state, &caller, &node).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// The fleet's GPU capacity per GPU type: GPUs present (on nodes that are not retired), those
/// new work can go to (healthy or degraded GPUs of ready nodes), and the unhealthy ones.
#[utoipa::path(get, path = "/v1/admin/capacity", tag = "admin",
    responses((status = 200, body = FleetCapacityView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn capacity(
    State(state): State<AppState>,
    Operator(caller): Operator,
) -> Result<Json<FleetCapacityView>, ApiError> {
    ops::fleet::capacity(&state, &caller).await.map(Json)
}

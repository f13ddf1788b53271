//! `/v1/orgs/{org}/pods…`: a tenant's GPU containers.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::extract::{Auth, IdempotencyKey, JsonBody, ListParams, ListQuery};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops::{self, parse_org};
use crate::state::AppState;
use crate::views::*;

/// The org's pods, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/pods", tag = "pods", params(("org" = String, Path), ListParams),
    responses((status = 200, body = PodList), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<PodList>, ApiError> {
    ops::pods::list(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// Create a pod. It starts `pending`; the scheduler places it on a node (`scheduled`, with
/// `node` and `gpus`), or says in `state_reason` why it cannot yet. Secret env values are stored
/// encrypted and never shown again.
#[utoipa::path(post, path = "/v1/orgs/{org}/pods", tag = "pods", request_body = CreatePodInput,
    params(("org" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 202, body = PodView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreatePodInput>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let (st, input, label) = (state.clone(), body.value, caller.principal.label());
    idempotent(
        &state,
        Some(org),
        label,
        key,
        body.fingerprint,
        StatusCode::ACCEPTED,
        move |conn| {
            Box::pin(async move { ops::pods::create(&st, conn, &caller, org, &input).await })
        },
    )
    .await
}

/// One pod: its state and why, where it runs, the GPUs it holds and where its ports are.
#[utoipa::path(get, path = "/v1/orgs/{org}/pods/{pod}", tag = "pods",
    params(("org" = String, Path), ("pod" = String, Path)),
    responses((status = 200, body = PodView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, pod)): Path<(String, String)>,
) -> Result<Json<PodView>, ApiError> {
    ops::pods::get(&state, &caller, parse_org(&org)?, &pod)
        .await
        .map(Json)
}

/// Delete a pod: it becomes `terminated`, its capacity is free at once and its node stops it.
/// Deleting it again is harmless.
#[utoipa::path(delete, path = "/v1/orgs/{org}/pods/{pod}", tag = "pods",
    params(("org" = String, Path), ("pod" = String, Path)),
    responses((status = 202, body = PodView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, pod)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view = ops::pods::delete(&state, &mut tx, &caller, org, &pod).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

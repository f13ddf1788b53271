//! `/v1/images` (the VM image catalog, for anyone signed in) and `/v1/admin/images…` (operators
//! manage it; 404 for anyone else, like all of `/v1/admin`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::admin::Operator;
use super::extract::{Auth, IdempotencyKey, JsonBody};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops;
use crate::state::AppState;
use crate::views::*;

/// The VM images instances can be created from (active ones), by name.
#[utoipa::path(get, path = "/v1/images", tag = "catalog",
    responses((status = 200, body = VmImageList), (status = 401, body = Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
) -> Result<Json<VmImageList>, ApiError> {
    ops::images::list(&state, &caller).await.map(Json)
}

/// Every image of the catalog, deprecated ones too.
#[utoipa::path(get, path = "/v1/admin/images", tag = "admin",
    responses((status = 200, body = VmImageList), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn admin_list(
    State(state): State<AppState>,
    Operator(caller): Operator,
) -> Result<Json<VmImageList>, ApiError> {
    ops::images::admin_list(&state, &caller).await.map(Json)
}

/// Add an image (`name` in the body). 409 when the name is taken.
#[utoipa::path(post, path = "/v1/admin/images", tag = "admin", request_body = VmImageInput,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = VmImageView), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Operator(caller): Operator,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<VmImageInput>,
) -> Result<Response, ApiError> {
    let (st, input, label) = (state.clone(), body.value, caller.principal.label());
    idempotent(
        &state,
        None,
        label,
        key,
        body.fingerprint,
        StatusCode::CREATED,
        move |conn| Box::pin(async move { ops::images::create(&st, conn, &caller, &input).await }),
    )
    .await
}

/// One image.
#[utoipa::path(get, path = "/v1/admin/images/{image}", tag = "admin",
    params(("image" = String, Path)),
    responses((status = 200, body = VmImageView), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(name): Path<String>,
) -> Result<Json<VmImageView>, ApiError> {
    ops::images::admin_get(&state, &caller, &name)
        .await
        .map(Json)
}

/// Create the image or replace all its fields (201 when created, 200 when replaced): the
/// idempotent way to register an image. Instances already created keep booting what they were
/// created with; set `status` to `deprecated` to stop new instances of it.
#[utoipa::path(put, path = "/v1/admin/images/{image}", tag = "admin", request_body = VmImageInput,
    params(("image" = String, Path)),
    responses((status = 200, body = VmImageView), (status = 201, body = VmImageView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(name): Path<String>,
    body: JsonBody<VmImageInput>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin().await?;
    let (view, created) = ops::images::put(&state, &mut tx, &caller, &name, &body.value).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// Remove an image. 409 while instances created from it are not terminated (deprecate it).
#[utoipa::path(delete, path = "/v1/admin/images/{image}", tag = "admin",
    params(("image" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.store.begin().await?;
    ops::images::delete(&state, &mut tx, &caller, &name).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

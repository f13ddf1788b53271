//! `/v1/orgs/…`: orgs, members, API keys and the audit log.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::extract::{Auth, IdempotencyKey, JsonBody, ListParams, ListQuery};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops::{self, parse_org, parse_user};
use crate::state::AppState;
use crate::views::*;

/// Orgs the caller belongs to.
#[utoipa::path(get, path = "/v1/orgs", tag = "orgs", params(ListParams),
    responses((status = 200, body = OrgList), (status = 401, body = Problem)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ListQuery(q): ListQuery,
) -> Result<Json<OrgList>, ApiError> {
    ops::orgs::list(&state, &caller, q.limit, q.cursor.as_deref())
        .await
        .map(Json)
}

/// Create an org; the caller becomes its owner.
#[utoipa::path(post, path = "/v1/orgs", tag = "orgs", request_body = CreateOrgInput,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = OrgView), (status = 422, body = Problem)), security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Auth(caller): Auth,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreateOrgInput>,
) -> Result<Response, ApiError> {
    let (st, input, label) = (state.clone(), body.value, caller.principal.label());
    idempotent(
        &state,
        None,
        label,
        key,
        body.fingerprint,
        StatusCode::CREATED,
        move |conn| Box::pin(async move { ops::orgs::create(&st, conn, &caller, &input).await }),
    )
    .await
}

#[utoipa::path(get, path = "/v1/orgs/{org}", tag = "orgs", params(("org" = String, Path)),
    responses((status = 200, body = OrgView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
) -> Result<Json<OrgView>, ApiError> {
    ops::orgs::get(&state, &caller, parse_org(&org)?)
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/orgs/{org}/members", tag = "orgs", params(("org" = String, Path), ListParams),
    responses((status = 200, body = MemberList), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn members(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<MemberList>, ApiError> {
    ops::orgs::members(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// Add someone who has signed up, with a role.
#[utoipa::path(post, path = "/v1/orgs/{org}/members", tag = "orgs", request_body = AddMemberInput,
    params(("org" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = MemberView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn member_add(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<AddMemberInput>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let (st, input, label) = (state.clone(), body.value, caller.principal.label());
    idempotent(
        &state,
        Some(org),
        label,
        key,
        body.fingerprint,
        StatusCode::CREATED,
        move |conn| {
            Box::pin(async move { ops::orgs::member_add(&st, conn, &caller, org, &input).await })
        },
    )
    .await
}

/// Change a member's role. An org always keeps at least one owner.
#[utoipa::path(patch, path = "/v1/orgs/{org}/members/{user}", tag = "orgs", request_body = UpdateMemberInput,
    params(("org" = String, Path), ("user" = String, Path)),
    responses((status = 200, body = MemberView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn member_update(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, user)): Path<(String, String)>,
    body: JsonBody<UpdateMemberInput>,
) -> Result<Json<MemberView>, ApiError> {
    let (org, user) = (parse_org(&org)?, parse_user(&user)?);
    let mut tx = state.store.begin().await?;
    let view = ops::orgs::member_update(&state, &mut tx, &caller, org, user, &body.value).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(Json(view))
}

/// Remove a member (or leave, when it is yourself).
#[utoipa::path(delete, path = "/v1/orgs/{org}/members/{user}", tag = "orgs",
    params(("org" = String, Path), ("user" = String, Path)),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn member_remove(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (org, user) = (parse_org(&org)?, parse_user(&user)?);
    let mut tx = state.store.begin().await?;
    ops::orgs::member_remove(&state, &mut tx, &caller, org, user).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/orgs/{org}/api-keys", tag = "orgs", params(("org" = String, Path), ListParams),
    responses((status = 200, body = ApiKeyList), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn api_keys(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<ApiKeyList>, ApiError> {
    ops::api_keys::list(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// Create an API key. The answer holds the secret `key`, shown this once.
#[utoipa::path(post, path = "/v1/orgs/{org}/api-keys", tag = "orgs", request_body = CreateApiKeyInput,
    params(("org" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = ApiKeyCreatedView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn api_key_create(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreateApiKeyInput>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let (st, input, label) = (state.clone(), body.value, caller.principal.label());
    idempotent(
        &state,
        Some(org),
        label,
        key,
        body.fingerprint,
        StatusCode::CREATED,
        move |conn| {
            Box::pin(async move { ops::api_keys::create(&st, conn, &caller, org, &input).await })
        },
    )
    .await
}

/// Revoke an API key; it stops working at once.
#[utoipa::path(delete, path = "/v1/orgs/{org}/api-keys/{key}", tag = "orgs",
    params(("org" = String, Path), ("key" = String, Path)),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn api_key_revoke(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    ops::api_keys::revoke(&state, &mut tx, &caller, org, &key).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The org's audit log, newest first (admins and owners).
#[utoipa::path(get, path = "/v1/orgs/{org}/audit-log", tag = "orgs", params(("org" = String, Path), ListParams),
    responses((status = 200, body = AuditList), (status = 403, body = Problem), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn audit_log(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<AuditList>, ApiError> {
    ops::audit::list(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

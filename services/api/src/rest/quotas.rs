//! Org GPU quotas: operators set them under `/v1/admin/orgs/{org}/quotas` (404 for anyone
//! else, before the body is read); members read their own org's at `/v1/orgs/{org}/quotas`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::admin::Operator;
use super::extract::{Auth, JsonBody};
use crate::error::{ApiError, Problem};
use crate::ops::quotas::{QuotaList, QuotaView, SetQuotaInput};
use crate::ops::{self, parse_org};
use crate::state::AppState;

/// An org's GPU quotas, by GPU type then product. A GPU type and product without a quota is
/// unlimited.
#[utoipa::path(get, path = "/v1/admin/orgs/{org}/quotas", tag = "admin", params(("org" = String, Path)),
    responses((status = 200, body = QuotaList), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn admin_list(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(org): Path<String>,
) -> Result<Json<QuotaList>, ApiError> {
    ops::quotas::admin_list(&state, &caller, &org)
        .await
        .map(Json)
}

/// Set or replace the org's quota for one GPU type and product; the scheduler refuses work
/// beyond it from then on (work already placed keeps running). Audited as `quota.set` in the
/// org's audit log.
#[utoipa::path(put, path = "/v1/admin/orgs/{org}/quotas", tag = "admin", request_body = SetQuotaInput,
    params(("org" = String, Path)),
    responses((status = 200, body = QuotaView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn set(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(org): Path<String>,
    body: JsonBody<SetQuotaInput>,
) -> Result<Json<QuotaView>, ApiError> {
    ops::quotas::set(&state, &caller, &org, &body.value)
        .await
        .map(Json)
}

/// Remove the org's quota for one GPU type and product: it is unlimited there again. Audited
/// as `quota.remove` in the org's audit log.
#[utoipa::path(delete, path = "/v1/admin/orgs/{org}/quotas/{gpu_type}/{product}", tag = "admin",
    params(("org" = String, Path), ("gpu_type" = String, Path), ("product" = String, Path)),
    responses((status = 204), (status = 404, body = Problem, description = "No such org or quota")),
    security(("bearer" = [])))]
pub async fn remove(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path((org, gpu_type, product)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    ops::quotas::remove(&state, &caller, &org, &gpu_type, &product).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The org's GPU quotas, set by the deployment's operators: the most GPUs of each type the org
/// may hold at once per product. A GPU type and product without a quota is unlimited.
#[utoipa::path(get, path = "/v1/orgs/{org}/quotas", tag = "orgs", params(("org" = String, Path)),
    responses((status = 200, body = QuotaList), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
) -> Result<Json<QuotaList>, ApiError> {
    ops::quotas::list(&state, &caller, parse_org(&org)?)
        .await
        .map(Json)
}

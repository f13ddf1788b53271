//! `/v1/orgs/{org}/instances…`: a tenant's VMs.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::{Auth, IdempotencyKey, JsonBody, ListParams, ListQuery};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops::instances::Power;
use crate::ops::{self, parse_org};
use crate::state::AppState;
use crate::views::*;

/// The org's instances, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/instances", tag = "instances", params(("org" = String, Path), ListParams),
    responses((status = 200, body = InstanceList), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<InstanceList>, ApiError> {
    ops::instances::list(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// Create an instance: a VM of a catalog image (`GET /v1/images`) with whole GPUs passed
/// through and the given SSH keys for the image's login user. It starts `pending`; the
/// scheduler places it on a node, and once its node reports the SSH port, `ssh` says how to log
/// in. CPU and memory follow the GPU count (the deployment's instance shape).
#[utoipa::path(post, path = "/v1/orgs/{org}/instances", tag = "instances", request_body = CreateInstanceInput,
    params(("org" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 202, body = InstanceView), (status = 402, body = Problem, description = "The org is out of credit"), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreateInstanceInput>,
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
            Box::pin(async move { ops::instances::create(&st, conn, &caller, org, &input).await })
        },
    )
    .await
}

/// One instance: its state and why, where it runs, its GPUs and how to reach it over SSH.
#[utoipa::path(get, path = "/v1/orgs/{org}/instances/{instance}", tag = "instances",
    params(("org" = String, Path), ("instance" = String, Path)),
    responses((status = 200, body = InstanceView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, instance)): Path<(String, String)>,
) -> Result<Json<InstanceView>, ApiError> {
    ops::instances::get(&state, &caller, parse_org(&org)?, &instance)
        .await
        .map(Json)
}

async fn power(
    state: AppState,
    caller: crate::state::Caller,
    org: String,
    instance: String,
    what: Power,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view = ops::instances::power(&state, &mut tx, &caller, org, &instance, what).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// Power the VM off (ACPI, then a hard stop after a timeout). Its GPUs are given back at once;
/// its disk, CPU and memory stay on its node, and a stopped instance is billed for its disk
/// only. Stopping a stopped instance changes nothing.
#[utoipa::path(post, path = "/v1/orgs/{org}/instances/{instance}/stop", tag = "instances",
    params(("org" = String, Path), ("instance" = String, Path)),
    responses((status = 202, body = InstanceView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn stop(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, instance)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    power(state, caller, org, instance, Power::Stop).await
}

/// Power a stopped VM on again, on its node (where its disk is), with whole GPUs of its type
/// there — 409 when that node has none free right now. An instance that lost its node (a drain,
/// running out of credit) is placed anew. Starting a running instance changes nothing.
#[utoipa::path(post, path = "/v1/orgs/{org}/instances/{instance}/start", tag = "instances",
    params(("org" = String, Path), ("instance" = String, Path)),
    responses((status = 202, body = InstanceView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, instance)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    power(state, caller, org, instance, Power::Start).await
}

/// Reboot a running VM (`reboot_count` goes up by one). 409 unless it is placed and powered on.
#[utoipa::path(post, path = "/v1/orgs/{org}/instances/{instance}/reboot", tag = "instances",
    params(("org" = String, Path), ("instance" = String, Path)),
    responses((status = 202, body = InstanceView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn reboot(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, instance)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    power(state, caller, org, instance, Power::Reboot).await
}

/// Terminate an instance: it becomes `terminated`, its disk is destroyed, its capacity is free
/// at once and billing stops. Deleting it again is harmless.
#[utoipa::path(delete, path = "/v1/orgs/{org}/instances/{instance}", tag = "instances",
    params(("org" = String, Path), ("instance" = String, Path)),
    responses((status = 202, body = InstanceView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, instance)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view = ops::instances::delete(&state, &mut tx, &caller, org, &instance).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// `?tail=` of the console call.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleParams {
    /// How many of the most recent lines to send, 0–5000. Default 100.
    pub tail: Option<i64>,
}

/// The VM's serial console (boot messages, the guest's own lines) and lines its node agent
/// wrote about it, as `text/plain`, one per line, oldest first. A window of recent output
/// (about 10,000 lines), not an archive.
#[utoipa::path(get, path = "/v1/orgs/{org}/instances/{instance}/console", tag = "instances",
    params(("org" = String, Path), ("instance" = String, Path), ConsoleParams),
    responses((status = 200, description = "the last lines as text/plain", content_type = "text/plain"),
        (status = 404, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = [])))]
pub async fn console(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, instance)): Path<(String, String)>,
    query: Result<Query<ConsoleParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|_| ApiError::field("tail", "must be a whole number between 0 and 5000"))?;
    let org = parse_org(&org)?;
    let tail = ops::pods::parse_tail(q.tail)?;
    let lines = ops::instances::console(&state, &caller, org, &instance, tail).await?;
    let mut body = String::new();
    for l in &lines {
        body.push_str(&l.text);
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

//! `/v1/orgs/{org}/pods…`: a tenant's GPU containers.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use utoipa::IntoParams;

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
    responses((status = 202, body = PodView), (status = 402, body = Problem, description = "The org is out of credit"), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
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

/// The pod's live state as server-sent events: an `event: pod` with the pod view now, then one
/// each time its state, reason, node or ports change, until it ends (`terminated`, `failed`,
/// `stopped`) or the client leaves. A comment line every 15 s keeps proxies from closing it.
#[utoipa::path(get, path = "/v1/orgs/{org}/pods/{pod}/events", tag = "pods",
    params(("org" = String, Path), ("pod" = String, Path)),
    responses((status = 200, description = "text/event-stream of `pod` events, each a PodView",
        content_type = "text/event-stream"), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, pod)): Path<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let views = ops::pods::watch(&state, &caller, parse_org(&org)?, &pod).await?;
    let events = views.map(|view| {
        Ok(Event::default()
            .event("pod")
            .data(serde_json::to_string(&view).unwrap_or_default()))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `?follow=&tail=` of the logs call.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsParams {
    /// Keep the connection open and stream new lines as server-sent events. Default false.
    pub follow: Option<bool>,
    /// How many of the most recent lines to send first, 0–5000. Default 100.
    pub tail: Option<i64>,
}

/// The pod's output (stdout and stderr, and lines its node agent wrote about it). Without
/// `follow`: the last `tail` lines as `text/plain`, one per line. With `follow=true`: a
/// `text/event-stream` of `log` events (data: a LogLineView as JSON, id: its cursor), the last
/// `tail` lines first, then new ones as they come, until the pod has ended and its last lines
/// are out; a reconnecting client sends `Last-Event-ID` and gets exactly the lines after it.
/// The control plane keeps a window of recent output (about 10,000 lines per pod), not an archive.
#[utoipa::path(get, path = "/v1/orgs/{org}/pods/{pod}/logs", tag = "pods",
    params(("org" = String, Path), ("pod" = String, Path), LogsParams),
    responses(
        (status = 200, description = "the last lines as text/plain, or with follow=true a text/event-stream of `log` events (LogLineView)",
            content_type = "text/plain"),
        (status = 404, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, pod)): Path<(String, String)>,
    query: Result<Query<LogsParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|_| {
        ApiError::field(
            "follow",
            "follow must be true or false and tail a whole number between 0 and 5000",
        )
    })?;
    let org = parse_org(&org)?;
    let tail = ops::pods::parse_tail(q.tail)?;
    if !q.follow.unwrap_or(false) {
        let lines = ops::pods::logs(&state, &caller, org, &pod, tail).await?;
        let mut body = String::new();
        for l in &lines {
            body.push_str(&l.text);
            body.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response());
    }
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let lines = ops::pods::follow_logs(&state, &caller, org, &pod, tail, resume).await?;
    let events = lines.map(|line| {
        Ok::<_, Infallible>(
            Event::default()
                .event("log")
                .id(line.cursor.clone())
                .data(serde_json::to_string(&line).unwrap_or_default()),
        )
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

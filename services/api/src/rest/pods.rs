//! `/v1/orgs/{org}/pods…`: a tenant's GPU containers.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use std::convert::Infallible;
use std::time::Duration;

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
    let org = parse_org(&org)?;
    // Checked now, so an unknown or foreign pod is a 404, not an empty stream.
    let first = ops::pods::get(&state, &caller, org, &pod).await?;
    let id = ops::pods::parse_pod(&pod)?.as_uuid();
    let live = Live {
        rx: state.live.subscribe(id),
        id,
        state,
        caller,
        org,
        pod,
        pending: Some(first),
        last: None,
        done: false,
    };
    let stream = futures::stream::unfold(live, Live::next);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// How often a live view re-reads even without a wake-up (a lost notice costs this much).
const RECHECK: Duration = Duration::from_secs(5);

/// One client's live view of one pod.
struct Live {
    state: AppState,
    caller: crate::state::Caller,
    org: kiln_domain::OrgId,
    pod: String,
    id: uuid::Uuid,
    rx: tokio::sync::watch::Receiver<u64>,
    pending: Option<PodView>,
    last: Option<String>,
    done: bool,
}

impl Live {
    /// The next event: the pod as it is, when it differs from what was sent last.
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(view) = self.pending.take() {
                let text = serde_json::to_string(&view).unwrap_or_default();
                if self.last.as_deref() != Some(text.as_str()) {
                    self.done = matches!(view.state.as_str(), "terminated" | "failed" | "stopped");
                    let event = Event::default().event("pod").data(text.clone());
                    self.last = Some(text);
                    return Some((Ok(event), self));
                }
            }
            if let Ok(Err(_)) = tokio::time::timeout(RECHECK, self.rx.changed()).await {
                // The hub forgot this channel: take a new one.
                self.rx = self.state.live.subscribe(self.id);
            }
            match ops::pods::get(&self.state, &self.caller, self.org, &self.pod).await {
                Ok(v) => self.pending = Some(v),
                // Gone, or access lost: end the stream.
                Err(_) => return None,
            }
        }
    }
}

//! `/v1/orgs/{org}/endpoints…`: a tenant's model servers behind the gateway.

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

/// The org's endpoints, newest first, each with its live replicas.
#[utoipa::path(get, path = "/v1/orgs/{org}/endpoints", tag = "endpoints", params(("org" = String, Path), ListParams),
    responses((status = 200, body = EndpointList), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<EndpointList>, ApiError> {
    ops::endpoints::list(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// Deploy a model server as an endpoint: `min_replicas` replicas start (each placed like a
/// pod), and `url` takes calls through the gateway with an API key of the org once one is
/// ready.
#[utoipa::path(post, path = "/v1/orgs/{org}/endpoints", tag = "endpoints", request_body = CreateEndpointInput,
    params(("org" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 202, body = EndpointView), (status = 402, body = Problem, description = "The org is out of credit"), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreateEndpointInput>,
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
            Box::pin(async move { ops::endpoints::create(&st, conn, &caller, org, &input).await })
        },
    )
    .await
}

/// `?minutes=` of the traffic call.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TrafficParams {
    /// The window, the last 1–10080 minutes. Default 60.
    pub minutes: Option<i64>,
}

/// The endpoint's calls over a recent window: per bucket (about 60) the calls, requests per
/// second, errors and latency percentiles through the gateway; totals with tokens.
#[utoipa::path(get, path = "/v1/orgs/{org}/endpoints/{endpoint}/traffic", tag = "endpoints",
    params(("org" = String, Path), ("endpoint" = String, Path), TrafficParams),
    responses((status = 200, body = EndpointTrafficView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn traffic(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
    query: Result<axum::extract::Query<TrafficParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EndpointTrafficView>, ApiError> {
    let axum::extract::Query(q) = query
        .map_err(|_| ApiError::field("minutes", "must be a whole number of minutes, 1 to 10080"))?;
    ops::endpoints::traffic(&state, &caller, parse_org(&org)?, &endpoint, q.minutes)
        .await
        .map(Json)
}

/// One endpoint, with its URL and live replicas.
#[utoipa::path(get, path = "/v1/orgs/{org}/endpoints/{endpoint}", tag = "endpoints",
    params(("org" = String, Path), ("endpoint" = String, Path)),
    responses((status = 200, body = EndpointView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
) -> Result<Json<EndpointView>, ApiError> {
    ops::endpoints::get(&state, &caller, parse_org(&org)?, &endpoint)
        .await
        .map(Json)
}

/// Delete an endpoint: calls get 404 at once, its replicas are terminated and their capacity
/// freed. Deleting it again is harmless.
#[utoipa::path(delete, path = "/v1/orgs/{org}/endpoints/{endpoint}", tag = "endpoints",
    params(("org" = String, Path), ("endpoint" = String, Path)),
    responses((status = 202, body = EndpointView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view = ops::endpoints::delete(&state, &mut tx, &caller, org, &endpoint).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// Set what the orgs you grant the endpoint pay you per call (paid from their balance to
/// yours). Calls already answered keep the price they were answered under.
#[utoipa::path(put, path = "/v1/orgs/{org}/endpoints/{endpoint}/price", tag = "endpoints",
    request_body = EndpointPriceSpec, params(("org" = String, Path), ("endpoint" = String, Path)),
    responses((status = 200, body = EndpointView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn price_set(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
    body: JsonBody<EndpointPriceSpec>,
) -> Result<Json<EndpointView>, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view =
        ops::endpoints::set_price(&state, &mut tx, &caller, org, &endpoint, Some(&body.value))
            .await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(Json(view))
}

/// Remove the endpoint's price: granted orgs call it free of any charge of yours.
#[utoipa::path(delete, path = "/v1/orgs/{org}/endpoints/{endpoint}/price", tag = "endpoints",
    params(("org" = String, Path), ("endpoint" = String, Path)),
    responses((status = 200, body = EndpointView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn price_remove(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
) -> Result<Json<EndpointView>, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view = ops::endpoints::set_price(&state, &mut tx, &caller, org, &endpoint, None).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(Json(view))
}

/// The orgs whose API keys may call the endpoint besides yours.
#[utoipa::path(get, path = "/v1/orgs/{org}/endpoints/{endpoint}/grants", tag = "endpoints",
    params(("org" = String, Path), ("endpoint" = String, Path)),
    responses((status = 200, body = EndpointGrantList), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn grants(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
) -> Result<Json<EndpointGrantList>, ApiError> {
    ops::endpoints::grants(&state, &caller, parse_org(&org)?, &endpoint)
        .await
        .map(Json)
}

/// Let another org's API keys call the endpoint: each call it makes is billed to it at the
/// endpoint's price and paid to you (you pay the catalog price for the compute, as for your own
/// calls). Granting an org again answers the first grant.
#[utoipa::path(post, path = "/v1/orgs/{org}/endpoints/{endpoint}/grants", tag = "endpoints",
    request_body = CreateEndpointGrantInput, params(("org" = String, Path), ("endpoint" = String, Path)),
    responses((status = 201, body = EndpointGrantView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn grant(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint)): Path<(String, String)>,
    body: JsonBody<CreateEndpointGrantInput>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let view = ops::endpoints::grant(&state, &mut tx, &caller, org, &endpoint, &body.value).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Take a grant back: that org's keys get 404 from the gateway within a second.
#[utoipa::path(delete, path = "/v1/orgs/{org}/endpoints/{endpoint}/grants/{grantee}", tag = "endpoints",
    params(("org" = String, Path), ("endpoint" = String, Path), ("grantee" = String, Path)),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn revoke_grant(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, endpoint, grantee)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    ops::endpoints::revoke_grant(&state, &mut tx, &caller, org, &endpoint, &grantee).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Other orgs' endpoints your org's API keys may call, with their URL and price.
#[utoipa::path(get, path = "/v1/orgs/{org}/granted-endpoints", tag = "endpoints",
    params(("org" = String, Path)),
    responses((status = 200, body = GrantedEndpointList), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn granted(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
) -> Result<Json<GrantedEndpointList>, ApiError> {
    ops::endpoints::granted(&state, &caller, parse_org(&org)?)
        .await
        .map(Json)
}

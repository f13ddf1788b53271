//! The REST surface (`/v1/…`) and its OpenAPI document.

mod admin;
mod billing;
mod catalog;
mod endpoints;
pub mod extract;
mod identity;
mod images;
mod instances;
mod orgs;
mod pods;
mod quotas;

use axum::Json;
use axum::Router;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use futures::future::BoxFuture;
use kiln_domain::OrgId;
use kiln_store::{Claim, IdempotencyScope};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::OpenApi;

use crate::error::{ApiError, FieldError, Problem};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/signup", post(identity::signup))
        .route("/v1/auth/login", post(identity::login))
        .route("/v1/auth/refresh", post(identity::refresh))
        .route("/v1/auth/logout", post(identity::logout))
        .route("/v1/me", get(identity::me))
        .route("/v1/orgs", get(orgs::list).post(orgs::create))
        .route("/v1/orgs/{org}", get(orgs::get))
        .route(
            "/v1/orgs/{org}/members",
            get(orgs::members).post(orgs::member_add),
        )
        .route(
            "/v1/orgs/{org}/members/{user}",
            delete(orgs::member_remove).patch(orgs::member_update),
        )
        .route(
            "/v1/orgs/{org}/api-keys",
            get(orgs::api_keys).post(orgs::api_key_create),
        )
        .route(
            "/v1/orgs/{org}/api-keys/{key}",
            delete(orgs::api_key_revoke),
        )
        .route("/v1/orgs/{org}/audit-log", get(orgs::audit_log))
        .route("/v1/orgs/{org}/quotas", get(quotas::list))
        .route("/v1/orgs/{org}/pods", get(pods::list).post(pods::create))
        .route(
            "/v1/orgs/{org}/pods/{pod}",
            get(pods::get).delete(pods::delete),
        )
        .route("/v1/orgs/{org}/pods/{pod}/events", get(pods::events))
        .route("/v1/orgs/{org}/pods/{pod}/logs", get(pods::logs))
        .route(
            "/v1/orgs/{org}/instances",
            get(instances::list).post(instances::create),
        )
        .route(
            "/v1/orgs/{org}/instances/{instance}",
            get(instances::get).delete(instances::delete),
        )
        .route(
            "/v1/orgs/{org}/instances/{instance}/stop",
            post(instances::stop),
        )
        .route(
            "/v1/orgs/{org}/instances/{instance}/start",
            post(instances::start),
        )
        .route(
            "/v1/orgs/{org}/instances/{instance}/reboot",
            post(instances::reboot),
        )
        .route(
            "/v1/orgs/{org}/instances/{instance}/console",
            get(instances::console),
        )
        .route(
            "/v1/orgs/{org}/endpoints",
            get(endpoints::list).post(endpoints::create),
        )
        .route(
            "/v1/orgs/{org}/endpoints/{endpoint}",
            get(endpoints::get).delete(endpoints::delete),
        )
        .route(
            "/v1/orgs/{org}/endpoints/{endpoint}/traffic",
            get(endpoints::traffic),
        )
        .route(
            "/v1/orgs/{org}/endpoints/{endpoint}/price",
            put(endpoints::price_set).delete(endpoints::price_remove),
        )
        .route(
            "/v1/orgs/{org}/endpoints/{endpoint}/grants",
            get(endpoints::grants).post(endpoints::grant),
        )
        .route(
            "/v1/orgs/{org}/endpoints/{endpoint}/grants/{grantee}",
            delete(endpoints::revoke_grant),
        )
        .route("/v1/orgs/{org}/granted-endpoints", get(endpoints::granted))
        .route("/v1/gpu-types", get(catalog::gpu_types))
        .route("/v1/images", get(images::list))
        .route(
            "/v1/admin/images",
            get(images::admin_list).post(images::create),
        )
        .route(
            "/v1/admin/images/{image}",
            get(images::get).put(images::put).delete(images::delete),
        )
        .route("/v1/admin/node-tokens", post(admin::node_token_create))
        .route("/v1/admin/nodes", get(admin::node_list))
        .route("/v1/admin/nodes/{node}", get(admin::node_get))
        .route(
            "/v1/admin/nodes/{node}/revoke-credential",
            post(admin::node_credential_revoke),
        )
        .route("/v1/admin/nodes/{node}/cordon", post(admin::node_cordon))
        .route(
            "/v1/admin/nodes/{node}/uncordon",
            post(admin::node_uncordon),
        )
        .route("/v1/admin/nodes/{node}/drain", post(admin::node_drain))
        .route("/v1/admin/capacity", get(admin::capacity))
        .route(
            "/v1/admin/orgs/{org}/quotas",
            get(quotas::admin_list).put(quotas::set),
        )
        .route(
            "/v1/admin/orgs/{org}/quotas/{gpu_type}/{product}",
            delete(quotas::remove),
        )
        .merge(billing_routes())
        .route("/openapi.json", get(openapi_json))
}

/// Balance, credits, usage, ledger, invoices; operators' prices and credit terms; the payment
/// webhook.
fn billing_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/orgs/{org}/balance", get(billing::balance))
        .route("/v1/orgs/{org}/credits", post(billing::add_credits))
        .route("/v1/orgs/{org}/usage", get(billing::usage))
        .route("/v1/orgs/{org}/ledger", get(billing::ledger))
        .route("/v1/orgs/{org}/invoices", get(billing::invoices))
        .route("/v1/orgs/{org}/invoices/{invoice}", get(billing::invoice))
        .route(
            "/v1/admin/prices",
            get(billing::prices_list).post(billing::price_create),
        )
        .route(
            "/v1/admin/prices/{version}",
            get(billing::price_get).delete(billing::price_delete),
        )
        .route(
            "/v1/admin/orgs/{org}/billing",
            get(billing::settings_get).put(billing::settings_set),
        )
        .route(
            "/v1/admin/orgs/{org}/promotional-credits",
            post(billing::promo_grant),
        )
        .route(
            "/v1/admin/orgs/{org}/invoices",
            post(billing::invoice_generate),
        )
        .route("/v1/billing/webhook", post(billing::webhook))
}

/// Answer for unknown paths: a problem, not an empty 404.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("resource")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Run a creating operation in one transaction, guarded by an optional `Idempotency-Key`:
/// the key is claimed in the same transaction as the effect, so a duplicate (even a concurrent
/// one) gets the first answer, and a failure leaves nothing behind.
pub async fn idempotent<T, F>(
    state: &AppState,
    org: Option<OrgId>,
    principal: String,
    key: Option<String>,
    fingerprint: Vec<u8>,
    status: StatusCode,
    effect: F,
) -> Result<Response, ApiError>
where
    T: Serialize,
    F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, ApiError>>,
{
    let mut tx = state.store.begin().await?;
    let scope = key.map(|key| IdempotencyScope {
        org: org.map_or_else(|| "-".to_owned(), |o| o.to_string()),
        principal,
        key,
    });
    if let Some(scope) = &scope {
        match state
            .store
            .idempotency_claim(&mut tx, scope, &fingerprint)
            .await?
        {
            Claim::New => {}
            Claim::Mismatch => return Err(ApiError::IdempotencyMismatch),
            Claim::InProgress => return Err(ApiError::IdempotencyInProgress),
            Claim::Replay { status, body } => {
                tx.rollback().await.map_err(kiln_store::StoreError::from)?;
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                let mut r = (code, Json(body)).into_response();
                r.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(r);
            }
        }
    }
    let value = effect(&mut tx).await?;
    let body = serde_json::to_value(&value).map_err(ApiError::internal)?;
    if let Some(scope) = &scope {
        state
            .store
            .idempotency_complete(&mut tx, scope, status.as_u16(), &body)
            .await?;
    }
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    Ok((status, Json(body)).into_response())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kiln API",
        version = "1",
        description = "Kiln: a multi-tenant GPU cloud. Errors are application/problem+json (RFC 9457). \
                       Authenticate with `Authorization: Bearer <access token or API key>`."
    ),
    paths(
        identity::signup, identity::login, identity::refresh, identity::logout, identity::me,
        orgs::list, orgs::create, orgs::get,
        orgs::members, orgs::member_add, orgs::member_update, orgs::member_remove,
        orgs::api_keys, orgs::api_key_create, orgs::api_key_revoke,
        orgs::audit_log,
        quotas::list,
        pods::list, pods::create, pods::get, pods::delete, pods::events, pods::logs,
        endpoints::list, endpoints::create, endpoints::get, endpoints::delete, endpoints::traffic,
        endpoints::price_set, endpoints::price_remove, endpoints::grants, endpoints::grant,
        endpoints::revoke_grant, endpoints::granted,
        instances::list, instances::create, instances::get, instances::stop, instances::start,
        instances::reboot, instances::delete, instances::console,
        catalog::gpu_types, images::list,
        images::admin_list, images::create, images::get, images::put, images::delete,
        admin::node_token_create, admin::node_list, admin::node_get, admin::node_credential_revoke,
        admin::node_cordon, admin::node_uncordon, admin::node_drain, admin::capacity,
        quotas::admin_list, quotas::set, quotas::remove,
        billing::balance, billing::add_credits, billing::usage, billing::ledger,
        billing::invoices, billing::invoice, billing::webhook,
        billing::prices_list, billing::price_create, billing::price_get, billing::price_delete,
        billing::settings_get, billing::settings_set, billing::promo_grant,
        billing::invoice_generate,
    ),
    components(schemas(Problem, FieldError, crate::views::LogLineView)),
    modifiers(&BearerAuth),
    tags(
        (name = "identity", description = "Accounts, sign-in and sessions"),
        (name = "orgs", description = "Orgs, members, API keys and the audit log"),
        (name = "pods", description = "GPU containers: create, watch, delete"),
        (name = "instances", description = "GPU virtual machines reached over SSH: create, stop, start, reboot, delete"),
        (name = "endpoints", description = "Model servers behind the gateway: deploy, watch, delete"),
        (name = "catalog", description = "GPU types, their MIG profiles and live availability; the VM images instances boot"),
        (name = "billing", description = "Balance, credits, usage, the ledger and invoices; the payment webhook"),
        (name = "admin", description = "Operators only (404 for anyone else): the fleet's nodes, their GPUs and bootstrap tokens, cordon and drain, capacity"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An access token from /v1/auth/login, or an API key (`kiln_…`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3.1 document, as served at `/openapi.json` and checked in as `openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi_json() -> impl IntoResponse {
    Json(openapi())
}

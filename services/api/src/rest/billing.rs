//! Billing over REST: an org's balance, usage, ledger and invoices (members, any role); credits
//! (operators, idempotent on `reference`); prices, credit terms, promotional credit and
//! on-demand invoices under `/v1/admin` (404 for anyone else); the payment provider's signed
//! webhook.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::admin::Operator;
use super::extract::{Auth, IdempotencyKey, JsonBody, ListParams, ListQuery};
use super::idempotent;
use crate::error::{ApiError, Problem};
use crate::ops::billing::*;
use crate::ops::{self, parse_org};
use crate::state::AppState;

fn document(content_type: &'static str, filename: String, body: Vec<u8>) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

fn format_of(raw: Option<&str>, allowed: &[&str]) -> Result<String, ApiError> {
    let f = raw.unwrap_or("json").to_ascii_lowercase();
    if allowed.contains(&f.as_str()) {
        Ok(f)
    } else {
        Err(ApiError::field(
            "format",
            format!("must be one of {}", allowed.join(", ")),
        ))
    }
}

/// The org's balance and credit terms: `balance` (paid; negative while drawing on credit),
/// `credit_limit`, unexpired promotional credit, what is `available`, this month's spend, the
/// burn rate over the last hour, and whether new work is refused for lack of credit.
#[utoipa::path(get, path = "/v1/orgs/{org}/balance", tag = "billing", params(("org" = String, Path)),
    responses((status = 200, body = BalanceView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn balance(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
) -> Result<Json<BalanceView>, ApiError> {
    ops::billing::balance(&state, &caller, parse_org(&org)?)
        .await
        .map(Json)
}

/// Credit the org (operators only; the org's members get 403, anyone else 404). Idempotent on
/// `reference`: the same reference for the same org answers the first posting (200) and
/// credits nothing more; with a different amount, 409.
#[utoipa::path(post, path = "/v1/orgs/{org}/credits", tag = "billing", request_body = AddCreditsInput,
    params(("org" = String, Path)),
    responses((status = 201, body = PostingView, description = "Credited"),
        (status = 200, body = PostingView, description = "Already credited under this reference"),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn add_credits(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    body: JsonBody<AddCreditsInput>,
) -> Result<Response, ApiError> {
    let org = parse_org(&org)?;
    let mut tx = state.store.begin().await?;
    let (new, view) = ops::billing::add_credits(&state, &mut tx, &caller, org, &body.value).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// Metered usage and its cost over `[from, to)` (default: this month so far), per product and
/// unit, grouped by `workload`, `gpu_type` or `day` (UTC). `format=csv` downloads it.
#[utoipa::path(get, path = "/v1/orgs/{org}/usage", tag = "billing",
    params(("org" = String, Path), UsageParams),
    responses((status = 200, body = UsageView, description = "JSON, or text/csv with format=csv"),
        (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn usage(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    Query(params): Query<UsageParams>,
) -> Result<Response, ApiError> {
    let format = format_of(params.format.as_deref(), &["json", "csv"])?;
    let view = ops::billing::usage(&state, &caller, parse_org(&org)?, &params).await?;
    Ok(if format == "csv" {
        document(
            "text/csv; charset=utf-8",
            format!("usage-{org}.csv"),
            usage_csv(&view).into_bytes(),
        )
    } else {
        Json(view).into_response()
    })
}

/// The org's ledger postings, newest first: charges (with what, when, how much, at which
/// price version), top-ups, payments, promotional credit and its expiry. Each posting's
/// entries sum to zero.
#[utoipa::path(get, path = "/v1/orgs/{org}/ledger", tag = "billing",
    params(("org" = String, Path), ListParams),
    responses((status = 200, body = PostingList), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn ledger(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<PostingList>, ApiError> {
    ops::billing::ledger(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// The org's monthly invoices, newest month first.
#[utoipa::path(get, path = "/v1/orgs/{org}/invoices", tag = "billing",
    params(("org" = String, Path), ListParams),
    responses((status = 200, body = InvoiceList), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn invoices(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path(org): Path<String>,
    ListQuery(q): ListQuery,
) -> Result<Json<InvoiceList>, ApiError> {
    ops::billing::invoices(
        &state,
        &caller,
        parse_org(&org)?,
        q.limit,
        q.cursor.as_deref(),
    )
    .await
    .map(Json)
}

/// One invoice with its lines (by product, GPU type and MIG profile). `format=csv` or
/// `format=pdf` downloads it.
#[utoipa::path(get, path = "/v1/orgs/{org}/invoices/{invoice}", tag = "billing",
    params(("org" = String, Path), ("invoice" = String, Path), DocumentParams),
    responses((status = 200, body = InvoiceView, description = "JSON, text/csv or application/pdf"),
        (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn invoice(
    State(state): State<AppState>,
    Auth(caller): Auth,
    Path((org, id)): Path<(String, String)>,
    Query(params): Query<DocumentParams>,
) -> Result<Response, ApiError> {
    let format = format_of(params.format.as_deref(), &["json", "csv", "pdf"])?;
    let org = parse_org(&org)?;
    let view = ops::billing::invoice(&state, &caller, org, &id).await?;
    Ok(match format.as_str() {
        "csv" => document(
            "text/csv; charset=utf-8",
            format!("{}.csv", view.id),
            invoice_csv(&view).into_bytes(),
        ),
        "pdf" => document(
            "application/pdf",
            format!("{}.pdf", view.id),
            invoice_pdf(org, &view),
        ),
        _ => Json(view).into_response(),
    })
}

/// Every version of the price catalog, oldest first.
#[utoipa::path(get, path = "/v1/admin/prices", tag = "admin",
    responses((status = 200, body = PriceVersionList), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn prices_list(
    State(state): State<AppState>,
    Operator(caller): Operator,
) -> Result<Json<PriceVersionList>, ApiError> {
    ops::billing::prices_list(&state, &caller).await.map(Json)
}

/// Add a price version: the whole catalog from `effective_from` (now or later) until the next
/// version. Running work is charged each second at the version in effect then.
#[utoipa::path(post, path = "/v1/admin/prices", tag = "admin", request_body = CreatePriceVersionInput,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same key and body")),
    responses((status = 201, body = PriceVersionView), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "A version already takes effect at that instant"),
        (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn price_create(
    State(state): State<AppState>,
    Operator(caller): Operator,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreatePriceVersionInput>,
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
            Box::pin(async move { ops::billing::price_create(&st, conn, &caller, &input).await })
        },
    )
    .await
}

/// One price version.
#[utoipa::path(get, path = "/v1/admin/prices/{version}", tag = "admin", params(("version" = String, Path)),
    responses((status = 200, body = PriceVersionView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn price_get(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(version): Path<String>,
) -> Result<Json<PriceVersionView>, ApiError> {
    ops::billing::price_get(&state, &caller, &version)
        .await
        .map(Json)
}

/// Delete a price version that has not taken effect yet (409 once it has: it is history).
#[utoipa::path(delete, path = "/v1/admin/prices/{version}", tag = "admin", params(("version" = String, Path)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn price_delete(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(version): Path<String>,
) -> Result<StatusCode, ApiError> {
    ops::billing::price_delete(&state, &caller, &version).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An org's credit terms: credit limit and monthly budget.
#[utoipa::path(get, path = "/v1/admin/orgs/{org}/billing", tag = "admin", params(("org" = String, Path)),
    responses((status = 200, body = BillingSettingsView), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn settings_get(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(org): Path<String>,
) -> Result<Json<BillingSettingsView>, ApiError> {
    ops::billing::settings_get(&state, &caller, &org)
        .await
        .map(Json)
}

/// Set an org's credit limit and monthly budget (alerts at 50/80/100 % in its audit log).
/// Audited as `billing.settings`.
#[utoipa::path(put, path = "/v1/admin/orgs/{org}/billing", tag = "admin", request_body = SetBillingSettingsInput,
    params(("org" = String, Path)),
    responses((status = 200, body = BillingSettingsView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn settings_set(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(org): Path<String>,
    body: JsonBody<SetBillingSettingsInput>,
) -> Result<Json<BillingSettingsView>, ApiError> {
    ops::billing::settings_set(&state, &caller, &org, &body.value)
        .await
        .map(Json)
}

/// Grant promotional credit, spent before the paid balance until `expires_at`; what is left
/// then expires. Idempotent on `grant` (201 new, 200 already granted).
#[utoipa::path(post, path = "/v1/admin/orgs/{org}/promotional-credits", tag = "admin", request_body = GrantPromoInput,
    params(("org" = String, Path)),
    responses((status = 201, body = PostingView), (status = 200, body = PostingView),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn promo_grant(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(org): Path<String>,
    body: JsonBody<GrantPromoInput>,
) -> Result<Response, ApiError> {
    let (new, view) = ops::billing::grant_promo(&state, &caller, &org, &body.value).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// Write the org's invoice for a month now: final if the month has closed, else a draft that
/// is rewritten until it does.
#[utoipa::path(post, path = "/v1/admin/orgs/{org}/invoices", tag = "admin", request_body = GenerateInvoiceInput,
    params(("org" = String, Path)),
    responses((status = 200, body = InvoiceView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn invoice_generate(
    State(state): State<AppState>,
    Operator(caller): Operator,
    Path(org): Path<String>,
    body: JsonBody<GenerateInvoiceInput>,
) -> Result<Json<InvoiceView>, ApiError> {
    ops::billing::invoice_generate(&state, &caller, &org, &body.value)
        .await
        .map(Json)
}

/// The payment provider's webhook. Signed: `Kiln-Signature: t=<unix seconds>,v1=<hex
/// HMAC-SHA256 of "<t>.<raw body>">` with the shared secret; refused (401) when the signature
/// does not match or `t` is more than 5 minutes from now. A `payment.succeeded` event credits
/// the org once per event id, however often it is delivered.
#[utoipa::path(post, path = "/v1/billing/webhook", tag = "billing", request_body = PaymentEvent,
    params(("Kiln-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex HMAC-SHA256>")),
    responses((status = 200, body = WebhookAck), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 422, body = Problem)))]
pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookAck>, ApiError> {
    let signature = headers.get("kiln-signature").and_then(|v| v.to_str().ok());
    ops::billing::payment_webhook(&state, signature, &body)
        .await
        .map(Json)
}

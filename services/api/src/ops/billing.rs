//! Billing: an org's balance, usage, ledger and invoices for its members; credits, prices,
//! credit terms and on-demand invoices for operators; the payment provider's signed webhook;
//! and the 402 check new work goes through.
//!
//! The rules live in `kiln-billing-core` and are applied through `kiln-billing` (the same
//! functions the billing service uses), so a top-up here and one from the webhook post the same
//! way, and the 402 refusal is exactly the core's credit decision on the ledger's funds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use async_graphql::{InputObject, SimpleObject};
use hmac::{Hmac, Mac};
use kiln_billing::ledger::TopUp;
use kiln_billing_core::{Money, Month, Timestamp};
use kiln_domain::{InvoiceId, OrgId, Permission, PodId, PostingId, PriceVersionId, WorkloadId};
use kiln_store::{
    AuditEvent, FundsRecord, GpuPriceRecord, InvoiceRecord, NewPriceVersion, OrgScope,
    PostingRecord, PriceVersionDelete, PriceVersionRecord, StoreError, UsageGroup,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::PgConnection;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::{IntoParams, ToSchema};

use super::fleet::require_operator;
use super::{Checks, page, parse_org};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::ts;

/// The only currency so far.
pub const CURRENCY: &str = "USD";
/// The largest single credit, in micro-units (10 million USD).
pub const MAX_CREDIT_MICROS: i64 = 10_000_000_000_000;
/// How far a webhook's timestamp may be from now.
pub const WEBHOOK_TOLERANCE_SECS: i64 = 300;
const MAX_REFERENCE_CHARS: usize = 200;

// ---------------------------------------------------------------------------------------------
// Views

/// An amount of money: integer micro-units (1e-6) of `currency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct MoneyView {
    #[schema(example = 1234500)]
    pub amount_micros: i64,
    #[schema(example = "USD")]
    pub currency: String,
}

pub fn money(micros: i64) -> MoneyView {
    MoneyView {
        amount_micros: micros,
        currency: CURRENCY.to_owned(),
    }
}

/// An org's balance and credit terms.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct BalanceView {
    /// The paid balance: top-ups and payments minus charges not covered by promotional credit.
    /// Negative while drawing on the credit limit.
    pub balance: MoneyView,
    /// How far `balance` may go below zero.
    pub credit_limit: MoneyView,
    /// Unexpired promotional credit (spent before the paid balance).
    pub promotional_credit: MoneyView,
    /// What can still be spent: balance + promotional credit + credit limit. At zero, new
    /// work is refused with 402 and running work is stopped after a grace period.
    pub available: MoneyView,
    /// Charges accrued since the start of this calendar month (UTC).
    pub spent_this_month: MoneyView,
    /// The monthly budget alerts are raised against (50/80/100 %), if set.
    pub monthly_budget: Option<MoneyView>,
    /// The highest budget alert raised this month (50, 80 or 100: percent of the budget
    /// spent), if any. Each is also in the audit log as `billing.budget_alert`.
    pub budget_alert_percent: Option<i32>,
    /// Charges accrued in the last hour: what running work costs per hour now.
    pub burn_rate_per_hour: MoneyView,
    /// New work is refused (402) because credit ran out.
    pub out_of_credit: bool,
    /// When the billing service saw credit run out (running work stops a grace period later).
    pub out_of_credit_since: Option<String>,
}

/// One line of a ledger posting. Positive: value held by (or attributed to) the account.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct EntryView {
    #[schema(example = "revenue:gpu")]
    pub account: String,
    pub amount_micros: i64,
}

/// One ledger posting: a charge, a top-up, promotional credit or its expiry. Its entries sum
/// to zero.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct PostingView {
    #[schema(example = "txn_0193a8d4e0c47a6b9f1e2d3c4b5a6978")]
    pub id: String,
    /// `charge`, `usage` (endpoint calls), `top_up`, `promo_grant` or `promo_expiry`.
    pub kind: String,
    /// When it accrued (a charge's period start; a credit's receipt).
    pub at: String,
    /// The charge or credit, positive.
    pub amount: MoneyView,
    pub description: String,
    /// The operator's reference, the payment event or the promotional grant.
    pub reference: Option<String>,
    /// The workload charged (`pod_…`, `wl_…`).
    pub workload: Option<String>,
    /// What was charged: `pod_gpu`, `instance_gpu`, `mig_slice`, `gpu_share`, `storage`,
    /// `inference_requests`, `inference_prompt_tokens`, `inference_completion_tokens`.
    pub product: Option<String>,
    pub gpu_type: Option<String>,
    /// The MIG profile of a MIG slice.
    pub detail: Option<String>,
    /// `on_demand` or `spot`.
    pub tier: Option<String>,
    /// The end of the charged period (`[at, period_end)`).
    pub period_end: Option<String>,
    /// The price version the charge was rated at (its `effective_from`).
    pub price_version: Option<String>,
    /// `gpu_seconds`, `slice_seconds`, `mib_seconds`, `gib_seconds`, `requests`, `tokens`.
    pub unit: Option<String>,
    pub quantity: Option<i64>,
    pub entries: Vec<EntryView>,
}

/// The org's postings, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct PostingList {
    pub items: Vec<PostingView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Metered quantity and cost of one group, per product and unit.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct UsageItemView {
    /// The workload (`pod_…`), GPU type or day (`YYYY-MM-DD`, UTC), as grouped.
    pub group: String,
    pub product: String,
    pub gpu_type: Option<String>,
    pub unit: String,
    pub quantity: i64,
    pub cost: MoneyView,
}

/// Usage over `[from, to)`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct UsageView {
    pub from: String,
    pub to: String,
    /// `workload`, `gpu_type` or `day`.
    pub group_by: String,
    pub items: Vec<UsageItemView>,
    pub total: MoneyView,
}

/// One invoice line: the month's charges of one product on one GPU type (and MIG profile).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct InvoiceLineView {
    pub product: String,
    pub gpu_type: Option<String>,
    pub detail: Option<String>,
    pub unit: String,
    pub quantity: i64,
    pub amount: MoneyView,
}

/// A monthly invoice. Its total equals what the ledger charged the org for usage accruing in
/// the month.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct InvoiceView {
    #[schema(example = "inv_0193a8d4e0c47a6b9f1e2d3c4b5a6978")]
    pub id: String,
    #[schema(example = "2026-11")]
    pub month: String,
    /// `draft` (the month is still open) or `final`.
    pub status: String,
    pub total: MoneyView,
    pub lines: Vec<InvoiceLineView>,
    pub created_at: String,
    pub updated_at: String,
}

/// The org's invoices, newest month first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct InvoiceList {
    pub items: Vec<InvoiceView>,
    pub next_cursor: Option<String>,
}

/// An operator's credit to an org.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct AddCreditsInput {
    /// Micro-units, 1 to 10¹³ (10 million USD).
    #[schema(example = 50000000)]
    pub amount_micros: Option<i64>,
    /// `USD` (the default).
    pub currency: Option<String>,
    /// Your reference (an invoice or transfer number): the same reference for the same org
    /// credits once; 1 to 200 printable characters.
    #[schema(example = "wire-2026-11-0042")]
    pub reference: String,
}

/// One GPU type's prices in a version, in micro-units (null = not sold on that type).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct GpuPricesView {
    #[schema(example = "h100-80gb")]
    pub gpu_type: String,
    /// Instances, per GPU-hour.
    pub instance_gpu_hour_micros: Option<i64>,
    /// Pods on whole GPUs, per GPU-hour.
    pub pod_gpu_hour_micros: Option<i64>,
    /// MIG slices, per slice-hour, by profile.
    #[schema(example = json!({"1g.10gb": 450000}))]
    pub mig_hour_micros: BTreeMap<String, i64>,
    /// Time-sliced shares, per GiB-hour of the declared memory cap.
    pub share_gib_hour_micros: Option<i64>,
    /// Spot discount off GPU prices, in basis points (0–10000).
    pub spot_discount_bps: i32,
    /// Endpoint calls: per request, per 1000 prompt tokens, per 1000 completion tokens (all
    /// three or none).
    pub endpoint_per_request_micros: Option<i64>,
    pub endpoint_per_1k_prompt_micros: Option<i64>,
    pub endpoint_per_1k_completion_micros: Option<i64>,
}

/// A version of the price catalog.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PriceVersionView {
    #[schema(example = "prc_0193a8d4e0c47a6b9f1e2d3c4b5a6978")]
    pub id: String,
    /// In effect from this instant until the next version's.
    pub effective_from: String,
    /// Disks of stopped instances, per GiB-month (30 days).
    pub storage_gib_month_micros: Option<i64>,
    pub note: String,
    pub gpus: Vec<GpuPricesView>,
    /// Whether it has taken effect (then it is history and cannot change).
    pub in_effect: bool,
    pub created_at: String,
}

/// Every price version, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PriceVersionList {
    pub items: Vec<PriceVersionView>,
}

/// A new price version: the whole catalog from `effective_from` on (a GPU type it leaves out
/// is not sold from then).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreatePriceVersionInput {
    /// RFC 3339; now or later (the past is history). Default: now.
    pub effective_from: Option<String>,
    pub storage_gib_month_micros: Option<i64>,
    pub note: String,
    pub gpus: Vec<GpuPricesView>,
}

/// An org's credit terms, as an operator sets them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BillingSettingsView {
    pub org: String,
    pub credit_limit: MoneyView,
    pub monthly_budget: Option<MoneyView>,
    pub out_of_credit_since: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SetBillingSettingsInput {
    /// How far the org's paid balance may go below zero, in micro-units (≥ 0).
    pub credit_limit_micros: Option<i64>,
    /// Monthly budget for alerts, in micro-units (> 0); null for none.
    pub monthly_budget_micros: Option<i64>,
}

/// Promotional credit for an org, spendable until `expires_at`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct GrantPromoInput {
    pub amount_micros: Option<i64>,
    pub currency: Option<String>,
    /// Names the grant (idempotent on it): 1 to 64 of `a-z`, `0-9`, `-`, `_`.
    #[schema(example = "welcome-2026")]
    pub grant: String,
    /// RFC 3339, in the future.
    pub expires_at: String,
}

/// Generate (or refresh the draft of) an org's invoice for a month.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct GenerateInvoiceInput {
    /// `YYYY-MM`; default: the current month (a draft until it closes).
    pub month: Option<String>,
}

/// `?from=&to=&group_by=&format=`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// RFC 3339 or `YYYY-MM-DD` (UTC midnight); default: the start of this month.
    pub from: Option<String>,
    /// RFC 3339 or `YYYY-MM-DD`, exclusive; default: now.
    pub to: Option<String>,
    /// `workload` (default), `gpu_type` or `day`.
    pub group_by: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// `?format=` of invoice downloads.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DocumentParams {
    /// `json` (default), `csv` or `pdf`.
    pub format: Option<String>,
}

/// What the payment provider sends (signed).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PaymentEvent {
    /// The provider's event id: an event is credited once however often it is delivered.
    #[schema(example = "evt_1Q2w3E4r")]
    pub id: String,
    /// Only `payment.succeeded` credits; other types are acknowledged and ignored.
    #[serde(rename = "type")]
    #[schema(example = "payment.succeeded")]
    pub kind: String,
    /// The org paid for (`org_…`).
    pub org: String,
    pub amount_micros: i64,
    pub currency: String,
}

/// The webhook's answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// The ledger posting the payment became (none for ignored event types).
    pub posting: Option<String>,
    /// The event was already credited: nothing changed.
    pub duplicate: bool,
}

// ---------------------------------------------------------------------------------------------
// Conversions

fn public_workload(kind: Option<&str>, id: uuid::Uuid) -> String {
    match kind {
        Some("pod") => PodId::from_uuid(id).to_string(),
        _ => WorkloadId::from_uuid(id).to_string(),
    }
}

pub fn posting_view(p: &PostingRecord) -> PostingView {
    PostingView {
        id: PostingId::from_uuid(p.id).to_string(),
        kind: p.kind.clone(),
        at: ts(p.at),
        amount: MoneyView {
            amount_micros: p.amount_micros,
            currency: p.currency.clone(),
        },
        description: p.description.clone(),
        reference: p.reference.clone(),
        workload: p
            .workload_id
            .map(|w| public_workload(p.workload_kind.as_deref(), w)),
        product: p.product.clone(),
        gpu_type: p.gpu_type.clone(),
        detail: p.detail.clone(),
        tier: p.tier.clone(),
        period_end: p.period_end.map(ts),
        price_version: p.price_version.map(ts),
        unit: p.unit.clone(),
        quantity: p.quantity,
        entries: p
            .entries
            .0
            .iter()
            .map(|e| EntryView {
                account: e.account.clone(),
                amount_micros: e.amount_micros,
            })
            .collect(),
    }
}

pub fn invoice_view(i: &InvoiceRecord) -> InvoiceView {
    InvoiceView {
        id: InvoiceId::from_uuid(i.id).to_string(),
        month: kiln_billing::convert::month_of_date(i.month).to_string(),
        status: i.status.clone(),
        total: MoneyView {
            amount_micros: i.total_micros,
            currency: i.currency.clone(),
        },
        lines: i
            .lines
            .0
            .iter()
            .map(|l| InvoiceLineView {
                product: l.product.clone(),
                gpu_type: l.gpu_type.clone(),
                detail: l.detail.clone(),
                unit: l.unit.clone(),
                quantity: l.quantity,
                amount: money(l.amount_micros),
            })
            .collect(),
        created_at: ts(i.created_at),
        updated_at: ts(i.updated_at),
    }
}

fn price_version_view(v: &PriceVersionRecord, now: OffsetDateTime) -> PriceVersionView {
    PriceVersionView {
        id: PriceVersionId::from_uuid(v.id).to_string(),
        effective_from: ts(v.effective_from),
        storage_gib_month_micros: v.storage_gib_month_micros,
        note: v.note.clone(),
        gpus: v
            .gpus
            .0
            .iter()
            .map(|g| GpuPricesView {
                gpu_type: g.gpu_type.clone(),
                instance_gpu_hour_micros: g.instance_gpu_hour_micros,
                pod_gpu_hour_micros: g.pod_gpu_hour_micros,
                mig_hour_micros: g.mig_hour_micros.clone(),
                share_gib_hour_micros: g.share_gib_hour_micros,
                spot_discount_bps: g.spot_discount_bps,
                endpoint_per_request_micros: g.endpoint_per_request_micros,
                endpoint_per_1k_prompt_micros: g.endpoint_per_1k_prompt_micros,
                endpoint_per_1k_completion_micros: g.endpoint_per_1k_completion_micros,
            })
            .collect(),
        in_effect: v.effective_from <= now,
        created_at: ts(v.created_at),
    }
}

fn billing_error(e: kiln_billing::BillingError) -> ApiError {
    match e {
        kiln_billing::BillingError::Store(s) => s.into(),
        kiln_billing::BillingError::ReferenceReused => ApiError::Conflict(
            "this reference was already used for this org with a different amount".into(),
        ),
        other => ApiError::internal(other),
    }
}

fn parse_instant(field: &str, raw: &str) -> Result<OffsetDateTime, ApiError> {
    if let Ok(t) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Ok(t);
    }
    let day = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(raw, &day)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| {
            ApiError::field(
                field,
                "must be RFC 3339 (2026-11-01T00:00:00Z) or YYYY-MM-DD",
            )
        })
}

fn parse_month(raw: &str) -> Option<Month> {
    let (y, m) = raw.trim().split_once('-')?;
    Month::new(y.parse().ok()?, m.parse().ok()?)
}

fn check_currency(checks: &mut Checks, currency: &Option<String>) {
    if let Some(c) = currency
        && !c.trim().eq_ignore_ascii_case(CURRENCY)
    {
        checks.push("currency", "only USD is supported");
    }
}

fn check_amount(checks: &mut Checks, amount: Option<i64>) -> i64 {
    match amount {
        None => {
            checks.push("amount_micros", "is required");
            0
        }
        Some(a) if (1..=MAX_CREDIT_MICROS).contains(&a) => a,
        Some(_) => {
            checks.push(
                "amount_micros",
                format!("must be between 1 and {MAX_CREDIT_MICROS}"),
            );
            0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The 402 check

/// Refuse new work with 402 when the org is out of credit (its funds and credit limit are
/// spent). Runs in the creating transaction.
pub async fn ensure_in_credit(
    state: &AppState,
    conn: &mut PgConnection,
    scope: &OrgScope,
) -> Result<(), ApiError> {
    let out = kiln_billing::limits::standing(
        &state.store,
        conn,
        scope.org_id().as_uuid(),
        OffsetDateTime::now_utc(),
    )
    .await
    .map_err(billing_error)?;
    match out {
        None => Ok(()),
        Some(f) => Err(ApiError::PaymentRequired(format!(
            "the org is out of credit: balance {} with a credit limit of {}; add credit to \
             start new work",
            Money::<kiln_billing_core::Usd>::from_micros(f.paid_micros + f.promo_micros),
            Money::<kiln_billing_core::Usd>::from_micros(f.credit_limit_micros),
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Tenant reads

fn balance_view(f: &FundsRecord, spent: i64, burn: i64, now: OffsetDateTime) -> BalanceView {
    let available = f.paid_micros + f.promo_micros + f.credit_limit_micros;
    BalanceView {
        balance: money(f.paid_micros),
        credit_limit: money(f.credit_limit_micros),
        promotional_credit: money(f.promo_micros),
        available: money(available),
        spent_this_month: money(spent),
        monthly_budget: f.monthly_budget_micros.map(money),
        budget_alert_percent: kiln_billing::limits::budget_alert_this_month(f, now),
        burn_rate_per_hour: money(burn),
        out_of_credit: available <= 0,
        out_of_credit_since: f.credit_exhausted_at.map(ts),
    }
}

/// The org's balance and credit terms. Members of any role.
pub async fn balance(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
) -> Result<BalanceView, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::BillingRead)
        .await?;
    let org = scope.org_id().as_uuid();
    let now = OffsetDateTime::now_utc();
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(StoreError::from)?;
    let f = state
        .store
        .billing_funds(&mut conn, &[org], now)
        .await?
        .into_iter()
        .next()
        .ok_or(ApiError::NotFound("org"))?;
    let month_start = kiln_billing::convert::odt(Month::of(kiln_billing::convert::ts(now)).start());
    let spent = state
        .store
        .billing_charged_since(&mut conn, &[org], month_start)
        .await?
        .first()
        .map_or(0, |(_, s)| *s);
    let burn = state
        .store
        .billing_charged_since(&mut conn, &[org], now - time::Duration::hours(1))
        .await?
        .first()
        .map_or(0, |(_, s)| *s);
    Ok(balance_view(&f, spent, burn, now))
}

/// The org's ledger postings, newest first.
pub async fn ledger(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<PostingList, ApiError> {
    let page = page::<PostingId>(limit, cursor, |p| p.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::BillingRead)
        .await?;
    let p = state.store.ledger_list(&scope, page).await?;
    Ok(PostingList {
        items: p.items.iter().map(posting_view).collect(),
        next_cursor: p.next_cursor,
    })
}

/// Metered usage and its cost over a period, grouped.
pub async fn usage(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    params: &UsageParams,
) -> Result<UsageView, ApiError> {
    let now = OffsetDateTime::now_utc();
    let mut checks = Checks::default();
    let from = match params.from.as_deref().filter(|s| !s.is_empty()) {
        None => Some(kiln_billing::convert::odt(
            Month::of(kiln_billing::convert::ts(now)).start(),
        )),
        Some(raw) => parse_instant("from", raw)
            .map_err(|_| checks.push("from", "must be RFC 3339 or YYYY-MM-DD"))
            .ok(),
    };
    let to = match params.to.as_deref().filter(|s| !s.is_empty()) {
        None => Some(now),
        Some(raw) => parse_instant("to", raw)
            .map_err(|_| checks.push("to", "must be RFC 3339 or YYYY-MM-DD"))
            .ok(),
    };
    let group_by = params.group_by.as_deref().unwrap_or("workload");
    let group = match group_by {
        "workload" => Some(UsageGroup::Workload),
        "gpu_type" => Some(UsageGroup::GpuType),
        "day" => Some(UsageGroup::Day),
        _ => {
            checks.push("group_by", "must be one of workload, gpu_type, day");
            None
        }
    };
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        checks.push("to", "must be after `from`");
    }
    checks.finish()?;
    let (Some(from), Some(to), Some(group)) = (from, to, group) else {
        return Err(ApiError::BadRequest("invalid usage query".into()));
    };
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::BillingRead)
        .await?;
    let rows = state.store.usage_summary(&scope, from, to, group).await?;
    let total = rows.iter().map(|r| r.amount_micros).sum();
    Ok(UsageView {
        from: ts(from),
        to: ts(to),
        group_by: group_by.to_owned(),
        items: rows
            .into_iter()
            .map(|r| {
                let group = match (group, r.group_key) {
                    (UsageGroup::Workload, Some(k)) => k
                        .parse::<uuid::Uuid>()
                        .map(|id| public_workload(r.workload_kind.as_deref(), id))
                        .unwrap_or(k),
                    (_, k) => k.unwrap_or_default(),
                };
                UsageItemView {
                    group,
                    product: r.product,
                    gpu_type: r.gpu_type,
                    unit: r.unit,
                    quantity: r.quantity,
                    cost: money(r.amount_micros),
                }
            })
            .collect(),
        total: money(total),
    })
}

/// The org's invoices, newest month first.
pub async fn invoices(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<InvoiceList, ApiError> {
    let page = page::<InvoiceId>(limit, cursor, |i| i.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::BillingRead)
        .await?;
    let p = state.store.invoice_list(&scope, page).await?;
    Ok(InvoiceList {
        items: p.items.iter().map(invoice_view).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn invoice(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    id: &str,
) -> Result<InvoiceView, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::BillingRead)
        .await?;
    let id: InvoiceId = id.parse().map_err(|_| ApiError::NotFound("invoice"))?;
    Ok(invoice_view(
        &state.store.invoice_get(&scope, id.as_uuid()).await?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Operators

/// Only operators add credit. A member of the org learns that (403); anyone else gets 404.
/// Checked on the request's own connection (one connection per request transaction).
async fn require_operator_for(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
) -> Result<(), ApiError> {
    if caller.principal.is_operator() {
        return if state.store.org_exists(conn, org).await? {
            Ok(())
        } else {
            Err(ApiError::NotFound("org"))
        };
    }
    state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::OrgRead)
        .await?;
    Err(ApiError::Forbidden(
        "only the deployment's operators add credit; pay through the payment provider".into(),
    ))
}

/// Credit an org (operators), idempotent on `(org, reference)`: answers whether it was new.
pub async fn add_credits(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    input: &AddCreditsInput,
) -> Result<(bool, PostingView), ApiError> {
    require_operator_for(state, conn, caller, org).await?;
    let mut checks = Checks::default();
    let amount = check_amount(&mut checks, input.amount_micros);
    check_currency(&mut checks, &input.currency);
    let reference = input.reference.trim();
    if reference.is_empty() {
        checks.push("reference", "is required");
    } else if reference.chars().count() > MAX_REFERENCE_CHARS
        || reference.chars().any(char::is_control)
    {
        checks.push(
            "reference",
            "must be at most 200 characters without control characters",
        );
    }
    checks.finish()?;
    let outcome = kiln_billing::ledger::top_up(
        &state.store,
        conn,
        org.as_uuid(),
        Money::from_micros(amount),
        reference,
        &format!("credit added by an operator ({reference})"),
        OffsetDateTime::now_utc(),
    )
    .await
    .map_err(billing_error)?;
    match outcome {
        TopUp::New(p) => {
            let event = AuditEvent {
                org_id: Some(org),
                actor_user: caller.principal.user_id(),
                actor_api_key: None,
                action: "billing.credit",
                target: Some(PostingId::from_uuid(p.id).to_string()),
                ip: caller.client.ip.clone(),
                details: serde_json::json!({ "amount_micros": amount, "reference": reference }),
            };
            state.store.audit_record(conn, &event).await?;
            Ok((true, posting_view(&p)))
        }
        TopUp::Duplicate(p) => Ok((false, posting_view(&p))),
    }
}

/// Grant promotional credit (operators).
pub async fn grant_promo(
    state: &AppState,
    caller: &Caller,
    org: &str,
    input: &GrantPromoInput,
) -> Result<(bool, PostingView), ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    let now = OffsetDateTime::now_utc();
    let mut checks = Checks::default();
    let amount = check_amount(&mut checks, input.amount_micros);
    check_currency(&mut checks, &input.currency);
    let grant = input.grant.trim();
    if grant.is_empty()
        || grant.len() > 64
        || !grant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        checks.push("grant", "must be 1 to 64 of a-z, 0-9, - and _");
    }
    let expires = match OffsetDateTime::parse(input.expires_at.trim(), &Rfc3339) {
        Ok(t) if t > now => Some(t),
        Ok(_) => {
            checks.push("expires_at", "must be in the future");
            None
        }
        Err(_) => {
            checks.push("expires_at", "must be RFC 3339");
            None
        }
    };
    checks.finish()?;
    let expires = expires.ok_or(ApiError::BadRequest("invalid expiry".into()))?;
    let mut tx = state.store.begin().await?;
    if !state.store.org_exists(&mut tx, org).await? {
        return Err(ApiError::NotFound("org"));
    }
    let outcome = kiln_billing::ledger::grant_promo(
        &state.store,
        &mut tx,
        org.as_uuid(),
        grant,
        Money::from_micros(amount),
        expires,
        now,
    )
    .await
    .map_err(billing_error)?;
    let (new, p) = match outcome {
        TopUp::New(p) => (true, p),
        TopUp::Duplicate(p) => (false, p),
    };
    if new {
        let event = AuditEvent {
            org_id: Some(org),
            actor_user: caller.principal.user_id(),
            actor_api_key: None,
            action: "billing.promo_grant",
            target: Some(grant.to_owned()),
            ip: caller.client.ip.clone(),
            details: serde_json::json!({ "amount_micros": amount, "expires_at": ts(expires) }),
        };
        state.store.audit_record(&mut tx, &event).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok((new, posting_view(&p)))
}

pub async fn prices_list(state: &AppState, caller: &Caller) -> Result<PriceVersionList, ApiError> {
    require_operator(caller)?;
    let now = OffsetDateTime::now_utc();
    Ok(PriceVersionList {
        items: state
            .store
            .price_versions()
            .await?
            .iter()
            .map(|v| price_version_view(v, now))
            .collect(),
    })
}

fn parse_price_version(raw: &str) -> Result<PriceVersionId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("price version"))
}

pub async fn price_get(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<PriceVersionView, ApiError> {
    require_operator(caller)?;
    let id = parse_price_version(id)?;
    Ok(price_version_view(
        &state.store.price_version_get(id.as_uuid()).await?,
        OffsetDateTime::now_utc(),
    ))
}

fn validate_gpu_prices(checks: &mut Checks, i: usize, g: &GpuPricesView) {
    let field = |f: &str| format!("gpus[{i}].{f}");
    let t = g.gpu_type.trim();
    if t.is_empty()
        || t.len() > 64
        || !t
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        checks.push(&field("gpu_type"), "must be 1 to 64 of a-z, 0-9 and -");
    }
    for (name, v) in [
        ("instance_gpu_hour_micros", g.instance_gpu_hour_micros),
        ("pod_gpu_hour_micros", g.pod_gpu_hour_micros),
        ("share_gib_hour_micros", g.share_gib_hour_micros),
        ("endpoint_per_request_micros", g.endpoint_per_request_micros),
        (
            "endpoint_per_1k_prompt_micros",
            g.endpoint_per_1k_prompt_micros,
        ),
        (
            "endpoint_per_1k_completion_micros",
            g.endpoint_per_1k_completion_micros,
        ),
    ] {
        if v.is_some_and(|v| !(0..=MAX_CREDIT_MICROS).contains(&v)) {
            checks.push(&field(name), "must be between 0 and 10^13 micros");
        }
    }
    if !(0..=10_000).contains(&g.spot_discount_bps) {
        checks.push(&field("spot_discount_bps"), "must be between 0 and 10000");
    }
    let geometry = kiln_placement::mig::geometry(t);
    for (profile, v) in &g.mig_hour_micros {
        if !(0..=MAX_CREDIT_MICROS).contains(v) {
            checks.push(
                &field("mig_hour_micros"),
                "prices must be between 0 and 10^13 micros",
            );
        }
        if !geometry.is_some_and(|geo| geo.profiles.iter().any(|p| p.name == profile)) {
            checks.push(
                &field("mig_hour_micros"),
                format!("`{profile}` is not a MIG profile of {t}"),
            );
        }
    }
    let endpoint = [
        g.endpoint_per_request_micros,
        g.endpoint_per_1k_prompt_micros,
        g.endpoint_per_1k_completion_micros,
    ];
    if endpoint.iter().any(Option::is_some) && !endpoint.iter().all(Option::is_some) {
        checks.push(
            &field("endpoint_per_request_micros"),
            "give all three endpoint prices or none",
        );
    }
}

/// Add a price version (operators), in effect from now or later. Audited org-less.
pub async fn price_create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    input: &CreatePriceVersionInput,
) -> Result<PriceVersionView, ApiError> {
    require_operator(caller)?;
    let now = OffsetDateTime::now_utc();
    let mut checks = Checks::default();
    let effective_from = match input.effective_from.as_deref().map(str::trim) {
        None | Some("") => Some(now),
        Some(raw) => match OffsetDateTime::parse(raw, &Rfc3339) {
            Ok(t) if t >= now - time::Duration::seconds(5) => Some(t.max(now)),
            Ok(_) => {
                checks.push(
                    "effective_from",
                    "must be now or later: prices already in effect are history",
                );
                None
            }
            Err(_) => {
                checks.push("effective_from", "must be RFC 3339");
                None
            }
        },
    };
    if input
        .storage_gib_month_micros
        .is_some_and(|v| !(0..=MAX_CREDIT_MICROS).contains(&v))
    {
        checks.push(
            "storage_gib_month_micros",
            "must be between 0 and 10^13 micros",
        );
    }
    if input.note.chars().count() > 500 {
        checks.push("note", "must be at most 500 characters");
    }
    if input.gpus.is_empty() {
        checks.push("gpus", "give the prices of at least one GPU type");
    }
    if input.gpus.len() > 256 {
        checks.push("gpus", "at most 256 GPU types");
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, g) in input.gpus.iter().enumerate() {
        validate_gpu_prices(&mut checks, i, g);
        if !seen.insert(g.gpu_type.trim()) {
            checks.push(&format!("gpus[{i}].gpu_type"), "is listed twice");
        }
    }
    checks.finish()?;
    let effective_from = effective_from.ok_or(ApiError::BadRequest("invalid version".into()))?;
    let gpus: Vec<GpuPriceRecord> = input
        .gpus
        .iter()
        .map(|g| GpuPriceRecord {
            gpu_type: g.gpu_type.trim().to_owned(),
            instance_gpu_hour_micros: g.instance_gpu_hour_micros,
            pod_gpu_hour_micros: g.pod_gpu_hour_micros,
            mig_hour_micros: g.mig_hour_micros.clone(),
            share_gib_hour_micros: g.share_gib_hour_micros,
            spot_discount_bps: g.spot_discount_bps,
            endpoint_per_request_micros: g.endpoint_per_request_micros,
            endpoint_per_1k_prompt_micros: g.endpoint_per_1k_prompt_micros,
            endpoint_per_1k_completion_micros: g.endpoint_per_1k_completion_micros,
        })
        .collect();
    let record = state
        .store
        .price_version_create(
            conn,
            &NewPriceVersion {
                effective_from,
                storage_gib_month_micros: input.storage_gib_month_micros,
                note: input.note.trim(),
                created_by: caller.principal.user_id().map(|u| u.as_uuid()),
                gpus: &gpus,
            },
        )
        .await?;
    let event = AuditEvent {
        org_id: None,
        actor_user: caller.principal.user_id(),
        actor_api_key: None,
        action: "billing.price_version.create",
        target: Some(PriceVersionId::from_uuid(record.id).to_string()),
        ip: caller.client.ip.clone(),
        details: serde_json::json!({ "effective_from": ts(effective_from), "gpu_types": gpus.len() }),
    };
    state.store.audit_record(conn, &event).await?;
    Ok(price_version_view(&record, now))
}

/// Delete a price version that has not taken effect (operators); 409 once it has.
pub async fn price_delete(state: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    require_operator(caller)?;
    let id = parse_price_version(id)?;
    let mut tx = state.store.begin().await?;
    match state
        .store
        .price_version_delete(&mut tx, id.as_uuid())
        .await?
    {
        PriceVersionDelete::Deleted => {
            tx.commit().await.map_err(StoreError::from)?;
            Ok(())
        }
        PriceVersionDelete::InEffect => Err(ApiError::Conflict(
            "this price version has taken effect: it is history and stays; add a new version"
                .into(),
        )),
        PriceVersionDelete::NotFound => Err(ApiError::NotFound("price version")),
    }
}

fn settings_view(s: &kiln_store::BillingSettingsRecord) -> BillingSettingsView {
    BillingSettingsView {
        org: OrgId::from_uuid(s.org_id).to_string(),
        credit_limit: money(s.credit_limit_micros),
        monthly_budget: s.monthly_budget_micros.map(money),
        out_of_credit_since: s.credit_exhausted_at.map(ts),
        updated_at: ts(s.updated_at),
    }
}

pub async fn settings_get(
    state: &AppState,
    caller: &Caller,
    org: &str,
) -> Result<BillingSettingsView, ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    Ok(settings_view(&state.store.billing_settings(org).await?))
}

/// Set an org's credit limit and monthly budget (operators), audited `billing.settings`.
pub async fn settings_set(
    state: &AppState,
    caller: &Caller,
    org: &str,
    input: &SetBillingSettingsInput,
) -> Result<BillingSettingsView, ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    let mut checks = Checks::default();
    let limit = match input.credit_limit_micros {
        None => {
            checks.push("credit_limit_micros", "is required");
            0
        }
        Some(l) if (0..=MAX_CREDIT_MICROS).contains(&l) => l,
        Some(_) => {
            checks.push("credit_limit_micros", "must be between 0 and 10^13");
            0
        }
    };
    if input
        .monthly_budget_micros
        .is_some_and(|b| !(1..=MAX_CREDIT_MICROS).contains(&b))
    {
        checks.push(
            "monthly_budget_micros",
            "must be between 1 and 10^13, or null",
        );
    }
    checks.finish()?;
    let mut tx = state.store.begin().await?;
    let record = state
        .store
        .billing_settings_set(&mut tx, org, limit, input.monthly_budget_micros)
        .await?;
    let event = AuditEvent {
        org_id: Some(org),
        actor_user: caller.principal.user_id(),
        actor_api_key: None,
        action: "billing.settings",
        target: Some(org.to_string()),
        ip: caller.client.ip.clone(),
        details: serde_json::json!({
            "credit_limit_micros": limit,
            "monthly_budget_micros": input.monthly_budget_micros,
        }),
    };
    state.store.audit_record(&mut tx, &event).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(settings_view(&record))
}

/// Write an org's invoice for a month now (operators): final if the month has closed, else a
/// draft that later calls and the month close rewrite.
pub async fn invoice_generate(
    state: &AppState,
    caller: &Caller,
    org: &str,
    input: &GenerateInvoiceInput,
) -> Result<InvoiceView, ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    let now = OffsetDateTime::now_utc();
    let month = match input.month.as_deref() {
        None => Month::of(kiln_billing::convert::ts(now)),
        Some(raw) => parse_month(raw).ok_or_else(|| ApiError::field("month", "must be YYYY-MM"))?,
    };
    if month.start() > kiln_billing::convert::ts(now) {
        return Err(ApiError::field("month", "must not be in the future"));
    }
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(StoreError::from)?;
    if !state.store.org_exists(&mut conn, org).await? {
        return Err(ApiError::NotFound("org"));
    }
    drop(conn);
    let record = kiln_billing::invoices::on_demand(
        &state.store,
        org.as_uuid(),
        month,
        now,
        state.config.invoice_close_delay(),
    )
    .await
    .map_err(billing_error)?;
    Ok(invoice_view(&record))
}

// ---------------------------------------------------------------------------------------------
// The payment provider's webhook

/// Check `Kiln-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` with the
/// deployment's webhook secret and a replay window of 5 minutes.
pub fn verify_signature(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let header = header.ok_or(ApiError::Unauthenticated(
        "send the payment provider's Kiln-Signature header",
    ))?;
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v.to_owned()),
            _ => {}
        }
    }
    let Some(t) = t else {
        return Err(ApiError::Unauthenticated(
            "the Kiln-Signature header has no timestamp",
        ));
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(ApiError::internal)?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let valid = signatures
        .iter()
        .any(|s| hex::decode(s).is_ok_and(|bytes| mac.clone().verify_slice(&bytes).is_ok()));
    if !valid {
        return Err(ApiError::Unauthenticated("the signature does not match"));
    }
    if (now.unix_timestamp() - t).abs() > WEBHOOK_TOLERANCE_SECS {
        return Err(ApiError::Unauthenticated(
            "the signed timestamp is outside the 5-minute replay window",
        ));
    }
    Ok(())
}

/// The `Kiln-Signature` header value for `body` at `t` (what the provider computes).
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A signed payment event: `payment.succeeded` credits the org once per event id.
pub async fn payment_webhook(
    state: &AppState,
    signature: Option<&str>,
    body: &[u8],
) -> Result<WebhookAck, ApiError> {
    // An empty secret is no secret: anyone could sign with it. Treated as not configured.
    let Some(secret) = state
        .config
        .billing_webhook_secret
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    else {
        return Err(ApiError::NotFound("resource"));
    };
    let now = OffsetDateTime::now_utc();
    verify_signature(secret.as_bytes(), signature, body, now)?;
    let event: PaymentEvent = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("not a payment event: {e}")))?;
    if event.kind != "payment.succeeded" {
        return Ok(WebhookAck {
            received: true,
            posting: None,
            duplicate: false,
        });
    }
    let mut checks = Checks::default();
    let amount = check_amount(&mut checks, Some(event.amount_micros));
    check_currency(&mut checks, &Some(event.currency.clone()));
    if event.id.is_empty() || event.id.len() > MAX_REFERENCE_CHARS {
        checks.push("id", "must be 1 to 200 characters");
    }
    let org = event.org.parse::<OrgId>().ok();
    if org.is_none() {
        checks.push("org", "is not an org id");
    }
    checks.finish()?;
    let org = org.ok_or(ApiError::BadRequest("no org".into()))?;
    let mut tx = state.store.begin().await?;
    if !state.store.org_exists(&mut tx, org).await? {
        return Err(ApiError::field("org", "no such org"));
    }
    let outcome = kiln_billing::ledger::top_up(
        &state.store,
        &mut tx,
        org.as_uuid(),
        Money::from_micros(amount),
        &format!("payment:{}", event.id),
        &format!("payment {}", event.id),
        now,
    )
    .await
    .map_err(billing_error)?;
    let (duplicate, posting) = match outcome {
        TopUp::New(p) => {
            let audit = AuditEvent {
                org_id: Some(org),
                actor_user: None,
                actor_api_key: None,
                action: "billing.payment",
                target: Some(event.id.clone()),
                ip: None,
                details: serde_json::json!({ "amount_micros": amount }),
            };
            state.store.audit_record(&mut tx, &audit).await?;
            (false, p)
        }
        TopUp::Duplicate(p) => (true, p),
    };
    tx.commit().await.map_err(StoreError::from)?;
    Ok(WebhookAck {
        received: true,
        posting: Some(PostingId::from_uuid(posting.id).to_string()),
        duplicate,
    })
}

// ---------------------------------------------------------------------------------------------
// Documents

/// A CSV field, quoted when it must be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn decimal(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

pub fn usage_csv(u: &UsageView) -> String {
    let mut out = String::from("group,product,gpu_type,unit,quantity,cost_micros,cost_usd\n");
    for i in &u.items {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            csv_field(&i.group),
            csv_field(&i.product),
            csv_field(i.gpu_type.as_deref().unwrap_or("")),
            csv_field(&i.unit),
            i.quantity,
            i.cost.amount_micros,
            decimal(i.cost.amount_micros)
        );
    }
    out
}

pub fn invoice_csv(i: &InvoiceView) -> String {
    let mut out = String::from(
        "invoice,month,product,gpu_type,detail,unit,quantity,amount_micros,amount_usd\n",
    );
    for l in &i.lines {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            i.id,
            i.month,
            csv_field(&l.product),
            csv_field(l.gpu_type.as_deref().unwrap_or("")),
            csv_field(l.detail.as_deref().unwrap_or("")),
            csv_field(&l.unit),
            l.quantity,
            l.amount.amount_micros,
            decimal(l.amount.amount_micros)
        );
    }
    let _ = writeln!(
        out,
        "{},{},total,,,,,{},{}",
        i.id,
        i.month,
        i.total.amount_micros,
        decimal(i.total.amount_micros)
    );
    out
}

/// The invoice as a one-page PDF (Courier, text only).
pub fn invoice_pdf(org: OrgId, i: &InvoiceView) -> Vec<u8> {
    let mut lines = vec![
        format!("Kiln invoice {}", i.id),
        format!("Org {org}   Month {}   Status {}", i.month, i.status),
        String::new(),
        "Product / GPU type / detail                          Quantity        Amount (USD)".into(),
    ];
    for l in &i.lines {
        let what = [
            Some(l.product.as_str()),
            l.gpu_type.as_deref(),
            l.detail.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" / ");
        lines.push(format!(
            "{what:<50} {:>12} {} {:>16}",
            l.quantity,
            l.unit,
            decimal(l.amount.amount_micros)
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "Total {:>70}",
        format!("{} USD", decimal(i.total.amount_micros))
    ));
    crate::pdf::text_page(&lines)
}

/// Deployment-wide prices of a GPU type in effect now, for `/v1/gpu-types`.
pub async fn current_prices(
    state: &AppState,
) -> Result<BTreeMap<String, serde_json::Value>, ApiError> {
    let versions = state.store.price_versions().await?;
    let now = Timestamp::from_offset_datetime(OffsetDateTime::now_utc()).unwrap_or_default();
    let Some(v) = versions
        .iter()
        .rev()
        .find(|v| kiln_billing::convert::ts(v.effective_from) <= now)
    else {
        return Ok(BTreeMap::new());
    };
    let m = |v: Option<i64>| v.map(|v| serde_json::json!(money(v)));
    Ok(v.gpus
        .0
        .iter()
        .map(|g| {
            let endpoint = match (
                g.endpoint_per_request_micros,
                g.endpoint_per_1k_prompt_micros,
                g.endpoint_per_1k_completion_micros,
            ) {
                (Some(r), Some(p), Some(c)) => serde_json::json!({
                    "per_request": money(r),
                    "per_1k_prompt_tokens": money(p),
                    "per_1k_completion_tokens": money(c),
                }),
                _ => serde_json::Value::Null,
            };
            (
                g.gpu_type.clone(),
                serde_json::json!({
                    "instance": m(g.instance_gpu_hour_micros),
                    "pod": m(g.pod_gpu_hour_micros),
                    "mig": g.mig_hour_micros.iter().map(|(p, v)| (p.clone(), money(*v))).collect::<BTreeMap<_, _>>(),
                    "share_gib": m(g.share_gib_hour_micros),
                    "per": "hour",
                    "spot_discount_bps": g.spot_discount_bps,
                    "storage_gib_month": m(v.storage_gib_month_micros),
                    "endpoint": endpoint,
                    "price_version": PriceVersionId::from_uuid(v.id).to_string(),
                }),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_check_the_secret_the_body_and_the_window() {
        let now = OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        let body = br#"{"id":"evt_1"}"#;
        let good = sign(b"secret", t, body);
        assert!(verify_signature(b"secret", Some(&good), body, now).is_ok());
        assert!(verify_signature(b"other", Some(&good), body, now).is_err());
        assert!(verify_signature(b"secret", Some(&good), b"{}", now).is_err());
        let stale = sign(b"secret", t - 301, body);
        assert!(verify_signature(b"secret", Some(&stale), body, now).is_err());
        assert!(verify_signature(b"secret", None, body, now).is_err());
    }

    #[test]
    fn csv_quotes_what_it_must_and_money_is_exact() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(decimal(1_234_500), "1.234500");
        assert_eq!(decimal(-5), "-0.000005");
    }
}

//! An org's billing page: balance and credit terms, burn rate, usage per day and GPU type this
//! month, and invoices with CSV/PDF downloads (members of any role; `ops::billing` says who).

use askama::Template;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::orgs::{OrgNav, load_org};
use super::{Chrome, Ctx, render, when};
use crate::error::ApiError;
use crate::ops;
use crate::ops::billing::{BalanceView, UsageParams};

/// `12.345600 USD` → `12.35`: dollars for people (the API keeps micro-units).
fn usd(micros: i64) -> String {
    let cents = (micros as i128 * 100).div_euclid(1_000_000);
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}${}.{:02}", abs / 100, abs % 100)
}

pub(super) struct UsageRow {
    pub day: String,
    pub gpu_type: String,
    pub product: String,
    pub quantity: String,
    pub cost: String,
    /// Cost in cents, for the bar (`<meter>`).
    pub cents: i64,
}

pub(super) struct InvoiceRow {
    pub id: String,
    pub month: String,
    pub status: String,
    pub total: String,
}

#[derive(Template)]
#[template(path = "billing.html")]
struct BillingPage {
    chrome: Chrome,
    org: OrgNav,
    balance: String,
    available: String,
    promo: String,
    credit_limit: String,
    spent: String,
    budget: Option<String>,
    /// This month's highest budget alert (percent of the budget spent), if one was raised.
    budget_alert: Option<i32>,
    burn: String,
    out_of_credit: bool,
    since: Option<String>,
    usage: Vec<UsageRow>,
    max_cents: i64,
    invoices: Vec<InvoiceRow>,
}

/// Seconds as hours with one decimal.
fn hours(quantity: i64, unit: &str) -> String {
    match unit {
        "requests" | "tokens" => format!("{quantity} {unit}"),
        _ => format!("{:.1} h", quantity as f64 / 3600.0),
    }
}

pub(super) async fn page(ctx: Ctx, Path(org): Path<String>) -> Response {
    let r = async {
        let (id, _, nav) = load_org(&ctx, &org, "billing").await?;
        let b: BalanceView = ops::billing::balance(&ctx.state, &ctx.caller, id).await?;
        let usage = ops::billing::usage(
            &ctx.state,
            &ctx.caller,
            id,
            &UsageParams {
                group_by: Some("day".into()),
                ..UsageParams::default()
            },
        )
        .await?;
        let invoices = ops::billing::invoices(&ctx.state, &ctx.caller, id, Some(24), None).await?;
        let usage: Vec<UsageRow> = usage
            .items
            .into_iter()
            .map(|u| UsageRow {
                day: u.group,
                gpu_type: u.gpu_type.unwrap_or_else(|| "—".into()),
                quantity: hours(u.quantity, &u.unit),
                product: u.product.replace('_', " "),
                cost: usd(u.cost.amount_micros),
                cents: u.cost.amount_micros / 10_000,
            })
            .collect();
        let chrome = ctx.chrome(Some(&nav.id)).await?;
        Ok(render(
            StatusCode::OK,
            &BillingPage {
                chrome,
                org: nav,
                balance: usd(b.balance.amount_micros),
                available: usd(b.available.amount_micros),
                promo: usd(b.promotional_credit.amount_micros),
                credit_limit: usd(b.credit_limit.amount_micros),
                spent: usd(b.spent_this_month.amount_micros),
                budget: b.monthly_budget.map(|m| usd(m.amount_micros)),
                budget_alert: b.budget_alert_percent,
                burn: usd(b.burn_rate_per_hour.amount_micros),
                out_of_credit: b.out_of_credit,
                since: b.out_of_credit_since.as_deref().map(when),
                max_cents: usage.iter().map(|u| u.cents).max().unwrap_or(0).max(1),
                usage,
                invoices: invoices
                    .items
                    .into_iter()
                    .map(|i| InvoiceRow {
                        total: usd(i.total.amount_micros),
                        id: i.id,
                        month: i.month,
                        status: i.status,
                    })
                    .collect(),
            },
        ))
    }
    .await;
    ctx.finish(r).await
}

pub(super) struct LineRow {
    pub product: String,
    pub gpu_type: String,
    pub detail: String,
    pub quantity: String,
    pub amount: String,
}

#[derive(Template)]
#[template(path = "invoice.html")]
struct InvoicePage {
    chrome: Chrome,
    org: OrgNav,
    id: String,
    month: String,
    status: String,
    total: String,
    lines: Vec<LineRow>,
}

/// One invoice as a page, with its lines and downloads.
pub(super) async fn invoice_page(
    ctx: Ctx,
    Path((org, invoice)): Path<(String, String)>,
) -> Response {
    let r = async {
        let (id, _, nav) = load_org(&ctx, &org, "billing").await?;
        let i = ops::billing::invoice(&ctx.state, &ctx.caller, id, &invoice).await?;
        let chrome = ctx.chrome(Some(&nav.id)).await?;
        Ok(render(
            StatusCode::OK,
            &InvoicePage {
                chrome,
                org: nav,
                lines: i
                    .lines
                    .into_iter()
                    .map(|l| LineRow {
                        product: l.product.replace('_', " "),
                        gpu_type: l.gpu_type.unwrap_or_else(|| "—".into()),
                        detail: l.detail.unwrap_or_default(),
                        quantity: hours(l.quantity, &l.unit),
                        amount: usd(l.amount.amount_micros),
                    })
                    .collect(),
                total: usd(i.total.amount_micros),
                id: i.id,
                month: i.month,
                status: i.status,
            },
        ))
    }
    .await;
    ctx.finish(r).await
}

/// An invoice download (`csv` or `pdf`) with the console's session.
pub(super) async fn invoice_download(
    ctx: Ctx,
    Path((org, invoice, format)): Path<(String, String, String)>,
) -> Response {
    let r = async {
        let id = ops::parse_org(&org)?;
        let view = ops::billing::invoice(&ctx.state, &ctx.caller, id, &invoice).await?;
        let (content_type, body) = match format.as_str() {
            "csv" => (
                "text/csv; charset=utf-8",
                ops::billing::invoice_csv(&view).into_bytes(),
            ),
            "pdf" => ("application/pdf", ops::billing::invoice_pdf(id, &view)),
            _ => return Err(ApiError::NotFound("document")),
        };
        let mut resp = (StatusCode::OK, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(v) =
            HeaderValue::from_str(&format!("attachment; filename=\"{}.{format}\"", view.id))
        {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
        Ok(resp)
    }
    .await;
    ctx.finish(r).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn dollars_round_down_to_the_cent() {
        assert_eq!(super::usd(12_345_600), "$12.34");
        assert_eq!(super::usd(-1_000_000), "-$1.00");
        assert_eq!(super::usd(0), "$0.00");
    }
}

//! `kiln billing …` (the org's balance, usage, ledger and invoices) and the operators'
//! `kiln admin prices …`, `kiln admin credit …`, `kiln admin billing …`.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::seg;
use crate::output::{self, cell, when};
use crate::{Ctx, items};

#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Balance, credit limit, promotional credit, what is available and the burn rate.
    Balance,
    /// Usage and cost over a period, grouped.
    Usage {
        /// RFC 3339 or YYYY-MM-DD [default: the start of this month].
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339 or YYYY-MM-DD, exclusive [default: now].
        #[arg(long)]
        to: Option<String>,
        /// workload, gpu_type or day.
        #[arg(long, default_value = "workload")]
        group_by: String,
    },
    /// Ledger postings, newest first.
    Ledger {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Monthly invoices, newest first.
    Invoices,
    /// One invoice with its lines.
    Invoice {
        #[arg(value_name = "INVOICE_ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// Every price version, oldest first.
    List,
    /// Add a version from a JSON file: `{"effective_from": …, "storage_gib_month_micros": …,
    /// "gpus": [{"gpu_type": "h100-80gb", "pod_gpu_hour_micros": 2990000, …}]}`.
    Create {
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Withdraw a version that has not taken effect.
    Delete {
        #[arg(value_name = "PRICE_VERSION_ID")]
        id: String,
    },
}

/// `12.5` → 12 500 000 micro-units, exactly (no floating point).
pub fn usd_to_micros(raw: &str) -> Result<i64> {
    let s = raw.trim().trim_start_matches('$');
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
    {
        bail!("{raw:?} is not an amount in USD (e.g. 25 or 12.50, up to 6 decimals)");
    }
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse()? };
    let frac: i64 = format!("{frac:0<6}").parse()?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .context("amount too large")
}

/// Micro-units as dollars with all six decimals.
fn usd(v: &Value) -> String {
    match v.get("amount_micros").and_then(Value::as_i64) {
        Some(m) => {
            let sign = if m < 0 { "-" } else { "" };
            let a = m.unsigned_abs();
            format!("{sign}{}.{:06} USD", a / 1_000_000, a % 1_000_000)
        }
        None => "-".into(),
    }
}

pub async fn run(ctx: &mut Ctx, command: BillingCommand) -> Result<()> {
    let org = ctx.org().await?;
    let base = format!("/v1/orgs/{}", seg(&org));
    match command {
        BillingCommand::Balance => {
            let b = ctx.client.get(&format!("{base}/balance")).await?;
            ctx.show(&b, |b| {
                let get = |k: &str| usd(b.get(k).unwrap_or(&Value::Null));
                output::table(
                    &[
                        "BALANCE",
                        "PROMO",
                        "CREDIT LIMIT",
                        "AVAILABLE",
                        "THIS MONTH",
                        "PER HOUR",
                    ],
                    [vec![
                        get("balance"),
                        get("promotional_credit"),
                        get("credit_limit"),
                        get("available"),
                        get("spent_this_month"),
                        get("burn_rate_per_hour"),
                    ]],
                );
                if b.get("out_of_credit").and_then(Value::as_bool) == Some(true) {
                    eprintln!("Out of credit: new work is refused until a top-up.");
                }
            });
        }
        BillingCommand::Usage { from, to, group_by } => {
            let mut q = format!("{base}/usage?group_by={}", seg(&group_by));
            if let Some(f) = from {
                q.push_str(&format!("&from={}", seg(&f)));
            }
            if let Some(t) = to {
                q.push_str(&format!("&to={}", seg(&t)));
            }
            let u = ctx.client.get(&q).await?;
            ctx.show(&u, |u| {
                output::table(
                    &["GROUP", "PRODUCT", "GPU TYPE", "QUANTITY", "UNIT", "COST"],
                    items(u).iter().map(|i| {
                        vec![
                            cell(i, "group"),
                            cell(i, "product"),
                            cell(i, "gpu_type"),
                            cell(i, "quantity"),
                            cell(i, "unit"),
                            usd(i.get("cost").unwrap_or(&Value::Null)),
                        ]
                    }),
                );
                println!("total {}", usd(u.get("total").unwrap_or(&Value::Null)));
            });
        }
        BillingCommand::Ledger { limit } => {
            let l = ctx
                .client
                .get(&format!("{base}/ledger?limit={}", limit.clamp(1, 200)))
                .await?;
            ctx.show(&l, |l| {
                output::table(
                    &["ID", "KIND", "AT", "AMOUNT", "DESCRIPTION"],
                    items(l).iter().map(|p| {
                        vec![
                            cell(p, "id"),
                            cell(p, "kind"),
                            when(p, "at"),
                            usd(p.get("amount").unwrap_or(&Value::Null)),
                            cell(p, "description"),
                        ]
                    }),
                );
            });
        }
        BillingCommand::Invoices => {
            let l = ctx.client.list_all(&format!("{base}/invoices")).await?;
            ctx.show(&l, |l| {
                output::table(
                    &["ID", "MONTH", "STATUS", "TOTAL"],
                    items(l).iter().map(|i| {
                        vec![
                            cell(i, "id"),
                            cell(i, "month"),
                            cell(i, "status"),
                            usd(i.get("total").unwrap_or(&Value::Null)),
                        ]
                    }),
                );
            });
        }
        BillingCommand::Invoice { id } => {
            let i = ctx
                .client
                .get(&format!("{base}/invoices/{}", seg(&id)))
                .await?;
            ctx.show(&i, |i| {
                println!(
                    "{} {} ({})",
                    cell(i, "id"),
                    cell(i, "month"),
                    cell(i, "status")
                );
                output::table(
                    &[
                        "PRODUCT", "GPU TYPE", "DETAIL", "QUANTITY", "UNIT", "AMOUNT",
                    ],
                    i.get("lines")
                        .and_then(Value::as_array)
                        .map_or(&[][..], Vec::as_slice)
                        .iter()
                        .map(|l| {
                            vec![
                                cell(l, "product"),
                                cell(l, "gpu_type"),
                                cell(l, "detail"),
                                cell(l, "quantity"),
                                cell(l, "unit"),
                                usd(l.get("amount").unwrap_or(&Value::Null)),
                            ]
                        }),
                );
                println!("total {}", usd(i.get("total").unwrap_or(&Value::Null)));
            });
        }
    }
    Ok(())
}

pub async fn prices(ctx: &mut Ctx, command: PricesCommand) -> Result<()> {
    match command {
        PricesCommand::List => {
            let l = ctx.client.get("/v1/admin/prices").await?;
            ctx.show(&l, |l| {
                output::table(
                    &["ID", "EFFECTIVE FROM", "IN EFFECT", "GPU TYPES", "NOTE"],
                    items(l).iter().map(|v| {
                        vec![
                            cell(v, "id"),
                            when(v, "effective_from"),
                            cell(v, "in_effect"),
                            v.get("gpus")
                                .and_then(Value::as_array)
                                .map(|g| {
                                    g.iter()
                                        .map(|g| cell(g, "gpu_type"))
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .unwrap_or_default(),
                            cell(v, "note"),
                        ]
                    }),
                );
            });
        }
        PricesCommand::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let body: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let v = ctx.client.create("/v1/admin/prices", &body).await?;
            ctx.show(&v, |v| {
                println!(
                    "Price version {} takes effect {}.",
                    cell(v, "id"),
                    when(v, "effective_from")
                );
            });
        }
        PricesCommand::Delete { id } => {
            ctx.client
                .delete(&format!("/v1/admin/prices/{}", seg(&id)))
                .await?;
            eprintln!("Price version {id} withdrawn.");
        }
    }
    Ok(())
}

/// `kiln admin credit ORG AMOUNT --reference R`.
pub async fn credit(ctx: &mut Ctx, org: &str, amount: &str, reference: &str) -> Result<()> {
    let body = json!({
        "amount_micros": usd_to_micros(amount)?,
        "currency": "USD",
        "reference": reference,
    });
    let p = ctx
        .client
        .post(&format!("/v1/orgs/{}/credits", seg(org)), &body)
        .await?;
    ctx.show(&p, |p| {
        println!(
            "Credited {} to {org} ({}).",
            usd(p.get("amount").unwrap_or(&Value::Null)),
            cell(p, "id")
        );
    });
    Ok(())
}

/// `kiln admin billing ORG [--credit-limit USD] [--budget USD|none]`.
pub async fn settings(
    ctx: &mut Ctx,
    org: &str,
    credit_limit: Option<String>,
    budget: Option<String>,
) -> Result<()> {
    let path = format!("/v1/admin/orgs/{}/billing", seg(org));
    let current = ctx.client.get(&path).await?;
    let s = if credit_limit.is_none() && budget.is_none() {
        current
    } else {
        let limit = match credit_limit {
            Some(l) => usd_to_micros(&l)?,
            None => current["credit_limit"]["amount_micros"]
                .as_i64()
                .unwrap_or(0),
        };
        let budget = match budget.as_deref() {
            Some("none") => Value::Null,
            Some(b) => json!(usd_to_micros(b)?),
            None => current["monthly_budget"]["amount_micros"].clone(),
        };
        ctx.client
            .put(
                &path,
                &json!({"credit_limit_micros": limit, "monthly_budget_micros": budget}),
            )
            .await?
    };
    ctx.show(&s, |s| {
        output::table(
            &[
                "ORG",
                "CREDIT LIMIT",
                "MONTHLY BUDGET",
                "OUT OF CREDIT SINCE",
            ],
            [vec![
                cell(s, "org"),
                usd(s.get("credit_limit").unwrap_or(&Value::Null)),
                usd(s.get("monthly_budget").unwrap_or(&Value::Null)),
                when(s, "out_of_credit_since"),
            ]],
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::usd_to_micros;

    #[test]
    fn dollars_parse_exactly() {
        assert_eq!(usd_to_micros("25").unwrap(), 25_000_000);
        assert_eq!(usd_to_micros("12.5").unwrap(), 12_500_000);
        assert_eq!(usd_to_micros("$0.000001").unwrap(), 1);
        assert!(usd_to_micros("1.0000001").is_err());
        assert!(usd_to_micros("-3").is_err());
        assert!(usd_to_micros("abc").is_err());
    }
}

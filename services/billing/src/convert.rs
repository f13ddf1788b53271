//! Rows of the store into the core's plain data, and the core's answers back into rows. No
//! decisions here: only spelling.

use std::collections::BTreeMap;

use kiln_billing_core::{
    Account, Charge, EndpointPrices, GpuPrices, GpuRequest, Money, Month, PriceBook, PriceVersion,
    Prices, Product, Tier, Timestamp, Transition, Unit, WorkloadKind, WorkloadShape,
};
use kiln_store::{
    ChargeDetail, ChargeRecord, GpuPriceRecord, HistoryRow, NewEntry, NewPosting,
    PriceVersionRecord, RatingWork,
};
use time::{Date, OffsetDateTime};

use crate::BillingError;

/// An instant as the core counts it (unix microseconds).
pub fn ts(t: OffsetDateTime) -> Timestamp {
    Timestamp::from_offset_datetime(t).unwrap_or(Timestamp(i64::MAX))
}

/// The core's instant as a database timestamp.
pub fn odt(t: Timestamp) -> OffsetDateTime {
    t.to_offset_datetime().unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A month's first day, as `invoices.month` stores it.
pub fn month_date(m: Month) -> Date {
    odt(m.start()).date()
}

/// The month a stored first day names.
pub fn month_of_date(d: Date) -> Month {
    Month::of(ts(d.midnight().assume_utc()))
}

fn money(m: Option<i64>) -> Option<Money> {
    m.map(Money::from_micros)
}

/// One GPU type's prices of a stored version.
pub fn gpu_prices(g: &GpuPriceRecord) -> GpuPrices {
    GpuPrices {
        instance_gpu_hour: money(g.instance_gpu_hour_micros),
        pod_gpu_hour: money(g.pod_gpu_hour_micros),
        mig_hour: g
            .mig_hour_micros
            .iter()
            .map(|(p, m)| (p.clone(), Money::from_micros(*m)))
            .collect(),
        share_gib_hour: money(g.share_gib_hour_micros),
        spot_discount_bps: u16::try_from(g.spot_discount_bps.clamp(0, 10_000)).unwrap_or(0),
        endpoint: match (
            g.endpoint_per_request_micros,
            g.endpoint_per_1k_prompt_micros,
            g.endpoint_per_1k_completion_micros,
        ) {
            (Some(r), Some(p), Some(c)) => Some(EndpointPrices {
                per_request: Money::from_micros(r),
                per_1k_prompt_tokens: Money::from_micros(p),
                per_1k_completion_tokens: Money::from_micros(c),
            }),
            _ => None,
        },
    }
}

/// A stored version as the core's.
pub fn price_version(v: &PriceVersionRecord) -> PriceVersion {
    PriceVersion {
        effective_from: ts(v.effective_from),
        prices: Prices {
            gpus: v
                .gpus
                .0
                .iter()
                .map(|g| (g.gpu_type.clone(), gpu_prices(g)))
                .collect::<BTreeMap<_, _>>(),
            storage_gib_month: money(v.storage_gib_month_micros),
        },
    }
}

/// The stored catalog as the core's price book.
pub fn price_book(versions: &[PriceVersionRecord]) -> Result<PriceBook, BillingError> {
    Ok(PriceBook::new(
        versions.iter().map(price_version).collect(),
    )?)
}

/// The billing-relevant shape of a workload with a rating cursor.
pub fn shape(w: &RatingWork) -> Result<WorkloadShape, BillingError> {
    let kind = match w.kind.as_str() {
        "pod" => WorkloadKind::Pod,
        "instance" => WorkloadKind::Instance,
        "endpoint_replica" => WorkloadKind::EndpointReplica,
        other => return Err(BillingError::Unrecognised("workload kind", other.into())),
    };
    let tier = if w.tier == "spot" {
        Tier::Spot
    } else {
        Tier::OnDemand
    };
    let gpu_type = || w.gpu_type.clone().unwrap_or_default();
    let gpu = match w.gpu_mode.as_str() {
        "none" => GpuRequest::None,
        "whole" => GpuRequest::Whole {
            gpu_type: gpu_type(),
            count: i64::from(w.gpu_count),
        },
        "passthrough" => GpuRequest::Passthrough {
            gpu_type: gpu_type(),
            count: i64::from(w.gpu_count),
        },
        "mig" => GpuRequest::Mig {
            gpu_type: gpu_type(),
            profile: w.mig_profile.clone().unwrap_or_default(),
        },
        "share" => GpuRequest::Share {
            gpu_type: gpu_type(),
            memory_mib: w.share_memory_mib.unwrap_or(0),
        },
        other => return Err(BillingError::Unrecognised("GPU mode", other.into())),
    };
    Ok(WorkloadShape {
        workload: w.workload_id,
        org: w.org_id,
        kind,
        tier,
        gpu,
        disk_gib: w.disk_gib,
    })
}

pub fn transition(h: &HistoryRow) -> Transition {
    Transition::new(
        h.state
            .parse()
            .unwrap_or_else(|e: std::convert::Infallible| match e {}),
        ts(h.at),
    )
}

pub fn tier_code(t: Tier) -> &'static str {
    match t {
        Tier::OnDemand => "on_demand",
        Tier::Spot => "spot",
    }
}

/// A charge's posting as rows: the core's lines (promotional credit first) and what it is for.
pub fn charge_posting(
    charge: &Charge,
    workload_kind: Option<&str>,
    promos: &[(Account, Money)],
) -> Result<NewPosting, BillingError> {
    let posting = kiln_billing_core::Posting::for_charge(charge, promos)?;
    Ok(charge_row(charge, workload_kind, &posting))
}

/// A granted caller's payment to an endpoint's owner, as a row: a usage posting of the caller's
/// (its invoice shows it as a `resale` line), whose other side is the owner's balance.
pub fn resale_posting(charge: &Charge, payee: uuid::Uuid) -> Result<NewPosting, BillingError> {
    let posting = kiln_billing_core::Posting::for_resale(charge, payee)?;
    let mut row = charge_row(charge, Some("endpoint"), &posting);
    row.description = format!(
        "{} (paid to {})",
        row.description,
        kiln_domain::OrgId::from_uuid(payee)
    );
    Ok(row)
}

fn charge_row(
    charge: &Charge,
    workload_kind: Option<&str>,
    posting: &kiln_billing_core::Posting,
) -> NewPosting {
    let usage = matches!(
        charge.product,
        Product::InferenceRequests
            | Product::InferencePromptTokens
            | Product::InferenceCompletionTokens
    );
    let what = match (&charge.gpu_type, &charge.detail) {
        (Some(g), Some(d)) => format!("{} {g} {d}", charge.product.code()),
        (Some(g), None) => format!("{} {g}", charge.product.code()),
        _ => charge.product.code().to_owned(),
    };
    NewPosting {
        key: posting.key().to_owned(),
        org_id: Some(charge.org),
        kind: if usage { "usage" } else { "charge" },
        at: odt(charge.start),
        amount_micros: charge.amount.micros,
        description: format!("{what}: {} {}", charge.quantity, charge.unit.code()),
        charge: Some(ChargeDetail {
            workload_id: charge.workload,
            workload_kind: workload_kind.map(str::to_owned),
            product: charge.product.code().to_owned(),
            gpu_type: charge.gpu_type.clone(),
            detail: charge.detail.clone(),
            tier: tier_code(charge.tier).to_owned(),
            period_end: odt(charge.end),
            price_version: odt(charge.price_version),
            unit: charge.unit.code().to_owned(),
            quantity: charge.quantity,
        }),
        reference: None,
        entries: entries(posting),
    }
}

/// A core posting's lines as entry rows.
pub fn entries(posting: &kiln_billing_core::Posting) -> Vec<NewEntry> {
    posting
        .lines()
        .iter()
        .map(|(account, amount)| NewEntry {
            account: account.to_string(),
            org_id: account.org(),
            amount_micros: amount.micros,
        })
        .collect()
}

/// A stored charge posting back as the core's charge (for invoices).
pub fn charge(r: &ChargeRecord) -> Result<Charge, BillingError> {
    Ok(Charge {
        key: r.idempotency_key.clone(),
        org: r.org_id,
        workload: r.workload_id,
        product: Product::from_code(&r.product)
            .ok_or_else(|| BillingError::Unrecognised("product", r.product.clone()))?,
        gpu_type: r.gpu_type.clone(),
        detail: r.detail.clone(),
        tier: if r.tier == "spot" {
            Tier::Spot
        } else {
            Tier::OnDemand
        },
        start: ts(r.at),
        end: ts(r.period_end),
        price_version: ts(r.price_version),
        unit: Unit::from_code(&r.unit)
            .ok_or_else(|| BillingError::Unrecognised("unit", r.unit.clone()))?,
        quantity: r.quantity,
        amount: Money::from_micros(r.amount_micros),
    })
}

/// The store's endpoint price as the core's prices.
pub fn endpoint_prices(p: kiln_store::EndpointPrice) -> kiln_billing_core::EndpointPrices {
    kiln_billing_core::EndpointPrices {
        per_request: Money::from_micros(p.per_request_micros),
        per_1k_prompt_tokens: Money::from_micros(p.per_1k_prompt_tokens_micros),
        per_1k_completion_tokens: Money::from_micros(p.per_1k_completion_tokens_micros),
    }
}

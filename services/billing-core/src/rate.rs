//! Rating: billable intervals and usage events into charges (see the crate docs for the
//! rounding rule).

use uuid::Uuid;

use crate::meter::{BillableInterval, IntervalKind, Transition, meter};
use crate::money::{Money, MoneyError};
use crate::price::{EndpointPrices, PriceBook, PriceVersion};
use crate::time::{Month, Timestamp};

const BPS: i128 = 10_000;
const SECS_PER_HOUR: i128 = 3_600;
/// A pricing month: 30 days.
pub const SECS_PER_PRICING_MONTH: i128 = 30 * 24 * 3_600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Pod,
    Instance,
    EndpointReplica,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    OnDemand,
    Spot,
}

/// What a workload holds, as in `workloads.gpu_mode` and friends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuRequest {
    None,
    Whole { gpu_type: String, count: i64 },
    Passthrough { gpu_type: String, count: i64 },
    Mig { gpu_type: String, profile: String },
    Share { gpu_type: String, memory_mib: i64 },
}

/// The billing-relevant shape of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadShape {
    pub workload: Uuid,
    pub org: Uuid,
    pub kind: WorkloadKind,
    pub tier: Tier,
    pub gpu: GpuRequest,
    pub disk_gib: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Product {
    InstanceGpu,
    PodGpu,
    MigSlice,
    GpuShare,
    Storage,
    InferenceRequests,
    InferencePromptTokens,
    InferenceCompletionTokens,
}

impl Product {
    pub fn code(self) -> &'static str {
        match self {
            Self::InstanceGpu => "instance_gpu",
            Self::PodGpu => "pod_gpu",
            Self::MigSlice => "mig_slice",
            Self::GpuShare => "gpu_share",
            Self::Storage => "storage",
            Self::InferenceRequests => "inference_requests",
            Self::InferencePromptTokens => "inference_prompt_tokens",
            Self::InferenceCompletionTokens => "inference_completion_tokens",
        }
    }

    pub const ALL: [Product; 8] = [
        Self::InstanceGpu,
        Self::PodGpu,
        Self::MigSlice,
        Self::GpuShare,
        Self::Storage,
        Self::InferenceRequests,
        Self::InferencePromptTokens,
        Self::InferenceCompletionTokens,
    ];

    /// The product a [`code`](Self::code) names.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.code() == code)
    }
}

/// The unit a charge's quantity is counted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    GpuSeconds,
    SliceSeconds,
    /// Share memory cap (MiB) × seconds.
    MibSeconds,
    /// Disk (GiB) × seconds.
    GibSeconds,
    Requests,
    Tokens,
}

impl Unit {
    pub const ALL: [Unit; 6] = [
        Self::GpuSeconds,
        Self::SliceSeconds,
        Self::MibSeconds,
        Self::GibSeconds,
        Self::Requests,
        Self::Tokens,
    ];

    /// As stored and shown: `gpu_seconds`, `slice_seconds`, `mib_seconds`, `gib_seconds`,
    /// `requests`, `tokens`.
    pub fn code(self) -> &'static str {
        match self {
            Self::GpuSeconds => "gpu_seconds",
            Self::SliceSeconds => "slice_seconds",
            Self::MibSeconds => "mib_seconds",
            Self::GibSeconds => "gib_seconds",
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.code() == code)
    }
}

/// One rated amount: what was charged, for what, at which price version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// Idempotency key, derived from what it charges: the same period of the same workload and
    /// product at the same price version always has the same key.
    pub key: String,
    pub org: Uuid,
    /// The workload, or for usage events the endpoint.
    pub workload: Uuid,
    pub product: Product,
    pub gpu_type: Option<String>,
    /// The MIG profile, for MIG slices.
    pub detail: Option<String>,
    pub tier: Tier,
    /// `[start, end)`; equal for usage events.
    pub start: Timestamp,
    pub end: Timestamp,
    pub price_version: Timestamp,
    pub unit: Unit,
    pub quantity: i64,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("no price version in effect at {0}")]
    NoPriceInEffect(Timestamp),
    #[error("no price for {product:?} on {gpu_type:?} in version {version}")]
    Unpriced {
        product: Product,
        gpu_type: Option<String>,
        version: Timestamp,
    },
    #[error("interval ends before it starts")]
    InvalidInterval,
    #[error("invalid shape: {0}")]
    InvalidShape(&'static str),
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// How one product of one shape is priced: amount over `secs` seconds at version `v` is
/// `numerator(v) * secs / denominator`.
struct Rating<'a> {
    product: Product,
    gpu_type: Option<&'a str>,
    detail: Option<&'a str>,
    unit: Unit,
    /// Units held (GPUs, slices, MiB, GiB).
    quantity: i64,
    spot: bool,
    denominator: i128,
}

impl Rating<'_> {
    fn for_interval<'s>(
        shape: &'s WorkloadShape,
        kind: IntervalKind,
    ) -> Result<Option<Rating<'s>>, RateError> {
        let spot = shape.tier == Tier::Spot;
        let per_hour = |product, gpu_type: &'s str, detail, unit, quantity, den| Rating {
            product,
            gpu_type: Some(gpu_type),
            detail,
            unit,
            quantity,
            spot,
            denominator: SECS_PER_HOUR * den * BPS,
        };
        if kind == IntervalKind::Storage {
            if shape.disk_gib < 0 {
                return Err(RateError::InvalidShape("negative disk"));
            }
            if shape.kind != WorkloadKind::Instance || shape.disk_gib == 0 {
                return Ok(None);
            }
            return Ok(Some(Rating {
                product: Product::Storage,
                gpu_type: None,
                detail: None,
                unit: Unit::GibSeconds,
                quantity: shape.disk_gib,
                spot: false,
                denominator: SECS_PER_PRICING_MONTH * BPS,
            }));
        }
        // Endpoint replicas are paid for per request and token, not per second.
        if shape.kind == WorkloadKind::EndpointReplica {
            return Ok(None);
        }
        Ok(match &shape.gpu {
            GpuRequest::None => None,
            GpuRequest::Whole { gpu_type, count } | GpuRequest::Passthrough { gpu_type, count } => {
                if *count <= 0 {
                    return Err(RateError::InvalidShape("gpu count must be positive"));
                }
                let product = match shape.kind {
                    WorkloadKind::Instance => Product::InstanceGpu,
                    _ => Product::PodGpu,
                };
                Some(per_hour(
                    product,
                    gpu_type,
                    None,
                    Unit::GpuSeconds,
                    *count,
                    1,
                ))
            }
            GpuRequest::Mig { gpu_type, profile } => Some(per_hour(
                Product::MigSlice,
                gpu_type,
                Some(profile),
                Unit::SliceSeconds,
                1,
                1,
            )),
            GpuRequest::Share {
                gpu_type,
                memory_mib,
            } => {
                if *memory_mib <= 0 {
                    return Err(RateError::InvalidShape("share memory must be positive"));
                }
                Some(per_hour(
                    Product::GpuShare,
                    gpu_type,
                    None,
                    Unit::MibSeconds,
                    *memory_mib,
                    1024,
                ))
            }
        })
    }

    /// Micro-units × (1 / denominator) per second at version `v`.
    fn numerator(&self, v: &PriceVersion) -> Result<i128, RateError> {
        let unpriced = || RateError::Unpriced {
            product: self.product,
            gpu_type: self.gpu_type.map(str::to_string),
            version: v.effective_from,
        };
        let (price, discount_bps) = match self.product {
            Product::Storage => (v.prices.storage_gib_month.ok_or_else(unpriced)?, 0),
            _ => {
                let gpu = v
                    .prices
                    .gpus
                    .get(self.gpu_type.unwrap_or_default())
                    .ok_or_else(unpriced)?;
                let price = match self.product {
                    Product::InstanceGpu => gpu.instance_gpu_hour,
                    Product::PodGpu => gpu.pod_gpu_hour,
                    Product::MigSlice => gpu.mig_hour.get(self.detail.unwrap_or_default()).copied(),
                    Product::GpuShare => gpu.share_gib_hour,
                    _ => None,
                };
                let bps = if self.spot {
                    i128::from(gpu.spot_discount_bps)
                } else {
                    0
                };
                (price.ok_or_else(unpriced)?, bps)
            }
        };
        Ok(i128::from(price.micros) * i128::from(self.quantity) * (BPS - discount_bps))
    }
}

/// Charges for `[from, to)` of `interval`, accrued from the interval's start (so cuts telescope).
fn rate_window(
    interval: BillableInterval,
    interval_end: Timestamp,
    from: Timestamp,
    to: Timestamp,
    shape: &WorkloadShape,
    book: &PriceBook,
) -> Result<Vec<Charge>, RateError> {
    let Some(rating) = Rating::for_interval(shape, interval.kind)? else {
        return Ok(Vec::new());
    };
    let from = from.max(interval.start);
    let to = to.min(interval_end);
    let mut out = Vec::new();
    if from >= to {
        return Ok(out);
    }
    let mut t = interval.start;
    let mut accrued: i128 = 0; // N(t)
    let mut charged: i128 = 0; // F(t) = floor(N(t) / D)
    while t < to {
        let mut next = to.min(Month::of(t).end());
        if let Some(change) = book.next_change_after(t) {
            next = next.min(change);
        }
        if t < from {
            next = next.min(from);
        }
        let secs = t.billed_seconds_until(next);
        if secs > 0 {
            let version = book.price_at(t).ok_or(RateError::NoPriceInEffect(t))?;
            let num = rating.numerator(version)?;
            accrued = num
                .checked_mul(i128::from(secs))
                .and_then(|n| n.checked_add(accrued))
                .ok_or(MoneyError::Overflow)?;
            let now_charged = accrued.div_euclid(rating.denominator);
            if t >= from {
                let quantity = i64::try_from(i128::from(secs) * i128::from(rating.quantity))
                    .map_err(|_| MoneyError::Overflow)?;
                out.push(Charge {
                    key: format!(
                        "charge:{}:{}:{}:{}:{}",
                        shape.workload,
                        rating.product.code(),
                        t,
                        next,
                        version.effective_from
                    ),
                    org: shape.org,
                    workload: shape.workload,
                    product: rating.product,
                    gpu_type: rating.gpu_type.map(str::to_string),
                    detail: rating.detail.map(str::to_string),
                    tier: shape.tier,
                    start: t,
                    end: next,
                    price_version: version.effective_from,
                    unit: rating.unit,
                    quantity,
                    amount: Money::try_from_i128(now_charged - charged)?,
                });
            }
            charged = now_charged;
        }
        t = next;
    }
    Ok(out)
}

/// Charges for a whole, closed interval, split at price versions and month boundaries.
pub fn rate(
    interval: BillableInterval,
    shape: &WorkloadShape,
    book: &PriceBook,
) -> Result<Vec<Charge>, RateError> {
    let end = interval.end.ok_or(RateError::InvalidInterval)?;
    if end < interval.start {
        return Err(RateError::InvalidInterval);
    }
    rate_window(interval, end, interval.start, end, shape, book)
}

/// Charges for what the history accrued in `[already_rated_until, now)` and nothing else: call
/// it every minute with the previous `now` as `already_rated_until`, and the charges add up to
/// exactly what one call over the whole history gives. Open intervals are rated up to `now`.
pub fn rate_until(
    history: &[Transition],
    shape: &WorkloadShape,
    book: &PriceBook,
    already_rated_until: Timestamp,
    now: Timestamp,
) -> Result<Vec<Charge>, RateError> {
    let mut out = Vec::new();
    let storage = shape.kind == WorkloadKind::Instance && shape.disk_gib > 0;
    for interval in meter(history, storage) {
        let end = interval.end.unwrap_or(now).min(now);
        if end <= already_rated_until || interval.start >= now {
            continue;
        }
        out.extend(rate_window(
            interval,
            end,
            already_rated_until,
            now,
            shape,
            book,
        )?);
    }
    Ok(out)
}

/// Metered endpoint usage, as reported by the gateway (one request, or an aggregate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageEvent {
    /// Unique per event (the gateway's request id or aggregate id): the idempotency key's root.
    pub id: String,
    pub org: Uuid,
    pub endpoint: Uuid,
    pub gpu_type: String,
    pub at: Timestamp,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// Charges for one usage event: per request, per prompt token and per completion token, each
/// rounded down to a micro. Components with zero quantity are omitted.
pub fn rate_usage(event: &UsageEvent, book: &PriceBook) -> Result<Vec<Charge>, RateError> {
    if event.requests < 0 || event.prompt_tokens < 0 || event.completion_tokens < 0 {
        return Err(RateError::InvalidShape("negative usage"));
    }
    let version = book
        .price_at(event.at)
        .ok_or(RateError::NoPriceInEffect(event.at))?;
    let prices = version
        .prices
        .gpus
        .get(&event.gpu_type)
        .and_then(|g| g.endpoint.as_ref())
        .ok_or_else(|| RateError::Unpriced {
            product: Product::InferenceRequests,
            gpu_type: Some(event.gpu_type.clone()),
            version: version.effective_from,
        })?;
    usage_charges(
        &format!("usage:{}", event.id),
        event,
        event.org,
        prices,
        version.effective_from,
        None,
    )
}

/// Charges to `payer` for `event` at `prices`, keyed `<key_root>:<product>`: per request, per
/// prompt token and per completion token, each rounded down to a micro; components with zero
/// quantity are omitted. Shared by the catalog's price ([`rate_usage`]) and an endpoint owner's
/// resale price (`calls::rate_calls`).
pub fn usage_charges(
    key_root: &str,
    event: &UsageEvent,
    payer: Uuid,
    prices: &EndpointPrices,
    price_version: Timestamp,
    detail: Option<&str>,
) -> Result<Vec<Charge>, RateError> {
    if event.requests < 0 || event.prompt_tokens < 0 || event.completion_tokens < 0 {
        return Err(RateError::InvalidShape("negative usage"));
    }
    let parts = [
        (
            Product::InferenceRequests,
            Unit::Requests,
            event.requests,
            prices.per_request,
            1,
        ),
        (
            Product::InferencePromptTokens,
            Unit::Tokens,
            event.prompt_tokens,
            prices.per_1k_prompt_tokens,
            1000,
        ),
        (
            Product::InferenceCompletionTokens,
            Unit::Tokens,
            event.completion_tokens,
            prices.per_1k_completion_tokens,
            1000,
        ),
    ];
    let mut out = Vec::new();
    for (product, unit, quantity, price, per) in parts {
        if quantity == 0 {
            continue;
        }
        let amount = (i128::from(price.micros) * i128::from(quantity)).div_euclid(per);
        out.push(Charge {
            key: format!("{key_root}:{}", product.code()),
            org: payer,
            workload: event.endpoint,
            product,
            gpu_type: Some(event.gpu_type.clone()),
            detail: detail.map(str::to_owned),
            tier: Tier::OnDemand,
            start: event.at,
            end: event.at,
            price_version,
            unit,
            quantity,
            amount: Money::try_from_i128(amount)?,
        });
    }
    Ok(out)
}

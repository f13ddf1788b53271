//! The price catalog: versions with effective dates. A version is identified by its
//! `effective_from`, which every charge rated with it records.

use std::collections::BTreeMap;

use crate::money::Money;
use crate::time::Timestamp;

/// Endpoint (inference) prices.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EndpointPrices {
    pub per_request: Money,
    pub per_1k_prompt_tokens: Money,
    pub per_1k_completion_tokens: Money,
}

/// Prices for one GPU type. A missing price means the product is not sold on that type; rating
/// such a workload is an error (never silently free).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GpuPrices {
    /// Instances (whole or passthrough GPUs), per GPU-hour.
    pub instance_gpu_hour: Option<Money>,
    /// Pods on whole GPUs, per GPU-hour.
    pub pod_gpu_hour: Option<Money>,
    /// MIG slices, per slice-hour, by profile (e.g. "1g.10gb").
    pub mig_hour: BTreeMap<String, Money>,
    /// Time-sliced shares, per GiB-hour of the declared memory cap.
    pub share_gib_hour: Option<Money>,
    /// Discount for spot tier, in basis points (0..=10 000) off the GPU price.
    pub spot_discount_bps: u16,
    /// Endpoints served on this GPU type.
    pub endpoint: Option<EndpointPrices>,
}

/// Everything priced by one version.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Prices {
    pub gpus: BTreeMap<String, GpuPrices>,
    /// Disks of stopped instances, per GiB-month; a month is 30 days (2 592 000 s) for pricing.
    pub storage_gib_month: Option<Money>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceVersion {
    pub effective_from: Timestamp,
    pub prices: Prices,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceBookError {
    #[error("two price versions take effect at {0}")]
    DuplicateEffectiveFrom(Timestamp),
    #[error("negative price in version {0}")]
    NegativePrice(Timestamp),
    #[error("spot discount over 10000 bps in version {0}")]
    DiscountOver100(Timestamp),
}

/// The versions, sorted by `effective_from`. A version is in effect from its `effective_from`
/// until the next one's.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PriceBook {
    versions: Vec<PriceVersion>,
}

impl PriceBook {
    pub fn new(mut versions: Vec<PriceVersion>) -> Result<Self, PriceBookError> {
        versions.sort_by_key(|v| v.effective_from);
        for pair in versions.windows(2) {
            if pair[0].effective_from == pair[1].effective_from {
                return Err(PriceBookError::DuplicateEffectiveFrom(
                    pair[0].effective_from,
                ));
            }
        }
        for v in &versions {
            validate(v)?;
        }
        Ok(Self { versions })
    }

    pub fn versions(&self) -> &[PriceVersion] {
        &self.versions
    }

    /// The version in effect at `t`, if any.
    pub fn price_at(&self, t: Timestamp) -> Option<&PriceVersion> {
        let idx = self.versions.partition_point(|v| v.effective_from <= t);
        idx.checked_sub(1).map(|i| &self.versions[i])
    }

    /// The first version change strictly after `t`.
    pub fn next_change_after(&self, t: Timestamp) -> Option<Timestamp> {
        let idx = self.versions.partition_point(|v| v.effective_from <= t);
        self.versions.get(idx).map(|v| v.effective_from)
    }
}

fn validate(v: &PriceVersion) -> Result<(), PriceBookError> {
    let at = v.effective_from;
    let neg = |m: &Option<Money>| m.is_some_and(|m| m.is_negative());
    if neg(&v.prices.storage_gib_month) {
        return Err(PriceBookError::NegativePrice(at));
    }
    for g in v.prices.gpus.values() {
        let endpoint_neg = g.endpoint.as_ref().is_some_and(|e| {
            e.per_request.is_negative()
                || e.per_1k_prompt_tokens.is_negative()
                || e.per_1k_completion_tokens.is_negative()
        });
        if neg(&g.instance_gpu_hour)
            || neg(&g.pod_gpu_hour)
            || neg(&g.share_gib_hour)
            || g.mig_hour.values().any(|m| m.is_negative())
            || endpoint_neg
        {
            return Err(PriceBookError::NegativePrice(at));
        }
        if g.spot_discount_bps > 10_000 {
            return Err(PriceBookError::DiscountOver100(at));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(at: i64, pod: i64) -> PriceVersion {
        let gpu = GpuPrices {
            pod_gpu_hour: Some(Money::from_micros(pod)),
            ..Default::default()
        };
        PriceVersion {
            effective_from: Timestamp(at),
            prices: Prices {
                gpus: [("H100".to_string(), gpu)].into(),
                storage_gib_month: None,
            },
        }
    }

    #[test]
    fn price_at_picks_the_version_in_effect() {
        let book = PriceBook::new(vec![version(200, 2), version(100, 1)]).unwrap();
        assert!(book.price_at(Timestamp(99)).is_none());
        assert_eq!(
            book.price_at(Timestamp(100)).unwrap().effective_from,
            Timestamp(100)
        );
        assert_eq!(
            book.price_at(Timestamp(199)).unwrap().effective_from,
            Timestamp(100)
        );
        assert_eq!(
            book.price_at(Timestamp(200)).unwrap().effective_from,
            Timestamp(200)
        );
        assert_eq!(
            book.price_at(Timestamp(i64::MAX)).unwrap().effective_from,
            Timestamp(200)
        );
        assert_eq!(book.next_change_after(Timestamp(0)), Some(Timestamp(100)));
        assert_eq!(book.next_change_after(Timestamp(100)), Some(Timestamp(200)));
        assert_eq!(book.next_change_after(Timestamp(200)), None);
    }

    #[test]
    fn refuses_bad_books() {
        assert_eq!(
            PriceBook::new(vec![version(1, 1), version(1, 2)]),
            Err(PriceBookError::DuplicateEffectiveFrom(Timestamp(1)))
        );
        assert_eq!(
            PriceBook::new(vec![version(1, -1)]),
            Err(PriceBookError::NegativePrice(Timestamp(1)))
        );
        let mut v = version(1, 1);
        v.prices.gpus.get_mut("H100").unwrap().spot_discount_bps = 10_001;
        assert_eq!(
            PriceBook::new(vec![v]),
            Err(PriceBookError::DiscountOver100(Timestamp(1)))
        );
    }
}

//! Endpoint calls into charges.
//!
//! The gateway records one usage event per completed call. Rating them one posting per call
//! would put three ledger postings behind every request; instead a rating pass groups the calls
//! it claimed into **aggregates** that one price rates — the same org, endpoint, GPU type, price
//! version and calendar month — and rates each aggregate once with [`rate_usage`] (requests,
//! prompt tokens and completion tokens each rounded down to a micro over the whole aggregate,
//! so grouping only ever rounds less than per-call rating would).
//!
//! An aggregate's id names exactly the calls it charges: `<endpoint>:<first id>..<last id>:<n>`
//! (ids in order). A call is rated once — the adapter marks it with its aggregate's key in the
//! same transaction that posts the charge — so two aggregates never share a call, their first
//! ids differ, and their keys never collide. A replayed pass over the same claimed calls derives
//! the same keys, which the ledger refuses to post twice.
//!
//! What is billable: calls the model answered, i.e. any status below 500. A 5xx (the replica
//! failed or could not be reached after retries) is not charged; it is marked rated with no
//! charge so it is not looked at again.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::price::PriceBook;
use crate::rate::{Charge, RateError, UsageEvent, rate_usage};
use crate::time::{Month, Timestamp};

/// One completed call, as the gateway metered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeteredCall {
    pub id: Uuid,
    pub org: Uuid,
    pub endpoint: Uuid,
    /// The GPU type the endpoint's replicas run on; `None` for a CPU-only endpoint (which the
    /// catalog does not price, so its calls wait, unrated, until it does).
    pub gpu_type: Option<String>,
    pub at: Timestamp,
    pub status: u16,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// Whether a call with this status is charged.
pub fn is_billable(status: u16) -> bool {
    status < 500
}

/// What rating a batch of calls decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RatedCalls {
    /// Charges to post (amounts may be zero for a free price; the ledger skips those).
    pub charges: Vec<Charge>,
    /// Each rated call and the aggregate that accounts for it (`None`: not billable, free).
    pub rated: Vec<(Uuid, Option<String>)>,
    /// Calls that cannot be rated yet (no price for them), with why. They stay unrated.
    pub unrated: Vec<(Uuid, RateError)>,
}

/// Group `calls` into aggregates and rate each with the price in effect at its calls' time.
pub fn rate_calls(calls: &[MeteredCall], book: &PriceBook) -> RatedCalls {
    type Key = (Uuid, Uuid, String, Timestamp, Month);
    let mut out = RatedCalls::default();
    let mut groups: BTreeMap<Key, Vec<&MeteredCall>> = BTreeMap::new();
    for call in calls {
        if !is_billable(call.status) {
            out.rated.push((call.id, None));
            continue;
        }
        let Some(gpu_type) = &call.gpu_type else {
            out.unrated.push((
                call.id,
                RateError::Unpriced {
                    product: crate::rate::Product::InferenceRequests,
                    gpu_type: None,
                    version: call.at,
                },
            ));
            continue;
        };
        let Some(version) = book.price_at(call.at) else {
            out.unrated
                .push((call.id, RateError::NoPriceInEffect(call.at)));
            continue;
        };
        groups
            .entry((
                call.org,
                call.endpoint,
                gpu_type.clone(),
                version.effective_from,
                Month::of(call.at),
            ))
            .or_default()
            .push(call);
    }
    for ((org, endpoint, gpu_type, _, _), mut members) in groups {
        members.sort_by_key(|c| c.id);
        let (first, last) = (members[0], members[members.len() - 1]);
        let aggregate = UsageEvent {
            id: format!("{endpoint}:{}..{}:{}", first.id, last.id, members.len()),
            org,
            endpoint,
            gpu_type,
            // Every member is priced by the same version and falls in the same month, so the
            // earliest member's time names both.
            at: members.iter().map(|c| c.at).min().unwrap_or(first.at),
            requests: members.len() as i64,
            prompt_tokens: members.iter().map(|c| c.prompt_tokens.max(0)).sum(),
            completion_tokens: members.iter().map(|c| c.completion_tokens.max(0)).sum(),
        };
        match rate_usage(&aggregate, book) {
            Ok(charges) => {
                out.charges.extend(charges);
                out.rated.extend(
                    members
                        .iter()
                        .map(|c| (c.id, Some(format!("usage:{}", aggregate.id)))),
                );
            }
            Err(e) => out
                .unrated
                .extend(members.iter().map(|c| (c.id, e.clone()))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::price::{EndpointPrices, GpuPrices, PriceVersion, Prices};
    use proptest::prelude::*;

    const H: &str = "h100-80gb";

    fn book(versions: &[(i64, i64, i64, i64)]) -> PriceBook {
        PriceBook::new(
            versions
                .iter()
                .map(|&(from, req, prompt, completion)| PriceVersion {
                    effective_from: Timestamp(from),
                    prices: Prices {
                        storage_gib_month: None,
                        gpus: [(
                            H.to_owned(),
                            GpuPrices {
                                endpoint: Some(EndpointPrices {
                                    per_request: Money::from_micros(req),
                                    per_1k_prompt_tokens: Money::from_micros(prompt),
                                    per_1k_completion_tokens: Money::from_micros(completion),
                                }),
                                ..GpuPrices::default()
                            },
                        )]
                        .into_iter()
                        .collect(),
                    },
                })
                .collect(),
        )
        .expect("a valid book")
    }

    fn call(n: u128, at: i64, status: u16, prompt: i64, completion: i64) -> MeteredCall {
        MeteredCall {
            id: Uuid::from_u128(n),
            org: Uuid::from_u128(1 << 100),
            endpoint: Uuid::from_u128(2 << 100),
            gpu_type: Some(H.to_owned()),
            at: Timestamp(at),
            status,
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    fn total(r: &RatedCalls) -> i64 {
        r.charges.iter().map(|c| c.amount.micros).sum()
    }

    #[test]
    fn an_aggregate_charges_requests_and_tokens_once_for_all_its_calls() {
        let b = book(&[(0, 100, 200, 600)]);
        let calls = [call(3, 10, 200, 1000, 500), call(1, 20, 200, 500, 0)];
        let r = rate_calls(&calls, &b);
        // 2 requests × 100 + 1,500 prompt × 200/1k + 500 completion × 600/1k.
        assert_eq!(total(&r), 200 + 300 + 300);
        assert_eq!(r.charges.len(), 3);
        let key = r.rated[0].1.clone().expect("charged");
        assert!(r.rated.iter().all(|(_, k)| k.as_ref() == Some(&key)));
        assert!(key.contains(&format!("{}..{}:2", Uuid::from_u128(1), Uuid::from_u128(3))));
        // The same calls in another order derive the same charges (the same keys).
        let again = rate_calls(&[calls[1].clone(), calls[0].clone()], &b);
        assert_eq!(again.charges, r.charges);
    }

    #[test]
    fn server_errors_are_rated_free_and_cpu_endpoints_wait_for_a_price() {
        let b = book(&[(0, 100, 0, 0)]);
        let mut cpu = call(2, 5, 200, 0, 0);
        cpu.gpu_type = None;
        let r = rate_calls(&[call(1, 5, 503, 10, 10), cpu], &b);
        assert_eq!(r.charges, vec![]);
        assert_eq!(r.rated, vec![(Uuid::from_u128(1), None)]);
        assert_eq!(r.unrated.len(), 1);
        assert_eq!(r.unrated[0].0, Uuid::from_u128(2));
        // 4xx is the model's answer: charged.
        assert_eq!(total(&rate_calls(&[call(3, 5, 404, 0, 0)], &b)), 100);
    }

    #[test]
    fn a_price_change_and_a_month_boundary_split_aggregates() {
        let feb = Month::new(2026, 2).expect("month").start().0;
        let b = book(&[(0, 100, 0, 0), (1_000, 300, 0, 0)]);
        let r = rate_calls(
            &[
                call(1, 10, 200, 0, 0),
                call(2, 2_000, 200, 0, 0),
                call(3, feb + 1, 200, 0, 0),
            ],
            &b,
        );
        assert_eq!(total(&r), 100 + 300 + 300);
        let keys: std::collections::BTreeSet<_> =
            r.rated.iter().filter_map(|(_, k)| k.clone()).collect();
        assert_eq!(keys.len(), 3, "one aggregate per version and month");
        let march_or_feb: Vec<_> = r.charges.iter().map(|c| Month::of(c.start)).collect();
        assert_eq!(march_or_feb[2], Month::new(2026, 2).expect("month"));
    }

    proptest! {
        /// Usage × price = charges: an aggregate's charge is the floor of the exact amount, and
        /// never more than rating each call alone would charge, nor less than that minus one
        /// micro per call and component.
        #[test]
        fn aggregates_charge_the_exact_amount_rounded_down(
            calls in prop::collection::vec((0u16..600, 0i64..5_000, 0i64..5_000), 1..40),
            req in 0i64..1_000, prompt in 0i64..1_000, completion in 0i64..1_000,
        ) {
            let b = book(&[(0, req, prompt, completion)]);
            let calls: Vec<MeteredCall> = calls
                .iter()
                .enumerate()
                .map(|(i, &(s, p, c))| call(i as u128 + 1, i as i64, s, p, c))
                .collect();
            let billable: Vec<&MeteredCall> =
                calls.iter().filter(|c| is_billable(c.status)).collect();
            let r = rate_calls(&calls, &b);
            let n = billable.len() as i64;
            let p: i64 = billable.iter().map(|c| c.prompt_tokens).sum();
            let c: i64 = billable.iter().map(|c| c.completion_tokens).sum();
            let exact = n * req + (p * prompt) / 1000 + (c * completion) / 1000;
            prop_assert_eq!(total(&r), exact);
            let one_by_one: i64 = billable
                .iter()
                .map(|&x| total(&rate_calls(std::slice::from_ref(x), &b)))
                .sum();
            prop_assert!(one_by_one <= total(&r));
            prop_assert!(total(&r) - one_by_one <= 2 * n);
            prop_assert_eq!(r.rated.len(), calls.len());
        }
    }
}

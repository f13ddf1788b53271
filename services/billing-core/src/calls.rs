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
//! **Resale.** An endpoint's owner may let other orgs call it at a price of its own. Such a call
//! is rated twice from the same aggregate: the owner pays the catalog price for it as for its
//! own calls (the compute is the owner's), and the caller pays the owner the endpoint's price
//! (as the gateway saw it when it answered), keyed `resale:<aggregate>:<product>`. A resale is
//! paid from the caller's paid balance only — promotional credit is the operator's gift to that
//! org, not money it can hand to another — see [`Posting::for_resale`](crate::Posting::for_resale).
//!
//! What is billable: calls the model answered, i.e. any status below 500. A 5xx (the replica
//! failed or could not be reached after retries) is not charged; it is marked rated with no
//! charge so it is not looked at again.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::money::Money;
use crate::price::{EndpointPrices, PriceBook};
use crate::rate::{Charge, RateError, UsageEvent, rate_usage, usage_charges};
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
    /// The org whose API key made the call (the owner itself, or an org it granted).
    pub caller: Uuid,
    /// The endpoint's own price when the call was answered, if it has one: what a caller other
    /// than the owner pays the owner.
    pub resale: Option<EndpointPrices>,
}

impl MeteredCall {
    /// What this call's caller owes the owner, per request and per 1k tokens (`None`: nothing —
    /// the owner's own call, or an endpoint without a price).
    fn resale_price(&self) -> Option<(i64, i64, i64)> {
        let p = self.resale.as_ref().filter(|_| self.caller != self.org)?;
        Some((
            p.per_request.micros,
            p.per_1k_prompt_tokens.micros,
            p.per_1k_completion_tokens.micros,
        ))
    }
}

/// A charge the caller pays to the endpoint's owner (not to the operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resale {
    pub charge: Charge,
    pub payee: Uuid,
}

/// Whether a call with this status is charged.
pub fn is_billable(status: u16) -> bool {
    status < 500
}

/// The `detail` of a resale charge (an invoice line of its own for the caller).
pub const RESALE_DETAIL: &str = "resale";

/// What rating a batch of calls decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RatedCalls {
    /// Charges to post (amounts may be zero for a free price; the ledger skips those).
    pub charges: Vec<Charge>,
    /// Callers' payments to endpoint owners (zero amounts likewise skipped).
    pub resales: Vec<Resale>,
    /// Each rated call and the aggregate that accounts for it (`None`: not billable, free).
    pub rated: Vec<(Uuid, Option<String>)>,
    /// Calls that cannot be rated yet (no price for them), with why. They stay unrated.
    pub unrated: Vec<(Uuid, RateError)>,
}

/// Group `calls` into aggregates and rate each with the price in effect at its calls' time.
pub fn rate_calls(calls: &[MeteredCall], book: &PriceBook) -> RatedCalls {
    type Key = (
        Uuid,
        Uuid,
        String,
        Timestamp,
        Month,
        Uuid,
        Option<(i64, i64, i64)>,
    );
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
                call.caller,
                call.resale_price(),
            ))
            .or_default()
            .push(call);
    }
    for ((org, endpoint, gpu_type, _, _, caller, resale), mut members) in groups {
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
        let resales = match resale {
            None => Ok(Vec::new()),
            Some((per_request, prompt, completion)) => usage_charges(
                &format!("resale:{}", aggregate.id),
                &aggregate,
                caller,
                &EndpointPrices {
                    per_request: Money::from_micros(per_request),
                    per_1k_prompt_tokens: Money::from_micros(prompt),
                    per_1k_completion_tokens: Money::from_micros(completion),
                },
                aggregate.at,
                Some(RESALE_DETAIL),
            ),
        };
        match rate_usage(&aggregate, book).and_then(|c| Ok((c, resales?))) {
            Ok((charges, resales)) => {
                out.charges.extend(charges);
                out.resales.extend(
                    resales
                        .into_iter()
                        .map(|charge| Resale { charge, payee: org }),
                );
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
    use crate::price::{GpuPrices, PriceVersion, Prices};
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
            caller: Uuid::from_u128(1 << 100),
            resale: None,
        }
    }

    /// `c` made by another org, under the endpoint's price `(request, prompt, completion)`.
    fn granted(mut c: MeteredCall, caller: u128, price: (i64, i64, i64)) -> MeteredCall {
        c.caller = Uuid::from_u128(caller);
        c.resale = Some(EndpointPrices {
            per_request: Money::from_micros(price.0),
            per_1k_prompt_tokens: Money::from_micros(price.1),
            per_1k_completion_tokens: Money::from_micros(price.2),
        });
        c
    }

    #[test]
    fn a_granted_caller_pays_the_owner_its_price_and_the_owner_pays_the_catalog() {
        let b = book(&[(0, 100, 200, 600)]);
        let owner = Uuid::from_u128(1 << 100);
        let calls = [
            granted(call(1, 10, 200, 1000, 500), 7, (1_000, 2_000, 4_000)),
            granted(call(2, 11, 200, 0, 0), 7, (1_000, 2_000, 4_000)),
            // The owner's own call under the same price: nothing is resold.
            granted(call(3, 12, 200, 0, 0), 1 << 100, (1_000, 2_000, 4_000)),
            // A 5xx: free for both.
            granted(call(4, 13, 503, 10, 10), 7, (1_000, 2_000, 4_000)),
        ];
        let r = rate_calls(&calls, &b);
        // The owner: 3 requests × 100 + 1,000 prompt × 200/1k + 500 completion × 600/1k.
        assert!(r.charges.iter().all(|c| c.org == owner));
        assert_eq!(total(&r), 300 + 200 + 300);
        // The caller: 2 requests × 1,000 + 1,000 × 2,000/1k + 500 × 4,000/1k, to the owner.
        let paid: i64 = r.resales.iter().map(|x| x.charge.amount.micros).sum();
        assert_eq!(paid, 2_000 + 2_000 + 2_000);
        assert!(r.resales.iter().all(|x| x.payee == owner
            && x.charge.org == Uuid::from_u128(7)
            && x.charge.key.starts_with("resale:")
            && x.charge.detail.as_deref() == Some(RESALE_DETAIL)));
        // Each resale is keyed by the aggregate that charges the owner for the same calls.
        let aggregate = r.rated[1].1.clone().expect("charged");
        assert!(r.resales.iter().all(|x| {
            x.charge
                .key
                .starts_with(&aggregate.replacen("usage:", "resale:", 1))
        }));
        assert_eq!(r.rated.len(), 4);
        // Rated again (a replayed pass), the same keys come out: the ledger posts them once.
        assert_eq!(rate_calls(&calls, &b).resales, r.resales);
    }

    #[test]
    fn calls_under_two_prices_or_from_two_callers_are_rated_apart() {
        let b = book(&[(0, 100, 0, 0)]);
        let r = rate_calls(
            &[
                granted(call(1, 10, 200, 0, 0), 7, (1_000, 0, 0)),
                granted(call(2, 11, 200, 0, 0), 7, (3_000, 0, 0)),
                granted(call(3, 12, 200, 0, 0), 8, (1_000, 0, 0)),
            ],
            &b,
        );
        let mut paid: Vec<(u128, i64)> = r
            .resales
            .iter()
            .map(|x| (x.charge.org.as_u128(), x.charge.amount.micros))
            .collect();
        paid.sort();
        assert_eq!(paid, vec![(7, 1_000), (7, 3_000), (8, 1_000)]);
        assert_eq!(total(&r), 300);
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

        /// Resales: only granted callers pay, always the owner, exactly their calls' usage at
        /// their price rounded down per caller; the owner's catalog charges are those of the
        /// same calls made by itself, but for rounding.
        #[test]
        fn granted_callers_pay_the_owner_exactly_their_own_usage(
            calls in prop::collection::vec((0u16..600, 0i64..5_000, 0i64..5_000, 0u128..3), 1..40),
            price in (0i64..10_000, 0i64..10_000, 0i64..10_000),
        ) {
            let b = book(&[(0, 100, 200, 600)]);
            let owner = 1u128 << 100;
            let calls: Vec<MeteredCall> = calls
                .iter()
                .enumerate()
                .map(|(i, &(s, p, c, who))| {
                    let caller = if who == 0 { owner } else { 7 + who };
                    granted(call(i as u128 + 1, i as i64, s, p, c), caller, price)
                })
                .collect();
            let r = rate_calls(&calls, &b);
            for caller in [8u128, 9] {
                let mine: Vec<&MeteredCall> = calls
                    .iter()
                    .filter(|c| c.caller.as_u128() == caller && is_billable(c.status))
                    .collect();
                let n = mine.len() as i64;
                let p: i64 = mine.iter().map(|c| c.prompt_tokens).sum();
                let c: i64 = mine.iter().map(|c| c.completion_tokens).sum();
                let paid: i64 = r
                    .resales
                    .iter()
                    .filter(|x| x.charge.org.as_u128() == caller)
                    .map(|x| x.charge.amount.micros)
                    .sum();
                prop_assert_eq!(paid, n * price.0 + p * price.1 / 1000 + c * price.2 / 1000);
            }
            prop_assert!(r.resales.iter().all(|x| x.payee.as_u128() == owner
                && x.charge.org.as_u128() != owner));
            let mut anonymous = calls.clone();
            for c in &mut anonymous {
                c.caller = c.org;
            }
            // Split by caller, the owner's aggregates round down apart: less, by under a micro
            // per token component and extra aggregate, never more.
            let together = total(&rate_calls(&anonymous, &b));
            prop_assert!(total(&r) <= together && together - total(&r) <= 4);
        }
    }
}

//! Property tests: the invariants billing must never break.

mod common;

use common::*;
use kiln_billing_core::ledger::fold_balances;
use kiln_billing_core::*;
use proptest::prelude::*;
use uuid::Uuid;

/// Exact (numerator, denominator) per second of `kind` for `shape` under version `v`,
/// computed independently of the crate's rating code.
fn oracle_rate(v: &PriceVersion, s: &WorkloadShape, kind: IntervalKind) -> Option<(i128, i128)> {
    if kind == IntervalKind::Storage {
        let p = v.prices.storage_gib_month?.micros;
        return Some((i128::from(p) * i128::from(s.disk_gib), 30 * 86_400));
    }
    let g = &v.prices.gpus["H100"];
    let off = if s.tier == Tier::Spot {
        10_000 - i128::from(g.spot_discount_bps)
    } else {
        10_000
    };
    let (price, qty, den) = match (&s.kind, &s.gpu) {
        (
            WorkloadKind::Instance,
            GpuRequest::Whole { count, .. } | GpuRequest::Passthrough { count, .. },
        ) => (g.instance_gpu_hour?, *count, 3_600),
        (_, GpuRequest::Whole { count, .. } | GpuRequest::Passthrough { count, .. }) => {
            (g.pod_gpu_hour?, *count, 3_600)
        }
        (_, GpuRequest::Mig { profile, .. }) => (*g.mig_hour.get(profile)?, 1, 3_600),
        (_, GpuRequest::Share { memory_mib, .. }) => {
            (g.share_gib_hour?, *memory_mib, 3_600 * 1_024)
        }
        (_, GpuRequest::None) => return None,
    };
    Some((
        i128::from(price.micros) * i128::from(qty) * off,
        den * 10_000,
    ))
}

fn rate_with_cuts(
    h: &[Transition],
    s: &WorkloadShape,
    book: &PriceBook,
    cuts: &[i64],
    now: Timestamp,
) -> Vec<Charge> {
    let mut cuts: Vec<Timestamp> = cuts.iter().map(|&c| ts(c)).filter(|&c| c < now).collect();
    cuts.sort();
    cuts.push(now);
    let mut rated = Timestamp(0);
    let mut out = Vec::new();
    for cut in cuts {
        out.extend(rate_until(h, s, book, rated, cut).unwrap());
        rated = cut;
    }
    out
}

fn posted_ledger(charges: &[Charge]) -> Ledger {
    let mut ledger = Ledger::new();
    for c in charges {
        ledger.post_charge(c).unwrap();
    }
    ledger
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Rating every minute, every hour, or at random moments — and re-running any run — yields
    /// exactly what one run over the whole history yields, with no key charged twice.
    #[test]
    fn rerating_at_any_cuts_equals_rating_once(
        h in history_strategy(),
        s in shape_strategy(),
        book in book_strategy(),
        cuts in prop::collection::vec(-HOUR..30 * HOUR, 0..8),
        repeat in prop::collection::vec(0usize..8, 0..4),
        now in 0i64..30 * HOUR,
    ) {
        let now = ts(now);
        let once = rate_until(&h, &s, &book, Timestamp(0), now).unwrap();
        let cut = rate_with_cuts(&h, &s, &book, &cuts, now);
        prop_assert_eq!(total(&once), total(&cut));
        let mut keys: Vec<&str> = cut.iter().map(|c| c.key.as_str()).collect();
        keys.sort();
        keys.dedup();
        prop_assert_eq!(keys.len(), cut.len(), "a key charged twice");
        // Every charge is inside one month and one price version.
        for c in &cut {
            prop_assert!(c.start < c.end);
            prop_assert_eq!(Month::of(c.start), Month::of(Timestamp(c.end.0 - 1)));
            prop_assert_eq!(book.price_at(c.start).unwrap().effective_from, c.price_version);
            prop_assert!(book.next_change_after(c.start).is_none_or(|n| n >= c.end));
            prop_assert!(c.amount.micros >= 0);
        }
        // Re-running some of the runs (a crashed rater retrying) posts nothing new.
        let mut ledger = posted_ledger(&cut);
        let before = ledger.balances().clone();
        for i in repeat {
            for c in rate_with_cuts(&h, &s, &book, &cuts, now).iter().skip(i) {
                prop_assert_ne!(ledger.post_charge(c).unwrap(), Posted::New);
            }
        }
        prop_assert_eq!(ledger.balances(), &before);
        let charged = -ledger.balances().iter().filter(|(a, _)| a.org().is_some()).map(|(_, m)| i128::from(m.micros)).sum::<i128>();
        prop_assert_eq!(charged, total(&once));
    }

    /// The charges of an interval, however split at price changes and months, add up to the
    /// exact amount rounded down once: never more, and less by under one micro.
    #[test]
    fn splitting_never_gains_or_loses_beyond_the_rule(
        s in shape_strategy(),
        book in book_strategy(),
        start in -HOUR..20 * HOUR,
        len in 0i64..4 * HOUR,
        storage in any::<bool>(),
    ) {
        let kind = if storage { IntervalKind::Storage } else { IntervalKind::Compute };
        let iv = BillableInterval { kind, start: ts(start), end: Some(ts(start + len)) };
        let charges = rate(iv, &s, &book).unwrap();
        let billable = match kind {
            IntervalKind::Storage => s.kind == WorkloadKind::Instance && s.disk_gib > 0,
            IntervalKind::Compute => s.kind != WorkloadKind::EndpointReplica,
        };
        if !billable {
            prop_assert!(charges.is_empty());
            return Ok(());
        }
        // Brute force: each whole-second tick T in (start, end] at the price in effect at T-1µs.
        let (mut exact, mut den) = (0i128, 1i128);
        for k in iv.start.second() + 1..=iv.end.unwrap().second() {
            let v = book.price_at(Timestamp(k * 1_000_000 - 1)).unwrap();
            let (n, d) = oracle_rate(v, &s, kind).unwrap();
            exact += n;
            den = d;
        }
        let charged = total(&charges);
        prop_assert_eq!(charged, exact.div_euclid(den));
        prop_assert!(charged * den <= exact && exact - charged * den < den);
        let secs: i64 = charges.iter().map(|c| c.quantity).sum::<i64>();
        let per = match (&s.gpu, kind) {
            (_, IntervalKind::Storage) => s.disk_gib,
            (GpuRequest::Whole { count, .. } | GpuRequest::Passthrough { count, .. }, _) => *count,
            (GpuRequest::Share { memory_mib, .. }, _) => *memory_mib,
            _ => 1,
        };
        prop_assert_eq!(secs, iv.start.billed_seconds_until(iv.end.unwrap()) * per);
    }

    /// `Posting::new` accepts exactly the balanced postings.
    #[test]
    fn postings_always_balance(lines in prop::collection::vec((0u128..4, any::<i64>()), 0..6), key in "[a-z]{0,3}") {
        let lines: Vec<(Account, Money)> = lines.into_iter().map(|(o, a)| (Account::OrgBalance(Uuid::from_u128(o)), m(a))).collect();
        let sum: i128 = lines.iter().map(|(_, a)| i128::from(a.micros)).sum();
        let ok = !key.is_empty() && lines.len() >= 2 && lines.iter().all(|(_, a)| a.micros != 0) && sum == 0;
        prop_assert_eq!(Posting::new(key, Timestamp(0), lines).is_ok(), ok);
    }

    /// Any sequence of top-ups, promos, charges and expiries: every posting balances, the
    /// ledger's balances equal folding its postings, all balances sum to zero, duplicates are
    /// no-ops and a reused key with different lines is refused without effect.
    #[test]
    fn balances_are_the_sum_of_postings(
        ops in prop::collection::vec((0u8..5, 0u128..3, 1i64..5_000_000, 0i64..30 * HOUR, 0u8..4), 0..60),
        h in history_strategy(),
        s in shape_strategy(),
        book in book_strategy(),
    ) {
        let charges = rate_until(&h, &s, &book, Timestamp(0), ts(30 * HOUR)).unwrap();
        let mut ledger = Ledger::new();
        for (i, (op, org, amount, at, tag)) in ops.into_iter().enumerate() {
            let org = Uuid::from_u128(1_000 + org);
            match op {
                0 => {
                    let p = Posting::top_up(org, m(amount), &format!("ref-{tag}"), ts(at)).unwrap();
                    let before = ledger.balances().clone();
                    match ledger.post(p.clone()) {
                        Ok(Posted::New) => {}
                        Ok(Posted::Duplicate) => prop_assert_eq!(ledger.get(p.key()), Some(&p)),
                        Err(LedgerError::KeyConflict(_)) => prop_assert_eq!(ledger.balances(), &before),
                        other => prop_assert!(false, "{other:?}"),
                    }
                }
                1 => { let _ = ledger.grant_promo(org, &format!("g{tag}"), m(amount), ts(at), ts(0)); }
                2 | 3 => {
                    if let Some(c) = charges.get(i % charges.len().max(1)) {
                        ledger.post_charge(c).unwrap();
                        prop_assert_ne!(ledger.post_charge(c).unwrap(), Posted::New);
                    }
                }
                _ => { ledger.expire_promos(ts(at)).unwrap(); }
            }
        }
        for p in ledger.postings() {
            prop_assert_eq!(p.lines().iter().map(|(_, a)| i128::from(a.micros)).sum::<i128>(), 0);
        }
        prop_assert_eq!(&fold_balances(ledger.postings()).unwrap(), ledger.balances());
        prop_assert_eq!(ledger.balances().values().map(|a| i128::from(a.micros)).sum::<i128>(), 0);
        // Promo accounts never go negative; expired ones are empty once expiry has run.
        ledger.expire_promos(ts(31 * HOUR)).unwrap();
        for (a, b) in ledger.balances() {
            if let Account::OrgPromo { .. } = a {
                prop_assert_eq!(b.micros, 0);
            }
        }
    }

    /// Invoices, grouped by product and GPU type, reconcile exactly with the ledger's charge
    /// postings of each month, for every org, whatever promos and rating cadence.
    #[test]
    fn invoices_reconcile_with_the_ledger(
        workloads in prop::collection::vec((history_strategy(), shape_strategy(), prop::collection::vec(0i64..30 * HOUR, 0..4)), 1..5),
        usage in prop::collection::vec((0u128..3, 0i64..30 * HOUR, 0i64..3, 0i64..5_000, 0i64..5_000), 0..10),
        promos in prop::collection::vec((0u128..3, 1i64..3_000_000, 0i64..30 * HOUR), 0..4),
        book in book_strategy(),
    ) {
        let now = ts(30 * HOUR);
        let mut charges = Vec::new();
        for (h, s, cuts) in &workloads {
            charges.extend(rate_with_cuts(h, s, &book, cuts, now));
        }
        for (i, (org, at, requests, prompt, completion)) in usage.into_iter().enumerate() {
            let event = UsageEvent {
                id: format!("e{i}"),
                org: Uuid::from_u128(1_000 + org),
                endpoint: Uuid::from_u128(9),
                gpu_type: "H100".into(),
                at: ts(at),
                requests,
                prompt_tokens: prompt,
                completion_tokens: completion,
            };
            charges.extend(rate_usage(&event, &book).unwrap());
        }
        let mut ledger = Ledger::new();
        for (i, (org, amount, expires)) in promos.into_iter().enumerate() {
            ledger.grant_promo(Uuid::from_u128(1_000 + org), &format!("p{i}"), m(amount), ts(expires), ts(0)).unwrap();
        }
        for (i, c) in charges.iter().enumerate() {
            if i % 3 == 0 {
                ledger.expire_promos(c.start).unwrap();
            }
            ledger.post_charge(c).unwrap();
        }
        let months = [Month::new(2026, 1).unwrap(), Month::new(2026, 2).unwrap()];
        for org in (0..3).map(|o| Uuid::from_u128(1_000 + o)) {
            let mut sum = 0i128;
            for month in months {
                let inv = invoice(org, month, &charges).unwrap();
                prop_assert_eq!(inv.total, ledger_charged_in_month(&ledger, org, month).unwrap());
                prop_assert_eq!(i128::from(inv.total.micros), inv.lines.iter().map(|l| i128::from(l.amount.micros)).sum::<i128>());
                sum += i128::from(inv.total.micros);
            }
            let org_charges: Vec<Charge> = charges.iter().filter(|c| c.org == org).cloned().collect();
            prop_assert_eq!(sum, total(&org_charges));
        }
    }
}

#[test]
fn same_key_different_lines_is_refused() {
    let org = Uuid::from_u128(1);
    let mut ledger = Ledger::new();
    let p = Posting::top_up(org, m(100), "wire-1", Timestamp(0)).unwrap();
    assert_eq!(post_ok(&mut ledger, p.clone()), Posted::New);
    assert_eq!(post_ok(&mut ledger, p), Posted::Duplicate);
    let other = Posting::top_up(org, m(101), "wire-1", Timestamp(0)).unwrap();
    assert_eq!(
        ledger.post(other),
        Err(LedgerError::KeyConflict("topup:wire-1".into()))
    );
    assert_eq!(ledger.balance(&Account::OrgBalance(org)), m(100));
    assert_eq!(ledger.balance(&Account::ExternalPayments), m(-100));
    assert!(Posting::top_up(org, m(0), "x", Timestamp(0)).is_err());
    assert_eq!(
        Posting::new(
            "k",
            Timestamp(0),
            vec![
                (Account::RevenueGpu, m(1)),
                (Account::RevenueStorage, m(-2))
            ]
        ),
        Err(PostingError::Unbalanced(-1))
    );
}

fn post_ok(ledger: &mut Ledger, p: Posting) -> Posted {
    ledger::post(ledger, p).unwrap()
}

#[test]
fn promo_is_spent_first_soonest_expiry_first_then_expires() {
    let org = Uuid::from_u128(5);
    let mut ledger = Ledger::new();
    ledger
        .post(Posting::top_up(org, m(1_000), "t", Timestamp(0)).unwrap())
        .unwrap();
    ledger
        .grant_promo(org, "late", m(300), Timestamp(200), Timestamp(0))
        .unwrap();
    ledger
        .grant_promo(org, "soon", m(100), Timestamp(100), Timestamp(0))
        .unwrap();
    assert_eq!(
        ledger
            .grant_promo(org, "soon", m(100), Timestamp(100), Timestamp(0))
            .unwrap(),
        Posted::Duplicate
    );
    assert!(
        ledger
            .grant_promo(org, "soon", m(100), Timestamp(999), Timestamp(0))
            .is_err()
    );
    let charge = |key: &str, at: i64, amount: i64| Charge {
        key: key.into(),
        org,
        workload: Uuid::from_u128(6),
        product: Product::PodGpu,
        gpu_type: Some("H100".into()),
        detail: None,
        tier: Tier::OnDemand,
        start: Timestamp(at),
        end: Timestamp(at + 1),
        price_version: Timestamp(0),
        unit: Unit::GpuSeconds,
        quantity: 1,
        amount: m(amount),
    };
    let soon = Account::OrgPromo {
        org,
        grant: "soon".into(),
    };
    let late = Account::OrgPromo {
        org,
        grant: "late".into(),
    };
    ledger.post_charge(&charge("charge:a", 10, 150)).unwrap();
    assert_eq!(
        (ledger.balance(&soon), ledger.balance(&late)),
        (m(0), m(250))
    );
    assert_eq!(
        ledger.org_funds(org, Timestamp(10)).unwrap(),
        OrgFunds {
            paid: m(1_000),
            promo: m(250)
        }
    );
    // Accrued after "late" expired: paid balance only.
    ledger.post_charge(&charge("charge:b", 250, 50)).unwrap();
    assert_eq!(ledger.balance(&Account::OrgBalance(org)), m(950));
    assert_eq!(ledger.org_funds(org, Timestamp(250)).unwrap().promo, m(0));
    assert_eq!(
        ledger.expire_promos(Timestamp(250)).unwrap(),
        vec![format!("promo-expiry:{late}")]
    );
    assert_eq!(
        ledger.expire_promos(Timestamp(250)).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(ledger.balance(&late), m(0));
    assert_eq!(
        ledger.balance(&Account::ExpensePromotions),
        m(-150),
        "only what was spent"
    );
    assert_eq!(ledger.balance(&Account::RevenueGpu), m(200));
    assert_eq!(
        ledger.post_charge(&charge("charge:zero", 5, 0)).unwrap(),
        Posted::Nothing
    );
}

#[test]
fn account_names_round_trip() {
    let org = Uuid::from_u128(42);
    for a in [
        Account::OrgBalance(org),
        Account::OrgPromo {
            org,
            grant: "welcome-2026".into(),
        },
        Account::RevenueGpu,
        Account::RevenueStorage,
        Account::RevenueInference,
        Account::ExternalPayments,
        Account::ExpensePromotions,
    ] {
        assert_eq!(a.to_string().parse::<Account>().unwrap(), a);
    }
    assert_eq!(
        Account::OrgBalance(org).to_string(),
        "org:00000000-0000-0000-0000-00000000002a:balance"
    );
    for bad in [
        "org:x:balance",
        "org:00000000-0000-0000-0000-00000000002a:promo:",
        "revenue:cpu",
        "org:00000000-0000-0000-0000-00000000002a",
    ] {
        assert!(bad.parse::<Account>().is_err(), "{bad}");
    }
}

//! Worked examples of metering and rating.

mod common;

use common::*;
use kiln_billing_core::*;

fn pod(count: i64) -> WorkloadShape {
    shape(
        WorkloadKind::Pod,
        Tier::OnDemand,
        GpuRequest::Whole {
            gpu_type: "H100".into(),
            count,
        },
        0,
        1,
    )
}

fn hist(rows: &[(&str, i64)]) -> Vec<Transition> {
    rows.iter()
        .map(|(s, at)| Transition::new(s.parse().unwrap(), Timestamp(*at)))
        .collect()
}

fn book(versions: &[(i64, i64, u16)]) -> PriceBook {
    PriceBook::new(
        versions
            .iter()
            .map(|&(at, base, bps)| version(Timestamp(at), base, bps))
            .collect(),
    )
    .unwrap()
}

// 2026-03-10T00:00:00Z, well inside a month.
const MAR: i64 = 1_773_100_800_000_000;

#[test]
fn per_second_with_a_price_change() {
    // Two GPUs at $2.50/GPU-hour, then $3.00 after an hour; 90 minutes in all.
    let book = book(&[(0, 2_500_000, 0), (MAR + HOUR, 3_000_000, 0)]);
    let h = hist(&[("running", MAR), ("stopped", MAR + HOUR * 3 / 2)]);
    let charges = rate_until(&h, &pod(2), &book, Timestamp(0), Timestamp(MAR + 10 * HOUR)).unwrap();
    assert_eq!(charges.len(), 2);
    assert_eq!(charges[0].amount, m(5_000_000));
    assert_eq!(charges[0].quantity, 2 * 3_600);
    assert_eq!(charges[0].unit, Unit::GpuSeconds);
    assert_eq!(charges[0].price_version, Timestamp(0));
    assert_eq!(charges[1].amount, m(3_000_000));
    assert_eq!(charges[1].price_version, Timestamp(MAR + HOUR));
    assert_eq!(
        charges[1].key,
        format!(
            "charge:{}:pod_gpu:{}:{}:{}",
            pod(2).workload,
            MAR + HOUR,
            MAR + 3 * HOUR / 2,
            MAR + HOUR
        )
    );
    // The same via rate() on the metered interval.
    let iv = meter(&h, false)[0];
    assert_eq!(rate(iv, &pod(2), &book).unwrap(), charges);
}

#[test]
fn spot_mig_share_instance_and_storage() {
    let book = PriceBook::new(vec![{
        let mut v = version(Timestamp(0), 3_600_000, 3_000);
        let g = v.prices.gpus.get_mut("H100").unwrap();
        g.mig_hour.insert("1g.10gb".into(), m(360_000));
        g.share_gib_hour = Some(m(100_000));
        v.prices.storage_gib_month = Some(m(50_000));
        v
    }])
    .unwrap();
    let h = hist(&[("running", MAR), ("stopped", MAR + HOUR)]);
    let now = Timestamp(MAR + 24 * 30 * HOUR);
    let amount = |s: &WorkloadShape| total(&rate_until(&h, s, &book, Timestamp(0), now).unwrap());
    let spot = shape(
        WorkloadKind::Pod,
        Tier::Spot,
        GpuRequest::Whole {
            gpu_type: "H100".into(),
            count: 1,
        },
        0,
        1,
    );
    assert_eq!(amount(&spot), 2_520_000, "30% off $3.60");
    let mig = shape(
        WorkloadKind::Pod,
        Tier::OnDemand,
        GpuRequest::Mig {
            gpu_type: "H100".into(),
            profile: "1g.10gb".into(),
        },
        0,
        1,
    );
    assert_eq!(amount(&mig), 360_000);
    let share = shape(
        WorkloadKind::Pod,
        Tier::OnDemand,
        GpuRequest::Share {
            gpu_type: "H100".into(),
            memory_mib: 10_240,
        },
        0,
        1,
    );
    assert_eq!(amount(&share), 1_000_000, "10 GiB at $0.10/GiB-hour");
    // A stopped instance's 100 GiB disk at $0.05/GiB-month, stopped for (30 days - 1 hour).
    let inst = shape(
        WorkloadKind::Instance,
        Tier::OnDemand,
        GpuRequest::Passthrough {
            gpu_type: "H100".into(),
            count: 1,
        },
        100,
        1,
    );
    let charges = rate_until(&h, &inst, &book, Timestamp(0), now).unwrap();
    let storage: i128 = charges
        .iter()
        .filter(|c| c.product == Product::Storage)
        .map(|c| i128::from(c.amount.micros))
        .sum();
    assert_eq!(storage, 5_000_000 * 719 / 720);
    assert_eq!(total(&charges) - storage, 3_600_007);
    // Endpoint replicas are paid per request; CPU-only workloads are not metered here.
    let replica = shape(
        WorkloadKind::EndpointReplica,
        Tier::OnDemand,
        GpuRequest::Whole {
            gpu_type: "H100".into(),
            count: 1,
        },
        0,
        1,
    );
    assert_eq!(amount(&replica), 0);
    assert_eq!(
        amount(&shape(
            WorkloadKind::Pod,
            Tier::OnDemand,
            GpuRequest::None,
            0,
            1
        )),
        0
    );
}

#[test]
fn charges_split_at_month_boundaries() {
    // T0 is 2026-01-31T22:00Z; run 4 hours at $1/hour.
    let book = book(&[(0, 1_000_000, 0)]);
    let h = hist(&[("running", T0), ("terminated", T0 + 4 * HOUR)]);
    let charges = rate_until(&h, &pod(1), &book, Timestamp(0), Timestamp(T0 + 5 * HOUR)).unwrap();
    assert_eq!(charges.len(), 2);
    assert_eq!(Month::of(charges[0].start), Month::new(2026, 1).unwrap());
    assert_eq!(charges[0].end, Month::new(2026, 2).unwrap().start());
    assert_eq!(Month::of(charges[1].start), Month::new(2026, 2).unwrap());
    assert_eq!(
        (charges[0].amount, charges[1].amount),
        (m(2_000_000), m(2_000_000))
    );
}

#[test]
fn rating_every_minute_carries_the_remainder() {
    // 1 micro per GPU-hour would round every minute's charge to zero if rounded per charge;
    // accruing from the start of the run bills exactly floor(hours) micros.
    let book = book(&[(0, 1, 0)]);
    let h = hist(&[("running", MAR)]);
    let mut charges = Vec::new();
    let mut rated = Timestamp(0);
    for minute in 1..=150 {
        let now = Timestamp(MAR + minute * 60_000_000);
        charges.extend(rate_until(&h, &pod(1), &book, rated, now).unwrap());
        rated = now;
    }
    assert_eq!(total(&charges), 2);
    assert_eq!(charges.len(), 150);
    assert_eq!(charges.iter().filter(|c| c.amount.micros == 1).count(), 2);
    // Sub-second runs bill the whole-second ticks they contain.
    let book = book_one_per_sec();
    let h = hist(&[
        ("running", MAR + 900_000),
        ("stopped", MAR + 1_100_000),
        ("running", MAR + 1_200_000),
        ("stopped", MAR + 1_900_000),
    ]);
    let charges = rate_until(&h, &pod(1), &book, Timestamp(0), Timestamp(MAR + HOUR)).unwrap();
    assert_eq!(
        charges.iter().map(|c| c.quantity).collect::<Vec<_>>(),
        vec![1]
    );
}

fn book_one_per_sec() -> PriceBook {
    book(&[(0, 3_600, 0)])
}

#[test]
fn errors_are_explicit() {
    let h = hist(&[("running", MAR), ("stopped", MAR + HOUR)]);
    let late = book(&[(MAR + 2_000_000, 1_000, 0)]);
    assert_eq!(
        rate_until(&h, &pod(1), &late, Timestamp(0), Timestamp(MAR + HOUR)),
        Err(RateError::NoPriceInEffect(Timestamp(MAR)))
    );
    let a100 = shape(
        WorkloadKind::Pod,
        Tier::OnDemand,
        GpuRequest::Whole {
            gpu_type: "A100".into(),
            count: 1,
        },
        0,
        1,
    );
    assert!(matches!(
        rate_until(
            &h,
            &a100,
            &book(&[(0, 1, 0)]),
            Timestamp(0),
            Timestamp(MAR + HOUR)
        ),
        Err(RateError::Unpriced { .. })
    ));
    let open = BillableInterval {
        kind: IntervalKind::Compute,
        start: Timestamp(MAR),
        end: None,
    };
    assert_eq!(
        rate(open, &pod(1), &book(&[(0, 1, 0)])),
        Err(RateError::InvalidInterval)
    );
    let huge = book(&[(0, i64::MAX, 0)]);
    let long = hist(&[("running", MAR), ("stopped", MAR + 1_000_000 * HOUR)]);
    assert!(matches!(
        rate_until(
            &long,
            &pod(8),
            &huge,
            Timestamp(0),
            Timestamp(MAR + 1_000_000 * HOUR)
        ),
        Err(RateError::Money(_))
    ));
}

#[test]
fn usage_events() {
    let mut v = version(Timestamp(0), 0, 0);
    v.prices.gpus.get_mut("H100").unwrap().endpoint = Some(EndpointPrices {
        per_request: m(100),
        per_1k_prompt_tokens: m(500_000),
        per_1k_completion_tokens: m(1_500_001),
    });
    let book = PriceBook::new(vec![v]).unwrap();
    let event = UsageEvent {
        id: "req-1".into(),
        org: uuid::Uuid::from_u128(7),
        endpoint: uuid::Uuid::from_u128(8),
        gpu_type: "H100".into(),
        at: Timestamp(MAR),
        requests: 1,
        prompt_tokens: 1_500,
        completion_tokens: 200,
    };
    let charges = rate_usage(&event, &book).unwrap();
    let amounts: Vec<i64> = charges.iter().map(|c| c.amount.micros).collect();
    assert_eq!(
        amounts,
        vec![100, 750_000, 300_000],
        "completion 300000.2 rounds down"
    );
    assert_eq!(charges[1].key, "usage:req-1:inference_prompt_tokens");
    let none = UsageEvent {
        prompt_tokens: 0,
        completion_tokens: 0,
        ..event.clone()
    };
    assert_eq!(rate_usage(&none, &book).unwrap().len(), 1);
    let neg = UsageEvent {
        requests: -1,
        ..event.clone()
    };
    assert!(rate_usage(&neg, &book).is_err());
    let other = UsageEvent {
        gpu_type: "L4".into(),
        ..event
    };
    assert!(matches!(
        rate_usage(&other, &book),
        Err(RateError::Unpriced { .. })
    ));
}

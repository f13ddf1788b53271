#![allow(dead_code)]

use kiln_billing_core::*;
use proptest::prelude::*;
use uuid::Uuid;

/// 2026-01-31T22:00:00Z: histories start two hours before a month boundary.
pub const T0: i64 = 1_769_896_800_000_000;
pub const HOUR: i64 = 3_600_000_000;

pub fn m(micros: i64) -> Money {
    Money::from_micros(micros)
}

pub fn ts(offset_micros: i64) -> Timestamp {
    Timestamp(T0 + offset_micros)
}

/// A version with every product priced on "H100".
pub fn version(at: Timestamp, base: i64, spot_bps: u16) -> PriceVersion {
    let gpu = GpuPrices {
        instance_gpu_hour: Some(m(base.saturating_add(7))),
        pod_gpu_hour: Some(m(base)),
        mig_hour: [("1g.10gb".to_string(), m(base / 7 + 1))].into(),
        share_gib_hour: Some(m(base / 80 + 3)),
        spot_discount_bps: spot_bps,
        endpoint: Some(EndpointPrices {
            per_request: m(base / 1000),
            per_1k_prompt_tokens: m(base / 10 + 1),
            per_1k_completion_tokens: m(base / 3 + 1),
        }),
    };
    PriceVersion {
        effective_from: at,
        prices: Prices {
            gpus: [("H100".to_string(), gpu)].into(),
            storage_gib_month: Some(m(base / 20 + 11)),
        },
    }
}

pub fn shape(
    kind: WorkloadKind,
    tier: Tier,
    gpu: GpuRequest,
    disk_gib: i64,
    n: u128,
) -> WorkloadShape {
    WorkloadShape {
        workload: Uuid::from_u128(n),
        org: Uuid::from_u128(1_000 + n % 3),
        kind,
        tier,
        gpu,
        disk_gib,
    }
}

pub fn total(charges: &[Charge]) -> i128 {
    charges.iter().map(|c| i128::from(c.amount.micros)).sum()
}

// ---- strategies ----

pub fn book_strategy() -> impl Strategy<Value = PriceBook> {
    (
        (0i64..=20_000_000, 0u16..=10_000),
        prop::collection::vec((0i64..30 * HOUR, 0i64..=20_000_000, 0u16..=10_000), 0..5),
    )
        .prop_map(|((base, bps), changes)| {
            let mut versions = vec![version(ts(-48 * HOUR), base, bps)];
            for (at, base, bps) in changes {
                if versions.iter().all(|v| v.effective_from != ts(at)) {
                    versions.push(version(ts(at), base, bps));
                }
            }
            PriceBook::new(versions).unwrap()
        })
}

pub fn shape_strategy() -> impl Strategy<Value = WorkloadShape> {
    let gpu = prop_oneof![
        (1i64..=8).prop_map(|count| GpuRequest::Whole {
            gpu_type: "H100".into(),
            count
        }),
        (1i64..=8).prop_map(|count| GpuRequest::Passthrough {
            gpu_type: "H100".into(),
            count
        }),
        Just(GpuRequest::Mig {
            gpu_type: "H100".into(),
            profile: "1g.10gb".into()
        }),
        (1i64..=81_920).prop_map(|memory_mib| GpuRequest::Share {
            gpu_type: "H100".into(),
            memory_mib
        }),
    ];
    let kind = prop_oneof![
        Just(WorkloadKind::Pod),
        Just(WorkloadKind::Instance),
        Just(WorkloadKind::EndpointReplica)
    ];
    let tier = prop_oneof![Just(Tier::OnDemand), Just(Tier::Spot)];
    (kind, tier, gpu, 0i64..=2_000, 0u128..1_000).prop_map(|(k, t, g, d, n)| shape(k, t, g, d, n))
}

pub fn state_strategy() -> impl Strategy<Value = State> {
    prop_oneof![
        4 => Just(State::Running),
        1 => Just(State::Pending),
        1 => Just(State::Starting),
        1 => Just(State::Stopping),
        3 => Just(State::Stopped),
        1 => Just(State::Terminated),
        1 => Just(State::Failed),
        1 => Just(State::Lost),
    ]
}

/// A history over at most ~24 hours from T0 (crossing the month boundary at T0 + 2h).
pub fn history_strategy() -> impl Strategy<Value = Vec<Transition>> {
    prop::collection::vec((state_strategy(), 0i64..2 * HOUR), 0..12).prop_map(|rows| {
        let mut at = 0;
        rows.into_iter()
            .map(|(state, delta)| {
                at += delta;
                Transition::new(state, ts(at))
            })
            .collect()
    })
}

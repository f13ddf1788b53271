//! `scheduler.core.*` and `scheduler.packing.*`: the placement core alone, in process, no I/O.
//!
//! * `scheduler.core.decisions_per_s` — best-fit through [`FleetIndex`] / [`place_indexed`] on
//!   10,000 nodes × 8 H100 (NVLink all-to-all, 2 NUMA nodes, 5 % of nodes in MIG mode), 60 % of
//!   GPU capacity allocated, one thread. A seeded stream of requests (1/2/4/8 whole GPUs, MIG
//!   slices, time-sliced shares); each placement is applied and the oldest allocations are
//!   released until the fleet is back at 60 %, so it stays near steady state. Only the `place`
//!   calls are timed, refusals included (they take the full scan that explains them).
//!   `…cycles_per_s` times place + apply + releases. `…first_fit` is the same stream with
//!   first-fit, `…unindexed` best-fit scanning every node (the figure before the index).
//! * `scheduler.packing.alloc_at_first_reject` / `scheduler.packing.first_fit` — the crate's
//!   [`simulate`] on a seeded trace of arrivals and departures on 1,000 such nodes: the share of
//!   GPU capacity allocated when the first request is refused, best-fit and first-fit.

use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use kiln_placement::{
    Allocation, AllocationId, Decision, FleetIndex, FleetSnapshot, Gpu, GpuUse, Node,
    PlacementRequest, Policy, Product, Resources, Strategy, TraceEvent, UNITS_PER_GPU,
    place_indexed, request_units, simulate,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const H100: &str = "h100-80gb";
const H100_MIB: u64 = 81_559;
const GPUS: u32 = 8;
const ORGS: usize = 16;
const MIG_PROFILES: &[&str] = &[
    "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb",
];

/// Sizes of the runs; the defaults are the (10,000 nodes).
pub struct PlacementPlan {
    pub nodes: u32,
    pub decisions: u32,
    pub seed: u64,
}

fn node(id: u32, mig: bool) -> Node {
    let gpus = (0..GPUS)
        .map(|i| {
            let mut g = Gpu::new(&format!("n{id}-g{i}"), i, H100, H100_MIB);
            g.numa_node = Some(i / (GPUS / 2));
            g.nvlink_peers = (0..GPUS).filter(|&j| j != i).collect();
            g.mig_enabled = mig;
            g
        })
        .collect();
    Node::new(
        &format!("n{id}"),
        Resources::new(192_000, 2_000_000, 28_000),
        gpus,
    )
}

/// `nodes` HGX nodes, 5 % in MIG mode, with `fill` of the other nodes' GPUs held one per
/// allocation in a seeded random pattern. Returns the fleet and the allocations' ids.
fn fleet(rng: &mut StdRng, nodes: u32, fill: f64) -> (FleetSnapshot, Vec<AllocationId>) {
    let mut ids = Vec::new();
    let nodes = (0..nodes)
        .map(|n| {
            let mut node = node(n, rng.gen_bool(0.05));
            if node.gpus[0].mig_enabled {
                return node;
            }
            for g in &mut node.gpus {
                if rng.gen_bool(fill) {
                    let id = AllocationId(format!("pre-{}", g.uuid));
                    let resources = Resources::new(16_000, 200_000, 100);
                    g.used = GpuUse::Whole(id.clone());
                    node.free = node.free.saturating_sub(&resources);
                    node.allocations.push(Allocation {
                        id: id.clone(),
                        org: format!("org{}", rng.gen_range(0..ORGS)),
                        product: Product::Pod,
                        tier: kiln_placement::Tier::OnDemand,
                        priority: 0,
                        resources,
                    });
                    ids.push(id);
                }
            }
            node
        })
        .collect();
    (FleetSnapshot::new(nodes), ids)
}

/// One request of the mixed stream: 70 % whole (1/2/4/8 GPUs), 15 % MIG, 15 % shares.
fn request(rng: &mut StdRng) -> PlacementRequest {
    let org = format!("org{}", rng.gen_range(0..ORGS));
    let kind = rng.gen_range(0..100);
    if kind < 70 {
        let count = *[1, 1, 1, 1, 1, 2, 2, 4, 4, 8]
            .choose(rng)
            .expect("non-empty");
        let c = u64::from(count);
        PlacementRequest::whole(&org, H100, count).with_resources(16_000 * c, 200_000 * c, 100 * c)
    } else if kind < 85 {
        let profile = MIG_PROFILES.choose(rng).expect("non-empty");
        PlacementRequest::mig(&org, H100, profile).with_resources(2_000, 20_000, 20)
    } else {
        let memory = *[10_240, 20_480, 40_960].choose(rng).expect("non-empty");
        PlacementRequest::share(&org, H100, memory).with_resources(4_000, 40_000, 20)
    }
}

#[derive(Clone)]
struct Steady {
    index: FleetIndex,
    /// Live allocations, oldest first, with their GPU units.
    live: VecDeque<(AllocationId, u64)>,
    units: u64,
    target: u64,
    next: u64,
}

impl Steady {
    fn new(rng: &mut StdRng, nodes: u32) -> Self {
        let (fleet, mut ids) = fleet(rng, nodes, 0.6);
        let capacity = u64::from(nodes * GPUS) * UNITS_PER_GPU;
        ids.shuffle(rng);
        let live: VecDeque<_> = ids.into_iter().map(|id| (id, UNITS_PER_GPU)).collect();
        let units = live.len() as u64 * UNITS_PER_GPU;
        Self {
            index: FleetIndex::new(fleet),
            live,
            units,
            target: capacity * 6 / 10,
            next: 0,
        }
    }

    /// Applies a placement and releases the oldest allocations down to the target.
    fn settle(&mut self, policy: &Policy, req: &PlacementRequest, d: &Decision) {
        if let Decision::Placed(p) = d {
            let id = AllocationId(format!("s{}", self.next));
            self.next += 1;
            self.index
                .apply(policy, req, p, id.clone())
                .expect("the core's placement applies");
            let u = request_units(req, Some(H100_MIB));
            self.live.push_back((id, u));
            self.units += u;
        }
        while self.units > self.target {
            let Some((id, u)) = self.live.pop_front() else {
                break;
            };
            // Preempted allocations are gone already; the stream has no spot work.
            let _ = self.index.release(&id);
            self.units -= u;
        }
    }
}

struct CoreRun {
    decisions_per_s: f64,
    cycles_per_s: f64,
    refused: f64,
}

/// Runs `n` decisions of the stream on `state` with `policy`; `place` is the decision call.
fn run_core(
    state: &mut Steady,
    rng: &mut StdRng,
    policy: &Policy,
    n: u32,
    place: impl Fn(&PlacementRequest, &FleetIndex, &Policy) -> Decision,
) -> CoreRun {
    let mut deciding = Duration::ZERO;
    let mut refused = 0u32;
    let start = Instant::now();
    for _ in 0..n {
        let req = request(rng);
        let t = Instant::now();
        let d = place(&req, &state.index, policy);
        deciding += t.elapsed();
        if matches!(d, Decision::Unschedulable(_)) {
            refused += 1;
        }
        state.settle(policy, &req, &d);
    }
    let total = start.elapsed();
    CoreRun {
        decisions_per_s: f64::from(n) / deciding.as_secs_f64(),
        cycles_per_s: f64::from(n) / total.as_secs_f64(),
        refused: f64::from(refused) / f64::from(n),
    }
}

fn indexed(req: &PlacementRequest, index: &FleetIndex, policy: &Policy) -> Decision {
    place_indexed(req, index, policy).expect("valid request")
}

fn unindexed(req: &PlacementRequest, index: &FleetIndex, policy: &Policy) -> Decision {
    kiln_placement::place(req, index.fleet(), policy).expect("valid request")
}

/// A trace of `arrivals` requests on `nodes`, each living a seeded random number of
/// arrivals; long enough lives that demand outgrows the fleet and something is refused.
fn trace(rng: &mut StdRng, nodes: u32, arrivals: u32) -> Vec<TraceEvent> {
    let mean_life = u64::from(nodes * GPUS) * 3 / 2;
    let mut departures: BinaryHeap<std::cmp::Reverse<(u64, u32)>> = BinaryHeap::new();
    let mut events = Vec::new();
    for k in 0..arrivals {
        while let Some(std::cmp::Reverse((at, id))) = departures.peek().copied() {
            if at > u64::from(k) {
                break;
            }
            departures.pop();
            events.push(TraceEvent::Depart {
                id: AllocationId(format!("t{id}")),
            });
        }
        events.push(TraceEvent::Arrive {
            id: AllocationId(format!("t{k}")),
            request: request(rng),
        });
        let life = rng.gen_range(1..=2 * mean_life);
        departures.push(std::cmp::Reverse((u64::from(k) + life, k)));
    }
    events
}

pub fn run(plan: &PlacementPlan, figure: impl Fn(&str, String, &str)) {
    let best = Policy::with_strategy(Strategy::BestFit);
    let first = Policy::with_strategy(Strategy::FirstFit);

    let t = Instant::now();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut state = Steady::new(&mut rng, plan.nodes);
    // Warm up into steady state (MIG and share GPUs fill, best-fit's packing takes hold).
    run_core(&mut state, &mut rng, &best, plan.decisions / 2, indexed);
    eprintln!(
        "kiln-bench: placement fleet of {} nodes ready in {:.1?}",
        plan.nodes,
        t.elapsed()
    );
    let mut first_state = state.clone();
    let mut unindexed_state = state.clone();

    let fit = run_core(&mut state, &mut rng.clone(), &best, plan.decisions, indexed);
    eprintln!(
        "kiln-bench: best-fit refused {:.2} % of requests (timed too: reasons for every node)",
        fit.refused * 100.0
    );
    figure(
        "scheduler.core.decisions_per_s",
        format!("{:.0}", fit.decisions_per_s),
        "decisions/s",
    );
    figure(
        "scheduler.core.cycles_per_s",
        format!("{:.0}", fit.cycles_per_s),
        "decisions/s",
    );
    let ff = run_core(
        &mut first_state,
        &mut rng.clone(),
        &first,
        plan.decisions,
        indexed,
    );
    figure(
        "scheduler.core.decisions_per_s.first_fit",
        format!("{:.0}", ff.decisions_per_s),
        "decisions/s",
    );
    // The exhaustive scan is slow: a few hundred decisions are enough to time it.
    let slow = run_core(
        &mut unindexed_state,
        &mut rng.clone(),
        &best,
        (plan.decisions / 100).max(50),
        unindexed,
    );
    figure(
        "scheduler.core.decisions_per_s.unindexed",
        format!("{:.0}", slow.decisions_per_s),
        "decisions/s",
    );

    let packing_nodes = plan.nodes.min(1_000);
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x9ac4);
    let (empty, _) = fleet(&mut rng, packing_nodes, 0.0);
    let events = trace(&mut rng, packing_nodes, packing_nodes * GPUS * 4);
    for (name, strategy) in [
        ("scheduler.packing.alloc_at_first_reject", Strategy::BestFit),
        ("scheduler.packing.first_fit", Strategy::FirstFit),
    ] {
        let t = Instant::now();
        let out = simulate(strategy, &empty, &events);
        eprintln!(
            "kiln-bench: {strategy:?} trace of {} events: {} placed, {} refused, {:.1?}",
            events.len(),
            out.placed,
            out.refused,
            t.elapsed()
        );
        figure(
            name,
            format!("{:.4}", out.alloc_at_first_reject.unwrap_or(1.0)),
            "fraction",
        );
    }
}

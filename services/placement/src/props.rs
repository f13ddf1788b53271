//! Property tests on small random fleets (1–3 nodes, 1–4 GPUs each):
//! * applying any sequence of placements never oversubscribes a GPU, a MIG slice, a share's
//!   memory or a node's CPU/memory/disk;
//! * MIG placements are always valid per geometry and non-overlapping;
//! * a request is refused only when an exhaustive search finds no valid placement either (and
//!   every placement the core makes is one the exhaustive search accepts).

use proptest::prelude::{
    Just, ProptestConfig, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest,
};
use proptest::strategy::Strategy as _;

use crate::*;

const H100: &str = "h100-80gb";
const L40S: &str = "l40s-48gb";
const PROFILES: &[&str] = &[
    "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb",
];

#[derive(Debug, Clone)]
struct GpuSpec {
    h100: bool,
    healthy: bool,
    mig: bool,
    numa: u32,
    group: Option<u32>,
}

fn arb_gpu() -> impl proptest::strategy::Strategy<Value = GpuSpec> {
    (
        any::<bool>(),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.3),
        0u32..2,
        prop::option::weighted(0.4, 0u32..2),
    )
        .prop_map(|(h100, healthy, mig, numa, group)| GpuSpec {
            h100,
            healthy,
            mig: mig && h100,
            numa,
            group,
        })
}

fn arb_node() -> impl proptest::strategy::Strategy<Value = (Vec<GpuSpec>, u8, u64, bool)> {
    (
        prop::collection::vec(arb_gpu(), 1..=4),
        any::<u8>(),
        prop::sample::select(vec![2_000u64, 8_000, 32_000]),
        prop::bool::weighted(0.9),
    )
}

fn build_fleet(specs: &[(Vec<GpuSpec>, u8, u64, bool)]) -> FleetSnapshot {
    let nodes = specs
        .iter()
        .enumerate()
        .map(|(n, (gpus, links, cpu, schedulable))| {
            let id = format!("n{n}");
            let mut gs: Vec<Gpu> = gpus
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let (t, mem) = if s.h100 { (H100, 81559) } else { (L40S, 46068) };
                    let mut g = Gpu::new(&format!("{id}-g{i}"), i as u32, t, mem);
                    g.healthy = s.healthy;
                    g.mig_enabled = s.mig;
                    g.numa_node = Some(s.numa);
                    g.iommu_group = s.group;
                    g
                })
                .collect();
            // NVLink: bit k of `links` connects the k-th pair (i < j).
            let mut k = 0;
            for i in 0..gs.len() {
                for j in i + 1..gs.len() {
                    if k < 8 && links & (1 << k) != 0 {
                        gs[i].nvlink_peers.push(j as u32);
                    }
                    k += 1;
                }
            }
            let mut node = Node::new(&id, Resources::new(*cpu, 64_000, 500), gs);
            node.schedulable = *schedulable;
            node
        })
        .collect();
    FleetSnapshot::new(nodes)
}

fn arb_request() -> impl proptest::strategy::Strategy<Value = PlacementRequest> {
    let gpu = prop_oneof![
        3 => (1u32..=4, prop::bool::weighted(0.3), prop::bool::weighted(0.3), any::<bool>())
            .prop_map(|(count, passthrough, nvlink, h100)| {
                let t = if h100 { H100 } else { L40S };
                let mut r = if passthrough {
                    PlacementRequest::passthrough("o", t, count)
                } else {
                    PlacementRequest::whole("o", t, count)
                };
                r.require_nvlink = nvlink;
                r
            }),
        2 => prop::sample::select(PROFILES).prop_map(|p| PlacementRequest::mig("o", H100, p)),
        2 => (prop::sample::select(vec![4_000u64, 20_000, 40_000, 46_068, 81_559]), any::<bool>())
            .prop_map(|(m, h100)| PlacementRequest::share("o", if h100 { H100 } else { L40S }, m)),
        1 => Just(PlacementRequest::cpu_only("o", 1_000, 1_000)),
    ];
    (
        gpu,
        prop::sample::select(vec![0u64, 1_000, 4_000, 16_000]),
        prop::sample::select(vec!["a", "b", "c"]),
        any::<bool>(),
        -2i32..3,
    )
        .prop_map(|(mut r, cpu, org, spot, prio)| {
            r.cpu_millis = cpu;
            r.org = org.into();
            if spot {
                r.tier = Tier::Spot;
            }
            r.priority = prio;
            r
        })
}

/// Whether the exhaustive search finds any valid placement of `req` on `node`, written
/// independently of the core's search: every GPU subset, every start, every GPU.
fn brute_fits(node: &Node, req: &PlacementRequest, policy: &Policy) -> bool {
    if !node.schedulable
        || !node.free.covers(&Resources::new(
            req.cpu_millis,
            req.memory_mib,
            req.disk_gib,
        ))
    {
        return false;
    }
    let n = node.gpus.len();
    let ok_type = |g: &Gpu| g.gpu_type == req.gpu_type && g.healthy;
    match &req.gpu {
        GpuDemand::None => true,
        GpuDemand::Whole { count, passthrough } => (0u32..(1 << n)).any(|set| {
            let members: Vec<usize> = (0..n).filter(|i| set & (1 << i) != 0).collect();
            members.len() == *count as usize
                && members.iter().all(|&i| {
                    let g = &node.gpus[i];
                    ok_type(g) && !g.mig_enabled && g.used == GpuUse::Idle
                })
                && (!passthrough
                    || members.iter().all(|&i| {
                        node.gpus[i].iommu_group.is_none_or(|grp| {
                            (0..n).all(|j| {
                                node.gpus[j].iommu_group != Some(grp) || members.contains(&j)
                            })
                        })
                    }))
                && (!req.require_nvlink
                    || members
                        .iter()
                        .all(|&a| members.iter().all(|&b| a == b || node.nvlinked(a, b))))
        }),
        GpuDemand::Mig { profile } => {
            let (geom, prof) = mig::lookup(&req.gpu_type, profile).unwrap();
            node.gpus.iter().any(|g| {
                let existing = match &g.used {
                    GpuUse::Idle => vec![],
                    GpuUse::Mig(v) => v.clone(),
                    _ => return false,
                };
                ok_type(g)
                    && g.mig_enabled
                    && prof.starts.iter().any(|&start| {
                        let mut all = existing.clone();
                        all.push(MigSlice {
                            alloc: "probe".into(),
                            profile: profile.clone(),
                            start,
                            size: prof.size,
                        });
                        geom.validate(&all).is_ok()
                    })
            })
        }
        GpuDemand::Share { memory_mib } => node.gpus.iter().any(|g| {
            let (tenants, used) = match &g.used {
                GpuUse::Idle => (0, 0),
                GpuUse::Shared(v) => (v.len() as u32, v.iter().map(|s| s.memory_mib).sum()),
                _ => return false,
            };
            ok_type(g)
                && !g.mig_enabled
                && tenants < policy.share_tenants_per_gpu
                && used + memory_mib <= g.memory_mib
        }),
    }
}

/// Independent checks that nothing is oversubscribed: MIG slices pairwise disjoint at valid
/// starts, shares within limits, node resources conserved.
fn assert_not_oversubscribed(fleet: &FleetSnapshot, start: &FleetSnapshot, policy: &Policy) {
    check_invariants(fleet, policy).unwrap();
    for (node, orig) in fleet.nodes.iter().zip(&start.nodes) {
        let held = node
            .allocations
            .iter()
            .fold(node.free, |acc, a| acc.add(&a.resources));
        assert_eq!(held, orig.free, "node {} resources not conserved", node.id);
        for g in &node.gpus {
            match &g.used {
                GpuUse::Mig(v) => {
                    assert!(g.mig_enabled && g.healthy || !v.is_empty());
                    let (geom, _) = mig::lookup(&g.gpu_type, &v[0].profile).unwrap();
                    for (i, a) in v.iter().enumerate() {
                        let p = geom.profile(&a.profile).unwrap();
                        assert!(p.starts.contains(&a.start) && p.size == a.size);
                        for b in &v[i + 1..] {
                            assert!(
                                a.start + a.size <= b.start || b.start + b.size <= a.start,
                                "overlapping slices {a:?} {b:?}"
                            );
                        }
                    }
                }
                GpuUse::Shared(v) => {
                    assert!(!g.mig_enabled);
                    assert!(v.len() as u32 <= policy.share_tenants_per_gpu);
                    assert!(v.iter().map(|s| s.memory_mib).sum::<u64>() <= g.memory_mib);
                }
                GpuUse::Whole(_) => assert!(!g.mig_enabled),
                GpuUse::Idle => {}
            }
        }
    }
    assert_eq!(usage_from_nodes(&fleet.nodes), fleet.usage);
}

fn arb_policy() -> impl proptest::strategy::Strategy<Value = Policy> {
    (any::<bool>(), any::<bool>(), 1u32..=4).prop_map(|(ff, preemption, limit)| Policy {
        strategy: if ff {
            Strategy::FirstFit
        } else {
            Strategy::BestFit
        },
        share_tenants_per_gpu: limit,
        preemption,
    })
}

/// Places and applies a sequence of requests (with some departures) onto `fleet`.
fn churn(fleet: &mut FleetSnapshot, policy: &Policy, steps: &[(PlacementRequest, Option<usize>)]) {
    let start = fleet.clone();
    for (k, (req, depart)) in steps.iter().enumerate() {
        if let Ok(Decision::Placed(p)) = place(req, fleet, policy) {
            apply(fleet, policy, req, &p, format!("r{k}").as_str().into())
                .unwrap_or_else(|e| panic!("core placement rejected by apply: {e}; {p:?}"));
        }
        if let Some(d) = depart {
            let _ = release(fleet, &format!("r{}", d % (k + 1)).as_str().into());
        }
        assert_not_oversubscribed(fleet, &start, policy);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn never_oversubscribed(
        nodes in prop::collection::vec(arb_node(), 1..=3),
        steps in prop::collection::vec((arb_request(), prop::option::weighted(0.2, any::<usize>())), 1..24),
        policy in arb_policy(),
    ) {
        let mut fleet = build_fleet(&nodes);
        churn(&mut fleet, &policy, &steps);
    }

    #[test]
    fn refused_only_when_nothing_fits(
        nodes in prop::collection::vec(arb_node(), 1..=3),
        steps in prop::collection::vec((arb_request(), prop::option::weighted(0.2, any::<usize>())), 0..12),
        req in arb_request(),
        policy in arb_policy(),
    ) {
        let mut fleet = build_fleet(&nodes);
        churn(&mut fleet, &policy, &steps);
        let no_preempt = Policy { preemption: false, ..policy };
        let exists = fleet.nodes.iter().any(|n| brute_fits(n, &req, &policy));
        match place(&req, &fleet, &no_preempt).unwrap() {
            Decision::Placed(p) => {
                prop_assert!(exists, "placed although brute force found nothing: {p:?}");
                prop_assert!(p.preempt.is_empty());
                let node = fleet.node(&p.node_id).unwrap();
                prop_assert!(brute_fits(node, &req, &policy));
                let mut after = fleet.clone();
                apply(&mut after, &policy, &req, &p, "probe".into()).unwrap();
            }
            Decision::Unschedulable(u) => {
                prop_assert!(!exists, "refused ({u}) although a placement exists");
                let counted: u32 = u.reasons.iter().map(Reason::nodes).sum();
                prop_assert_eq!(counted as usize, fleet.nodes.len());
            }
        }
        // With preemption: refused only if no node fits even with all its spot work gone.
        if req.tier == Tier::OnDemand {
            let pre = Policy { preemption: true, ..policy };
            let exists_evicting = fleet.nodes.iter().any(|n| {
                let spot: Vec<&Allocation> =
                    n.allocations.iter().filter(|a| a.tier == Tier::Spot).collect();
                brute_fits(&without_allocations(n, &spot), &req, &policy)
            });
            match place(&req, &fleet, &pre).unwrap() {
                Decision::Placed(p) => {
                    prop_assert!(exists_evicting);
                    let node = fleet.node(&p.node_id).unwrap();
                    for v in &p.preempt {
                        prop_assert_eq!(node.allocation(v).unwrap().tier, Tier::Spot);
                    }
                    let mut after = fleet.clone();
                    apply(&mut after, &pre, &req, &p, "probe".into()).unwrap();
                    check_invariants(&after, &pre).unwrap();
                }
                Decision::Unschedulable(_) => prop_assert!(!exists_evicting),
            }
        }
    }

    #[test]
    fn mig_choices_are_valid_and_disjoint(
        profiles in prop::collection::vec(prop::sample::select(PROFILES), 1..16),
        ff in any::<bool>(),
    ) {
        let mut g = Gpu::new("g", 0, H100, 81559);
        g.mig_enabled = true;
        let mut fleet = FleetSnapshot::new(vec![Node::new("n", Resources::new(1, 1, 1), vec![g])]);
        let policy = Policy::with_strategy(if ff { Strategy::FirstFit } else { Strategy::BestFit });
        let start = fleet.clone();
        for (k, p) in profiles.iter().enumerate() {
            let req = PlacementRequest::mig("o", H100, p);
            let exists = brute_fits(&fleet.nodes[0], &req, &policy);
            match place(&req, &fleet, &policy).unwrap() {
                Decision::Placed(pl) => {
                    prop_assert!(exists);
                    apply(&mut fleet, &policy, &req, &pl, format!("m{k}").as_str().into()).unwrap();
                }
                Decision::Unschedulable(_) => prop_assert!(!exists),
            }
            assert_not_oversubscribed(&fleet, &start, &policy);
        }
    }
}

#[test]
fn best_fit_packs_mig_at_least_as_well_as_first_fit_on_small_then_large() {
    // Seven 1g slices then a 4g: best-fit keeps start 0..4 free as long as it can.
    let mut g = Gpu::new("g", 0, H100, 81559);
    g.mig_enabled = true;
    let fleet = FleetSnapshot::new(vec![Node::new("n", Resources::new(1, 1, 1), vec![g])]);
    let ev = |k: usize, p: &str| TraceEvent::Arrive {
        id: format!("m{k}").as_str().into(),
        request: PlacementRequest::mig("o", H100, p),
    };
    let events = vec![ev(0, "1g.10gb"), ev(1, "1g.10gb"), ev(2, "4g.40gb")];
    assert_eq!(simulate(Strategy::BestFit, &fleet, &events).placed, 3);
    assert_eq!(simulate(Strategy::FirstFit, &fleet, &events).placed, 2);
}

/// A node of up to 8 GPUs, for the index comparison: NVLink pairs from a 28-bit mask (all
/// links often, so the whole-GPU bound is exact and pruning really happens), CPU and memory
/// drawn from few values so that ties on the last score elements are common.
fn arb_big_node() -> impl proptest::strategy::Strategy<Value = (Vec<GpuSpec>, u32, u64, u64, bool)>
{
    (
        prop::collection::vec(arb_gpu(), 1..=8),
        prop_oneof![Just(u32::MAX), any::<u32>()],
        prop::sample::select(vec![2_000u64, 8_000, 32_000]),
        prop::sample::select(vec![16_000u64, 64_000]),
        prop::bool::weighted(0.9),
    )
}

fn build_big_fleet(specs: &[(Vec<GpuSpec>, u32, u64, u64, bool)]) -> FleetSnapshot {
    let mut fleet = build_fleet(
        &specs
            .iter()
            .map(|(g, _, cpu, _, sched)| (g.clone(), 0u8, *cpu, *sched))
            .collect::<Vec<_>>(),
    );
    for (node, (_, links, _, mem, _)) in fleet.nodes.iter_mut().zip(specs) {
        node.free.memory_mib = *mem;
        let n = node.gpus.len();
        let mut k = 0;
        for i in 0..n {
            for j in i + 1..n {
                if links & (1 << k) != 0 {
                    node.gpus[i].nvlink_peers.push(j as u32);
                }
                k += 1;
            }
        }
    }
    fleet
}

fn arb_sized_request() -> impl proptest::strategy::Strategy<Value = PlacementRequest> {
    (
        arb_request(),
        prop::sample::select(vec![0u64, 8_000, 32_000]),
        1u32..=8,
        any::<bool>(),
        prop::sample::select(vec![0u64, 0, 200, 600]),
    )
        .prop_map(|(mut r, mem, count, big, disk)| {
            r.memory_mib = mem;
            r.disk_gib = disk;
            if big && let GpuDemand::Whole { count: c, .. } = &mut r.gpu {
                *c = count;
            }
            r
        })
}

/// A node from a few HGX-like templates: 4 or 8 GPUs split over 2 NUMA nodes, all-pairs
/// NVLink or none, sometimes an L40S in the last slot (so idle counts differ from free H100
/// counts), sometimes the upper half in MIG mode; few CPU values. Many nodes share buckets and
/// tie on score, which is what the index's bounds must get right.
fn arb_template_node()
-> impl proptest::strategy::Strategy<Value = (Vec<GpuSpec>, u32, u64, u64, bool)> {
    (
        prop::sample::select(vec![4usize, 8]),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.2),
        prop::sample::select(vec![8_000u64, 32_000]),
        prop::bool::weighted(0.95),
    )
        .prop_map(|(n, nvlink, mixed, mig, cpu, schedulable)| {
            let gpus = (0..n)
                .map(|i| GpuSpec {
                    h100: !(mixed && i == n - 1),
                    healthy: true,
                    mig: mig && i >= n / 2 && !(mixed && i == n - 1),
                    numa: (i * 2 / n) as u32,
                    group: None,
                })
                .collect();
            (
                gpus,
                if nvlink { u32::MAX } else { 0 },
                cpu,
                64_000,
                schedulable,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// As below, on fleets of look-alike nodes with long churn.
    #[test]
    fn indexed_decisions_equal_exhaustive_on_lookalike_nodes(
        nodes in prop::collection::vec(arb_template_node(), 2..=12),
        steps in prop::collection::vec(
            (arb_sized_request(), prop::option::weighted(0.3, any::<usize>()), Just(None)),
            0..80,
        ),
        probes in prop::collection::vec(arb_sized_request(), 1..16),
        policy in arb_policy(),
    ) {
        compare_indexed(&nodes, &steps, &probes, &policy)?;
    }

    /// The index changes speed, never answers: after random churn (placements, departures,
    /// cordons, all through the index and mirrored on a plain snapshot with `apply`/`release`),
    /// `place_indexed` decides exactly as `place` for random requests and policies, and the
    /// index's buckets equal a fresh build.
    #[test]
    fn indexed_decisions_equal_exhaustive(
        nodes in prop::collection::vec(arb_big_node(), 1..=8),
        steps in prop::collection::vec(
            (arb_sized_request(), prop::option::weighted(0.25, any::<usize>()), prop::option::weighted(0.05, any::<usize>())),
            0..40,
        ),
        probes in prop::collection::vec(arb_sized_request(), 1..12),
        policy in arb_policy(),
    ) {
        compare_indexed(&nodes, &steps, &probes, &policy)?;
    }
}

type NodeSpec = (Vec<GpuSpec>, u32, u64, u64, bool);
type Step = (PlacementRequest, Option<usize>, Option<usize>);

/// Churns a fleet through the index and a plain snapshot side by side, comparing every
/// decision and the snapshots, then compares `probes` under both strategies.
fn compare_indexed(
    nodes: &[NodeSpec],
    steps: &[Step],
    probes: &[PlacementRequest],
    policy: &Policy,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let policy = *policy;
    let mut plain = build_big_fleet(nodes);
    let mut index = FleetIndex::new(plain.clone());
    for (k, (req, depart, cordon)) in steps.iter().enumerate() {
        let d = place_indexed(req, &index, &policy);
        prop_assert_eq!(&d, &place(req, &plain, &policy));
        if let Ok(Decision::Placed(p)) = d {
            let id: AllocationId = format!("r{k}").as_str().into();
            let a = index.apply(&policy, req, &p, id.clone());
            let b = apply(&mut plain, &policy, req, &p, id);
            prop_assert_eq!(a, b);
        }
        if let Some(d) = depart {
            let id: AllocationId = format!("r{}", d % (k + 1)).as_str().into();
            prop_assert_eq!(index.release(&id), release(&mut plain, &id));
        }
        if let Some(c) = cordon {
            let pos = c % plain.nodes.len();
            plain.nodes[pos].schedulable = !plain.nodes[pos].schedulable;
            index.update_node(pos, |n| n.schedulable = !n.schedulable);
        }
        prop_assert_eq!(index.fleet(), &plain);
    }
    index.assert_consistent();
    // The invariant the index's exactness rests on: every node that fits has an entry whose
    // bound is at most its score, and the bound is the score itself for shares, MIG, CPU-only
    // and (on all-NVLink nodes without IOMMU groups) whole GPUs.
    let best_fit = Policy {
        strategy: Strategy::BestFit,
        ..policy
    };
    for req in probes {
        let Ok(ctx) = crate::place::Ctx::new(req, &best_fit) else {
            continue;
        };
        // The fast path alone finds whatever fits free (no quotas in these fleets), so the
        // fallback to `place` serves refusals only.
        let no_preempt = Policy {
            preemption: false,
            ..best_fit
        };
        let placed = matches!(place(req, &plain, &no_preempt), Ok(Decision::Placed(_)));
        prop_assert_eq!(index.best_fit(&ctx).is_some(), placed);
        for (pos, node) in plain.nodes.iter().enumerate() {
            let Ok(fit) = crate::place::fit_node(node, &ctx) else {
                continue;
            };
            let bound = index.node_bound(pos, &ctx);
            prop_assert!(
                bound.is_some_and(|b| b <= fit.score),
                "node {pos} scores {:?}, bound {bound:?}",
                fit.score
            );
            let regular = node.gpus.iter().all(|g| {
                g.iommu_group.is_none()
                    && node.gpus.iter().all(|h| {
                        h.index == g.index || node.nvlinked(g.index as usize, h.index as usize)
                    })
            });
            if !matches!(req.gpu, GpuDemand::Whole { .. }) || regular {
                prop_assert_eq!(bound, Some(fit.score), "node {} not tight", pos);
            }
        }
    }
    for req in probes {
        for strategy in [Strategy::BestFit, Strategy::FirstFit] {
            let policy = Policy { strategy, ..policy };
            prop_assert_eq!(
                place_indexed(req, &index, &policy),
                place(req, &plain, &policy)
            );
        }
    }
    Ok(())
}

#[test]
fn index_prefers_the_same_node_as_exhaustive_on_a_filled_hgx_fleet() {
    // 64 NVLink nodes with a deterministic fill pattern; every 1/2/4/8-GPU request placed in
    // turn through both paths must land on the same node and GPUs.
    let mut nodes = Vec::new();
    for n in 0..64u32 {
        let mut gpus: Vec<Gpu> = (0..8)
            .map(|i| {
                let mut g = Gpu::new(&format!("n{n}-g{i}"), i, H100, 81559);
                g.numa_node = Some(i / 4);
                g.nvlink_peers = (0..8).filter(|&j| j != i).collect();
                g
            })
            .collect();
        let mut node_allocs = Vec::new();
        for (i, g) in gpus.iter_mut().enumerate() {
            if (n * 7 + i as u32 * 3) % 5 < 3 {
                let id = AllocationId(format!("pre-{n}-{i}"));
                g.used = GpuUse::Whole(id.clone());
                node_allocs.push(Allocation {
                    id,
                    org: "o".into(),
                    product: Product::Pod,
                    tier: Tier::OnDemand,
                    priority: 0,
                    resources: Resources::new(1_000, 1_000, 0),
                });
            }
        }
        let mut node = Node::new(
            &format!("n{n}"),
            Resources::new(64_000 + u64::from(n % 3) * 1_000, 1_000_000, 1_000),
            gpus,
        );
        node.allocations = node_allocs;
        nodes.push(node);
    }
    let mut plain = FleetSnapshot::new(nodes);
    let mut index = FleetIndex::new(plain.clone());
    let policy = Policy::default();
    for k in 0..200u32 {
        let count = [1, 2, 4, 8, 1, 1, 2][k as usize % 7];
        let req = PlacementRequest::whole("o", H100, count).with_resources(1_000, 1_000, 0);
        let d = place_indexed(&req, &index, &policy).unwrap();
        assert_eq!(d, place(&req, &plain, &policy).unwrap(), "request {k}");
        if let Decision::Placed(p) = d {
            let id: AllocationId = format!("r{k}").as_str().into();
            index.apply(&policy, &req, &p, id.clone()).unwrap();
            apply(&mut plain, &policy, &req, &p, id).unwrap();
        }
        if k % 3 == 0 {
            let id: AllocationId = format!("r{}", k / 2).as_str().into();
            assert_eq!(index.release(&id).is_ok(), release(&mut plain, &id).is_ok());
        }
    }
    index.assert_consistent();
}

#[test]
fn ties_across_buckets_go_to_the_lower_position() {
    // Node 0 (free NUMA sizes 3+1) and node 1 (2+1+1) sit in different buckets with the same
    // bound and the same score for one GPU; node 1's bucket sorts first. Best-fit's tie-break is
    // the lower position: node 0.
    let node = |id: &str, numa: [u32; 4]| {
        let gpus = (0..4u32)
            .map(|i| {
                let mut g = Gpu::new(&format!("{id}-g{i}"), i, H100, 81559);
                g.numa_node = Some(numa[i as usize]);
                g.nvlink_peers = (0..4).filter(|&j| j != i).collect();
                g
            })
            .collect();
        Node::new(id, Resources::new(4_000, 64_000, 100), gpus)
    };
    let fleet = FleetSnapshot::new(vec![node("a", [0, 0, 0, 1]), node("b", [0, 0, 1, 2])]);
    let index = FleetIndex::new(fleet.clone());
    let req = PlacementRequest::whole("o", H100, 1).with_resources(4_000, 0, 0);
    let policy = Policy::default();
    let want = place(&req, &fleet, &policy).unwrap();
    assert_eq!(want.placement().unwrap().node_id, "a");
    assert_eq!(place_indexed(&req, &index, &policy).unwrap(), want);
}

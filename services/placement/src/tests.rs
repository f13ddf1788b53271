//! Unit tests: one small, readable fleet per rule.

use crate::*;

const H100: &str = "h100-80gb";
const L40S: &str = "l40s-48gb";
const H100_MIB: u64 = 81559;

fn res() -> Resources {
    Resources::new(64_000, 512_000, 2_000)
}

/// `n` H100s, all pairs NVLink-connected, first half on NUMA node 0, the rest on 1.
fn hgx(id: &str, n: u32) -> Node {
    let gpus = (0..n)
        .map(|i| {
            let mut g = Gpu::new(&format!("{id}-g{i}"), i, H100, H100_MIB);
            g.numa_node = Some(if i < n / 2 { 0 } else { 1 });
            g.nvlink_peers = (0..n).filter(|&j| j != i).collect();
            g
        })
        .collect();
    Node::new(id, res(), gpus)
}

/// `n` PCIe GPUs of `gpu_type` without NVLink, all on NUMA node 0.
fn pcie(id: &str, gpu_type: &str, n: u32) -> Node {
    let gpus = (0..n)
        .map(|i| {
            let mut g = Gpu::new(&format!("{id}-g{i}"), i, gpu_type, 46068);
            g.numa_node = Some(0);
            g
        })
        .collect();
    Node::new(id, res(), gpus)
}

fn policy() -> Policy {
    Policy::default()
}

fn placed(req: &PlacementRequest, fleet: &FleetSnapshot) -> Placement {
    match place(req, fleet, &policy()).unwrap() {
        Decision::Placed(p) => p,
        Decision::Unschedulable(u) => panic!("expected a placement, got: {u}"),
    }
}

fn refused(req: &PlacementRequest, fleet: &FleetSnapshot) -> Unschedulable {
    match place(req, fleet, &policy()).unwrap() {
        Decision::Placed(p) => panic!("expected a refusal, got {p:?}"),
        Decision::Unschedulable(u) => u,
    }
}

fn uuids(p: &Placement) -> Vec<String> {
    match &p.gpus {
        GpuAssignment::Whole { gpu_uuids } => gpu_uuids.clone(),
        other => panic!("not whole GPUs: {other:?}"),
    }
}

/// Places and applies `req` as allocation `id`.
fn run(fleet: &mut FleetSnapshot, id: &str, req: &PlacementRequest) -> Placement {
    let p = placed(req, fleet);
    apply(fleet, &policy(), req, &p, AllocationId::from(id)).unwrap();
    check_invariants(fleet, &policy()).unwrap();
    p
}

#[test]
fn best_fit_fills_the_partly_used_node_first() {
    let mut fleet = FleetSnapshot::new(vec![hgx("a", 8), hgx("b", 8)]);
    run(&mut fleet, "x", &PlacementRequest::whole("o", H100, 3));
    let first = fleet
        .nodes
        .iter()
        .find(|n| !n.allocations.is_empty())
        .unwrap()
        .id
        .clone();
    // Further single GPUs go to the same node; the other stays whole for an 8-GPU job.
    for k in 0..5 {
        let p = run(
            &mut fleet,
            &format!("s{k}"),
            &PlacementRequest::whole("o", H100, 1),
        );
        assert_eq!(p.node_id, first);
    }
    let p = run(&mut fleet, "big", &PlacementRequest::whole("o", H100, 8));
    assert_ne!(p.node_id, first);
}

#[test]
fn first_fit_takes_the_first_node_that_fits() {
    let fleet = FleetSnapshot::new(vec![hgx("a", 8), hgx("b", 2)]);
    let req = PlacementRequest::whole("o", H100, 1);
    let ff = place(&req, &fleet, &Policy::with_strategy(Strategy::FirstFit)).unwrap();
    assert_eq!(ff.placement().unwrap().node_id, "a");
    // Best fit prefers the small node, keeping the 8-GPU node whole.
    assert_eq!(placed(&req, &fleet).node_id, "b");
}

#[test]
fn multi_gpu_prefers_nvlink_then_numa() {
    // Node "pci": 4 free GPUs without NVLink (fewer free → best-fit would like it).
    // Node "hgx": 8 NVLink-connected GPUs. NVLink wins for a 4-GPU request.
    let fleet = FleetSnapshot::new(vec![pcie("pci", H100, 4), hgx("hgx", 8)]);
    let p = placed(&PlacementRequest::whole("o", H100, 4), &fleet);
    assert_eq!(p.node_id, "hgx");
    // … and the 4 are on one NUMA node.
    let node = fleet.node("hgx").unwrap();
    let numas: Vec<_> = uuids(&p)
        .iter()
        .map(|u| node.gpus.iter().find(|g| &g.uuid == u).unwrap().numa_node)
        .collect();
    assert!(numas.iter().all(|n| *n == numas[0]), "{numas:?}");
}

#[test]
fn single_gpu_taken_from_the_fuller_numa_node() {
    let mut node = hgx("a", 8);
    // NUMA 1 (GPUs 4..8) has two busy GPUs; NUMA 0 is untouched.
    node.allocations.push(Allocation {
        id: "busy".into(),
        org: "o".into(),
        product: Product::Pod,
        tier: Tier::OnDemand,
        priority: 0,
        resources: Resources::default(),
    });
    node.gpus[4].used = GpuUse::Whole("busy".into());
    node.gpus[5].used = GpuUse::Whole("busy".into());
    let fleet = FleetSnapshot::new(vec![node]);
    let p = placed(&PlacementRequest::whole("o", H100, 1), &fleet);
    assert!(["a-g6", "a-g7"].contains(&uuids(&p)[0].as_str()), "{p:?}");
}

#[test]
fn required_nvlink_is_explained_when_missing() {
    let mut node = pcie("a", H100, 4);
    // Two NVLink pairs, no 4-clique.
    node.gpus[0].nvlink_peers = vec![1];
    node.gpus[2].nvlink_peers = vec![3];
    let fleet = FleetSnapshot::new(vec![node]);
    let req = PlacementRequest::whole("o", H100, 4).nvlink_required();
    let u = refused(&req, &fleet);
    assert_eq!(
        u.to_string(),
        "1 node has 4 free h100-80gb GPUs but not 4 NVLink-connected"
    );
    // A pair is fine.
    let p = placed(
        &PlacementRequest::whole("o", H100, 2).nvlink_required(),
        &fleet,
    );
    let got = uuids(&p);
    assert!(
        got == ["a-g0", "a-g1"] || got == ["a-g2", "a-g3"],
        "{got:?}"
    );
    // Without the requirement 4 PCIe GPUs are fine too.
    placed(&PlacementRequest::whole("o", H100, 4), &fleet);
}

#[test]
fn passthrough_takes_whole_iommu_groups_exactly() {
    // Groups: {g0, g1}, {g2}, {g3}.
    let mut node = pcie("a", L40S, 4);
    node.gpus[0].iommu_group = Some(10);
    node.gpus[1].iommu_group = Some(10);
    node.gpus[2].iommu_group = Some(11);
    node.gpus[3].iommu_group = Some(12);
    let mut fleet = FleetSnapshot::new(vec![node]);
    // One GPU: only g2 or g3 (g0 alone would leave its group-mate behind).
    let p = placed(&PlacementRequest::passthrough("o", L40S, 1), &fleet);
    assert!(["a-g2", "a-g3"].contains(&uuids(&p)[0].as_str()));
    // Three: the pair plus one single.
    let p = placed(&PlacementRequest::passthrough("o", L40S, 3), &fleet);
    let got = uuids(&p);
    assert!(
        got.contains(&"a-g0".into()) && got.contains(&"a-g1".into()),
        "{got:?}"
    );
    // A container takes g1 alone; now the {g0, g1} group is not entirely free.
    let mut pod = PlacementRequest::whole("o", L40S, 1);
    pod.gpu_type = L40S.into();
    let p = placed(&pod, &fleet);
    let mut p = p;
    p.gpus = GpuAssignment::Whole {
        gpu_uuids: vec!["a-g1".into()],
    };
    apply(&mut fleet, &policy(), &pod, &p, "pod".into()).unwrap();
    let u = refused(&PlacementRequest::passthrough("o", L40S, 3), &fleet);
    assert_eq!(
        u.reasons,
        vec![Reason::IommuGroupsBusy {
            nodes: 1,
            gpu_type: L40S.into(),
            wanted: 3
        }]
    );
    // Two still works: g2 + g3.
    let p = placed(&PlacementRequest::passthrough("o", L40S, 2), &fleet);
    assert_eq!(uuids(&p), vec!["a-g2".to_owned(), "a-g3".to_owned()]);
    // apply refuses a passthrough that splits a group.
    let req = PlacementRequest::passthrough("o", L40S, 1);
    let bad = Placement {
        node_id: "a".into(),
        gpus: GpuAssignment::Whole {
            gpu_uuids: vec!["a-g0".into()],
        },
        preempt: vec![],
    };
    assert!(apply(&mut fleet, &policy(), &req, &bad, "vm".into()).is_err());
}

#[test]
fn unhealthy_gpus_are_never_used() {
    let mut node = pcie("a", L40S, 2);
    node.gpus[0].healthy = false;
    let fleet = FleetSnapshot::new(vec![node]);
    let p = placed(&PlacementRequest::whole("o", L40S, 1), &fleet);
    assert_eq!(uuids(&p), vec!["a-g1".to_owned()]);
    refused(&PlacementRequest::whole("o", L40S, 2), &fleet);
    let mut node = pcie("b", L40S, 1);
    node.gpus[0].healthy = false;
    let fleet = FleetSnapshot::new(vec![node]);
    let u = refused(&PlacementRequest::share("o", L40S, 1000), &fleet);
    assert_eq!(u.to_string(), "1 node has only unhealthy l40s-48gb GPUs");
}

#[test]
fn modes_do_not_mix_on_one_gpu() {
    // g0 in MIG mode, g1 with a share: neither takes whole work; g0 takes no share.
    let mut node = hgx("a", 2);
    node.gpus[0].mig_enabled = true;
    let mut fleet = FleetSnapshot::new(vec![node]);
    run(
        &mut fleet,
        "sh",
        &PlacementRequest::share("o", H100, 10_000),
    );
    assert!(matches!(
        &fleet.nodes[0].gpus[1].used,
        GpuUse::Shared(v) if v.len() == 1
    ));
    let u = refused(&PlacementRequest::whole("o", H100, 1), &fleet);
    assert_eq!(u.to_string(), "1 node has no free h100-80gb");
    // A second share goes next to the first, never onto the MIG GPU.
    let p = run(
        &mut fleet,
        "sh2",
        &PlacementRequest::share("o", H100, 10_000),
    );
    assert!(matches!(p.gpus, GpuAssignment::Share { ref gpu_uuid, .. } if gpu_uuid == "a-g1"));
    // MIG work only on the MIG GPU.
    let p = run(
        &mut fleet,
        "m",
        &PlacementRequest::mig("o", H100, "3g.40gb"),
    );
    assert!(matches!(p.gpus, GpuAssignment::Mig { ref gpu_uuid, .. } if gpu_uuid == "a-g0"));
}

#[test]
fn mig_positions_follow_the_geometry_and_keep_big_profiles() {
    let mut node = hgx("a", 1);
    node.gpus[0].mig_enabled = true;
    let mut fleet = FleetSnapshot::new(vec![node]);
    // A 1g slice goes to the top of the GPU so a 4g.40gb (start 0 only) still fits.
    let p = run(
        &mut fleet,
        "s1",
        &PlacementRequest::mig("o", H100, "1g.10gb"),
    );
    let GpuAssignment::Mig { start, size, .. } = p.gpus else {
        panic!()
    };
    assert_eq!((start, size), (6, 1));
    let p = run(
        &mut fleet,
        "s2",
        &PlacementRequest::mig("o", H100, "4g.40gb"),
    );
    assert!(matches!(
        p.gpus,
        GpuAssignment::Mig {
            start: 0,
            size: 4,
            ..
        }
    ));
    // A 3g.40gb (starts 0 or 4) no longer fits: 4..8 is partly used.
    let u = refused(&PlacementRequest::mig("o", H100, "3g.40gb"), &fleet);
    assert_eq!(
        u.to_string(),
        "1 node has no free 3g.40gb position on their MIG-mode h100-80gb GPUs"
    );
    // A 2g.20gb fits at 4.
    let p = run(
        &mut fleet,
        "s3",
        &PlacementRequest::mig("o", H100, "2g.20gb"),
    );
    assert!(matches!(p.gpus, GpuAssignment::Mig { start: 4, .. }));
}

#[test]
fn mig_requests_need_mig_mode_and_a_known_profile() {
    let fleet = FleetSnapshot::new(vec![hgx("a", 2)]);
    let u = refused(&PlacementRequest::mig("o", H100, "1g.10gb"), &fleet);
    assert_eq!(u.to_string(), "1 node has no h100-80gb GPU in MIG mode");
    assert!(matches!(
        place(
            &PlacementRequest::mig("o", H100, "1g.5gb"),
            &fleet,
            &policy()
        ),
        Err(PlacementError::UnknownMigProfile { .. })
    ));
    assert!(matches!(
        place(
            &PlacementRequest::mig("o", L40S, "1g.10gb"),
            &fleet,
            &policy()
        ),
        Err(PlacementError::NoMigGeometry { .. })
    ));
    assert!(matches!(
        place(&PlacementRequest::whole("o", H100, 0), &fleet, &policy()),
        Err(PlacementError::InvalidRequest(_))
    ));
}

#[test]
fn shares_respect_tenant_limit_and_memory() {
    let mut fleet = FleetSnapshot::new(vec![pcie("a", L40S, 2)]);
    // Best-fit stacks shares on one GPU up to the tenant limit (4) …
    for k in 0..4 {
        let p = run(
            &mut fleet,
            &format!("t{k}"),
            &PlacementRequest::share("o", L40S, 4000),
        );
        assert!(matches!(p.gpus, GpuAssignment::Share { ref gpu_uuid, .. } if gpu_uuid == "a-g0"));
    }
    // … then spills to the next.
    let p = run(&mut fleet, "t4", &PlacementRequest::share("o", L40S, 4000));
    assert!(matches!(p.gpus, GpuAssignment::Share { ref gpu_uuid, .. } if gpu_uuid == "a-g1"));
    // Memory caps are summed: 4000 + 42068 = 46068 fits exactly, one MiB more does not.
    let u = refused(&PlacementRequest::share("o", L40S, 42_069), &fleet);
    assert_eq!(
        u.to_string(),
        "1 node has no l40s-48gb GPU with room for another 42069 MiB share (at most 4 tenants \
         per GPU)"
    );
    run(
        &mut fleet,
        "t5",
        &PlacementRequest::share("o", L40S, 42_068),
    );
}

#[test]
fn cpu_memory_disk_are_checked_and_counted() {
    let mut small = pcie("small", L40S, 1);
    small.free = Resources::new(1000, 4096, 10);
    let fleet = FleetSnapshot::new(vec![small, pcie("busy", L40S, 0), {
        let mut n = pcie("off", L40S, 2);
        n.schedulable = false;
        n
    }]);
    let req = PlacementRequest::whole("o", L40S, 1).with_resources(4000, 8192, 50);
    let u = refused(&req, &fleet);
    assert_eq!(
        u.to_string(),
        "1 node has less than 4000 CPU millicores free; 1 node has no l40s-48gb GPUs; 1 node is \
         not schedulable (not ready, cordoned or draining)"
    );
    assert_eq!(u.reasons.iter().map(Reason::nodes).sum::<u32>(), 3);
    // CPU-only work prefers nodes without GPUs.
    let p = placed(&PlacementRequest::cpu_only("o", 500, 1024), &fleet);
    assert_eq!(p.node_id, "busy");
}

#[test]
fn reasons_are_counted_per_cause() {
    // 3 nodes with no free H100, 2 with 4 free GPUs but no 4-clique: the sentence.
    let mut nodes = Vec::new();
    for k in 0..3 {
        let mut n = hgx(&format!("full{k}"), 2);
        n.allocations.push(Allocation {
            id: format!("x{k}").as_str().into(),
            org: "other".into(),
            product: Product::Pod,
            tier: Tier::OnDemand,
            priority: 0,
            resources: Resources::default(),
        });
        for g in &mut n.gpus {
            g.used = GpuUse::Whole(format!("x{k}").as_str().into());
        }
        nodes.push(n);
    }
    nodes.push(pcie("p0", H100, 4));
    nodes.push(pcie("p1", H100, 4));
    let fleet = FleetSnapshot::new(nodes).with_quota("acme", H100, Product::Pod, 8);
    let mut fleet = fleet;
    fleet
        .usage
        .set(QuotaKey::new("acme", H100, Product::Pod), 8 * UNITS_PER_GPU);
    let req = PlacementRequest::whole("acme", H100, 4).nvlink_required();
    assert_eq!(
        refused(&req, &fleet).to_string(),
        "3 nodes have no free h100-80gb; 2 nodes have 4 free h100-80gb GPUs but not 4 \
         NVLink-connected; org quota for h100-80gb pods is 8 and 8 are in use (this request \
         needs 4)"
    );
    // When the nodes would fit, only the quota is named.
    let u = refused(&PlacementRequest::whole("acme", H100, 1), &fleet);
    assert!(matches!(
        u.reasons.as_slice(),
        [Reason::QuotaExceeded { .. }]
    ));
    // Another product of the same org has no limit.
    placed(
        &PlacementRequest::whole("acme", H100, 1).with_product(Product::Endpoint),
        &fleet,
    );
}

#[test]
fn quota_counts_fractions_of_gpus() {
    let mut node = hgx("a", 2);
    node.gpus[0].mig_enabled = true;
    let mut fleet = FleetSnapshot::new(vec![node]).with_quota("o", H100, Product::Pod, 1);
    run(
        &mut fleet,
        "m",
        &PlacementRequest::mig("o", H100, "3g.40gb"),
    ); // 4 units
    run(&mut fleet, "s", &PlacementRequest::share("o", H100, 20_000)); // 2 units
    assert_eq!(
        fleet.usage.get(&QuotaKey::new("o", H100, Product::Pod)),
        Some(6)
    );
    assert_eq!(usage_from_nodes(&fleet.nodes), fleet.usage);
    // 6 + 2 units = exactly 1 GPU: a 2g.20gb still fits, a 3g.40gb (4 units) does not.
    placed(&PlacementRequest::mig("o", H100, "2g.20gb"), &fleet);
    let u = refused(&PlacementRequest::mig("o", H100, "3g.40gb"), &fleet);
    assert_eq!(
        u.to_string(),
        "org quota for h100-80gb pods is 1 and 0.75 are in use (this request needs 0.5)"
    );
    release(&mut fleet, &"m".into()).unwrap();
    assert_eq!(
        fleet.usage.get(&QuotaKey::new("o", H100, Product::Pod)),
        Some(2)
    );
    placed(&PlacementRequest::mig("o", H100, "3g.40gb"), &fleet);
}

fn spot_fleet() -> FleetSnapshot {
    // Node a: 4 GPUs, spot jobs p0 (priority 0, 1 GPU), p5 (priority 5, 1 GPU), on-demand od (2 GPUs).
    // Node b: 2 GPUs, spot job q1 (priority 1, 2 GPUs).
    let mut fleet = FleetSnapshot::new(vec![hgx("a", 4), hgx("b", 2)]);
    let spot = |p| {
        PlacementRequest::whole("s", H100, 1)
            .spot()
            .with_priority(p)
    };
    let mut put = |id: &str, node: &str, gpus: &[&str], req: &PlacementRequest| {
        let p = Placement {
            node_id: node.into(),
            gpus: GpuAssignment::Whole {
                gpu_uuids: gpus.iter().map(|s| s.to_string()).collect(),
            },
            preempt: vec![],
        };
        let mut req = req.clone();
        req.gpu = GpuDemand::Whole {
            count: gpus.len() as u32,
            passthrough: false,
        };
        apply(&mut fleet, &policy(), &req, &p, id.into()).unwrap();
    };
    put("p0", "a", &["a-g0"], &spot(0));
    put("p5", "a", &["a-g1"], &spot(5));
    put(
        "od",
        "a",
        &["a-g2", "a-g3"],
        &PlacementRequest::whole("x", H100, 2),
    );
    put("q1", "b", &["b-g0", "b-g1"], &spot(1));
    fleet
}

#[test]
fn on_demand_preempts_the_cheapest_spot_work() {
    let fleet = spot_fleet();
    // One GPU: evicting p0 (priority 0) is cheapest.
    let p = placed(&PlacementRequest::whole("o", H100, 1), &fleet);
    assert_eq!(
        (p.node_id.as_str(), p.preempt.clone()),
        ("a", vec!["p0".into()])
    );
    // Two GPUs: q1 alone (max priority 1) beats p0 + p5 (max priority 5).
    let p = placed(&PlacementRequest::whole("o", H100, 2), &fleet);
    assert_eq!(
        (p.node_id.as_str(), p.preempt.clone()),
        ("b", vec!["q1".into()])
    );
    let mut after = fleet.clone();
    apply(
        &mut after,
        &policy(),
        &PlacementRequest::whole("o", H100, 2),
        &p,
        "new".into(),
    )
    .unwrap();
    assert!(after.node("b").unwrap().allocation(&"q1".into()).is_none());
    check_invariants(&after, &policy()).unwrap();
    // Four GPUs would need the on-demand job gone: refused.
    let u = refused(&PlacementRequest::whole("o", H100, 4), &fleet);
    assert!(
        u.to_string().contains("2 nodes have no free h100-80gb"),
        "{u}"
    );
    // Spot work never preempts.
    refused(&PlacementRequest::whole("o", H100, 1).spot(), &fleet);
    // Nor does anything when preemption is off.
    let off = Policy {
        preemption: false,
        ..policy()
    };
    assert!(
        place(&PlacementRequest::whole("o", H100, 1), &fleet, &off)
            .unwrap()
            .placement()
            .is_none()
    );
}

#[test]
fn preemption_frees_cpu_too() {
    let mut node = pcie("a", L40S, 1);
    node.free = Resources::new(4000, 16_000, 100);
    let mut fleet = FleetSnapshot::new(vec![node]);
    let batch = PlacementRequest::cpu_only("s", 3000, 1000).spot();
    run(&mut fleet, "batch", &batch);
    let req = PlacementRequest::whole("o", L40S, 1).with_resources(2000, 1000, 0);
    let p = placed(&req, &fleet);
    assert_eq!(p.preempt, vec![AllocationId::from("batch")]);
}

#[test]
fn fair_share_serves_the_least_served_org_first() {
    // Org "big" already runs 4 GPUs, "small" runs none.
    let mut fleet = FleetSnapshot::new(vec![hgx("a", 8)]);
    run(&mut fleet, "b0", &PlacementRequest::whole("big", H100, 4));
    let pend = |org: &str, n: u32, prio: i32, at: u64| Pending {
        request: PlacementRequest::whole(org, H100, n).with_priority(prio),
        submitted_at: at,
    };
    let pending = vec![
        pend("big", 1, 0, 1),   // 0
        pend("big", 1, 9, 2),   // 1: big's most important
        pend("small", 2, 0, 3), // 2
        pend("small", 2, 0, 4), // 3
        pend("mid", 1, 0, 5),   // 4
    ];
    let order = fair_order(&pending, &fleet);
    // small (0) and mid (0) tie at share 0: small's next is older → small, then mid (0 < 2/8),
    // then small again (2/8 < 4/8), then big (4/8 < ... small 4/8, tie → big's prio 9 first).
    assert_eq!(order, vec![2, 4, 3, 1, 0]);
}

#[test]
fn simulate_and_fragmentation() {
    let fleet = FleetSnapshot::new(vec![hgx("a", 8), hgx("b", 8)]);
    let f = fragmentation(&fleet);
    assert_eq!(
        (f.free_gpus, f.fits_8, f.fits_4, f.idle_nodes),
        (16, 2, 4, 2)
    );
    // 1-GPU jobs, then an 8-GPU job: first-fit spreads nothing here but a departure pattern
    // can; best-fit keeps node b whole.
    let mut events = Vec::new();
    for k in 0..6 {
        events.push(TraceEvent::Arrive {
            id: format!("s{k}").as_str().into(),
            request: PlacementRequest::whole("o", H100, 1),
        });
    }
    events.push(TraceEvent::Arrive {
        id: "big".into(),
        request: PlacementRequest::whole("o", H100, 8),
    });
    let best = simulate(Strategy::BestFit, &fleet, &events);
    assert_eq!((best.placed, best.refused), (7, 0));
    assert_eq!(best.fragmentation.free_gpus, 2);
    assert!(best.alloc_at_first_reject.is_none());
    let first = simulate(Strategy::FirstFit, &fleet, &events);
    assert_eq!(first.placed, 7);
    // Another 8-GPU arrival is refused at 14/16 allocated.
    events.push(TraceEvent::Arrive {
        id: "big2".into(),
        request: PlacementRequest::whole("o", H100, 8),
    });
    events.push(TraceEvent::Depart { id: "big".into() });
    let out = simulate(Strategy::BestFit, &fleet, &events);
    assert_eq!(out.refused, 1);
    assert_eq!(out.alloc_at_first_reject, Some(14.0 / 16.0));
    assert_eq!(out.fragmentation.free_gpus, 10);
}

#[test]
fn snapshot_round_trips_through_json_shape() {
    // serde derives are there for the service; check the quota map's list form compiles and
    // keeps its entries (no JSON dependency here: compare through the From impls).
    let fleet = FleetSnapshot::new(vec![]).with_quota("o", H100, Product::Pod, 2);
    let list: Vec<KeyedEntry> = fleet.quotas.clone().into();
    assert_eq!(list.len(), 1);
    assert_eq!(KeyedCounts::from(list), fleet.quotas);
    assert_eq!(
        refused(&PlacementRequest::whole("o", H100, 1), &fleet).reasons,
        vec![Reason::NoNodes]
    );
}

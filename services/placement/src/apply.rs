//! Applying placements to a snapshot and taking allocations off it, each checked against the
//! rules independently of the search that produced the placement, plus a whole-snapshot
//! invariant check. The service does the same in SQL; the simulator and the property tests use
//! these.

use crate::error::PlacementError;
use crate::mig;
use crate::place::{GpuAssignment, Placement, Policy};
use crate::quota::{node_allocation_units, request_units};
use crate::request::{GpuDemand, PlacementRequest, Tier};
use crate::share::share_load;
use crate::snapshot::{
    Allocation, AllocationId, FleetSnapshot, GpuUse, MigSlice, Node, QuotaKey, Resources, Share,
};

fn bad(msg: impl Into<String>) -> PlacementError {
    PlacementError::Inconsistent(msg.into())
}

/// Takes allocation `id` off the fleet: frees its GPUs, slices, shares and resources, and its
/// quota usage. Returns what it was.
pub fn release(fleet: &mut FleetSnapshot, id: &AllocationId) -> Result<Allocation, PlacementError> {
    let node_pos = fleet
        .nodes
        .iter()
        .position(|n| n.allocation(id).is_some())
        .ok_or_else(|| bad(format!("no allocation {id}")))?;
    release_at(fleet, node_pos, id)
}

/// [`release`] of an allocation known to be on node `node_pos` (the index knows where).
pub(crate) fn release_at(
    fleet: &mut FleetSnapshot,
    node_pos: usize,
    id: &AllocationId,
) -> Result<Allocation, PlacementError> {
    let (alloc, freed) = release_from(&mut fleet.nodes[node_pos], id)?;
    for (key, units) in freed {
        fleet.usage.sub(&key, units);
    }
    Ok(alloc)
}

/// Takes allocation `id` off `node`; returns it and the quota units it held, per key.
fn release_from(
    node: &mut Node,
    id: &AllocationId,
) -> Result<(Allocation, Vec<(QuotaKey, u64)>), PlacementError> {
    let pos = node
        .allocations
        .iter()
        .position(|a| &a.id == id)
        .ok_or_else(|| bad(format!("no allocation {id}")))?;
    let a = &node.allocations[pos];
    let freed = node_allocation_units(node)
        .into_iter()
        .filter(|(p, _, _)| *p == pos)
        .map(|(_, gpu_type, u)| (QuotaKey::new(&a.org, gpu_type, a.product), u))
        .collect();
    for g in &mut node.gpus {
        g.used.release(id);
    }
    let alloc = node.allocations.remove(pos);
    node.free = node.free.add(&alloc.resources);
    Ok((alloc, freed))
}

/// Records `placement` of `req` as allocation `id`: preempts the named victims, then takes the
/// GPUs and resources. Refuses (and leaves the fleet as it was) if the placement breaks a rule
/// in this snapshot.
pub fn apply(
    fleet: &mut FleetSnapshot,
    policy: &Policy,
    req: &PlacementRequest,
    placement: &Placement,
    id: AllocationId,
) -> Result<(), PlacementError> {
    let node_pos = fleet
        .nodes
        .iter()
        .position(|n| n.id == placement.node_id)
        .ok_or_else(|| bad(format!("no node {}", placement.node_id)))?;
    if fleet.nodes.iter().any(|n| n.allocation(&id).is_some()) {
        return Err(bad(format!("allocation {id} exists already")));
    }
    apply_at(fleet, node_pos, policy, req, placement, id)
}

/// [`apply`] on node `node_pos` (which must be the placement's node) of an `id` the caller
/// has checked is new. Only that node and the usage change, so only they are copied for the
/// trial (a fleet-wide copy per placement would cost more than the decision).
pub(crate) fn apply_at(
    fleet: &mut FleetSnapshot,
    node_pos: usize,
    policy: &Policy,
    req: &PlacementRequest,
    placement: &Placement,
    id: AllocationId,
) -> Result<(), PlacementError> {
    {
        let node = &fleet.nodes[node_pos];
        if !node.schedulable {
            return Err(bad(format!("node {} is not schedulable", node.id)));
        }
        for v in &placement.preempt {
            match node.allocation(v) {
                Some(a) if a.tier == Tier::Spot => {}
                Some(_) => return Err(bad(format!("{v} is on-demand and cannot be preempted"))),
                None => return Err(bad(format!("victim {v} is not on node {}", node.id))),
            }
        }
        if !placement.preempt.is_empty() && req.tier != Tier::OnDemand {
            return Err(bad("only on-demand work preempts"));
        }
    }
    // Check against a copy of the node with the victims gone, then commit.
    let mut node = fleet.nodes[node_pos].clone();
    let mut freed = Vec::new();
    for v in &placement.preempt {
        freed.extend(release_from(&mut node, v)?.1);
    }
    let want = Resources::new(req.cpu_millis, req.memory_mib, req.disk_gib);
    if !node.free.covers(&want) {
        return Err(bad(format!("node {} lacks CPU, memory or disk", node.id)));
    }
    take_gpus(&mut node, policy, req, &placement.gpus, &id)?;
    node.free = node.free.saturating_sub(&want);
    node.allocations.push(Allocation {
        id,
        org: req.org.clone(),
        product: req.product,
        tier: req.tier,
        priority: req.priority,
        resources: want,
    });
    // GPU memory per type never changes; only shares need it.
    let units = req.wants_gpu().then(|| {
        let memory = match req.gpu {
            GpuDemand::Share { .. } => fleet.gpu_memory_of(&req.gpu_type),
            _ => None,
        };
        request_units(req, memory)
    });
    fleet.nodes[node_pos] = node;
    for (key, u) in freed {
        fleet.usage.sub(&key, u);
    }
    if let Some(units) = units {
        fleet
            .usage
            .add(QuotaKey::new(&req.org, &req.gpu_type, req.product), units);
    }
    Ok(())
}

fn gpu_pos(node: &Node, uuid: &str, gpu_type: &str) -> Result<usize, PlacementError> {
    let i = node
        .gpus
        .iter()
        .position(|g| g.uuid == uuid)
        .ok_or_else(|| bad(format!("no GPU {uuid} on node {}", node.id)))?;
    let g = &node.gpus[i];
    if g.gpu_type != gpu_type {
        return Err(bad(format!("GPU {uuid} is {}, not {gpu_type}", g.gpu_type)));
    }
    if !g.healthy {
        return Err(bad(format!("GPU {uuid} is unhealthy")));
    }
    Ok(i)
}

fn take_gpus(
    node: &mut Node,
    policy: &Policy,
    req: &PlacementRequest,
    gpus: &GpuAssignment,
    id: &AllocationId,
) -> Result<(), PlacementError> {
    match (&req.gpu, gpus) {
        (GpuDemand::None, GpuAssignment::None) => Ok(()),
        (GpuDemand::Whole { count, passthrough }, GpuAssignment::Whole { gpu_uuids }) => {
            let mut pos = Vec::new();
            for u in gpu_uuids {
                let i = gpu_pos(node, u, &req.gpu_type)?;
                if pos.contains(&i) {
                    return Err(bad(format!("GPU {u} named twice")));
                }
                let g = &node.gpus[i];
                if g.mig_enabled || !matches!(g.used, GpuUse::Idle) {
                    return Err(bad(format!("GPU {u} is not free for whole-GPU work")));
                }
                pos.push(i);
            }
            if pos.len() != *count as usize {
                return Err(bad(format!("{} GPUs for a request of {count}", pos.len())));
            }
            if *passthrough {
                for &i in &pos {
                    if let Some(grp) = node.gpus[i].iommu_group {
                        let missing = node
                            .gpus
                            .iter()
                            .enumerate()
                            .any(|(j, g)| g.iommu_group == Some(grp) && !pos.contains(&j));
                        if missing {
                            return Err(bad(format!(
                                "passthrough of {} leaves part of IOMMU group {grp} behind",
                                node.gpus[i].uuid
                            )));
                        }
                    }
                }
            }
            for i in pos {
                node.gpus[i].used = GpuUse::Whole(id.clone());
            }
            Ok(())
        }
        (
            GpuDemand::Mig { profile },
            GpuAssignment::Mig {
                gpu_uuid,
                profile: p,
                start,
                size,
            },
        ) => {
            if profile != p {
                return Err(bad(format!("placement is for {p}, request for {profile}")));
            }
            let (geom, prof) = mig::lookup(&req.gpu_type, profile)?;
            let i = gpu_pos(node, gpu_uuid, &req.gpu_type)?;
            let g = &mut node.gpus[i];
            if !g.mig_enabled {
                return Err(bad(format!("GPU {gpu_uuid} is not in MIG mode")));
            }
            let mut slices = match &g.used {
                GpuUse::Idle => Vec::new(),
                GpuUse::Mig(v) => v.clone(),
                _ => return Err(bad(format!("GPU {gpu_uuid} holds non-MIG work"))),
            };
            if *size != prof.size || !geom.fits_at(prof, *start, geom.occupancy(&slices)) {
                return Err(bad(format!(
                    "{profile} cannot start at {start} on GPU {gpu_uuid}"
                )));
            }
            slices.push(MigSlice {
                alloc: id.clone(),
                profile: profile.clone(),
                start: *start,
                size: *size,
            });
            g.used = GpuUse::Mig(slices);
            Ok(())
        }
        (
            GpuDemand::Share { memory_mib },
            GpuAssignment::Share {
                gpu_uuid,
                memory_mib: m,
            },
        ) => {
            if memory_mib != m {
                return Err(bad("share memory differs from the request"));
            }
            let i = gpu_pos(node, gpu_uuid, &req.gpu_type)?;
            let (tenants, used) = share_load(node, i)
                .ok_or_else(|| bad(format!("GPU {gpu_uuid} cannot take shares")))?;
            let g = &mut node.gpus[i];
            if tenants >= policy.share_tenants_per_gpu || used + memory_mib > g.memory_mib {
                return Err(bad(format!("GPU {gpu_uuid} has no room for the share")));
            }
            let mut v = match &g.used {
                GpuUse::Shared(v) => v.clone(),
                _ => Vec::new(),
            };
            v.push(Share {
                alloc: id.clone(),
                memory_mib: *memory_mib,
            });
            g.used = GpuUse::Shared(v);
            Ok(())
        }
        _ => Err(bad("the placement's GPU mode differs from the request's")),
    }
}

/// Checks the snapshot's invariants: no GPU held whole by a MIG-mode GPU, MIG layouts valid per
/// geometry and non-overlapping, shares within the tenant limit and the GPU's memory, every
/// GPU holder a known allocation of the node, allocation ids unique.
pub fn check_invariants(fleet: &FleetSnapshot, policy: &Policy) -> Result<(), PlacementError> {
    let mut ids = std::collections::BTreeSet::new();
    for node in &fleet.nodes {
        for a in &node.allocations {
            if !ids.insert(&a.id) {
                return Err(bad(format!("allocation {} appears twice", a.id)));
            }
        }
        let known = |id: &AllocationId| -> Result<(), PlacementError> {
            node.allocation(id)
                .map(|_| ())
                .ok_or_else(|| bad(format!("node {} GPU held by unknown {id}", node.id)))
        };
        for g in &node.gpus {
            match &g.used {
                GpuUse::Idle => {}
                GpuUse::Whole(id) => {
                    known(id)?;
                    if g.mig_enabled {
                        return Err(bad(format!("MIG-mode GPU {} held whole", g.uuid)));
                    }
                }
                GpuUse::Mig(v) => {
                    if !g.mig_enabled && !v.is_empty() {
                        return Err(bad(format!("GPU {} has MIG slices, MIG off", g.uuid)));
                    }
                    let geom = mig::geometry(&g.gpu_type)
                        .ok_or_else(|| bad(format!("{} has no MIG geometry", g.gpu_type)))?;
                    geom.validate(v)
                        .map_err(|e| bad(format!("GPU {}: {e}", g.uuid)))?;
                    for s in v {
                        known(&s.alloc)?;
                    }
                }
                GpuUse::Shared(v) => {
                    if g.mig_enabled && !v.is_empty() {
                        return Err(bad(format!("MIG-mode GPU {} has shares", g.uuid)));
                    }
                    if v.len() as u32 > policy.share_tenants_per_gpu {
                        return Err(bad(format!("GPU {} has {} tenants", g.uuid, v.len())));
                    }
                    if v.iter().map(|s| s.memory_mib).sum::<u64>() > g.memory_mib {
                        return Err(bad(format!("GPU {} shares exceed its memory", g.uuid)));
                    }
                    for s in v {
                        known(&s.alloc)?;
                    }
                }
            }
        }
    }
    Ok(())
}

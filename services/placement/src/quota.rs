//! Org quotas per GPU type and product, charged in GPU units (eighths of a GPU): a whole GPU is
//! 8 units, a MIG slice its memory-slice size (a `3g.40gb` is 4), a share its memory cap as a
//! fraction of the GPU's memory, rounded up (20 GiB of an 80 GiB GPU is 2).

use crate::mig;
use crate::reasons::Reason;
use crate::request::{GpuDemand, PlacementRequest};
use crate::snapshot::{FleetSnapshot, GpuUse, KeyedCounts, Node, QuotaKey, UNITS_PER_GPU};

/// Units a share of `memory_mib` on a GPU with `gpu_memory_mib` is charged.
pub fn share_units(memory_mib: u64, gpu_memory_mib: u64) -> u64 {
    if gpu_memory_mib == 0 {
        return UNITS_PER_GPU;
    }
    (memory_mib * UNITS_PER_GPU)
        .div_ceil(gpu_memory_mib)
        .clamp(1, UNITS_PER_GPU)
}

/// Units request `req` is charged against its quota. `gpu_memory_mib` is the memory of a GPU
/// of the requested type (only shares need it).
pub fn request_units(req: &PlacementRequest, gpu_memory_mib: Option<u64>) -> u64 {
    match &req.gpu {
        GpuDemand::None => 0,
        GpuDemand::Whole { count, .. } => u64::from(*count) * UNITS_PER_GPU,
        GpuDemand::Mig { profile } => mig::lookup(&req.gpu_type, profile)
            .map(|(_, p)| u64::from(p.size))
            .unwrap_or(UNITS_PER_GPU),
        GpuDemand::Share { memory_mib } => {
            share_units(*memory_mib, gpu_memory_mib.unwrap_or(*memory_mib))
        }
    }
}

/// The quota refusal for `req`, if its org would go over its limit.
pub(crate) fn check(fleet: &FleetSnapshot, req: &PlacementRequest) -> Option<Reason> {
    if !req.wants_gpu() {
        return None;
    }
    let key = QuotaKey::new(&req.org, &req.gpu_type, req.product);
    let limit = fleet.quotas.get(&key)?;
    let used = fleet.usage.get(&key).unwrap_or(0);
    let requested = request_units(req, fleet.gpu_memory_of(&req.gpu_type));
    (used + requested > limit * UNITS_PER_GPU).then(|| Reason::QuotaExceeded {
        org: req.org.clone(),
        gpu_type: req.gpu_type.clone(),
        product: req.product,
        limit_gpus: limit,
        used_units: used,
        requested_units: requested,
    })
}

/// GPU units each allocation on `node` holds, per GPU type: `(allocation position, gpu type,
/// units)`.
pub(crate) fn node_allocation_units(node: &Node) -> Vec<(usize, &str, u64)> {
    let mut out: Vec<(usize, &str, u64)> = Vec::new();
    for g in &node.gpus {
        let mut add = |id: &crate::AllocationId, units: u64| {
            if let Some(pos) = node.allocations.iter().position(|a| &a.id == id) {
                match out
                    .iter_mut()
                    .find(|(p, t, _)| *p == pos && *t == g.gpu_type.as_str())
                {
                    Some((_, _, u)) => *u += units,
                    None => out.push((pos, g.gpu_type.as_str(), units)),
                }
            }
        };
        match &g.used {
            GpuUse::Idle => {}
            GpuUse::Whole(id) => add(id, UNITS_PER_GPU),
            GpuUse::Mig(v) => v.iter().for_each(|s| add(&s.alloc, u64::from(s.size))),
            GpuUse::Shared(v) => v
                .iter()
                .for_each(|s| add(&s.alloc, share_units(s.memory_mib, g.memory_mib))),
        }
    }
    out
}

/// Usage per org × GPU type × product derived from what the nodes hold. Right when the
/// snapshot covers the whole fleet; the service may instead load usage from Postgres.
pub fn usage_from_nodes(nodes: &[Node]) -> KeyedCounts {
    let mut usage = KeyedCounts::default();
    for node in nodes {
        for (pos, gpu_type, units) in node_allocation_units(node) {
            let a = &node.allocations[pos];
            usage.add(QuotaKey::new(&a.org, gpu_type, a.product), units);
        }
    }
    usage
}

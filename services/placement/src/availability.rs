//! Live availability per GPU type: what a tenant could get right now, counted with the same
//! rules the core places by. `GET /v1/gpu-types` shows it.
//!
//! Per GPU type, over the nodes given (the caller passes every node that is not retired, with
//! [`Node::schedulable`] meaning ready):
//! * `total`: GPUs present; `unhealthy`: those reporting unhealthy (degraded GPUs still take
//!   work and are not counted here).
//! * `whole`: healthy GPUs of schedulable nodes, not in MIG mode and holding nothing at all —
//!   what a whole-GPU or passthrough request could take. A MIG-mode GPU never counts, even when
//!   empty, because the core puts only MIG work on it.
//! * `mig`: for every profile of the type's geometry ([`crate::mig`]), how many **more
//!   instances of that profile alone** could be placed now, summed over the healthy MIG-mode GPUs
//!   of schedulable nodes: per GPU, instances are added greedily at the lowest free valid start
//!   until none is left (memory slices and compute slices both counted). The starts of a profile
//!   are aligned to its size, so its free positions never overlap one another and greedy is the
//!   maximum. The counts are alternatives, not a sum: placing one profile uses room the others
//!   would have used.
//! * `shares`: GPUs that can take one more time-sliced tenant (healthy, schedulable, not MIG,
//!   idle or shared below the tenant limit, memory left) and the largest share memory that fits
//!   on one of them.
//!
//! Node CPU, memory and disk are not considered: the figures are GPU capacity, and a request
//! that also needs much host memory may still wait.

use std::collections::BTreeMap;

use crate::mig::{self, MigGeometry, MigProfile, Occupancy};
use crate::snapshot::{GpuUse, Node};

/// What one GPU type offers now. See the module documentation for each figure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeAvailability {
    pub total: u64,
    pub unhealthy: u64,
    pub whole: u64,
    /// One entry per profile of the type's MIG geometry, smallest profile first; empty for a
    /// type without MIG.
    pub mig: Vec<(&'static str, u64)>,
    /// GPUs that can take one more time-sliced share.
    pub share_gpus: u64,
    /// The largest share memory (MiB) one of those GPUs has left; 0 when none can.
    pub share_max_memory_mib: u64,
}

/// How many more instances of `profile` fit on a GPU of geometry `geom` with occupancy `occ`.
pub fn mig_placeable(geom: &MigGeometry, profile: &MigProfile, occ: Occupancy) -> u64 {
    let mut occ = occ;
    let mut n = 0;
    while let Some(start) = geom.free_starts(profile, occ).next() {
        occ.memory_mask |= profile.mask_at(start);
        occ.compute_used += profile.compute_slices;
        n += 1;
    }
    n
}

/// Availability of every GPU type present on `nodes`, and of every type with a MIG geometry
/// (all zero when the fleet has none), keyed by GPU type id. GPUs without a type (`""`) are
/// left out: no request can name them.
pub fn availability(
    nodes: &[Node],
    share_tenants_per_gpu: u32,
) -> BTreeMap<String, TypeAvailability> {
    let mut out: BTreeMap<String, TypeAvailability> = BTreeMap::new();
    for geom in mig::GEOMETRIES {
        out.insert(geom.gpu_type.to_owned(), empty(geom.gpu_type));
    }
    for node in nodes {
        for gpu in &node.gpus {
            if gpu.gpu_type.is_empty() {
                continue;
            }
            let t = out
                .entry(gpu.gpu_type.clone())
                .or_insert_with(|| empty(&gpu.gpu_type));
            t.total += 1;
            if !gpu.healthy {
                t.unhealthy += 1;
                continue;
            }
            if !node.schedulable {
                continue;
            }
            if gpu.mig_enabled {
                let Some(geom) = mig::geometry(&gpu.gpu_type) else {
                    continue;
                };
                let occ = match &gpu.used {
                    GpuUse::Idle => Occupancy::default(),
                    GpuUse::Mig(slices) => geom.occupancy(slices),
                    // Not a state the core creates; nothing more fits on it.
                    GpuUse::Whole(_) | GpuUse::Shared(_) => continue,
                };
                for (slot, prof) in t.mig.iter_mut().zip(geom.profiles) {
                    slot.1 += mig_placeable(geom, prof, occ);
                }
                continue;
            }
            let (tenants, used) = match &gpu.used {
                GpuUse::Idle => {
                    t.whole += 1;
                    (0, 0)
                }
                GpuUse::Shared(v) => (v.len() as u64, v.iter().map(|s| s.memory_mib).sum()),
                GpuUse::Whole(_) | GpuUse::Mig(_) => continue,
            };
            let left = gpu.memory_mib.saturating_sub(used);
            if tenants < u64::from(share_tenants_per_gpu) && left > 0 {
                t.share_gpus += 1;
                t.share_max_memory_mib = t.share_max_memory_mib.max(left);
            }
        }
    }
    out
}

fn empty(gpu_type: &str) -> TypeAvailability {
    TypeAvailability {
        mig: mig::geometry(gpu_type)
            .map(|g| g.profiles.iter().map(|p| (p.name, 0)).collect())
            .unwrap_or_default(),
        ..TypeAvailability::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{AllocationId, Gpu, MigSlice, Resources, Share};

    fn gpus(n: u32, gpu_type: &str, memory_mib: u64) -> Vec<Gpu> {
        (0..n)
            .map(|i| Gpu::new(&format!("g{i}"), i, gpu_type, memory_mib))
            .collect()
    }

    fn node(id: &str, gpus: Vec<Gpu>) -> Node {
        Node::new(id, Resources::new(64_000, 512 * 1024, 2000), gpus)
    }

    fn mig_of(a: &TypeAvailability, profile: &str) -> u64 {
        a.mig.iter().find(|(p, _)| *p == profile).unwrap().1
    }

    fn slice(profile: &str, start: u8, size: u8) -> MigSlice {
        MigSlice {
            alloc: AllocationId(format!("{profile}@{start}")),
            profile: profile.into(),
            start,
            size,
        }
    }

    #[test]
    fn an_empty_mig_gpu_offers_each_profile_as_often_as_the_hardware_allows() {
        let g = &mig::H100_80GB;
        let counts: Vec<u64> = g
            .profiles
            .iter()
            .map(|p| mig_placeable(g, p, Occupancy::default()))
            .collect();
        // 1g.10gb ×7 (compute-bound), 1g.20gb ×4, 2g.20gb ×3, 3g.40gb ×2, 4g.40gb, 7g.80gb.
        assert_eq!(counts, vec![7, 4, 3, 2, 1, 1]);
    }

    #[test]
    fn whole_counts_idle_healthy_gpus_of_ready_nodes_only() {
        let mut a = node("a", gpus(4, "h100-80gb", 81920));
        a.gpus[0].used = GpuUse::Whole(AllocationId::from("w"));
        a.gpus[1].healthy = false;
        a.gpus[2].used = GpuUse::Shared(vec![Share {
            alloc: AllocationId::from("s"),
            memory_mib: 20480,
        }]);
        let mut b = node("b", gpus(2, "h100-80gb", 81920));
        b.schedulable = false;
        let c = node("c", gpus(2, "l40s-48gb", 46068));
        let av = availability(&[a, b, c], 4);
        let h = &av["h100-80gb"];
        assert_eq!((h.total, h.unhealthy, h.whole), (6, 1, 1));
        // The idle GPU and the shared one take shares; the shared one has 60 GiB left.
        assert_eq!((h.share_gpus, h.share_max_memory_mib), (2, 81920));
        let l = &av["l40s-48gb"];
        assert_eq!((l.total, l.whole), (2, 2));
        assert!(l.mig.is_empty());
        // MIG-capable types are listed even with none in the fleet.
        assert_eq!(av["a100-40gb"].total, 0);
        assert_eq!(mig_of(&av["a100-40gb"], "7g.40gb"), 0);
    }

    #[test]
    fn a_placed_3g_takes_a_3g_and_the_7g_but_leaves_the_4g() {
        let mut gs = gpus(2, "h100-80gb", 81920);
        for g in &mut gs {
            g.mig_enabled = true;
        }
        gs[0].used = GpuUse::Mig(vec![slice("3g.40gb", 4, 4)]);
        let av = availability(&[node("a", gs)], 4);
        let h = &av["h100-80gb"];
        assert_eq!(h.whole, 0, "MIG-mode GPUs are never whole");
        assert_eq!(h.share_gpus, 0);
        // GPU 0 (3g at 4..8, 4 compute slices left): 3g ×1, 4g ×1, 7g ×0, 1g.10gb ×4.
        // GPU 1 (empty): 3g ×2, 4g ×1, 7g ×1, 1g.10gb ×7.
        assert_eq!(mig_of(h, "3g.40gb"), 1 + 2);
        assert_eq!(mig_of(h, "4g.40gb"), 1 + 1);
        assert_eq!(mig_of(h, "7g.80gb"), 1);
        assert_eq!(mig_of(h, "1g.10gb"), 4 + 7);
        assert_eq!(mig_of(h, "2g.20gb"), 2 + 3);
    }

    #[test]
    fn compute_slices_bound_mig_counts_too() {
        let g = &mig::A100_80GB;
        // 4g at 0 uses 4 compute slices; 3 are left, so one 3g at 4 fits but no 4g.
        let occ = g.occupancy(&[slice("4g.40gb", 0, 4)]);
        let p3 = g.profile("3g.40gb").unwrap();
        let p2 = g.profile("2g.20gb").unwrap();
        let p1 = g.profile("1g.10gb").unwrap();
        assert_eq!(mig_placeable(g, p3, occ), 1);
        assert_eq!(
            mig_placeable(g, p2, occ),
            1,
            "one 2g at 4; 6 would exceed compute"
        );
        assert_eq!(mig_placeable(g, p1, occ), 3);
    }

    #[test]
    fn a_gpu_at_the_tenant_limit_or_out_of_memory_takes_no_share() {
        let mut gs = gpus(2, "l40s-48gb", 46068);
        let share = |m| Share {
            alloc: AllocationId::from("x"),
            memory_mib: m,
        };
        gs[0].used = GpuUse::Shared(vec![share(1024), share(1024)]);
        gs[1].used = GpuUse::Shared(vec![share(46068)]);
        let av = availability(&[node("a", gs)], 2);
        let l = &av["l40s-48gb"];
        assert_eq!((l.whole, l.share_gpus, l.share_max_memory_mib), (0, 0, 0));
    }
}

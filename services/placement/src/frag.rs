//! How fragmented a fleet is: how many large requests could still be placed.

use serde::{Deserialize, Serialize};

use crate::mig;
use crate::snapshot::{FleetSnapshot, GpuUse, UNITS_PER_GPU};

/// Fragmentation figures for a snapshot. GPU counts are per node and GPU type (a request never
/// spans nodes or types); CPU, memory and disk are not considered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Fragmentation {
    /// Healthy GPUs on schedulable nodes, and how many are completely idle (not MIG mode).
    pub gpus: u64,
    pub free_gpus: u64,
    /// Schedulable nodes whose GPUs are all idle (and that have GPUs).
    pub idle_nodes: u64,
    /// How many 8-, 4-, 2- and 1-GPU whole requests could still be placed (each node and type
    /// counted on its own, ignoring NVLink).
    pub fits_8: u64,
    pub fits_4: u64,
    pub fits_2: u64,
    pub fits_1: u64,
    /// Free memory slices on MIG-mode GPUs, and how many full-GPU (`7g`) instances could go there.
    pub free_mig_slices: u64,
    pub fits_mig_full: u64,
    /// GPU units (eighths) allocated out of all units of healthy GPUs on schedulable nodes.
    pub allocated_units: u64,
    pub capacity_units: u64,
}

impl Fragmentation {
    /// Share of idle GPUs that no 4-GPU request could use (0 = none stranded).
    pub fn stranded_for_4(&self) -> f64 {
        if self.free_gpus == 0 {
            return 0.0;
        }
        (self.free_gpus - 4 * self.fits_4) as f64 / self.free_gpus as f64
    }

    /// Allocated share of capacity, 0.0 ..= 1.0.
    pub fn utilisation(&self) -> f64 {
        if self.capacity_units == 0 {
            return 0.0;
        }
        self.allocated_units as f64 / self.capacity_units as f64
    }
}

/// Computes the fragmentation figures of `fleet`.
pub fn fragmentation(fleet: &FleetSnapshot) -> Fragmentation {
    let mut f = Fragmentation::default();
    for node in fleet.nodes.iter().filter(|n| n.schedulable) {
        let mut per_type: Vec<(&str, u64)> = Vec::new();
        let mut all_idle = !node.gpus.is_empty();
        for g in &node.gpus {
            if !g.healthy {
                all_idle = false;
                continue;
            }
            f.gpus += 1;
            f.capacity_units += UNITS_PER_GPU;
            match &g.used {
                GpuUse::Idle if !g.mig_enabled => {
                    f.free_gpus += 1;
                    match per_type.iter_mut().find(|(t, _)| *t == g.gpu_type) {
                        Some((_, c)) => *c += 1,
                        None => per_type.push((&g.gpu_type, 1)),
                    }
                }
                GpuUse::Idle | GpuUse::Mig(_) => {
                    let slices: &[_] = match &g.used {
                        GpuUse::Mig(v) => v,
                        _ => &[],
                    };
                    if !slices.is_empty() {
                        all_idle = false;
                    }
                    if let Some(geom) = mig::geometry(&g.gpu_type) {
                        let occ = geom.occupancy(slices);
                        f.free_mig_slices += u64::from(occ.free_memory_slices());
                        f.allocated_units += u64::from(8 - occ.free_memory_slices());
                        if occ.memory_mask == 0 {
                            f.fits_mig_full += 1;
                        }
                    }
                }
                GpuUse::Whole(_) => {
                    all_idle = false;
                    f.allocated_units += UNITS_PER_GPU;
                }
                GpuUse::Shared(v) => {
                    all_idle = all_idle && v.is_empty();
                    let used: u64 = v.iter().map(|s| s.memory_mib).sum();
                    let units = crate::quota::share_units(used, g.memory_mib);
                    f.allocated_units += if v.is_empty() { 0 } else { units };
                }
            }
        }
        if all_idle {
            f.idle_nodes += 1;
        }
        for (_, c) in per_type {
            f.fits_8 += c / 8;
            f.fits_4 += c / 4;
            f.fits_2 += c / 2;
            f.fits_1 += c;
        }
    }
    f
}

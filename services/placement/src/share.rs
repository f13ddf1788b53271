//! Time-sliced shares: up to [`Policy::share_tenants_per_gpu`](crate::Policy) tenants on one
//! GPU, each with a declared memory cap, the caps together within the GPU's memory. A GPU in MIG
//! mode or held whole takes no shares. Best-fit puts a share on the GPU that is left with the
//! least memory (an already shared GPU before an idle one), so idle GPUs stay whole.

use crate::Strategy;
use crate::reasons::Miss;
use crate::snapshot::{GpuUse, Node};

/// The chosen GPU (position in [`Node::gpus`]) and its score: [GPU was idle, memory left,
/// tenant slots left].
pub(crate) struct ShareFit {
    pub gpu: usize,
    pub score: [u64; 3],
}

/// Tenants and memory already on GPU `gpu`, or `None` if it cannot take shares at all.
pub(crate) fn share_load(node: &Node, gpu: usize) -> Option<(u32, u64)> {
    let g = &node.gpus[gpu];
    if g.mig_enabled {
        return None;
    }
    match &g.used {
        GpuUse::Idle => Some((0, 0)),
        GpuUse::Shared(v) => Some((v.len() as u32, v.iter().map(|s| s.memory_mib).sum())),
        GpuUse::Whole(_) | GpuUse::Mig(_) => None,
    }
}

pub(crate) fn fit(
    node: &Node,
    gpu_type: &str,
    memory_mib: u64,
    tenant_limit: u32,
    strategy: Strategy,
) -> Result<ShareFit, Miss> {
    let mut any_healthy = false;
    let mut best: Option<ShareFit> = None;
    for (i, g) in node.gpus.iter().enumerate() {
        if g.gpu_type != gpu_type || !g.healthy {
            continue;
        }
        any_healthy = true;
        let Some((tenants, used)) = share_load(node, i) else {
            continue;
        };
        if tenants >= tenant_limit || used + memory_mib > g.memory_mib {
            continue;
        }
        let score = [
            u64::from(tenants == 0),
            g.memory_mib - used - memory_mib,
            u64::from(tenant_limit - tenants - 1),
        ];
        if strategy == Strategy::FirstFit {
            return Ok(ShareFit {
                gpu: i,
                score: [0; 3],
            });
        }
        if best.as_ref().is_none_or(|b| score < b.score) {
            best = Some(ShareFit { gpu: i, score });
        }
    }
    match best {
        Some(b) => Ok(b),
        None if !any_healthy => Err(Miss::UnhealthyGpus),
        None => Err(Miss::NoShareRoom),
    }
}

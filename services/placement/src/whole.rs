//! Whole GPUs (containers) and passthrough GPUs (VMs) on one node.
//!
//! Eligible GPUs are healthy, of the requested type, not in MIG mode and completely idle (a GPU
//! with even one time-sliced share gets no whole work). Among the sets of `count` eligible GPUs
//! the best is, in order: all pairs NVLink-connected, all on one NUMA node, taken from the NUMA
//! node with the fewest free GPUs (so a fuller socket is finished before a fresh one is broken).
//!
//! Passthrough works on IOMMU groups instead of GPUs: a GPU can only be handed to a VM together
//! with every other device of its group, so a group is usable only if all its GPUs are eligible,
//! and the chosen groups must add up to exactly `count` GPUs.

use crate::Strategy;
use crate::reasons::Miss;
use crate::snapshot::{GpuUse, Node};

/// Enumeration budget (complete candidate sets looked at per node). Nodes have ≤ 8 GPUs in
/// practice (C(8,4) = 70 sets); the cap only bounds pathological inventories.
const SET_BUDGET: usize = 20_000;

/// A chosen set of GPUs (bit mask over positions in [`Node::gpus`]) and its within-node score
/// (lower is better): [not NVLink-connected, not one NUMA node, free GPUs left, NUMA pressure].
pub(crate) struct WholeFit {
    pub mask: u64,
    pub score: [u64; 4],
}

/// Bits of `mask`, lowest first.
fn bits(mask: u64) -> impl Iterator<Item = usize> {
    let mut m = mask;
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            i
        })
    })
}

pub(crate) fn fit(
    node: &Node,
    gpu_type: &str,
    count: u32,
    passthrough: bool,
    require_nvlink: bool,
    strategy: Strategy,
) -> Result<WholeFit, Miss> {
    let n = node.gpus.len().min(64);
    let mut healthy_typed = 0u32;
    let mut elig = 0u64;
    for i in 0..n {
        let g = &node.gpus[i];
        if g.gpu_type == gpu_type && g.healthy {
            healthy_typed += 1;
            if !g.mig_enabled && matches!(g.used, GpuUse::Idle) {
                elig |= 1 << i;
            }
        }
    }
    if healthy_typed == 0 {
        return Err(Miss::UnhealthyGpus);
    }
    let free = elig.count_ones();
    if free == 0 {
        return Err(Miss::NoFreeGpus);
    }
    if free < count {
        return Err(Miss::TooFewFreeGpus { free });
    }
    let first_fit = strategy == Strategy::FirstFit;
    let left = u64::from(free - count);
    // NUMA pressure of a GPU: free GPUs on its NUMA node (take from the fuller socket first).
    let mut pressure = [0u64; 64];
    for i in bits(elig) {
        let numa = node.gpus[i].numa_node;
        pressure[i] = bits(elig)
            .filter(|&j| node.gpus[j].numa_node == numa)
            .count() as u64;
    }

    // Fast path: one container GPU has no topology to weigh.
    if count == 1 && !passthrough {
        let pick = if first_fit {
            elig.trailing_zeros() as usize
        } else {
            bits(elig).min_by_key(|&i| pressure[i]).expect("free > 0")
        };
        return Ok(WholeFit {
            mask: 1 << pick,
            score: if first_fit {
                [0; 4]
            } else {
                [0, 0, left, pressure[pick]]
            },
        });
    }

    // Items to choose from: single GPUs, or whole IOMMU groups for passthrough.
    let mut items = [0u64; 64];
    let mut n_items = 0;
    for i in bits(elig) {
        let mask = if passthrough {
            group_mask(node, i, n)
        } else {
            1 << i
        };
        if mask & !elig == 0 && !items[..n_items].contains(&mask) {
            items[n_items] = mask;
            n_items += 1;
        }
    }

    let mut adj = [0u64; 64];
    if count > 1 {
        for i in bits(elig) {
            adj[i] = bits(elig)
                .filter(|&j| j == i || node.nvlinked(i, j))
                .fold(0u64, |m, j| m | (1 << j));
        }
    }

    let score_set = |mask: u64| -> Option<[u64; 4]> {
        let clique = bits(mask).all(|i| adj[i] & mask == mask) || count == 1;
        if require_nvlink && !clique {
            return None;
        }
        if first_fit {
            return Some([0; 4]);
        }
        let first = node.gpus[mask.trailing_zeros() as usize].numa_node;
        let same_numa = bits(mask).all(|i| node.gpus[i].numa_node == first);
        let p: u64 = bits(mask).map(|i| pressure[i]).sum();
        Some([u64::from(!clique), u64::from(!same_numa), left, p])
    };
    let mut search = Search {
        items: &items[..n_items],
        want: count,
        budget: SET_BUDGET,
        found_exact: false,
        best: None,
        first_only: first_fit,
        score_set: &score_set,
    };
    search.dfs(0, 0, 0);
    match search.best {
        Some((mask, score)) => Ok(WholeFit { mask, score }),
        None if passthrough && !search.found_exact => Err(Miss::IommuGroupsBusy),
        None => Err(Miss::NoNvlinkSet),
    }
}
/// Bit mask (over node GPU positions) of the IOMMU group GPU `i` belongs to.
fn group_mask(node: &Node, i: usize, n: usize) -> u64 {
    match node.gpus[i].iommu_group {
        None => 1 << i,
        Some(grp) => (0..n)
            .filter(|&j| node.gpus[j].iommu_group == Some(grp))
            .fold(0u64, |m, j| m | (1 << j)),
    }
}

type ScoreFn<'a> = dyn Fn(u64) -> Option<[u64; 4]> + 'a;

struct Search<'a> {
    items: &'a [u64],
    want: u32,
    budget: usize,
    found_exact: bool,
    best: Option<(u64, [u64; 4])>,
    first_only: bool,
    score_set: &'a ScoreFn<'a>,
}

impl Search<'_> {
    fn done(&self) -> bool {
        self.budget == 0 || (self.first_only && self.best.is_some())
    }

    fn dfs(&mut self, from: usize, mask: u64, size: u32) {
        if size == self.want {
            self.found_exact = true;
            self.budget -= 1;
            if let Some(score) = (self.score_set)(mask)
                && self.best.is_none_or(|(_, b)| score < b)
            {
                self.best = Some((mask, score));
            }
            return;
        }
        for k in from..self.items.len() {
            if self.done() {
                return;
            }
            let item = self.items[k];
            let s = size + item.count_ones();
            if s <= self.want {
                self.dfs(k + 1, mask | item, s);
            }
        }
    }
}

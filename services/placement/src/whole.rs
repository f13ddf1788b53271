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

/// A chosen set of GPUs (positions in [`Node::gpus`]) and its within-node score (lower is
/// better): [not NVLink-connected, not one NUMA node, free GPUs left, NUMA pressure].
pub(crate) struct WholeFit {
    pub gpus: Vec<usize>,
    pub score: [u64; 4],
}

pub(crate) fn eligible(node: &Node, i: usize, gpu_type: &str) -> bool {
    let g = &node.gpus[i];
    g.gpu_type == gpu_type && g.healthy && !g.mig_enabled && matches!(g.used, GpuUse::Idle)
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
    let mut elig: Vec<usize> = Vec::with_capacity(n);
    for i in 0..n {
        let g = &node.gpus[i];
        if g.gpu_type == gpu_type && g.healthy {
            healthy_typed += 1;
            if eligible(node, i, gpu_type) {
                elig.push(i);
            }
        }
    }
    if healthy_typed == 0 {
        return Err(Miss::UnhealthyGpus);
    }
    if elig.is_empty() {
        return Err(Miss::NoFreeGpus);
    }
    let count_us = count as usize;
    if elig.len() < count_us {
        return Err(Miss::TooFewFreeGpus {
            free: elig.len() as u32,
        });
    }

    // Items to choose from: single GPUs, or whole IOMMU groups for passthrough.
    let items: Vec<u64> = if passthrough {
        let mut groups: Vec<u64> = Vec::new();
        for &i in &elig {
            let mask = group_mask(node, i, n);
            let all_eligible = (0..n)
                .filter(|j| mask & (1 << j) != 0)
                .all(|j| eligible(node, j, gpu_type));
            if all_eligible && !groups.contains(&mask) {
                groups.push(mask);
            }
        }
        groups
    } else {
        elig.iter().map(|&i| 1u64 << i).collect()
    };

    let adj: Vec<u64> = (0..n)
        .map(|i| {
            (0..n)
                .filter(|&j| j == i || node.nvlinked(i, j))
                .fold(0u64, |m, j| m | (1 << j))
        })
        .collect();
    let mut numa_free: Vec<(Option<u32>, u64)> = Vec::new();
    for &i in &elig {
        let numa = node.gpus[i].numa_node;
        match numa_free.iter_mut().find(|(k, _)| *k == numa) {
            Some((_, c)) => *c += 1,
            None => numa_free.push((numa, 1)),
        }
    }
    let left = (elig.len() - count_us) as u64;

    let mut search = Search {
        items: &items,
        want: count,
        budget: SET_BUDGET,
        found_exact: false,
        best: None,
        first_only: strategy == Strategy::FirstFit,
        score_set: &|mask: u64| {
            let clique = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .all(|i| adj[i] & mask == mask);
            if require_nvlink && !clique {
                return None;
            }
            let mut numas = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| node.gpus[i].numa_node);
            let first = numas.next().flatten();
            let same_numa = numas.all(|x| x == first);
            let pressure: u64 = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| {
                    let numa = node.gpus[i].numa_node;
                    numa_free
                        .iter()
                        .find(|(k, _)| *k == numa)
                        .map_or(0, |(_, c)| *c)
                })
                .sum();
            Some([u64::from(!clique), u64::from(!same_numa), left, pressure])
        },
    };
    search.dfs(0, 0, 0);
    match search.best {
        Some((mask, score)) => Ok(WholeFit {
            gpus: (0..n).filter(|i| mask & (1 << i) != 0).collect(),
            score: if strategy == Strategy::FirstFit {
                [0; 4]
            } else {
                score
            },
        }),
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

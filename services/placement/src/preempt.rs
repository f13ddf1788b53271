//! Spot preemption: when on-demand work fits nowhere free, find the cheapest set of spot
//! allocations on one node whose removal makes it fit. On-demand work is never a victim.
//!
//! "Cheapest", compared in order: the highest victim priority is as low as possible (a priority-5
//! spot job is never evicted if evicting priority-0 ones is enough), then the fewest victims,
//! then the lowest sum of victim priorities, then the best fit of the request itself.

use crate::place::{Ctx, Fit, Placement, Score, fit_node};
use crate::request::Tier;
use crate::snapshot::{Allocation, AllocationId, Node};

/// Fit checks allowed per node when searching victim subsets exhaustively; beyond it the search
/// shrinks a sufficient set greedily instead.
const CHECK_BUDGET: usize = 4_000;

/// `node` as it would be with `victims` gone: their GPUs, slices, shares and resources freed.
pub fn without(node: &Node, victims: &[&Allocation]) -> Node {
    let mut n = node.clone();
    for v in victims {
        for g in &mut n.gpus {
            g.used.release(&v.id);
        }
        n.free = n.free.add(&v.resources);
        n.allocations.retain(|a| a.id != v.id);
    }
    n
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Cost {
    max_priority: i32,
    victims: usize,
    priority_sum: i64,
    score: Score,
}

fn cost(victims: &[&Allocation], fit: &Fit) -> Cost {
    Cost {
        max_priority: victims.iter().map(|a| a.priority).max().unwrap_or(i32::MIN),
        victims: victims.len(),
        priority_sum: victims.iter().map(|a| i64::from(a.priority)).sum(),
        score: fit.score,
    }
}

/// Cheapest victim set on one node: (victims, fit after removing them).
fn on_node<'a>(node: &'a Node, ctx: &Ctx<'_>) -> Option<(Vec<&'a Allocation>, Fit)> {
    let mut spot: Vec<&Allocation> = node
        .allocations
        .iter()
        .filter(|a| a.tier == Tier::Spot)
        .collect();
    if spot.is_empty() || !node.schedulable {
        return None;
    }
    spot.sort_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.id.cmp(&b.id)));
    // Removing more never hurts, so first find the lowest priority ceiling that suffices.
    fit_node(&without(node, &spot), ctx).ok()?;
    let mut pool_len = spot.len();
    for (k, a) in spot.iter().enumerate() {
        let is_last_of_priority = spot.get(k + 1).is_none_or(|b| b.priority != a.priority);
        if is_last_of_priority && fit_node(&without(node, &spot[..=k]), ctx).is_ok() {
            pool_len = k + 1;
            break;
        }
    }
    let pool = &spot[..pool_len];
    let ceiling = pool[pool_len - 1].priority;
    // Fewest victims: subsets by increasing size, each must include a ceiling-priority victim.
    let mut checks = 0usize;
    for size in 1..=pool.len() {
        let mut best: Option<(Vec<&Allocation>, Fit, Cost)> = None;
        let mut idx: Vec<usize> = (0..size).collect();
        loop {
            if checks >= CHECK_BUDGET {
                return greedy(node, pool, ctx);
            }
            let set: Vec<&Allocation> = idx.iter().map(|&i| pool[i]).collect();
            if set.iter().any(|a| a.priority == ceiling) {
                checks += 1;
                if let Ok(fit) = fit_node(&without(node, &set), ctx) {
                    let c = cost(&set, &fit);
                    if best.as_ref().is_none_or(|(_, _, b)| c < *b) {
                        best = Some((set, fit, c));
                    }
                }
            }
            if !next_combination(&mut idx, pool.len()) {
                break;
            }
        }
        if let Some((set, fit, _)) = best {
            return Some((set, fit));
        }
    }
    None
}

/// Starting from all of `pool`, drop victims (highest priority first) while the rest suffices.
fn greedy<'a>(
    node: &'a Node,
    pool: &[&'a Allocation],
    ctx: &Ctx<'_>,
) -> Option<(Vec<&'a Allocation>, Fit)> {
    let mut set: Vec<&Allocation> = pool.to_vec();
    for k in (0..pool.len()).rev() {
        let trial: Vec<&Allocation> = set.iter().copied().filter(|a| a.id != pool[k].id).collect();
        if fit_node(&without(node, &trial), ctx).is_ok() {
            set = trial;
        }
    }
    let fit = fit_node(&without(node, &set), ctx).ok()?;
    Some((set, fit))
}

/// Advances `idx` (a sorted k-subset of 0..n) to the next one in lexicographic order.
fn next_combination(idx: &mut [usize], n: usize) -> bool {
    let k = idx.len();
    for i in (0..k).rev() {
        if idx[i] < n - k + i {
            idx[i] += 1;
            for j in i + 1..k {
                idx[j] = idx[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

/// The cheapest preemption over all nodes, as a placement naming its victims.
pub(crate) fn find(nodes: &[Node], ctx: &Ctx<'_>) -> Option<Placement> {
    find_among(nodes, 0..nodes.len(), ctx)
}

/// [`find`] over the nodes at `positions` (ascending), e.g. only those holding spot work:
/// no other node can offer a victim.
pub(crate) fn find_among(
    nodes: &[Node],
    positions: impl Iterator<Item = usize>,
    ctx: &Ctx<'_>,
) -> Option<Placement> {
    let mut best: Option<(usize, Vec<AllocationId>, Fit, Cost)> = None;
    for i in positions {
        let node = &nodes[i];
        if ctx.req.wants_gpu() && !node.has_gpu_type(&ctx.req.gpu_type) {
            continue;
        }
        if let Some((victims, fit)) = on_node(node, ctx) {
            let c = cost(&victims, &fit);
            if best.as_ref().is_none_or(|(_, _, _, b)| c < *b) {
                best = Some((i, victims.iter().map(|a| a.id.clone()).collect(), fit, c));
            }
        }
    }
    best.map(|(i, preempt, fit, _)| Placement {
        node_id: nodes[i].id.clone(),
        gpus: fit.assignment(&nodes[i], ctx.req, ctx),
        preempt,
    })
}

#[cfg(test)]
mod tests {
    use super::next_combination;

    #[test]
    fn combinations_in_order() {
        let mut idx = vec![0, 1];
        let mut seen = vec![idx.clone()];
        while next_combination(&mut idx, 4) {
            seen.push(idx.clone());
        }
        assert_eq!(seen.len(), 6);
        assert_eq!(seen.last().unwrap(), &vec![2, 3]);
    }
}

//! Fair share between orgs when demand exceeds supply: dominant-resource fairness (DRF).
//!
//! Each org's share is its largest fraction of any resource it holds (GPU units, CPU, memory)
//! of the fleet's capacity. Pending requests are ordered by repeatedly taking the org with the
//! smallest dominant share — counting what it already runs plus what this ordering has granted
//! it so far — and from that org its most important, oldest request. Ties between orgs go to the
//! higher priority, then the older request, then the org id (so the order is deterministic).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quota::{node_allocation_units, request_units};
use crate::request::{OrgId, PlacementRequest};
use crate::snapshot::{FleetSnapshot, UNITS_PER_GPU};

/// A request waiting to be placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub request: PlacementRequest,
    /// When it was submitted (any monotonic unit, e.g. unix milliseconds). Older goes first.
    pub submitted_at: u64,
}

/// Amounts of the resources fairness is computed over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    pub gpu_units: u64,
    pub cpu_millis: u64,
    pub memory_mib: u64,
}

impl Amounts {
    fn add(&mut self, o: &Amounts) {
        self.gpu_units += o.gpu_units;
        self.cpu_millis += o.cpu_millis;
        self.memory_mib += o.memory_mib;
    }
}

/// A fraction `num / den` compared exactly.
#[derive(Debug, Clone, Copy)]
struct Frac(u64, u64);

impl PartialEq for Frac {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Frac {}
impl PartialOrd for Frac {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Frac {
    fn cmp(&self, o: &Self) -> Ordering {
        (u128::from(self.0) * u128::from(o.1)).cmp(&(u128::from(o.0) * u128::from(self.1)))
    }
}

fn dominant_share(used: &Amounts, cap: &Amounts) -> Frac {
    [
        (used.gpu_units, cap.gpu_units),
        (used.cpu_millis, cap.cpu_millis),
        (used.memory_mib, cap.memory_mib),
    ]
    .into_iter()
    .filter(|&(_, c)| c > 0)
    .map(|(u, c)| Frac(u, c))
    .max()
    .unwrap_or(Frac(0, 1))
}

/// Capacity (healthy GPUs, and CPU/memory free or held) of the schedulable nodes, and what each
/// org holds now.
pub fn capacity_and_usage(fleet: &FleetSnapshot) -> (Amounts, BTreeMap<OrgId, Amounts>) {
    let mut cap = Amounts::default();
    let mut usage: BTreeMap<OrgId, Amounts> = BTreeMap::new();
    for node in &fleet.nodes {
        let units = node_allocation_units(node);
        for (pos, a) in node.allocations.iter().enumerate() {
            let u = usage.entry(a.org.clone()).or_default();
            u.cpu_millis += a.resources.cpu_millis;
            u.memory_mib += a.resources.memory_mib;
            u.gpu_units += units
                .iter()
                .filter(|(p, _, _)| *p == pos)
                .map(|(_, _, n)| n)
                .sum::<u64>();
        }
        if !node.schedulable {
            continue;
        }
        let held = node
            .allocations
            .iter()
            .fold(node.free, |acc, a| acc.add(&a.resources));
        cap.cpu_millis += held.cpu_millis;
        cap.memory_mib += held.memory_mib;
        cap.gpu_units += node.gpus.iter().filter(|g| g.healthy).count() as u64 * UNITS_PER_GPU;
    }
    (cap, usage)
}

/// What `req` would add to its org's holdings.
pub fn demand(req: &PlacementRequest, gpu_memory_mib: Option<u64>) -> Amounts {
    Amounts {
        gpu_units: request_units(req, gpu_memory_mib),
        cpu_millis: req.cpu_millis,
        memory_mib: req.memory_mib,
    }
}

/// Orders `pending` for placement by dominant-resource fairness against `fleet`: returns
/// indexes into `pending`.
pub fn fair_order(pending: &[Pending], fleet: &FleetSnapshot) -> Vec<usize> {
    let (cap, usage) = capacity_and_usage(fleet);
    fair_order_with(pending, &usage, &cap, |t| fleet.gpu_memory_of(t))
}

/// [`fair_order`] with explicit current usage per org and capacity.
pub fn fair_order_with(
    pending: &[Pending],
    usage: &BTreeMap<OrgId, Amounts>,
    capacity: &Amounts,
    gpu_memory_of: impl Fn(&str) -> Option<u64>,
) -> Vec<usize> {
    // Per org: its queue, most important then oldest first (popped from the back).
    let mut queues: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in pending.iter().enumerate() {
        queues.entry(p.request.org.as_str()).or_default().push(i);
    }
    for q in queues.values_mut() {
        q.sort_by(|&a, &b| {
            let (pa, pb) = (&pending[a], &pending[b]);
            pb.request
                .priority
                .cmp(&pa.request.priority)
                .then(pa.submitted_at.cmp(&pb.submitted_at))
                .then(a.cmp(&b))
        });
        q.reverse();
    }
    let mut held: BTreeMap<&str, Amounts> = queues
        .keys()
        .map(|&o| (o, usage.get(o).copied().unwrap_or_default()))
        .collect();
    let mut order = Vec::with_capacity(pending.len());
    while !queues.is_empty() {
        let org = queues
            .iter()
            .map(|(&o, q)| {
                let next = &pending[*q.last().expect("queues are never empty")];
                (o, dominant_share(&held[o], capacity), next)
            })
            .min_by(|a, b| {
                a.1.cmp(&b.1)
                    .then(b.2.request.priority.cmp(&a.2.request.priority))
                    .then(a.2.submitted_at.cmp(&b.2.submitted_at))
                    .then(a.0.cmp(b.0))
            })
            .map(|(o, _, _)| o)
            .expect("at least one org queued");
        let q = queues.get_mut(org).expect("org chosen from queues");
        let i = q.pop().expect("queues are never empty");
        if q.is_empty() {
            queues.remove(org);
        }
        let req = &pending[i].request;
        held.get_mut(org)
            .expect("every queued org has holdings")
            .add(&demand(req, gpu_memory_of(&req.gpu_type)));
        order.push(i);
    }
    order
}

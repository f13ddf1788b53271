//! [`FleetIndex`]: the fleet plus the buckets that let best-fit find its node without walking
//! every node, and [`place_indexed`], which answers exactly what [`place`] would.
//!
//! ## Why it is exact
//! Best-fit picks the node with the smallest `(score, position)`, where the score is the
//! 12-element lexicographic vector of [`fit_node`]. Every schedulable node is filed under one
//! or more *classes*; each class holds a set of `(free CPU, node, GPU)` entries sorted by free
//! CPU, and from the class alone the index computes a lower bound of the first 11 score
//! elements (the 12th is free CPU minus the request's CPU, exact per entry). For every node
//! that fits, one of its entries' bound is ≤ its real score (for whole GPUs the node's own
//! entry; for MIG and shares the entry of the GPU the node would pick, whose bound is exact).
//! The search evaluates nodes with [`fit_node`] itself and skips an entry only when its
//! `(bound, position)` is already above the best `(score, position)` found, so the winner is
//! never skipped. Classes are visited in bound order, which makes the skipping early: in a
//! regular fleet the first node that fits in the best class is the answer.
//!
//! The classes (all per GPU type, all with the node's idle GPU count, best-fit's
//! "keep whole nodes free" term, in the key):
//! * **whole**: free whole GPUs and the free GPUs per NUMA node (sorted). The bound:
//!   `[0, one NUMA node cannot hold the set, free − count, NUMA pressure of the best possible
//!   set]`, exact when the node's GPUs are all NVLink-connected;
//! * **share**: one entry per GPU that can take shares, by (has tenants, free memory, tenants):
//!   the share score of that GPU, exact;
//! * **MIG**: one entry per MIG-mode GPU, by occupancy (empty, memory slices taken, compute
//!   slices used): the MIG score of that GPU, computed once per occupancy, exact;
//! * **CPU-only**: by GPU count: exact.
//!
//! When nothing fits free, the refusal must name every node's reason, in node order (ties
//! between causes go to the first seen). [`FleetIndex`] keeps a brief per node (schedulable,
//! free CPU/memory/disk, per GPU type: healthy, free whole and MIG-capable GPU counts) that
//! decides most nodes' reason as `fit_node` would; only nodes it cannot decide are evaluated.
//! Preemption then looks only at nodes holding spot work, the only ones it can use.
//! First-fit (whose answer is snapshot order, and which stops early anyway) and quota refusals
//! go to [`place`] unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::apply::{apply_at, release_at};
use crate::error::PlacementError;
use crate::mig;
use crate::place::{
    Ctx, Decision, Fit, Placement, Policy, Strategy, fit_node, idle_gpus, mig_gpu_score, place,
};
use crate::reasons::{Miss, Tally, Unschedulable};
use crate::request::{GpuDemand, PlacementRequest, Tier};
use crate::share::share_load;
use crate::snapshot::{Allocation, AllocationId, FleetSnapshot, GpuUse, Node};
use crate::{preempt, quota};

/// NUMA nodes per GPU type a node may have and still get the tight whole-GPU bound (more get
/// a weaker but still valid one).
const MAX_NUMA: usize = 8;

/// `(free CPU millis, node position, GPU position)`.
type Entry = (u64, u32, u32);

/// The first 11 score elements' lower bound of a class.
type Prefix = [u64; 11];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Class {
    /// Every schedulable node, for CPU-only requests.
    Cpu { gpus: u64, idle: u64 },
    /// Nodes with `free` whole-GPU-eligible GPUs of type `ty`; `numa`: the free GPUs per NUMA
    /// node, largest first, zero-padded (`None`: more NUMA nodes than [`MAX_NUMA`]).
    Whole {
        ty: u16,
        free: u32,
        numa: Option<[u8; MAX_NUMA]>,
        idle: u64,
    },
    /// GPUs that can take shares; `tier` 1 if they have no tenant yet; `fullness` is
    /// `u32::MAX − tenants` so that fuller GPUs sort first, as best-fit prefers them.
    Share {
        ty: u16,
        tier: u8,
        free_mib: u64,
        fullness: u32,
        idle: u64,
    },
    /// MIG-mode GPUs by occupancy.
    Mig {
        ty: u16,
        empty: bool,
        mask: u8,
        compute: u8,
        idle: u64,
    },
}

/// A [`FleetSnapshot`] with the buckets best-fit searches, kept in step by [`FleetIndex::apply`],
/// [`FleetIndex::release`] and [`FleetIndex::update_node`]. Owning the snapshot is what keeps
/// the two from drifting apart: there is no other way to change it.
#[derive(Debug, Clone)]
pub struct FleetIndex {
    fleet: FleetSnapshot,
    /// Interned GPU type ids (a fleet has a handful).
    types: Vec<String>,
    classes: BTreeMap<Class, BTreeSet<Entry>>,
    /// What each node is filed under, to take it out again.
    filed: Vec<Vec<(Class, Entry)>>,
    node_pos: HashMap<String, u32>,
    alloc_node: HashMap<AllocationId, u32>,
    /// Per node, what a refusal's reasons need to know without reading its GPUs.
    briefs: Vec<Brief>,
    /// Nodes holding spot work: the only ones preemption can use.
    spot: BTreeSet<u32>,
}

/// What the reasons for a refusal need of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Brief {
    schedulable: bool,
    free: crate::snapshot::Resources,
    types: Vec<(u16, TypeBrief)>,
}

/// Counts of one GPU type's GPUs on a node, as `whole::fit`, `share::fit` and `fit_mig` count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TypeBrief {
    /// Healthy, among the first 64 GPUs (whole-GPU fits look no further).
    healthy_64: u32,
    healthy: u32,
    /// Healthy, idle, not MIG, among the first 64.
    whole_free: u32,
    /// Healthy, MIG mode, holding nothing but MIG slices.
    mig: u32,
}

fn bad(msg: impl Into<String>) -> PlacementError {
    PlacementError::Inconsistent(msg.into())
}

impl FleetIndex {
    /// Indexes `fleet` (linear in its size; done once, then kept up to date incrementally).
    pub fn new(fleet: FleetSnapshot) -> Self {
        assert!(
            fleet.nodes.len() <= u32::MAX as usize,
            "more nodes than the index can number"
        );
        let mut index = Self {
            types: Vec::new(),
            classes: BTreeMap::new(),
            filed: vec![Vec::new(); fleet.nodes.len()],
            node_pos: HashMap::with_capacity(fleet.nodes.len()),
            alloc_node: HashMap::new(),
            briefs: vec![Brief::default(); fleet.nodes.len()],
            spot: BTreeSet::new(),
            fleet,
        };
        for (i, node) in index.fleet.nodes.iter().enumerate() {
            index.node_pos.entry(node.id.clone()).or_insert(i as u32);
            for a in &node.allocations {
                index.alloc_node.entry(a.id.clone()).or_insert(i as u32);
            }
        }
        for i in 0..index.fleet.nodes.len() {
            index.file(i);
        }
        index
    }

    /// The snapshot, as it is now.
    pub fn fleet(&self) -> &FleetSnapshot {
        &self.fleet
    }

    pub fn into_fleet(self) -> FleetSnapshot {
        self.fleet
    }

    /// Position of node `id` in [`FleetSnapshot::nodes`].
    pub fn node_position(&self, id: &str) -> Option<usize> {
        self.node_pos.get(id).map(|&p| p as usize)
    }

    /// [`crate::apply`] through the index: the same checks and the same result, in time
    /// proportional to one node rather than the fleet.
    pub fn apply(
        &mut self,
        policy: &Policy,
        req: &PlacementRequest,
        placement: &Placement,
        id: AllocationId,
    ) -> Result<(), PlacementError> {
        let pos = self
            .node_position(&placement.node_id)
            .ok_or_else(|| bad(format!("no node {}", placement.node_id)))?;
        if self.alloc_node.contains_key(&id) {
            return Err(bad(format!("allocation {id} exists already")));
        }
        apply_at(&mut self.fleet, pos, policy, req, placement, id.clone())?;
        for v in &placement.preempt {
            self.alloc_node.remove(v);
        }
        self.alloc_node.insert(id, pos as u32);
        self.refile(pos);
        Ok(())
    }

    /// [`crate::release`] through the index.
    pub fn release(&mut self, id: &AllocationId) -> Result<Allocation, PlacementError> {
        let pos = *self
            .alloc_node
            .get(id)
            .ok_or_else(|| bad(format!("no allocation {id}")))? as usize;
        let alloc = release_at(&mut self.fleet, pos, id)?;
        self.alloc_node.remove(id);
        self.refile(pos);
        Ok(alloc)
    }

    /// Changes node `pos` in place (cordon, health, inventory, …) and re-files it. The node's
    /// id must stay the same. Quota usage is not recomputed: keep it right yourself (or build
    /// a new index) if the change moves allocations.
    pub fn update_node<R>(&mut self, pos: usize, change: impl FnOnce(&mut Node) -> R) -> R {
        for a in &self.fleet.nodes[pos].allocations {
            self.alloc_node.remove(&a.id);
        }
        let id = self.fleet.nodes[pos].id.clone();
        let out = change(&mut self.fleet.nodes[pos]);
        assert_eq!(
            self.fleet.nodes[pos].id, id,
            "update_node must keep the node id"
        );
        for a in &self.fleet.nodes[pos].allocations {
            self.alloc_node.insert(a.id.clone(), pos as u32);
        }
        self.refile(pos);
        out
    }

    fn type_id(&self, gpu_type: &str) -> Option<u16> {
        self.types
            .iter()
            .position(|t| t == gpu_type)
            .map(|p| p as u16)
    }

    fn intern(&mut self, gpu_type: &str) -> u16 {
        self.type_id(gpu_type).unwrap_or_else(|| {
            assert!(self.types.len() < u16::MAX as usize, "too many GPU types");
            self.types.push(gpu_type.to_owned());
            (self.types.len() - 1) as u16
        })
    }

    fn refile(&mut self, pos: usize) {
        for (class, entry) in std::mem::take(&mut self.filed[pos]) {
            if let Some(set) = self.classes.get_mut(&class) {
                set.remove(&entry);
                if set.is_empty() {
                    self.classes.remove(&class);
                }
            }
        }
        self.file(pos);
    }

    /// Files node `pos` under its classes (it must not be filed yet).
    fn file(&mut self, pos: usize) {
        let entries = self.entries(pos);
        for &(class, entry) in &entries {
            self.classes.entry(class).or_default().insert(entry);
        }
        self.filed[pos] = entries;
        self.briefs[pos] = self.brief(pos);
        let node = &self.fleet.nodes[pos];
        if node.allocations.iter().any(|a| a.tier == Tier::Spot) {
            self.spot.insert(pos as u32);
        } else {
            self.spot.remove(&(pos as u32));
        }
    }

    fn brief(&mut self, pos: usize) -> Brief {
        let mut types: Vec<(u16, TypeBrief)> = Vec::new();
        for i in 0..self.fleet.nodes[pos].gpus.len() {
            let ty = self.intern(&self.fleet.nodes[pos].gpus[i].gpu_type.clone());
            let g = &self.fleet.nodes[pos].gpus[i];
            let t = match types.iter_mut().find(|(t, _)| *t == ty) {
                Some((_, t)) => t,
                None => {
                    types.push((ty, TypeBrief::default()));
                    &mut types.last_mut().expect("just pushed").1
                }
            };
            if !g.healthy {
                continue;
            }
            t.healthy += 1;
            if i < 64 {
                t.healthy_64 += 1;
                if !g.mig_enabled && matches!(g.used, GpuUse::Idle) {
                    t.whole_free += 1;
                }
            }
            if g.mig_enabled && matches!(g.used, GpuUse::Idle | GpuUse::Mig(_)) {
                t.mig += 1;
            }
        }
        let node = &self.fleet.nodes[pos];
        Brief {
            schedulable: node.schedulable,
            free: node.free,
            types,
        }
    }

    /// Why node `pos` cannot take `ctx`'s request, if its brief can tell (as `fit_node`
    /// would say it); `None` when only the node's GPUs can tell.
    fn quick_miss(&self, pos: usize, ctx: &Ctx<'_>, ty: Option<u16>) -> Option<Miss> {
        let b = &self.briefs[pos];
        let req = ctx.req;
        if !b.schedulable {
            return Some(Miss::NotSchedulable);
        }
        let t = if req.wants_gpu() {
            match b.types.iter().find(|(t, _)| Some(*t) == ty) {
                Some((_, t)) => Some(t),
                None => return Some(Miss::NoGpuType),
            }
        } else {
            None
        };
        if b.free.cpu_millis < req.cpu_millis {
            return Some(Miss::Cpu);
        }
        if b.free.memory_mib < req.memory_mib {
            return Some(Miss::Memory);
        }
        if b.free.disk_gib < req.disk_gib {
            return Some(Miss::Disk);
        }
        let t = t?;
        match &req.gpu {
            GpuDemand::None => None,
            GpuDemand::Whole { count, .. } => {
                if t.healthy_64 == 0 {
                    Some(Miss::UnhealthyGpus)
                } else if t.whole_free == 0 {
                    Some(Miss::NoFreeGpus)
                } else if t.whole_free < *count {
                    Some(Miss::TooFewFreeGpus { free: t.whole_free })
                } else {
                    None
                }
            }
            GpuDemand::Share { .. } => (t.healthy == 0).then_some(Miss::UnhealthyGpus),
            GpuDemand::Mig { .. } => {
                if t.healthy == 0 {
                    Some(Miss::UnhealthyGpus)
                } else if t.mig == 0 {
                    Some(Miss::MigModeOff)
                } else {
                    None
                }
            }
        }
    }

    /// The refusal (or preemption) [`place`] would answer when nothing fits free, computed
    /// from the briefs in node order (the reasons' order depends on it), reading a node's GPUs
    /// only when its brief cannot tell. `None` if some node turns out to fit after all.
    fn refuse(&self, ctx: &Ctx<'_>) -> Option<Decision> {
        let ty = self.type_id(&ctx.req.gpu_type);
        let mut tally = Tally::default();
        for (pos, node) in self.fleet.nodes.iter().enumerate() {
            let miss = match self.quick_miss(pos, ctx, ty) {
                Some(miss) => miss,
                None => fit_node(node, ctx).err()?,
            };
            tally.add(miss);
        }
        let mut reasons = tally.into_reasons(ctx.req, ctx.policy.share_tenants_per_gpu);
        if ctx.policy.preemption
            && ctx.req.tier == Tier::OnDemand
            && let Some(p) = preempt::find_among(
                &self.fleet.nodes,
                self.spot.iter().map(|&p| p as usize),
                ctx,
            )
        {
            return Some(Decision::Placed(p));
        }
        reasons.shrink_to_fit();
        Some(Decision::Unschedulable(Unschedulable { reasons }))
    }

    /// The classes node `pos` belongs to, with its entry in each.
    fn entries(&mut self, pos: usize) -> Vec<(Class, Entry)> {
        let node = &self.fleet.nodes[pos];
        let mut out = Vec::new();
        if !node.schedulable {
            return out;
        }
        let cpu = node.free.cpu_millis;
        let idle = idle_gpus(node);
        let p = pos as u32;
        out.push((
            Class::Cpu {
                gpus: node.gpus.len() as u64,
                idle,
            },
            (cpu, p, 0),
        ));
        let mut seen: Vec<&str> = Vec::new();
        let types: Vec<String> = node
            .gpus
            .iter()
            .filter(|g| {
                let new = !seen.contains(&g.gpu_type.as_str());
                if new {
                    seen.push(&g.gpu_type);
                }
                new
            })
            .map(|g| g.gpu_type.clone())
            .collect();
        let ids: Vec<u16> = types.iter().map(|t| self.intern(t)).collect();
        let node = &self.fleet.nodes[pos];
        for (gpu_type, &ty) in types.iter().zip(&ids) {
            // Whole GPUs: as in `whole::fit`, the first 64 GPUs, healthy, idle, not MIG.
            let mut free = 0u32;
            let mut groups: Vec<(Option<u32>, u8)> = Vec::new();
            for g in node.gpus.iter().take(64) {
                if &g.gpu_type == gpu_type
                    && g.healthy
                    && !g.mig_enabled
                    && matches!(g.used, GpuUse::Idle)
                {
                    free += 1;
                    match groups.iter_mut().find(|(n, _)| *n == g.numa_node) {
                        Some((_, c)) => *c += 1,
                        None => groups.push((g.numa_node, 1)),
                    }
                }
            }
            if free > 0 {
                let numa = (groups.len() <= MAX_NUMA).then(|| {
                    let mut sizes = [0u8; MAX_NUMA];
                    for (s, (_, c)) in sizes.iter_mut().zip(&groups) {
                        *s = *c;
                    }
                    sizes.sort_unstable_by(|a, b| b.cmp(a));
                    sizes
                });
                out.push((
                    Class::Whole {
                        ty,
                        free,
                        numa,
                        idle,
                    },
                    (cpu, p, 0),
                ));
            }
            let geom = mig::geometry(gpu_type);
            for (gi, g) in node.gpus.iter().enumerate() {
                if &g.gpu_type != gpu_type || !g.healthy {
                    continue;
                }
                let entry = (cpu, p, gi as u32);
                if let Some((tenants, used)) = share_load(node, gi) {
                    if used <= g.memory_mib {
                        out.push((
                            Class::Share {
                                ty,
                                tier: u8::from(tenants == 0),
                                free_mib: g.memory_mib - used,
                                fullness: u32::MAX - tenants,
                                idle,
                            },
                            entry,
                        ));
                    }
                } else if g.mig_enabled
                    && let Some(geom) = geom
                {
                    let slices: &[_] = match &g.used {
                        GpuUse::Idle => &[],
                        GpuUse::Mig(v) => v,
                        GpuUse::Whole(_) | GpuUse::Shared(_) => continue,
                    };
                    let occ = geom.occupancy(slices);
                    out.push((
                        Class::Mig {
                            ty,
                            empty: slices.is_empty(),
                            mask: occ.memory_mask,
                            compute: occ.compute_used,
                            idle,
                        },
                        entry,
                    ));
                }
            }
        }
        out
    }

    /// Best-fit's node and fit for `ctx`, or `None` if no node fits.
    pub(crate) fn best_fit(&self, ctx: &Ctx<'_>) -> Option<(usize, Fit)> {
        let req = ctx.req;
        let mut search = Search {
            nodes: &self.fleet.nodes,
            ctx,
            cpu: req.cpu_millis,
            best: None,
        };
        let ty = self.type_id(&req.gpu_type);
        let (lo, hi, sorted) = match &req.gpu {
            GpuDemand::None => (
                Class::Cpu { gpus: 0, idle: 0 },
                Class::Cpu {
                    gpus: u64::MAX,
                    idle: u64::MAX,
                },
                true,
            ),
            GpuDemand::Whole { count, .. } => (
                Class::Whole {
                    ty: ty?,
                    free: *count,
                    numa: None,
                    idle: 0,
                },
                Class::Whole {
                    ty: ty?,
                    free: u32::MAX,
                    numa: Some([u8::MAX; MAX_NUMA]),
                    idle: u64::MAX,
                },
                false,
            ),
            // Key order is bound order within a tier; the tiers are walked one after the other.
            GpuDemand::Share { memory_mib } => {
                for tier in [0u8, 1] {
                    let lo = Class::Share {
                        ty: ty?,
                        tier,
                        free_mib: *memory_mib,
                        fullness: 0,
                        idle: 0,
                    };
                    let hi = Class::Share {
                        ty: ty?,
                        tier,
                        free_mib: u64::MAX,
                        fullness: u32::MAX,
                        idle: u64::MAX,
                    };
                    for (class, set) in self.classes.range(lo..=hi) {
                        if let Some(prefix) = class_bound(class, ctx)
                            && !search.visit(&prefix, set)
                        {
                            return search.best;
                        }
                    }
                }
                return search.best;
            }
            GpuDemand::Mig { .. } => (
                Class::Mig {
                    ty: ty?,
                    empty: false,
                    mask: 0,
                    compute: 0,
                    idle: 0,
                },
                Class::Mig {
                    ty: ty?,
                    empty: true,
                    mask: u8::MAX,
                    compute: u8::MAX,
                    idle: u64::MAX,
                },
                false,
            ),
        };
        let mut classes: Vec<(Prefix, &BTreeSet<Entry>)> = self
            .classes
            .range(lo..=hi)
            .filter_map(|(class, set)| Some((class_bound(class, ctx)?, set)))
            .collect();
        if !sorted {
            // Stable: equal bounds keep key order (correctness does not depend on it).
            classes.sort_by_key(|a| a.0);
        }
        for (prefix, set) in &classes {
            if !search.visit(prefix, set) {
                break;
            }
        }
        search.best
    }

    /// For node `pos` and request `ctx`: the smallest full-score bound over the node's entries
    /// (`None` if none of its classes admits the request). Tests check it against the node's
    /// real score.
    #[cfg(test)]
    pub(crate) fn node_bound(&self, pos: usize, ctx: &Ctx<'_>) -> Option<[u64; 12]> {
        let ty = self.type_id(&ctx.req.gpu_type);
        self.filed[pos]
            .iter()
            .filter(|(class, _)| match (class, &ctx.req.gpu) {
                (Class::Cpu { .. }, GpuDemand::None) => true,
                (Class::Whole { ty: t, .. }, GpuDemand::Whole { .. })
                | (Class::Share { ty: t, .. }, GpuDemand::Share { .. })
                | (Class::Mig { ty: t, .. }, GpuDemand::Mig { .. }) => Some(*t) == ty,
                _ => false,
            })
            .filter_map(|(class, (cpu, _, _))| {
                let prefix = class_bound(class, ctx)?;
                let mut b = [0u64; 12];
                b[..11].copy_from_slice(&prefix);
                b[11] = cpu.checked_sub(ctx.req.cpu_millis)?;
                Some(b)
            })
            .min()
    }

    /// Checks the buckets against a fresh build (tests only).
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        let fresh = FleetIndex::new(self.fleet.clone());
        // Type ids may be numbered differently; compare by name.
        let named = |ix: &FleetIndex| -> BTreeSet<(String, String)> {
            ix.classes
                .iter()
                .flat_map(|(c, set)| {
                    let (ty, c) = match *c {
                        Class::Cpu { .. } => (String::new(), *c),
                        Class::Whole { ty, .. }
                        | Class::Share { ty, .. }
                        | Class::Mig { ty, .. } => (ix.types[ty as usize].clone(), c.with_ty(0)),
                    };
                    set.iter()
                        .map(move |e| (ty.clone(), format!("{c:?} {e:?}")))
                })
                .collect()
        };
        assert_eq!(named(self), named(&fresh), "index drifted from its fleet");
        assert_eq!(self.alloc_node, fresh.alloc_node);
        assert_eq!(self.node_pos, fresh.node_pos);
        assert_eq!(self.spot, fresh.spot);
        let named_briefs = |ix: &FleetIndex| -> Vec<(bool, Vec<(String, TypeBrief)>)> {
            ix.briefs
                .iter()
                .map(|b| {
                    let mut t: Vec<_> = b
                        .types
                        .iter()
                        .map(|(ty, t)| (ix.types[*ty as usize].clone(), *t))
                        .collect();
                    t.sort_by(|a, b| a.0.cmp(&b.0));
                    (b.schedulable, t)
                })
                .collect()
        };
        assert_eq!(named_briefs(self), named_briefs(&fresh));
        let free = |ix: &FleetIndex| ix.briefs.iter().map(|b| b.free).collect::<Vec<_>>();
        assert_eq!(free(self), free(&fresh));
    }
}

#[cfg(test)]
impl Class {
    fn with_ty(self, t: u16) -> Class {
        match self {
            Class::Cpu { .. } => self,
            Class::Whole {
                ty: _,
                free,
                numa,
                idle,
            } => Class::Whole {
                ty: t,
                free,
                numa,
                idle,
            },
            Class::Share {
                ty: _,
                tier,
                free_mib,
                fullness,
                idle,
            } => Class::Share {
                ty: t,
                tier,
                free_mib,
                fullness,
                idle,
            },
            Class::Mig {
                ty: _,
                empty,
                mask,
                compute,
                idle,
            } => Class::Mig {
                ty: t,
                empty,
                mask,
                compute,
                idle,
            },
        }
    }
}

/// Lower bound of the first 11 score elements of any node filed under `class` for `ctx`
/// (`None`: the class cannot take the request). The caller picks classes of the request's
/// kind and GPU type.
fn class_bound(class: &Class, ctx: &Ctx<'_>) -> Option<Prefix> {
    let mut p = [0u64; 11];
    match (*class, &ctx.req.gpu) {
        (Class::Cpu { gpus, idle }, GpuDemand::None) => {
            p[0] = gpus;
            p[1] = idle;
        }
        (
            Class::Whole {
                free, numa, idle, ..
            },
            GpuDemand::Whole { count, .. },
        ) => {
            if free < *count {
                return None;
            }
            p = whole_bound(free, numa, idle, *count);
        }
        (
            Class::Share {
                tier,
                free_mib,
                fullness,
                idle,
                ..
            },
            GpuDemand::Share { memory_mib },
        ) => {
            let limit = ctx.policy.share_tenants_per_gpu;
            let tenants = u32::MAX - fullness;
            if tenants >= limit || free_mib < *memory_mib {
                return None;
            }
            p[0] = u64::from(tier);
            p[1] = free_mib - memory_mib;
            p[2] = u64::from(limit - tenants - 1);
            p[10] = idle;
        }
        (
            Class::Mig {
                empty,
                mask,
                compute,
                idle,
                ..
            },
            GpuDemand::Mig { .. },
        ) => {
            let (geom, prof) = ctx.mig.expect("MIG context resolved in Ctx::new");
            let occ = mig::Occupancy {
                memory_mask: mask,
                compute_used: compute,
            };
            let (_, s) = mig_gpu_score(geom, prof, occ, empty)?;
            p[..9].copy_from_slice(&s);
            p[10] = idle;
        }
        _ => return None,
    }
    Some(p)
}

/// Lower bound of a whole-GPU fit's score on a node of class (`free`, `numa`, `idle`) for
/// `count` GPUs. `whole::fit` minimises [not NVLink clique, not one NUMA node, free − count,
/// NUMA pressure] where a GPU's pressure is the free GPUs on its NUMA node. With NUMA sizes
/// a₁…aₖ: if some aᵢ ≥ count the best conceivable set is a clique on the smallest such NUMA
/// node (pressure count × aᵢ); otherwise every set spans NUMA nodes and its pressure is at
/// least the sum of the `count` smallest GPU pressures.
fn whole_bound(free: u32, numa: Option<[u8; MAX_NUMA]>, idle: u64, count: u32) -> Prefix {
    let mut p = [0u64; 11];
    p[2] = u64::from(free - count);
    p[10] = idle;
    if let Some(sizes) = numa {
        let c = u64::from(count);
        match sizes
            .iter()
            .map(|&a| u64::from(a))
            .filter(|&a| a >= c)
            .min()
        {
            Some(a) => p[3] = c * a,
            None => {
                p[1] = 1;
                let mut left = c;
                // Sizes are sorted largest first: walk them from the smallest.
                for a in sizes.iter().rev().map(|&a| u64::from(a)).filter(|&a| a > 0) {
                    let take = a.min(left);
                    p[3] += take * a;
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
    }
    p
}

/// Branch and bound over classes: keeps the best `(score, position)` seen and skips entries
/// whose bound is above it.
struct Search<'a> {
    nodes: &'a [Node],
    ctx: &'a Ctx<'a>,
    /// The request's CPU: entries below it cannot fit, entries above it score `free − cpu`.
    cpu: u64,
    best: Option<(usize, Fit)>,
}

impl Search<'_> {
    /// Visits one class; `false` if its bound (and so every later class's) is above the best.
    fn visit(&mut self, prefix: &Prefix, set: &BTreeSet<Entry>) -> bool {
        let bound = |extra: u64| -> [u64; 12] {
            let mut b = [0u64; 12];
            b[..11].copy_from_slice(prefix);
            b[11] = extra;
            b
        };
        if let Some((_, b)) = &self.best
            && b.score < bound(0)
        {
            return false;
        }
        let mut last = None;
        for &(cpu, node, _) in set.range((self.cpu, 0, 0)..) {
            let node = node as usize;
            if let Some((bi, b)) = &self.best
                && (bound(cpu - self.cpu), node) > (b.score, *bi)
            {
                break;
            }
            // A node's GPUs of one class sit next to each other: evaluate it once.
            if last == Some(node) {
                continue;
            }
            last = Some(node);
            if let Ok(fit) = fit_node(&self.nodes[node], self.ctx)
                && self
                    .best
                    .as_ref()
                    .is_none_or(|(bi, b)| (fit.score, node) < (b.score, *bi))
            {
                self.best = Some((node, fit));
            }
        }
        true
    }
}

/// [`place`] on an indexed fleet: the same decision, found through the buckets for best-fit
/// and explained from the briefs when refused. First-fit and quota refusals take [`place`]'s
/// own path.
pub fn place_indexed(
    req: &PlacementRequest,
    index: &FleetIndex,
    policy: &Policy,
) -> Result<Decision, PlacementError> {
    let fleet = &index.fleet;
    if policy.strategy == Strategy::BestFit {
        let ctx = Ctx::new(req, policy)?;
        if quota::check(fleet, req).is_none() {
            if let Some((i, fit)) = index.best_fit(&ctx) {
                let node = &fleet.nodes[i];
                return Ok(Decision::Placed(Placement {
                    node_id: node.id.clone(),
                    gpus: fit.assignment(node, req, &ctx),
                    preempt: Vec::new(),
                }));
            }
            if let Some(d) = index.refuse(&ctx) {
                return Ok(d);
            }
        }
    }
    place(req, fleet, policy)
}

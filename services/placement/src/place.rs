//! The decision: try every node, keep the best fit (or the first, for first-fit), explain the
//! rest; fall back to preempting spot work for on-demand requests.

use serde::{Deserialize, Serialize};

use crate::error::PlacementError;
use crate::mig::{self, MigGeometry, MigProfile, Occupancy};
use crate::reasons::{Miss, Tally, Unschedulable};
use crate::request::{GpuDemand, PlacementRequest, Tier};
use crate::snapshot::{AllocationId, FleetSnapshot, GpuUse, Node};
use crate::{preempt, quota, share, whole};

/// How to choose among nodes (and GPUs, and MIG positions) that all fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fill what is already partly used and keep whole free GPUs and whole free nodes for large
    /// requests; prefer NVLink-connected, single-NUMA sets; MIG positions that keep the large
    /// profiles placeable.
    #[default]
    BestFit,
    /// The first node in snapshot order that fits, the lowest-numbered GPUs and start position
    /// that fit. The baseline the benchmark compares against.
    FirstFit,
}

/// Knobs of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub strategy: Strategy,
    /// Most time-sliced tenants on one GPU.
    pub share_tenants_per_gpu: u32,
    /// Let on-demand requests that fit nowhere free preempt spot allocations.
    pub preemption: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            strategy: Strategy::BestFit,
            share_tenants_per_gpu: 4,
            preemption: true,
        }
    }
}

impl Policy {
    pub fn with_strategy(strategy: Strategy) -> Self {
        Self {
            strategy,
            ..Self::default()
        }
    }
}

/// The GPUs a placement takes on its node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum GpuAssignment {
    None,
    /// Whole GPUs by UUID, in node order. For passthrough these are all GPUs of the IOMMU
    /// groups taken.
    Whole {
        gpu_uuids: Vec<String>,
    },
    /// A MIG GPU instance at memory slices `start .. start + size` of GPU `gpu_uuid`.
    Mig {
        gpu_uuid: String,
        profile: String,
        start: u8,
        size: u8,
    },
    /// A time-sliced share of GPU `gpu_uuid` capped at `memory_mib`.
    Share {
        gpu_uuid: String,
        memory_mib: u64,
    },
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node_id: String,
    pub gpus: GpuAssignment,
    /// Spot allocations on the node to preempt first (empty unless nothing free fitted).
    pub preempt: Vec<AllocationId>,
}

/// The core's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Placed(Placement),
    Unschedulable(Unschedulable),
}

impl Decision {
    pub fn placement(&self) -> Option<&Placement> {
        match self {
            Decision::Placed(p) => Some(p),
            Decision::Unschedulable(_) => None,
        }
    }
}

/// Lexicographic score of a fit, lower is better.
pub(crate) type Score = [u64; 12];

/// What a fit takes on its node, by GPU position (turned into UUIDs only for the winner).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Choice {
    None,
    /// Bit mask over [`Node::gpus`] positions.
    Whole(u64),
    Mig {
        gpu: usize,
        start: u8,
    },
    Share {
        gpu: usize,
    },
}

/// One node's best option for the request.
pub(crate) struct Fit {
    pub choice: Choice,
    pub score: Score,
}

impl Fit {
    /// The placement's GPU part on `node` (the node the fit was computed for, or a copy of it
    /// with other allocations removed: GPU positions are the same).
    pub fn assignment(&self, node: &Node, req: &PlacementRequest, ctx: &Ctx<'_>) -> GpuAssignment {
        match self.choice {
            Choice::None => GpuAssignment::None,
            Choice::Whole(mask) => GpuAssignment::Whole {
                gpu_uuids: (0..node.gpus.len().min(64))
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| node.gpus[i].uuid.clone())
                    .collect(),
            },
            Choice::Mig { gpu, start } => {
                let (_, prof) = ctx.mig.expect("MIG context resolved in Ctx::new");
                GpuAssignment::Mig {
                    gpu_uuid: node.gpus[gpu].uuid.clone(),
                    profile: prof.name.to_owned(),
                    start,
                    size: prof.size,
                }
            }
            Choice::Share { gpu } => GpuAssignment::Share {
                gpu_uuid: node.gpus[gpu].uuid.clone(),
                memory_mib: match req.gpu {
                    GpuDemand::Share { memory_mib } => memory_mib,
                    _ => 0,
                },
            },
        }
    }
}

/// What a request needs, resolved once.
pub(crate) struct Ctx<'a> {
    pub req: &'a PlacementRequest,
    pub policy: &'a Policy,
    pub mig: Option<(&'static MigGeometry, &'static MigProfile)>,
}

impl<'a> Ctx<'a> {
    pub fn new(req: &'a PlacementRequest, policy: &'a Policy) -> Result<Self, PlacementError> {
        let mig = match &req.gpu {
            GpuDemand::None => None,
            GpuDemand::Whole { count, .. } => {
                if *count == 0 || *count > 64 {
                    return Err(PlacementError::InvalidRequest(format!(
                        "whole-GPU count must be 1..=64, not {count}"
                    )));
                }
                None
            }
            GpuDemand::Share { memory_mib } => {
                if *memory_mib == 0 {
                    return Err(PlacementError::InvalidRequest(
                        "a time-sliced share needs a memory cap above 0 MiB".into(),
                    ));
                }
                None
            }
            GpuDemand::Mig { profile } => Some(mig::lookup(&req.gpu_type, profile)?),
        };
        if req.wants_gpu() && req.gpu_type.is_empty() {
            return Err(PlacementError::InvalidRequest(
                "a GPU request needs a GPU type".into(),
            ));
        }
        Ok(Self { req, policy, mig })
    }
}

/// Healthy, idle, non-MIG GPUs of any type on `node` (best-fit's "keep whole nodes free" term).
pub(crate) fn idle_gpus(node: &Node) -> u64 {
    node.gpus
        .iter()
        .filter(|g| g.healthy && !g.mig_enabled && matches!(g.used, GpuUse::Idle))
        .count() as u64
}

/// Whether `node` can take the request, and how well.
pub(crate) fn fit_node(node: &Node, ctx: &Ctx<'_>) -> Result<Fit, Miss> {
    let req = ctx.req;
    if !node.schedulable {
        return Err(Miss::NotSchedulable);
    }
    if req.wants_gpu() && !node.has_gpu_type(&req.gpu_type) {
        return Err(Miss::NoGpuType);
    }
    if node.free.cpu_millis < req.cpu_millis {
        return Err(Miss::Cpu);
    }
    if node.free.memory_mib < req.memory_mib {
        return Err(Miss::Memory);
    }
    if node.free.disk_gib < req.disk_gib {
        return Err(Miss::Disk);
    }
    let strategy = ctx.policy.strategy;
    let first_fit = strategy == Strategy::FirstFit;
    let mut score: Score = [0; 12];
    let choice = match &req.gpu {
        GpuDemand::None => {
            if !first_fit {
                score[0] = node.gpus.len() as u64;
                score[1] = idle_gpus(node);
            }
            Choice::None
        }
        GpuDemand::Whole { count, passthrough } => {
            let w = whole::fit(
                node,
                &req.gpu_type,
                *count,
                *passthrough,
                req.require_nvlink,
                strategy,
            )?;
            score[..4].copy_from_slice(&w.score);
            Choice::Whole(w.mask)
        }
        GpuDemand::Share { memory_mib } => {
            let s = share::fit(
                node,
                &req.gpu_type,
                *memory_mib,
                ctx.policy.share_tenants_per_gpu,
                strategy,
            )?;
            score[..3].copy_from_slice(&s.score);
            Choice::Share { gpu: s.gpu }
        }
        GpuDemand::Mig { .. } => {
            let (geom, prof) = ctx.mig.expect("MIG context resolved in Ctx::new");
            let (gpu, start, s) = fit_mig(node, &req.gpu_type, geom, prof, first_fit)?;
            score[..9].copy_from_slice(&s);
            Choice::Mig { gpu, start }
        }
    };
    if !first_fit {
        // Keep whole free nodes for large requests, then the least leftover CPU.
        if req.wants_gpu() {
            score[10] = idle_gpus(node);
        }
        score[11] = node.free.cpu_millis - req.cpu_millis;
    }
    Ok(Fit { choice, score })
}

/// Best-fit start for `prof` on one MIG GPU with occupancy `occ` (`empty`: no slices at all)
/// and that GPU's score: [GPU was empty, memory slices left, then 255 − headroom per profile,
/// largest first]. Shared with the index, which scores every GPU of one occupancy at once.
pub(crate) fn mig_gpu_score(
    geom: &MigGeometry,
    prof: &MigProfile,
    occ: Occupancy,
    empty: bool,
) -> Option<(u8, [u64; 9])> {
    let (start, headroom) = geom.best_start(prof, occ)?;
    let mut score = [0u64; 9];
    score[0] = u64::from(empty);
    score[1] = u64::from(occ.free_memory_slices() - prof.size);
    for (s, h) in score[2..].iter_mut().zip(headroom) {
        *s = 255 - u64::from(h);
    }
    Some((start, score))
}

/// Best MIG GPU and start on `node`: (GPU position, start, score) where the score is [GPU was
/// empty, memory slices left, then 255 − headroom per profile, largest first].
fn fit_mig(
    node: &Node,
    gpu_type: &str,
    geom: &MigGeometry,
    prof: &MigProfile,
    first_fit: bool,
) -> Result<(usize, u8, [u64; 9]), Miss> {
    let mut any_healthy = false;
    let mut any_mig = false;
    let mut best: Option<(usize, u8, [u64; 9])> = None;
    for (i, g) in node.gpus.iter().enumerate() {
        if g.gpu_type != gpu_type || !g.healthy {
            continue;
        }
        any_healthy = true;
        if !g.mig_enabled {
            continue;
        }
        let slices: &[_] = match &g.used {
            GpuUse::Idle => &[],
            GpuUse::Mig(v) => v,
            GpuUse::Whole(_) | GpuUse::Shared(_) => continue,
        };
        any_mig = true;
        let occ = geom.occupancy(slices);
        if first_fit {
            if let Some(start) = geom.free_starts(prof, occ).next() {
                return Ok((i, start, [0; 9]));
            }
            continue;
        }
        let Some((start, score)) = mig_gpu_score(geom, prof, occ, slices.is_empty()) else {
            continue;
        };
        if best.is_none_or(|(_, _, b)| score < b) {
            best = Some((i, start, score));
        }
    }
    match best {
        Some(b) => Ok(b),
        None if !any_healthy => Err(Miss::UnhealthyGpus),
        None if !any_mig => Err(Miss::MigModeOff),
        None => Err(Miss::NoMigPosition),
    }
}

/// Best fit over `nodes`, or the tally of why none fits.
pub(crate) fn best_node(nodes: &[Node], ctx: &Ctx<'_>) -> Result<(usize, Fit), Tally> {
    let mut tally = Tally::default();
    let mut best: Option<(usize, Fit)> = None;
    let first_fit = ctx.policy.strategy == Strategy::FirstFit;
    for (i, node) in nodes.iter().enumerate() {
        match fit_node(node, ctx) {
            Ok(fit) => {
                if first_fit {
                    return Ok((i, fit));
                }
                if best.as_ref().is_none_or(|(_, b)| fit.score < b.score) {
                    best = Some((i, fit));
                }
            }
            Err(miss) => {
                if best.is_none() {
                    tally.add(miss);
                }
            }
        }
    }
    best.ok_or(tally)
}

/// Decides where `req` goes in `fleet`.
///
/// Errors only for requests that make no sense (a MIG profile the GPU type does not have, a
/// zero count); "does not fit now" is [`Decision::Unschedulable`] with counted reasons.
pub fn place(
    req: &PlacementRequest,
    fleet: &FleetSnapshot,
    policy: &Policy,
) -> Result<Decision, PlacementError> {
    let ctx = Ctx::new(req, policy)?;
    let quota = quota::check(fleet, req);
    let found = best_node(&fleet.nodes, &ctx);
    let mut reasons = match (found, quota) {
        (Ok((i, fit)), None) => {
            return Ok(Decision::Placed(Placement {
                node_id: fleet.nodes[i].id.clone(),
                gpus: fit.assignment(&fleet.nodes[i], req, &ctx),
                preempt: Vec::new(),
            }));
        }
        (Ok(_), Some(q)) => {
            return Ok(Decision::Unschedulable(Unschedulable { reasons: vec![q] }));
        }
        (Err(tally), q) => {
            let mut r = tally.into_reasons(req, policy.share_tenants_per_gpu);
            if let Some(q) = q {
                r.push(q);
                return Ok(Decision::Unschedulable(Unschedulable { reasons: r }));
            }
            r
        }
    };
    if policy.preemption
        && req.tier == Tier::OnDemand
        && let Some(p) = preempt::find(&fleet.nodes, &ctx)
    {
        return Ok(Decision::Placed(p));
    }
    reasons.shrink_to_fit();
    Ok(Decision::Unschedulable(Unschedulable { reasons }))
}

//! The nearest requests that would place now, for a refusal's `state_reason`: "no 8 × h100-80gb
//! free; would place now: 4 × h100-80gb, 8 × a100-40gb".
//!
//! Candidates are close to the original by construction — the same shape on another GPU type,
//! fewer GPUs of the same type, a smaller MIG profile, a smaller share — and each is checked
//! with [`place_indexed`] on the same view, so every one offered would really be placed at this
//! moment (capacity may of course be taken before the tenant asks for it).

use crate::index::{FleetIndex, place_indexed};
use crate::place::{Decision, Policy};
use crate::request::{GpuDemand, PlacementRequest};

/// Up to `limit` requests near `req` that `index` would place now, nearest first.
pub fn alternatives(
    req: &PlacementRequest,
    index: &FleetIndex,
    policy: &Policy,
    limit: usize,
) -> Vec<PlacementRequest> {
    let mut types: Vec<String> = index
        .fleet()
        .nodes
        .iter()
        .flat_map(|n| n.gpus.iter().map(|g| g.gpu_type.clone()))
        .collect();
    types.sort();
    types.dedup();
    let mut out = Vec::new();
    for candidate in candidates(req, &types) {
        if out.len() >= limit {
            break;
        }
        if matches!(
            place_indexed(&candidate, index, policy),
            Ok(Decision::Placed(ref p)) if p.preempt.is_empty()
        ) && !out.contains(&candidate)
        {
            out.push(candidate);
        }
    }
    out
}

/// Nearest first: the same shape elsewhere, then smaller on the same type.
fn candidates(req: &PlacementRequest, types: &[String]) -> Vec<PlacementRequest> {
    let with = |gpu_type: &str, gpu: GpuDemand| PlacementRequest {
        gpu_type: gpu_type.to_owned(),
        gpu,
        ..req.clone()
    };
    let others = types.iter().filter(|t| **t != req.gpu_type);
    let mut out = Vec::new();
    match &req.gpu {
        GpuDemand::None => {}
        GpuDemand::Whole { count, passthrough } => {
            out.extend(others.map(|t| with(t, req.gpu.clone())));
            let mut c = count / 2;
            while c >= 1 {
                out.push(with(
                    &req.gpu_type,
                    GpuDemand::Whole {
                        count: c,
                        passthrough: *passthrough,
                    },
                ));
                c /= 2;
            }
        }
        GpuDemand::Mig { profile } => {
            for t in others {
                if crate::mig::lookup(t, profile).is_ok() {
                    out.push(with(t, req.gpu.clone()));
                }
            }
            if let Some(geometry) = crate::mig::geometry(&req.gpu_type) {
                let own = geometry.profiles.iter().find(|p| p.name == profile);
                for p in geometry.profiles.iter().rev() {
                    if own.is_some_and(|o| p.memory_mib < o.memory_mib) {
                        out.push(with(
                            &req.gpu_type,
                            GpuDemand::Mig {
                                profile: p.name.to_owned(),
                            },
                        ));
                    }
                }
            }
        }
        GpuDemand::Share { memory_mib } => {
            out.extend(others.map(|t| with(t, req.gpu.clone())));
            let mut m = memory_mib / 2;
            while m >= 1024 {
                out.push(with(&req.gpu_type, GpuDemand::Share { memory_mib: m }));
                m /= 2;
            }
        }
    }
    out
}

/// A request's GPU shape in words: "4 × h100-80gb", "h100-80gb MIG 3g.40gb",
/// "a 20 GiB share of an h100-80gb".
pub fn describe(req: &PlacementRequest) -> String {
    match &req.gpu {
        GpuDemand::None => "no GPU".to_owned(),
        GpuDemand::Whole { count, .. } => format!("{count} × {}", req.gpu_type),
        GpuDemand::Mig { profile } => format!("{} MIG {profile}", req.gpu_type),
        GpuDemand::Share { memory_mib } => {
            format!(
                "a {} GiB share of a {}",
                memory_mib.div_ceil(1024),
                req.gpu_type
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::AllocationId;
    use crate::snapshot::{FleetSnapshot, Gpu, GpuUse, Node, Resources};

    fn node(id: &str, gpu_type: &str, gpus: u32, busy: u32) -> Node {
        let gpus = (0..gpus)
            .map(|i| {
                let mut g = Gpu::new(&format!("{id}-{i}"), i, gpu_type, 81920);
                if i < busy {
                    g.used = GpuUse::Whole(AllocationId(format!("{id}-held-{i}")));
                }
                g
            })
            .collect();
        Node::new(
            id,
            Resources {
                cpu_millis: 64_000,
                memory_mib: 512 * 1024,
                disk_gib: 1000,
            },
            gpus,
        )
    }

    #[test]
    fn offers_only_what_would_place_now_nearest_first() {
        let fleet = FleetSnapshot::new(vec![
            node("h", "h100-80gb", 8, 5),
            node("a", "a100-80gb", 8, 0),
        ]);
        let index = FleetIndex::new(fleet);
        let req = PlacementRequest::whole("org", "h100-80gb", 8);
        let alts = alternatives(&req, &index, &Policy::default(), 3);
        let words: Vec<String> = alts.iter().map(describe).collect();
        // 8 A100s are free; 3 H100s are, so 2 × and 1 × fit but not 4 ×.
        assert_eq!(words, ["8 × a100-80gb", "2 × h100-80gb", "1 × h100-80gb"]);
    }

    #[test]
    fn smaller_mig_profiles_are_offered_for_a_full_mig_gpu() {
        let mut n = node("h", "h100-80gb", 1, 0);
        n.gpus[0].mig_enabled = true;
        let index = FleetIndex::new(FleetSnapshot::new(vec![n]));
        let req = PlacementRequest::mig("org", "h100-80gb", "7g.80gb");
        // Free, so the request itself would place: alternatives are only asked for refusals,
        // but the smaller profiles are still valid offers.
        let alts = alternatives(&req, &index, &Policy::default(), 2);
        assert_eq!(alts.len(), 2);
        assert!(
            alts.iter()
                .all(|a| matches!(&a.gpu, GpuDemand::Mig { profile } if profile != "7g.80gb"))
        );
    }
}

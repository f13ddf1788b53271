//! What is placed on each GPU, for the GPU source's [`set_load`](kiln_inventory::GpuSource::set_load):
//! the simulated source's gauges follow it, the real one ignores it.

use std::collections::BTreeMap;

use kiln_inventory::{HostInventory, Load};

use crate::state::{AppliedState, GpuUse};

/// Busy fraction of a whole GPU (or a passthrough one) with work on it.
pub const WHOLE_BUSY: f64 = 0.9;
/// Busy fraction one time-sliced share adds.
pub const SHARE_BUSY: f64 = 0.3;

/// The load on every GPU of `host` (by index) given what is applied; GPUs with nothing placed are
/// [`Load::IDLE`]. UUIDs that are not this host's are ignored (and logged by the caller).
pub fn gpu_loads(host: &HostInventory, state: &AppliedState) -> BTreeMap<u32, Load> {
    let mut loads: BTreeMap<u32, Load> = host.gpus.iter().map(|g| (g.index, Load::IDLE)).collect();
    let find = |uuid: &str| host.gpus.iter().find(|g| g.uuid == uuid);
    for a in state.assignments.values() {
        let mut add = |uuid: &str, memory_mib: Option<u64>, busy: f64| {
            if let Some(g) = find(uuid) {
                let l = loads.get_mut(&g.index).expect("every GPU has an entry");
                l.memory_mib =
                    (l.memory_mib + memory_mib.unwrap_or(g.memory_mib)).min(g.memory_mib);
                l.busy_fraction = (l.busy_fraction + busy).min(1.0);
            }
        };
        match &a.gpu_use {
            GpuUse::None => {}
            GpuUse::Whole { uuids } | GpuUse::Passthrough { uuids } => {
                for u in uuids {
                    add(u, None, WHOLE_BUSY);
                }
            }
            GpuUse::Share {
                gpu_uuid,
                memory_cap_mib,
            } => add(gpu_uuid, Some(*memory_cap_mib), SHARE_BUSY),
            GpuUse::Mig { gpu_uuid, profile } => {
                let Some(g) = find(gpu_uuid) else { continue };
                let max_slices = g
                    .mig
                    .profiles
                    .iter()
                    .map(|p| p.compute_slices)
                    .max()
                    .unwrap_or(1)
                    .max(1);
                let (memory, busy) = match g.mig.profiles.iter().find(|p| &p.name == profile) {
                    Some(p) => (
                        p.memory_mib,
                        WHOLE_BUSY * f64::from(p.compute_slices) / f64::from(max_slices),
                    ),
                    // A profile the inventory does not list: count it as a small slice.
                    None => (0, WHOLE_BUSY / f64::from(max_slices)),
                };
                add(gpu_uuid, Some(memory), busy);
            }
        }
    }
    loads
}

/// UUIDs an applied assignment names that this host does not have.
pub fn unknown_gpus(host: &HostInventory, state: &AppliedState) -> Vec<(String, String)> {
    state
        .assignments
        .iter()
        .flat_map(|(id, a)| a.gpu_uuids.iter().map(move |u| (id.clone(), u.clone())))
        .filter(|(_, u)| !host.gpus.iter().any(|g| &g.uuid == u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AppliedAssignment, SpecKind};
    use kiln_inventory::{GpuSource, SimulatedOptions, SimulatedSource};

    fn host() -> HostInventory {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../inventory/inventories/h100-sxm-8x.toml");
        SimulatedSource::load(&path, SimulatedOptions::default())
            .unwrap()
            .inventory()
            .unwrap()
    }

    fn with(entries: Vec<(&str, GpuUse)>) -> AppliedState {
        AppliedState {
            node_id: String::new(),
            applied_revision: 1,
            assignments: entries
                .into_iter()
                .map(|(id, gpu_use)| {
                    (
                        id.to_owned(),
                        AppliedAssignment {
                            generation: 1,
                            kind: SpecKind::Pod,
                            gpu_uuids: gpu_use.gpu_uuids(),
                            gpu_use,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn loads_follow_each_mode() {
        let h = host();
        let uuid = |i: usize| h.gpus[i].uuid.clone();
        let state = with(vec![
            (
                "whole",
                GpuUse::Whole {
                    uuids: vec![uuid(0), uuid(1)],
                },
            ),
            (
                "share-a",
                GpuUse::Share {
                    gpu_uuid: uuid(2),
                    memory_cap_mib: 10_000,
                },
            ),
            (
                "share-b",
                GpuUse::Share {
                    gpu_uuid: uuid(2),
                    memory_cap_mib: 20_000,
                },
            ),
            (
                "mig",
                GpuUse::Mig {
                    gpu_uuid: uuid(3),
                    profile: "3g.40gb".into(),
                },
            ),
            (
                "elsewhere",
                GpuUse::Whole {
                    uuids: vec!["GPU-not-here".into()],
                },
            ),
        ]);
        let loads = gpu_loads(&h, &state);
        assert_eq!(loads.len(), 8);
        assert_eq!(loads[&0].memory_mib, h.gpus[0].memory_mib);
        assert_eq!(loads[&0].busy_fraction, WHOLE_BUSY);
        assert_eq!(loads[&1].memory_mib, h.gpus[1].memory_mib);
        assert_eq!(loads[&2].memory_mib, 30_000);
        assert!((loads[&2].busy_fraction - 2.0 * SHARE_BUSY).abs() < 1e-9);
        let p = h.gpus[3]
            .mig
            .profiles
            .iter()
            .find(|p| p.name == "3g.40gb")
            .unwrap();
        assert_eq!(loads[&3].memory_mib, p.memory_mib);
        assert!(loads[&3].busy_fraction > 0.0 && loads[&3].busy_fraction < WHOLE_BUSY);
        for i in 4..8 {
            assert_eq!(loads[&i], Load::IDLE);
        }
        assert_eq!(
            unknown_gpus(&h, &state),
            vec![("elsewhere".to_owned(), "GPU-not-here".to_owned())]
        );
        // Removing everything resets every GPU.
        assert!(
            gpu_loads(&h, &AppliedState::default())
                .values()
                .all(|l| *l == Load::IDLE)
        );
    }

    #[test]
    fn loads_are_capped_by_the_gpu() {
        let h = host();
        let u = h.gpus[0].uuid.clone();
        let state = with(vec![
            (
                "a",
                GpuUse::Whole {
                    uuids: vec![u.clone()],
                },
            ),
            (
                "b",
                GpuUse::Share {
                    gpu_uuid: u,
                    memory_cap_mib: 1 << 40,
                },
            ),
        ]);
        let l = gpu_loads(&h, &state)[&0];
        assert_eq!(l.memory_mib, h.gpus[0].memory_mib);
        assert!(l.busy_fraction <= 1.0);
    }
}

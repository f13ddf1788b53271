//! The simulated GPU source: a declared inventory with synthetic metrics.
//!
//! Kiln's tests and local stack run where no GPU exists, and this is the one place the design
//! allows simulation (DESIGN.md, "Real components"). It implements the same
//! [`GpuSource`] trait as [`NvmlSource`](crate::NvmlSource) and produces the same data, so the
//! agent and the control plane cannot tell them apart:
//!
//! * the inventory comes from a TOML declaration ([`spec`]) — the shipped ones are in
//!   `agent/inventory/inventories/`;
//! * UUIDs are derived from host name and GPU index (UUIDv5), so a restarted agent reports the
//!   same GPUs and two simulated agents with different host names never collide;
//! * gauges follow what the agent says it placed ([`GpuSource::set_load`]): SM activity tracks the
//!   busy fraction, memory used the placed memory, power and temperature rise with activity
//!   up to the model's TDP and full-load temperature, with small seeded noise;
//! * faults can be injected in process or through a fault file, see [`faults`].

pub mod faults;
pub mod spec;
pub(crate) mod synth;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

pub use faults::Fault;
pub use spec::InventorySpec;

use crate::model::{
    GpuInfo, GpuSample, Health, HostInventory, MigInstance, MigPlacement, MigProfileInfo, MigState,
    XidEvent, xid_marks_unhealthy,
};
use crate::{GpuSource, InventoryError, Load};
use synth::Rng;

/// Namespace of the UUIDv5s the simulated source gives its GPUs and MIG instances.
const UUID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_3c2e_9a4d_4c57_8e21_5d0f_7a9b_3c10);

/// Options of a simulated source beyond its inventory file.
#[derive(Debug, Clone, Default)]
pub struct SimulatedOptions {
    /// Host name to report and derive UUIDs from; wins over the file's `hostname`, which wins
    /// over the kernel's host name.
    pub hostname: Option<String>,
    /// A fault file re-read at every sample (see [`faults`]).
    pub fault_file: Option<PathBuf>,
}

/// A host's GPUs as declared in an inventory file, with synthetic gauges and injectable faults.
#[derive(Debug)]
pub struct SimulatedSource {
    spec: InventorySpec,
    hostname: String,
    uuids: Vec<String>,
    fault_file: Option<PathBuf>,
    state: Mutex<SimState>,
}

#[derive(Debug)]
struct SimState {
    loads: Vec<Load>,
    /// `Fault::Unhealthy` reasons.
    injected: Vec<Option<String>>,
    /// Set by an injected XID that marks the GPU unhealthy.
    xid_unhealthy: Vec<Option<String>>,
    /// Injected XIDs not yet reported.
    pending_xids: Vec<Vec<u64>>,
    /// (corrected, uncorrected) volatile ECC counts.
    ecc: Vec<(u64, u64)>,
    /// XIDs the fault file listed at the previous sample (to report each appearance once).
    file_xids: BTreeSet<(u32, u64)>,
    mig_instances: Vec<Vec<MigInstance>>,
    rng: Rng,
}

impl SimulatedSource {
    /// Loads and validates an inventory file.
    pub fn load(path: &Path, options: SimulatedOptions) -> Result<Self, InventoryError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| InventoryError::ReadInventory {
                path: path.to_owned(),
                source,
            })?;
        Self::from_toml(&text, &path.display().to_string(), options)
    }

    /// Builds a source from inventory text; `origin` names it in errors.
    pub fn from_toml(
        text: &str,
        origin: &str,
        options: SimulatedOptions,
    ) -> Result<Self, InventoryError> {
        let spec = InventorySpec::parse(text, origin)?;
        Ok(Self::from_spec(spec, options))
    }

    /// Builds a source from an already validated declaration.
    pub fn from_spec(spec: InventorySpec, options: SimulatedOptions) -> Self {
        let hostname = options
            .hostname
            .or_else(|| spec.hostname.clone())
            .unwrap_or_else(crate::os_hostname);
        let count = spec.gpu.count as usize;
        let uuids: Vec<String> = (0..spec.gpu.count)
            .map(|i| gpu_uuid(&hostname, i))
            .collect();
        let mut mig_instances = vec![Vec::new(); count];
        for inst in &spec.mig_instances {
            let profile = spec
                .mig_profiles
                .iter()
                .find(|p| p.name == inst.profile)
                .expect("validated: instance profiles exist");
            mig_instances[inst.gpu as usize].push(MigInstance {
                profile: profile.name.clone(),
                placement: Some(MigPlacement {
                    start: inst.start,
                    size: profile.size,
                }),
                uuid: mig_uuid(&uuids[inst.gpu as usize], &profile.name, inst.start),
                memory_mib: profile.memory_mib,
            });
        }
        for list in &mut mig_instances {
            list.sort_by_key(|m| m.placement.map(|p| p.start));
        }
        let state = SimState {
            loads: vec![Load::IDLE; count],
            injected: vec![None; count],
            xid_unhealthy: vec![None; count],
            pending_xids: vec![Vec::new(); count],
            ecc: vec![(0, 0); count],
            file_xids: BTreeSet::new(),
            mig_instances,
            rng: Rng::new(fnv1a(hostname.as_bytes())),
        };
        Self {
            spec,
            hostname,
            uuids,
            fault_file: options.fault_file,
            state: Mutex::new(state),
        }
    }

    /// The declaration this source simulates.
    pub fn spec(&self) -> &InventorySpec {
        &self.spec
    }

    /// The fault file this source re-reads at every sample, if any.
    pub fn fault_file(&self) -> Option<&Path> {
        self.fault_file.as_deref()
    }

    /// Injects a fault; it shows in the next [`sample`](GpuSource::sample).
    pub fn inject(&self, fault: Fault) -> Result<(), InventoryError> {
        self.check_gpu(fault.gpu())?;
        let mut state = self.lock();
        match fault {
            Fault::Unhealthy { gpu, reason } => state.injected[gpu as usize] = Some(reason),
            Fault::Xid { gpu, code } => {
                state.pending_xids[gpu as usize].push(code);
                if xid_marks_unhealthy(code) {
                    state.xid_unhealthy[gpu as usize]
                        .get_or_insert_with(|| format!("XID {code} reported by the driver"));
                }
            }
            Fault::Ecc {
                gpu,
                corrected,
                uncorrected,
            } => {
                let counts = &mut state.ecc[gpu as usize];
                counts.0 += corrected;
                counts.1 += uncorrected;
            }
        }
        Ok(())
    }

    /// Clears every injected fault of a GPU, as a reset would: it reports healthy again (unless
    /// the fault file still says otherwise), pending XIDs are dropped, ECC counts return to 0.
    pub fn clear(&self, gpu: u32) -> Result<(), InventoryError> {
        self.check_gpu(gpu)?;
        let mut state = self.lock();
        let i = gpu as usize;
        state.injected[i] = None;
        state.xid_unhealthy[i] = None;
        state.pending_xids[i].clear();
        state.ecc[i] = (0, 0);
        Ok(())
    }

    fn check_gpu(&self, index: u32) -> Result<(), InventoryError> {
        if index >= self.spec.gpu.count {
            return Err(InventoryError::UnknownGpu {
                index,
                count: self.spec.gpu.count,
            });
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GpuSource for SimulatedSource {
    fn inventory(&self) -> Result<HostInventory, InventoryError> {
        let spec = &self.spec;
        let state = self.lock();
        let profiles: Vec<MigProfileInfo> = spec
            .mig_profiles
            .iter()
            .map(|p| MigProfileInfo {
                name: p.name.clone(),
                compute_slices: p.compute_slices().unwrap_or(0),
                memory_mib: p.memory_mib,
                placements: p.placements(),
            })
            .collect();
        let gpus = (0..spec.gpu.count)
            .map(|index| GpuInfo {
                index,
                uuid: self.uuids[index as usize].clone(),
                name: spec.gpu.model.clone(),
                gpu_type: Some(spec.gpu.type_id.clone()),
                memory_mib: spec.gpu.memory_mib,
                pci_bus_id: spec.pci_bus_id(index),
                numa_node: Some(spec.numa_node(index)),
                mig: MigState {
                    capable: spec.gpu.mig_capable,
                    enabled: spec.gpu.mig_enabled,
                    profiles: profiles.clone(),
                    instances: state.mig_instances[index as usize].clone(),
                },
                nvlink_peers: spec.nvlink_peers(index),
            })
            .collect();
        Ok(HostInventory::new(
            self.hostname.clone(),
            spec.driver_version.clone(),
            spec.cuda_version.clone(),
            gpus,
        ))
    }

    fn sample(&self) -> Result<Vec<GpuSample>, InventoryError> {
        let count = self.spec.gpu.count;
        let file = match &self.fault_file {
            Some(path) => faults::read_fault_file(path, count)?,
            None => faults::FileFaults::default(),
        };
        let mut state = self.lock();
        let new_file_xids: Vec<(u32, u64)> =
            file.xids.difference(&state.file_xids).copied().collect();
        state.file_xids = file.xids.clone();
        let mut samples = Vec::with_capacity(count as usize);
        for index in 0..count {
            let i = index as usize;
            let load = state.loads[i];
            let g = synth::gauges(&self.spec.gpu, load, &mut state.rng);
            let mut xids: Vec<u64> = std::mem::take(&mut state.pending_xids[i]);
            xids.extend(
                new_file_xids
                    .iter()
                    .filter(|(gpu, _)| *gpu == index)
                    .map(|(_, code)| *code),
            );
            let file_xid_reason = file
                .xids
                .iter()
                .find(|(gpu, code)| *gpu == index && xid_marks_unhealthy(*code))
                .map(|(_, code)| format!("XID {code} reported by the driver"));
            let reason = state.injected[i]
                .clone()
                .or_else(|| file.unhealthy.get(&index).cloned())
                .or(file_xid_reason)
                .or_else(|| state.xid_unhealthy[i].clone());
            let (corrected, uncorrected) = state.ecc[i];
            samples.push(GpuSample {
                index,
                uuid: self.uuids[i].clone(),
                temperature_c: Some(g.temperature_c),
                power_w: Some(g.power_w),
                sm_util_pct: Some(g.sm_util_pct),
                mem_util_pct: Some(g.mem_util_pct),
                memory_used_mib: Some(g.memory_used_mib),
                ecc_corrected: Some(corrected),
                ecc_uncorrected: Some(uncorrected),
                health: match reason {
                    Some(reason) => Health::Unhealthy { reason },
                    None => Health::Healthy,
                },
                xid_events: xids.into_iter().map(|code| XidEvent { code }).collect(),
            });
        }
        Ok(samples)
    }

    fn set_load(&self, gpu_index: u32, load: Load) -> Result<(), InventoryError> {
        self.check_gpu(gpu_index)?;
        self.lock().loads[gpu_index as usize] = load;
        Ok(())
    }
}

/// `GPU-<uuidv5(host/gpu/index)>`: stable across restarts, distinct across host names.
fn gpu_uuid(hostname: &str, index: u32) -> String {
    let id = Uuid::new_v5(
        &UUID_NAMESPACE,
        format!("{hostname}/gpu/{index}").as_bytes(),
    );
    format!("GPU-{id}")
}

/// `MIG-<uuidv5(parent/profile@start)>`.
fn mig_uuid(parent: &str, profile: &str, start: u32) -> String {
    let id = Uuid::new_v5(
        &UUID_NAMESPACE,
        format!("{parent}/mig/{profile}@{start}").as_bytes(),
    );
    format!("MIG-{id}")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

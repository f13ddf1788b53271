//! The real GPU source: NVML through `nvml-wrapper`.
//!
//! `nvml-wrapper` opens `libnvidia-ml.so.1` with `libloading` at run time, so this code builds
//! and the agent binary runs on hosts without NVIDIA software; there [`NvmlSource::open`] simply
//! returns [`InventoryError::NvmlLibraryMissing`] and [`open_source`](crate::open_source) falls
//! back to a simulated inventory if one is configured.
//!
//! What is wired, per GPU: index, UUID, name, memory, PCI bus id, NUMA node (NVML, falling back
//! to sysfs), MIG capability/mode, the MIG profiles the GPU offers and the MIG devices present
//! (UUID, profile from the device name, memory), NVLink peers (remote PCI id of every active
//! link, plus NVLink P2P status between GPU pairs so NVSwitch-connected GPUs count as peers),
//! volatile ECC counts, temperature, power, SM/memory utilisation, memory used; per host the
//! driver and CUDA versions. XID errors come from an NVML event set watched on a background
//! thread.
//!
//! What is not, because `nvml-wrapper` 0.13 has no safe call for it (and this workspace forbids
//! `unsafe`): the placement (start/size) of an existing MIG instance (`nvmlGpuInstanceGetInfo`
//! is not wrapped), and the possible placements of a profile (`possible_placements` returns an
//! empty list: the wrapper never sets the vector's length). Both are `None`/empty here; the
//! scheduler must treat a real MIG GPU's geometry as coming from its profile table.
//!
//! Health: a GPU is unhealthy after any XID not in [`APPLICATION_XIDS`](crate::APPLICATION_XIDS)
//! or after NVML reports it lost, and stays so until the agent restarts (a GPU that needed a
//! reset needs an operator anyway) — the device plugin's rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nvml_wrapper::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, P2pCapabilitiesIndex, P2pStatus, TemperatureSensor,
};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

use crate::model::{
    GpuInfo, GpuSample, Health, HostInventory, MigInstance, MigProfileInfo, MigState, XidEvent,
    gpu_type_for, xid_marks_unhealthy,
};
use crate::{GpuSource, InventoryError, Load};

/// The library name NVML is loaded from unless configured otherwise (what `nvml-wrapper` uses).
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVML's `NVML_NVLINK_MAX_LINKS` (H100 has 18 links).
const MAX_NVLINKS: u32 = 18;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_COUNT` in the headers `nvml-wrapper-sys` 0.10 carries.
const GPU_INSTANCE_PROFILE_COUNT: u32 = 17;
const MIB: u64 = 1024 * 1024;

/// How to open NVML.
#[derive(Debug, Clone, Default)]
pub struct NvmlOptions {
    /// Path or name of the NVML library; default [`DEFAULT_NVML_LIBRARY`].
    pub library: Option<PathBuf>,
    /// Host name to report; default the kernel's host name.
    pub hostname: Option<String>,
}

/// GPU inventory and metrics from the NVIDIA driver.
pub struct NvmlSource {
    nvml: Nvml,
    hostname: String,
    /// UUIDs read at open, so a GPU that falls off the bus can still be named in a sample.
    uuids: Vec<String>,
    /// XID codes per GPU index, filled by the watcher thread, drained by `sample`.
    xids: Arc<Mutex<BTreeMap<u32, Vec<u64>>>>,
    /// Why each GPU is unhealthy, once it is.
    unhealthy: Mutex<BTreeMap<u32, String>>,
    watcher: Option<XidWatcher>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("hostname", &self.hostname)
            .field("gpus", &self.uuids.len())
            .finish_non_exhaustive()
    }
}

impl NvmlSource {
    /// Opens NVML from the default library name.
    pub fn open() -> Result<Self, InventoryError> {
        Self::open_with(NvmlOptions::default())
    }

    /// Opens NVML; fails with a typed error when the library is absent, NVML will not
    /// initialise, or it sees no GPU.
    pub fn open_with(options: NvmlOptions) -> Result<Self, InventoryError> {
        let nvml = init_nvml(options.library.as_ref())?;
        let count = nvml.device_count().map_err(|source| InventoryError::Nvml {
            call: "nvmlDeviceGetCount",
            gpu: None,
            source,
        })?;
        if count == 0 {
            return Err(InventoryError::NvmlNoDevices);
        }
        let mut uuids = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = device(&nvml, index)?;
            uuids.push(
                device
                    .uuid()
                    .map_err(nvml_err("nvmlDeviceGetUUID", index))?,
            );
        }
        let hostname = match options.hostname {
            Some(h) => h,
            None => crate::os_hostname(),
        };
        let xids = Arc::new(Mutex::new(BTreeMap::new()));
        let watcher = XidWatcher::start(options.library, Arc::clone(&xids));
        Ok(Self {
            nvml,
            hostname,
            uuids,
            xids,
            unhealthy: Mutex::new(BTreeMap::new()),
            watcher,
        })
    }

    fn gpu_info(&self, index: u32, bus_ids: &[String]) -> Result<GpuInfo, InventoryError> {
        let device = device(&self.nvml, index)?;
        let name = device
            .name()
            .map_err(nvml_err("nvmlDeviceGetName", index))?;
        let memory_mib = device
            .memory_info()
            .map_err(nvml_err("nvmlDeviceGetMemoryInfo", index))?
            .total
            / MIB;
        let pci = device
            .pci_info()
            .map_err(nvml_err("nvmlDeviceGetPciInfo", index))?;
        let numa_node = device.numa_node_id().ok().or_else(|| {
            sysfs_numa_node(&format!(
                "{:04x}:{:02x}:{:02x}.0",
                pci.domain, pci.bus, pci.device
            ))
        });
        Ok(GpuInfo {
            index,
            uuid: self.uuids[index as usize].clone(),
            gpu_type: gpu_type_for(&name, memory_mib),
            name,
            memory_mib,
            pci_bus_id: pci.bus_id.to_ascii_uppercase(),
            numa_node,
            mig: mig_state(&device, index),
            nvlink_peers: self.nvlink_peers(&device, index, bus_ids),
        })
    }

    /// Peers over NVLink: the GPU at the far end of each active link, and — for GPUs whose
    /// links end at an NVSwitch — every GPU NVML reports NVLink P2P as possible with.
    fn nvlink_peers(&self, device: &Device<'_>, index: u32, bus_ids: &[String]) -> Vec<u32> {
        let mut peers = BTreeSet::new();
        let mut any_active = false;
        for link in 0..MAX_NVLINKS {
            let wrapper = device.link_wrapper_for(link);
            match wrapper.is_active() {
                Ok(true) => any_active = true,
                Ok(false) => continue,
                Err(NvmlError::InvalidArg | NvmlError::NotSupported) => break,
                Err(_) => continue,
            }
            if let Ok(remote) = wrapper.remote_pci_info()
                && let Some(peer) = bus_ids
                    .iter()
                    .position(|b| b.eq_ignore_ascii_case(&remote.bus_id))
            {
                peers.insert(peer as u32);
            }
        }
        if any_active {
            for other in 0..bus_ids.len() as u32 {
                if other == index || peers.contains(&other) {
                    continue;
                }
                if let Ok(other_device) = self.nvml.device_by_index(other)
                    && let Ok(P2pStatus::Ok) =
                        device.p2p_status(&other_device, P2pCapabilitiesIndex::NvLink)
                {
                    peers.insert(other);
                }
            }
        }
        peers.remove(&index);
        peers.into_iter().collect()
    }

    fn sample_gpu(&self, index: u32, xids: Vec<u64>) -> GpuSample {
        let mut unhealthy = self.unhealthy.lock().unwrap_or_else(|e| e.into_inner());
        for code in &xids {
            if xid_marks_unhealthy(*code) {
                unhealthy
                    .entry(index)
                    .or_insert_with(|| format!("XID {code} reported by the driver"));
            }
        }
        let mut sample = GpuSample {
            index,
            uuid: self.uuids[index as usize].clone(),
            temperature_c: None,
            power_w: None,
            sm_util_pct: None,
            mem_util_pct: None,
            memory_used_mib: None,
            ecc_corrected: None,
            ecc_uncorrected: None,
            health: Health::Healthy,
            xid_events: xids.into_iter().map(|code| XidEvent { code }).collect(),
        };
        let mut lost = false;
        let mut ok = |r: Result<u64, NvmlError>| match r {
            Ok(v) => Some(v),
            Err(NvmlError::GpuLost) => {
                lost = true;
                None
            }
            Err(_) => None,
        };
        match self.nvml.device_by_index(index) {
            Ok(device) => {
                sample.temperature_c =
                    ok(device.temperature(TemperatureSensor::Gpu).map(u64::from)).map(|t| t as u32);
                sample.power_w =
                    ok(device.power_usage().map(|mw| u64::from(mw) / 1000)).map(|w| w as u32);
                let util = device.utilization_rates();
                sample.sm_util_pct = ok(util.as_ref().map(|u| u64::from(u.gpu)).map_err(clone_err))
                    .map(|v| v as u32);
                sample.mem_util_pct = ok(util.map(|u| u64::from(u.memory))).map(|v| v as u32);
                sample.memory_used_mib = ok(device.memory_info().map(|m| m.used / MIB));
                sample.ecc_corrected =
                    ok(device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile));
                sample.ecc_uncorrected =
                    ok(device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
            }
            Err(NvmlError::GpuLost) => lost = true,
            Err(_) => {}
        }
        if lost {
            unhealthy
                .entry(index)
                .or_insert_with(|| "NVML reports the GPU lost (fallen off the bus)".to_owned());
        }
        if let Some(reason) = unhealthy.get(&index) {
            sample.health = Health::Unhealthy {
                reason: reason.clone(),
            };
        }
        sample
    }
}

impl GpuSource for NvmlSource {
    fn inventory(&self) -> Result<HostInventory, InventoryError> {
        let driver_version =
            self.nvml
                .sys_driver_version()
                .map_err(|source| InventoryError::Nvml {
                    call: "nvmlSystemGetDriverVersion",
                    gpu: None,
                    source,
                })?;
        let cuda = self
            .nvml
            .sys_cuda_driver_version()
            .map_err(|source| InventoryError::Nvml {
                call: "nvmlSystemGetCudaDriverVersion",
                gpu: None,
                source,
            })?;
        let cuda_version = format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(cuda),
            nvml_wrapper::cuda_driver_version_minor(cuda)
        );
        let count = self.uuids.len() as u32;
        let mut bus_ids = Vec::with_capacity(count as usize);
        for index in 0..count {
            let pci = device(&self.nvml, index)?
                .pci_info()
                .map_err(nvml_err("nvmlDeviceGetPciInfo", index))?;
            bus_ids.push(pci.bus_id);
        }
        let gpus = (0..count)
            .map(|index| self.gpu_info(index, &bus_ids))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HostInventory::new(
            self.hostname.clone(),
            driver_version,
            cuda_version,
            gpus,
        ))
    }

    fn sample(&self) -> Result<Vec<GpuSample>, InventoryError> {
        let mut xids = std::mem::take(&mut *self.xids.lock().unwrap_or_else(|e| e.into_inner()));
        Ok((0..self.uuids.len() as u32)
            .map(|index| self.sample_gpu(index, xids.remove(&index).unwrap_or_default()))
            .collect())
    }

    /// Real GPUs report their own utilisation; what the agent placed is irrelevant here.
    fn set_load(&self, gpu_index: u32, _load: Load) -> Result<(), InventoryError> {
        let count = self.uuids.len() as u32;
        if gpu_index >= count {
            return Err(InventoryError::UnknownGpu {
                index: gpu_index,
                count,
            });
        }
        Ok(())
    }
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
    }
}

fn init_nvml(library: Option<&PathBuf>) -> Result<Nvml, InventoryError> {
    let mut builder = Nvml::builder();
    if let Some(path) = library {
        builder.lib_path(path.as_os_str());
    }
    builder.init().map_err(|source| match source {
        NvmlError::LibloadingError(_) => InventoryError::NvmlLibraryMissing {
            library: library.map_or_else(
                || DEFAULT_NVML_LIBRARY.to_owned(),
                |p| p.display().to_string(),
            ),
            source,
        },
        source => InventoryError::NvmlInit { source },
    })
}

fn device(nvml: &Nvml, index: u32) -> Result<Device<'_>, InventoryError> {
    nvml.device_by_index(index)
        .map_err(nvml_err("nvmlDeviceGetHandleByIndex", index))
}

fn nvml_err(call: &'static str, gpu: u32) -> impl FnOnce(NvmlError) -> InventoryError {
    move |source| InventoryError::Nvml {
        call,
        gpu: Some(gpu),
        source,
    }
}

/// `NvmlError` is not `Clone`; keep the variant that matters (lost or not) when reusing one
/// result for two fields.
fn clone_err(e: &NvmlError) -> NvmlError {
    match e {
        NvmlError::GpuLost => NvmlError::GpuLost,
        _ => NvmlError::Unknown,
    }
}

fn sysfs_numa_node(address: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{address}/numa_node")).ok()?;
    // -1 means the platform has no NUMA information for the device.
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

fn mig_state(device: &Device<'_>, index: u32) -> MigState {
    let mode = match device.mig_mode() {
        Ok(mode) => mode,
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
            return MigState::default();
        }
        Err(error) => {
            tracing::warn!(gpu = index, %error, "could not read MIG mode; reporting MIG as unsupported");
            return MigState::default();
        }
    };
    let enabled = mode.current == 1; // NVML_DEVICE_MIG_ENABLE
    let mut profiles: Vec<MigProfileInfo> = (0..GPU_INSTANCE_PROFILE_COUNT)
        .filter_map(|id| {
            let info = device.profile_info(id).ok()?;
            Some(MigProfileInfo {
                name: profile_name(id, info.slice_count, info.memory_size_mb),
                compute_slices: info.slice_count,
                memory_mib: info.memory_size_mb,
                // nvml-wrapper 0.13's `possible_placements` always returns an empty list.
                placements: Vec::new(),
            })
        })
        .collect();
    profiles.sort_by_key(|p| (p.compute_slices, p.memory_mib));
    let mut instances = Vec::new();
    if enabled {
        let max = device.mig_device_count().unwrap_or(0);
        for slot in 0..max {
            let mig = match device.mig_device_by_index(slot) {
                Ok(mig) => mig,
                Err(NvmlError::NotFound) => continue,
                Err(_) => break,
            };
            let (Ok(uuid), Ok(name)) = (mig.uuid(), mig.name()) else {
                continue;
            };
            instances.push(MigInstance {
                profile: name
                    .rsplit_once("MIG ")
                    .map_or(name.clone(), |(_, p)| p.trim().to_owned()),
                placement: None,
                uuid,
                memory_mib: mig.memory_info().map(|m| m.total / MIB).unwrap_or(0),
            });
        }
    }
    MigState {
        capable: true,
        enabled,
        profiles,
        instances,
    }
}

/// `nvidia-smi` style profile name from NVML's profile id, slice count and memory. Memory is
/// rounded up to whole GiB, which reproduces NVIDIA's names for A100 and H100 (`7g.80gb` has
/// 79.25 GiB); the id's revision says which suffix the profile carries.
fn profile_name(id: u32, slices: u32, memory_mb: u64) -> String {
    let suffix = match id {
        7 | 8 => "+me",       // *_SLICE_REV1: with media extensions
        10..=12 => "+gfx",    // *_SLICE_GFX
        13 | 14 => "-me",     // *_SLICE_NO_ME
        15 | 16 => "+me.all", // *_SLICE_ALL_ME
        _ => "",
    };
    format!("{slices}g.{}gb{suffix}", memory_mb.div_ceil(1024))
}

/// A thread that owns its own NVML handle and an event set for critical XIDs on every GPU.
///
/// An `EventSet` borrows the `Nvml` it came from and is not `Sync`, so it cannot live in the
/// shared source; NVML is reference counted, so a second `init` in the thread is cheap.
struct XidWatcher {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl XidWatcher {
    const WAIT_MS: u32 = 500;

    /// Starts the watcher; `None` (and a warning) if the thread cannot be spawned.
    fn start(library: Option<PathBuf>, xids: Arc<Mutex<BTreeMap<u32, Vec<u64>>>>) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name("nvml-xid".into())
            .spawn(move || {
                if let Err(error) = watch_xids(library.as_ref(), &xids, &thread_stop) {
                    tracing::warn!(
                        error = %error_chain(error.as_ref()),
                        "XID events are not available; GPU health will only reflect lost GPUs"
                    );
                }
            });
        match spawned {
            Ok(handle) => Some(Self { stop, handle }),
            Err(error) => {
                tracing::warn!(%error, "could not start the XID watcher thread");
                None
            }
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

/// `error: cause: cause`, for a log line that shows the whole chain once.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn watch_xids(
    library: Option<&PathBuf>,
    xids: &Mutex<BTreeMap<u32, Vec<u64>>>,
    stop: &AtomicBool,
) -> Result<(), Box<dyn std::error::Error>> {
    let nvml = init_nvml(library)?;
    let mut set = nvml.create_event_set()?;
    let mut registered = 0;
    for index in 0..nvml.device_count()? {
        let device = nvml.device_by_index(index)?;
        let supported = device
            .supported_event_types()
            .unwrap_or_else(|_| EventTypes::empty());
        if supported.contains(EventTypes::CRITICAL_XID_ERROR) {
            set = device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| Box::new(e.error))?;
            registered += 1;
        }
    }
    if registered == 0 {
        return Err("no GPU supports critical-XID events".into());
    }
    while !stop.load(Ordering::Relaxed) {
        match set.wait(XidWatcher::WAIT_MS) {
            Ok(event) => {
                if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    continue;
                }
                let code = match event.event_data {
                    Some(XidError::Value(code)) => code,
                    _ => 0,
                };
                if let Ok(index) = event.device.index() {
                    tracing::warn!(gpu = index, xid = code, "XID event");
                    xids.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(index)
                        .or_default()
                        .push(code);
                }
            }
            Err(NvmlError::Timeout) => {}
            // A lost GPU is reported by `sample`; keep watching the others.
            Err(NvmlError::GpuLost | NvmlError::Unknown) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine has no NVIDIA driver: opening must fail with a typed error, not panic.
    #[test]
    fn open_fails_cleanly_without_nvidia() {
        match NvmlSource::open() {
            Err(
                e @ (InventoryError::NvmlLibraryMissing { .. }
                | InventoryError::NvmlInit { .. }
                | InventoryError::NvmlNoDevices),
            ) => {
                assert!(e.to_string().contains("NVML"), "{e}");
            }
            Err(other) => panic!("unexpected error kind: {other:?}"),
            // A host with a GPU: the real source must then describe it.
            Ok(source) => {
                let inventory = source.inventory().expect("inventory from NVML");
                assert!(!inventory.gpus.is_empty());
            }
        }
    }

    #[test]
    fn missing_library_names_the_library() {
        let err = NvmlSource::open_with(NvmlOptions {
            library: Some("/nonexistent/libnvidia-ml.so.1".into()),
            hostname: None,
        })
        .unwrap_err();
        assert!(
            matches!(err, InventoryError::NvmlLibraryMissing { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libnvidia-ml.so.1"), "{msg}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn profile_names_match_nvidia_smi() {
        assert_eq!(profile_name(0, 1, 9856), "1g.10gb");
        assert_eq!(profile_name(2, 3, 40448), "3g.40gb");
        assert_eq!(profile_name(4, 7, 81152), "7g.80gb");
        assert_eq!(profile_name(0, 1, 4864), "1g.5gb");
        assert_eq!(profile_name(7, 1, 9856), "1g.10gb+me");
    }
}

//! The plain-data model of a host's GPUs, shared by every [`GpuSource`](crate::GpuSource).
//!
//! These types are what an agent sends to the control plane (inventory once at registration and
//! when it changes, samples with every metrics report), so they are serde-serialisable, hold no
//! handles and no I/O, and mean the same whether NVML or the simulated source produced them.
//! A measurement the device cannot give (utilisation of a GPU in MIG mode, ECC on a GPU with ECC
//! off) is `None`, never a made-up zero.

use serde::{Deserialize, Serialize};

/// Everything the control plane needs to know about one host's GPUs to place work on them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInventory {
    pub hostname: String,
    /// NVIDIA kernel driver version, e.g. `550.90.07`.
    pub driver_version: String,
    /// Highest CUDA version the driver supports, `major.minor`, e.g. `12.4`.
    pub cuda_version: String,
    /// GPUs ordered by NVML index.
    pub gpus: Vec<GpuInfo>,
    /// `nvlink_matrix[i][j]` is true when GPU `gpus[i]` and GPU `gpus[j]` talk over NVLink
    /// (directly or through NVSwitch). Derived from [`GpuInfo::nvlink_peers`] by
    /// [`HostInventory::new`]; symmetric, false on the diagonal.
    pub nvlink_matrix: Vec<Vec<bool>>,
}

impl HostInventory {
    /// Assembles an inventory and derives the NVLink matrix from each GPU's peers.
    ///
    /// A link reported by only one side is still a link (NVML can fail to report one end), so
    /// the matrix is made symmetric; peers naming GPUs that are not in `gpus` are ignored.
    pub fn new(
        hostname: String,
        driver_version: String,
        cuda_version: String,
        gpus: Vec<GpuInfo>,
    ) -> Self {
        let n = gpus.len();
        let mut matrix = vec![vec![false; n]; n];
        for (i, gpu) in gpus.iter().enumerate() {
            for peer in &gpu.nvlink_peers {
                if let Some(j) = gpus.iter().position(|g| g.index == *peer)
                    && i != j
                {
                    matrix[i][j] = true;
                    matrix[j][i] = true;
                }
            }
        }
        Self {
            hostname,
            driver_version,
            cuda_version,
            gpus,
            nvlink_matrix: matrix,
        }
    }

    /// The GPU with NVML index `index`.
    pub fn gpu(&self, index: u32) -> Option<&GpuInfo> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// Whether GPUs `a` and `b` (NVML indexes) are NVLink-connected.
    pub fn nvlink_connected(&self, a: u32, b: u32) -> bool {
        let pos = |idx| self.gpus.iter().position(|g| g.index == idx);
        match (pos(a), pos(b)) {
            (Some(i), Some(j)) => self.nvlink_matrix[i][j],
            _ => false,
        }
    }
}

/// One physical GPU as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML index (the `nvidia-smi` index; stable while the host's PCI layout does not change).
    pub index: u32,
    /// `GPU-xxxxxxxx-…`; the identity the control plane keys GPUs by.
    pub uuid: String,
    /// Marketing name as the driver reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// The API's GPU type id (`h100-80gb`, `a100-40gb`, `l40s-48gb`, …) when known.
    pub gpu_type: Option<String>,
    /// Total framebuffer memory in MiB.
    pub memory_mib: u64,
    /// NVML form, `00000000:18:00.0` (domain:bus:device.function, hex upper case).
    pub pci_bus_id: String,
    /// NUMA node of the GPU's PCIe root, when the platform reports one.
    pub numa_node: Option<u32>,
    pub mig: MigState,
    /// NVML indexes of the GPUs this one reaches over NVLink (directly or through NVSwitch).
    pub nvlink_peers: Vec<u32>,
}

/// MIG capability, mode and the slices present on one GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigState {
    /// The GPU can be partitioned (A100, H100, …).
    pub capable: bool,
    /// MIG mode is on now: the GPU hosts only MIG instances.
    pub enabled: bool,
    /// GPU-instance profiles this GPU offers, smallest first.
    pub profiles: Vec<MigProfileInfo>,
    /// MIG instances that exist now (empty unless `enabled`).
    pub instances: Vec<MigInstance>,
}

/// One GPU-instance profile of a MIG-capable GPU (e.g. `1g.10gb`) and where it may be placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigProfileInfo {
    /// `nvidia-smi` style name: `<compute slices>g.<memory GB>gb`, e.g. `3g.40gb`.
    pub name: String,
    /// Compute slices (GPCs) of the profile: the `N` of `Ng`.
    pub compute_slices: u32,
    /// Memory of one instance of the profile in MiB.
    pub memory_mib: u64,
    /// Valid placements in memory-slice units. Empty when the source cannot tell (see
    /// [`NvmlSource`](crate::NvmlSource)).
    pub placements: Vec<MigPlacement>,
}

/// Where a MIG instance sits on its GPU, in memory-slice units (NVML's `start`/`size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigPlacement {
    pub start: u32,
    pub size: u32,
}

impl MigPlacement {
    /// Whether two placements share a memory slice.
    pub fn overlaps(&self, other: &MigPlacement) -> bool {
        self.start < other.start + other.size && other.start < self.start + self.size
    }
}

/// A MIG instance present on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigInstance {
    /// Profile name, e.g. `1g.10gb`.
    pub profile: String,
    /// Placement on the parent GPU; `None` when the source cannot tell.
    pub placement: Option<MigPlacement>,
    /// `MIG-xxxxxxxx-…`, the id a container's device request names.
    pub uuid: String,
    pub memory_mib: u64,
}

/// Health as the node sees it. An unhealthy GPU is taken out of capacity by the control plane
/// (without taking the node down) until a later sample reports it healthy again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy { reason: String },
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// An XID error the driver raised for a GPU (see NVIDIA's XID catalogue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidEvent {
    /// The XID code; `0` when NVML delivered a critical-XID event without a code.
    pub code: u64,
}

/// XIDs that are the application's fault (a bad kernel, a page fault in user code, a preempted
/// context) and say nothing about the GPU itself. Every other XID marks the GPU unhealthy —
/// the same rule as NVIDIA's Kubernetes device plugin.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Whether XID `code` should take the GPU out of capacity.
pub fn xid_marks_unhealthy(code: u64) -> bool {
    !APPLICATION_XIDS.contains(&code)
}

/// One reading of one GPU's gauges and counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    /// NVML index of the GPU.
    pub index: u32,
    pub uuid: String,
    pub temperature_c: Option<u32>,
    pub power_w: Option<u32>,
    /// Percent of time a kernel ran on the SMs over the driver's last sample period.
    pub sm_util_pct: Option<u32>,
    /// Percent of time device memory was read or written.
    pub mem_util_pct: Option<u32>,
    pub memory_used_mib: Option<u64>,
    /// Volatile (since driver load) corrected ECC errors.
    pub ecc_corrected: Option<u64>,
    /// Volatile (since driver load) uncorrected ECC errors.
    pub ecc_uncorrected: Option<u64>,
    pub health: Health,
    /// XID events raised since the previous sample (each is reported once).
    pub xid_events: Vec<XidEvent>,
}

/// What the agent has placed on one GPU, summed over everything placed there (whole-GPU work,
/// MIG instances, time-sliced shares).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Device memory the placed work may use, MiB.
    pub memory_mib: u64,
    /// Fraction of the GPU's compute the placed work keeps busy, `0.0..=1.0`.
    pub busy_fraction: f64,
}

impl Load {
    /// Nothing placed.
    pub const IDLE: Load = Load {
        memory_mib: 0,
        busy_fraction: 0.0,
    };
}

/// The API's GPU type id for a GPU the driver names `name` with `memory_mib` of memory, for the
/// models Kiln sells; `None` for anything else (the operator maps it by hand).
pub fn gpu_type_for(name: &str, memory_mib: u64) -> Option<String> {
    let gb = memory_mib.div_ceil(1024);
    let upper = name.to_ascii_uppercase();
    // Order matters: "H100" is a substring of nothing else here, but "L40S" contains "L40".
    let family = ["H200", "H100", "A100", "L40S", "L40", "A10G", "L4"]
        .into_iter()
        .find(|f| upper.contains(f))?;
    // Marketing sizes, matched loosely: the driver reports usable memory, a little under.
    let nominal = [24u64, 40, 48, 80, 94, 141]
        .into_iter()
        .find(|n| gb <= *n && gb + 4 >= *n)?;
    Some(format!("{}-{nominal}gb", family.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, peers: &[u32]) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "x".into(),
            gpu_type: None,
            memory_mib: 1,
            pci_bus_id: String::new(),
            numa_node: None,
            mig: MigState::default(),
            nvlink_peers: peers.to_vec(),
        }
    }

    #[test]
    fn matrix_is_symmetric_even_when_one_side_reports() {
        let inv = HostInventory::new(
            "h".into(),
            "d".into(),
            "c".into(),
            vec![gpu(0, &[1]), gpu(1, &[]), gpu(2, &[9])],
        );
        assert!(inv.nvlink_connected(0, 1));
        assert!(inv.nvlink_connected(1, 0));
        assert!(!inv.nvlink_connected(0, 2));
        assert!(!inv.nvlink_connected(2, 9), "unknown peers are ignored");
        assert!(!inv.nvlink_matrix[0][0]);
    }

    #[test]
    fn gpu_type_ids_for_the_models_we_sell() {
        assert_eq!(
            gpu_type_for("NVIDIA H100 80GB HBM3", 81559).as_deref(),
            Some("h100-80gb")
        );
        assert_eq!(
            gpu_type_for("NVIDIA A100-SXM4-40GB", 40960).as_deref(),
            Some("a100-40gb")
        );
        assert_eq!(
            gpu_type_for("NVIDIA L40S", 46068).as_deref(),
            Some("l40s-48gb")
        );
        assert_eq!(gpu_type_for("NVIDIA GeForce GTX 1080", 8192), None);
    }

    #[test]
    fn application_xids_do_not_mark_unhealthy() {
        assert!(!xid_marks_unhealthy(13));
        assert!(!xid_marks_unhealthy(31));
        assert!(xid_marks_unhealthy(48));
        assert!(xid_marks_unhealthy(79));
    }

    #[test]
    fn health_serialises_tagged() {
        let h = Health::Unhealthy {
            reason: "XID 79".into(),
        };
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, r#"{"state":"unhealthy","reason":"XID 79"}"#);
        assert_eq!(serde_json::from_str::<Health>(&json).unwrap(), h);
    }
}

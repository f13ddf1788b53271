//! GPU inventory and health of a Kiln node, behind one trait.
//!
//! The node agent has to tell the control plane exactly which GPUs its host has (model,
//! memory, PCI and NUMA placement, MIG state, NVLink wiring) and how they are doing (gauges,
//! ECC, XIDs, health), because placement and capacity are decided from that report. This crate
//! is that report's only producer:
//!
//! * [`model`] — the plain data ([`HostInventory`], [`GpuInfo`], [`GpuSample`], …) that goes over
//!   the wire; no handles, no I/O.
//! * [`GpuSource`] — the one trait the agent talks to.
//! * [`NvmlSource`] — the real thing, NVML via `nvml-wrapper`, loaded at run time so the same
//!   binary runs on hosts without NVIDIA software.
//! * [`SimulatedSource`] — a declared inventory (TOML, see [`sim::spec`]) with synthetic
//!   utilisation that follows what the agent placed, and fault injection for tests. Simulation
//!   is allowed only here, for the hardware a machine does not have (DESIGN.md).
//! * [`open_source`] — picks NVML when it works, else the configured simulated inventory, else
//!   fails with [`InventoryError::NoSource`], and the agent refuses to start with that message.
//!
//! The decisions made from this data (what fits where, when a GPU leaves capacity) live in the
//! control plane; this crate only describes.

pub mod error;
pub mod model;
pub mod nvml;
pub mod sim;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use error::InventoryError;
pub use model::{
    APPLICATION_XIDS, GpuInfo, GpuSample, Health, HostInventory, Load, MigInstance, MigPlacement,
    MigProfileInfo, MigState, XidEvent, gpu_type_for, xid_marks_unhealthy,
};
pub use nvml::{NvmlOptions, NvmlSource};
pub use sim::{Fault, SimulatedOptions, SimulatedSource};

/// Where a node's GPU facts come from. Implementations are cheap to call and thread-safe; the
/// agent calls `inventory` at registration (and when asked to refresh), `sample` on its metrics
/// tick, and `set_load` whenever what it placed on a GPU changes.
pub trait GpuSource: Send + Sync {
    /// The host and its GPUs.
    fn inventory(&self) -> Result<HostInventory, InventoryError>;

    /// One reading per GPU, in index order. XID events are reported once, by the first sample
    /// after they happen.
    fn sample(&self) -> Result<Vec<GpuSample>, InventoryError>;

    /// Tells the source the total of what is placed on GPU `gpu_index` now. The simulated
    /// source's gauges follow it; the real source ignores it (the hardware reports itself).
    fn set_load(&self, gpu_index: u32, load: Load) -> Result<(), InventoryError>;
}

/// Whether to try NVML.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NvmlPolicy {
    /// Use NVML when it opens (the default, and what production hosts run).
    #[default]
    Auto,
    /// Never try NVML: for running simulated agents on a development box that has a GPU.
    Disabled,
}

/// The `[gpu]` part of the agent's config.
///
/// ```toml
/// [gpu]
/// nvml = "auto"                      # or "disabled"; default "auto"
/// nvml_library = "libnvidia-ml.so.1" # default; a path if the driver lives elsewhere
/// hostname = "node-a"                # default: the kernel's host name
///
/// [gpu.simulated]                    # only on hosts without NVIDIA GPUs
/// inventory = "agent/inventory/inventories/h100-sxm-8x.toml"
/// fault_file = "/tmp/kiln/node-a.faults.toml"   # optional, see `sim::faults`
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub nvml: NvmlPolicy,
    pub nvml_library: Option<PathBuf>,
    /// Host name to report (and, for a simulated source, to derive GPU UUIDs from).
    pub hostname: Option<String>,
    /// Used only when NVML is unavailable or disabled.
    pub simulated: Option<SimulatedConfig>,
}

/// A simulated inventory to fall back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    /// The declared inventory file.
    pub inventory: PathBuf,
    /// Optional fault file, re-read at every sample.
    #[serde(default)]
    pub fault_file: Option<PathBuf>,
}

/// Which source [`open_source`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Nvml,
    Simulated { inventory: PathBuf },
}

/// The opened source, what it is, and — when it is simulated — why NVML was not used, for the
/// agent's start-up log line.
pub struct OpenedSource {
    pub source: Box<dyn GpuSource>,
    pub kind: SourceKind,
    pub nvml_unavailable: Option<InventoryError>,
}

impl std::fmt::Debug for OpenedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedSource")
            .field("kind", &self.kind)
            .field("nvml_unavailable", &self.nvml_unavailable)
            .finish_non_exhaustive()
    }
}

/// Opens NVML if it works, else the configured simulated inventory, else fails with
/// [`InventoryError::NoSource`] carrying why NVML failed.
///
/// A configured simulated inventory that fails to load is an error of its own (a bad file
/// should be fixed, not silently ignored).
pub fn open_source(config: &SourceConfig) -> Result<OpenedSource, InventoryError> {
    let nvml_error = match config.nvml {
        NvmlPolicy::Auto => match NvmlSource::open_with(NvmlOptions {
            library: config.nvml_library.clone(),
            hostname: config.hostname.clone(),
        }) {
            Ok(source) => {
                return Ok(OpenedSource {
                    source: Box::new(source),
                    kind: SourceKind::Nvml,
                    nvml_unavailable: None,
                });
            }
            Err(e) => e,
        },
        NvmlPolicy::Disabled => InventoryError::NvmlDisabled,
    };
    let Some(sim) = &config.simulated else {
        return Err(InventoryError::NoSource {
            nvml: Box::new(nvml_error),
        });
    };
    let source = SimulatedSource::load(
        &sim.inventory,
        SimulatedOptions {
            hostname: config.hostname.clone(),
            fault_file: sim.fault_file.clone(),
        },
    )?;
    Ok(OpenedSource {
        source: Box::new(source),
        kind: SourceKind::Simulated {
            inventory: sim.inventory.clone(),
        },
        nvml_unavailable: Some(nvml_error),
    })
}

/// The kernel's host name (Linux), else `$HOSTNAME`, else `localhost`.
pub(crate) fn os_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests;

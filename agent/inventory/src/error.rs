//! The one error type of this crate.
//!
//! Every variant carries the context a reader of the log needs (which file, which field, which
//! GPU, which NVML call) and, where there is one, the underlying error as `#[source]`; `Display`
//! never repeats the source, so log the whole chain (`{:#}` with anyhow, or walk `source()`).

use std::path::PathBuf;

use nvml_wrapper::error::NvmlError;

/// Why the inventory could not be read, parsed or sampled.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The NVML shared library could not be loaded (no NVIDIA driver installed on this host).
    #[error("NVML is not available: the NVIDIA management library `{library}` could not be loaded")]
    NvmlLibraryMissing {
        library: String,
        #[source]
        source: NvmlError,
    },

    /// The library loaded but NVML refused to initialise (driver not loaded, no permission, …).
    #[error("NVML is not available: the library loaded but NVML could not be initialised")]
    NvmlInit {
        #[source]
        source: NvmlError,
    },

    /// The configuration says not to try NVML.
    #[error("NVML is disabled by configuration (`nvml = \"disabled\"`)")]
    NvmlDisabled,

    /// NVML works but sees no GPU, so it cannot describe this host.
    #[error("NVML is not usable: it reports no GPUs on this host")]
    NvmlNoDevices,

    /// An NVML query that the inventory cannot do without failed.
    #[error("NVML call `{call}` failed{}", gpu.map(|g| format!(" for GPU {g}")).unwrap_or_default())]
    Nvml {
        call: &'static str,
        gpu: Option<u32>,
        #[source]
        source: NvmlError,
    },

    /// The declared inventory file could not be read.
    #[error("could not read inventory file {}", path.display())]
    ReadInventory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The declared inventory file is not valid TOML or does not match the schema.
    #[error("inventory file {}{}: {message}", origin, line.map(|l| format!(", line {l}")).unwrap_or_default())]
    ParseInventory {
        /// The file path, or a label for inventories given as text.
        origin: String,
        line: Option<usize>,
        /// The parser's message; it names the offending field (`missing field `memory_mib``).
        message: String,
    },

    /// The inventory parsed but declares something impossible.
    #[error("inventory file {origin}: `{field}` {reason}")]
    InvalidInventory {
        origin: String,
        /// Dotted path of the offending field, e.g. `gpu.nvlink` or `mig_instances[2].start`.
        field: String,
        reason: String,
    },

    /// The fault file of a simulated source exists but could not be read.
    #[error("could not read fault file {}", path.display())]
    ReadFaultFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The fault file of a simulated source is not valid.
    #[error("fault file {}{}: {message}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default())]
    ParseFaultFile {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    /// A GPU index that this host does not have.
    #[error("no GPU with index {index} on this host ({count} GPUs)")]
    UnknownGpu { index: u32, count: u32 },

    /// Neither NVML nor a simulated inventory can be used: the agent must not start.
    #[error(
        "no GPU source is usable: NVML is unavailable and no simulated inventory is configured \
         (set `simulated.inventory` to a declared inventory file only on hosts without NVIDIA GPUs)"
    )]
    NoSource {
        /// Why NVML could not be used.
        #[source]
        nvml: Box<InventoryError>,
    },
}

impl InventoryError {
    /// Builds a [`InventoryError::ParseInventory`]/[`InventoryError::ParseFaultFile`] line number
    /// from a TOML error's byte span.
    pub(crate) fn toml_line(text: &str, err: &toml::de::Error) -> Option<usize> {
        err.span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
    }
}

//! Fault injection for the simulated source.
//!
//! Two ways in, both meant for tests:
//!
//! * **In process** — [`SimulatedSource::inject`](super::SimulatedSource::inject) and
//!   [`clear`](super::SimulatedSource::clear), for unit tests and for harnesses that embed the
//!   source.
//! * **From outside the process** — a *fault file* whose path is configured
//!   (`simulated.fault_file` in the agent's config,
//!   [`SimulatedOptions::fault_file`](super::SimulatedOptions::fault_file) here). The source
//!   re-reads it at every `sample()`, so a test can make a running agent's GPU unhealthy by
//!   writing the file and heal it by removing the entry (or the file). It is level-triggered like the rest of Kiln: the file
//!   states the faults that exist *now*.
//!
//! ```toml
//! # e.g. /tmp/kiln-test/agent-2.faults.toml
//! [[gpu]]
//! index = 3
//! unhealthy = "double-bit ECC error"   # GPU 3 reports Unhealthy while this entry is present
//!
//! [[gpu]]
//! index = 5
//! xid = [79]                           # XID 79 is reported once, when it first appears in the
//!                                      # file; GPU 5 is Unhealthy while it stays listed (79 is
//!                                      # not an application XID)
//! ```
//!
//! A missing file means no faults. Write it atomically (write a temporary file in the same
//! directory, then rename it over), or a sample may read half a file and report a parse error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use crate::InventoryError;

/// A fault to inject into a running simulated source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The GPU reports `Unhealthy { reason }` until [`clear`](super::SimulatedSource::clear).
    Unhealthy { gpu: u32, reason: String },
    /// The driver raises XID `code` on the GPU: reported by the next sample; unless it is an
    /// [application XID](crate::APPLICATION_XIDS) the GPU stays unhealthy until cleared.
    Xid { gpu: u32, code: u64 },
    /// Volatile ECC counters of the GPU grow by these amounts.
    Ecc {
        gpu: u32,
        corrected: u64,
        uncorrected: u64,
    },
}

impl Fault {
    pub fn gpu(&self) -> u32 {
        match self {
            Fault::Unhealthy { gpu, .. } | Fault::Xid { gpu, .. } | Fault::Ecc { gpu, .. } => *gpu,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFileSpec {
    #[serde(default)]
    gpu: Vec<FaultEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultEntry {
    index: u32,
    #[serde(default)]
    unhealthy: Option<String>,
    #[serde(default)]
    xid: Vec<u64>,
}

/// The faults a fault file declares now, per GPU index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct FileFaults {
    pub unhealthy: BTreeMap<u32, String>,
    pub xids: BTreeSet<(u32, u64)>,
}

/// Reads the fault file; a missing file is no faults.
pub(crate) fn read_fault_file(path: &Path, gpu_count: u32) -> Result<FileFaults, InventoryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileFaults::default()),
        Err(source) => {
            return Err(InventoryError::ReadFaultFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    let parse_error = |line, message| InventoryError::ParseFaultFile {
        path: path.to_owned(),
        line,
        message,
    };
    let spec: FaultFileSpec = toml::from_str(&text).map_err(|e| {
        parse_error(
            InventoryError::toml_line(&text, &e),
            e.message().trim().to_owned(),
        )
    })?;
    let mut faults = FileFaults::default();
    for (i, entry) in spec.gpu.into_iter().enumerate() {
        if entry.index >= gpu_count {
            return Err(parse_error(
                None,
                format!(
                    "gpu[{i}].index {} is not a GPU of this host ({gpu_count} GPUs)",
                    entry.index
                ),
            ));
        }
        if let Some(reason) = entry.unhealthy {
            faults.unhealthy.entry(entry.index).or_insert(reason);
        }
        faults
            .xids
            .extend(entry.xid.into_iter().map(|code| (entry.index, code)));
    }
    Ok(faults)
}

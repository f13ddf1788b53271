//! The declared-inventory file: schema, parsing and validation.
//!
//! The file describes one host the way an operator would read it off a spec sheet (model,
//! count, memory, power envelope, NVLink wiring, NUMA layout, MIG geometry); everything a real
//! host would add on its own — PCI bus ids, UUIDs — is derived deterministically from it, so a
//! restarted simulated agent reports the same GPUs. Unknown keys are rejected so a typo cannot
//! silently fall back to a default.
//!
//! ```toml
//! hostname = "sim-h100-0"          # optional; the agent config and then the OS name win/lose
//! driver_version = "550.90.07"     # optional
//! cuda_version = "12.4"            # optional
//!
//! [gpu]
//! type_id = "h100-80gb"            # the API's GPU type id
//! model = "NVIDIA H100 80GB HBM3"  # what NVML would call it
//! count = 8
//! memory_mib = 81559
//! tdp_w = 700                      # power at full load
//! idle_power_w = 70
//! idle_temp_c = 30
//! max_temp_c = 75                  # temperature at full load
//! numa_nodes = 2                   # GPUs are split over the nodes in index order
//! nvlink = "all"                   # "all" (NVSwitch / full mesh), "none", or [[0, 1], [2, 3]]
//! mig_capable = true
//! mig_enabled = false              # initial MIG mode
//!
//! [[mig_profiles]]                 # the GPU-instance profiles and their valid placements
//! name = "1g.10gb"
//! memory_mib = 9856
//! size = 1                         # memory slices one instance occupies
//! starts = [0, 1, 2, 3, 4, 5, 6]   # valid start slices
//!
//! [[mig_instances]]                # instances present at start (only with mig_enabled)
//! gpu = 0
//! profile = "1g.10gb"
//! start = 0
//! ```

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::InventoryError;
use crate::model::MigPlacement;

/// A parsed, validated inventory declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventorySpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default = "default_driver")]
    pub driver_version: String,
    #[serde(default = "default_cuda")]
    pub cuda_version: String,
    pub gpu: GpuSpec,
    #[serde(default)]
    pub mig_profiles: Vec<MigProfileSpec>,
    #[serde(default)]
    pub mig_instances: Vec<MigInstanceSpec>,
}

fn default_driver() -> String {
    "550.90.07".into()
}
fn default_cuda() -> String {
    "12.4".into()
}
fn one() -> u32 {
    1
}

/// The (identical) GPUs of the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    pub type_id: String,
    pub model: String,
    pub count: u32,
    pub memory_mib: u64,
    pub tdp_w: u32,
    pub idle_power_w: u32,
    pub idle_temp_c: u32,
    pub max_temp_c: u32,
    #[serde(default = "one")]
    pub numa_nodes: u32,
    #[serde(default)]
    pub nvlink: NvLinkSpec,
    #[serde(default)]
    pub mig_capable: bool,
    #[serde(default)]
    pub mig_enabled: bool,
}

/// How the GPUs are wired over NVLink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NvLinkSpec {
    /// PCIe only.
    #[default]
    None,
    /// Every GPU reaches every other (NVSwitch, or a fully connected HGX board).
    All,
    /// Exactly these bidirectional pairs.
    Pairs(Vec<[u32; 2]>),
}

impl Serialize for NvLinkSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            NvLinkSpec::None => s.serialize_str("none"),
            NvLinkSpec::All => s.serialize_str("all"),
            NvLinkSpec::Pairs(pairs) => pairs.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for NvLinkSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NvLinkSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""all", "none" or a list of [a, b] GPU index pairs"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NvLinkSpec, E> {
                match v {
                    "all" => Ok(NvLinkSpec::All),
                    "none" => Ok(NvLinkSpec::None),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NvLinkSpec, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = seq.next_element::<[u32; 2]>()? {
                    pairs.push(pair);
                }
                Ok(NvLinkSpec::Pairs(pairs))
            }
        }
        d.deserialize_any(V)
    }
}

/// One MIG GPU-instance profile of the declared GPU model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigProfileSpec {
    pub name: String,
    pub memory_mib: u64,
    /// Memory slices an instance occupies.
    pub size: u32,
    /// Valid start slices.
    pub starts: Vec<u32>,
}

impl MigProfileSpec {
    /// The `N` of `Ng.Mgb`.
    pub fn compute_slices(&self) -> Option<u32> {
        self.name.split_once("g.")?.0.parse().ok()
    }

    pub fn placements(&self) -> Vec<MigPlacement> {
        self.starts
            .iter()
            .map(|&start| MigPlacement {
                start,
                size: self.size,
            })
            .collect()
    }
}

/// A MIG instance present when the simulated host starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigInstanceSpec {
    pub gpu: u32,
    pub profile: String,
    pub start: u32,
}

/// Memory slices of a MIG-capable GPU (A100, H100: 8).
pub const MIG_MEMORY_SLICES: u32 = 8;

impl InventorySpec {
    /// Parses and validates inventory text; `origin` names it in errors (usually the path).
    pub fn parse(text: &str, origin: &str) -> Result<Self, InventoryError> {
        let spec: InventorySpec =
            toml::from_str(text).map_err(|e| InventoryError::ParseInventory {
                origin: origin.to_owned(),
                line: InventoryError::toml_line(text, &e),
                message: e.message().trim().to_owned(),
            })?;
        spec.validate(origin)?;
        Ok(spec)
    }

    fn validate(&self, origin: &str) -> Result<(), InventoryError> {
        let invalid = |field: &str, reason: String| InventoryError::InvalidInventory {
            origin: origin.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let g = &self.gpu;
        if g.type_id.trim().is_empty() {
            return Err(invalid("gpu.type_id", "must not be empty".into()));
        }
        if g.count == 0 || g.count > 16 {
            return Err(invalid(
                "gpu.count",
                format!("must be 1..=16, got {}", g.count),
            ));
        }
        if g.memory_mib == 0 {
            return Err(invalid("gpu.memory_mib", "must be positive".into()));
        }
        if g.idle_power_w >= g.tdp_w {
            return Err(invalid(
                "gpu.idle_power_w",
                format!("must be below gpu.tdp_w ({} W)", g.tdp_w),
            ));
        }
        if g.idle_temp_c >= g.max_temp_c {
            return Err(invalid(
                "gpu.idle_temp_c",
                format!("must be below gpu.max_temp_c ({} °C)", g.max_temp_c),
            ));
        }
        if g.numa_nodes == 0 || g.numa_nodes > g.count {
            return Err(invalid(
                "gpu.numa_nodes",
                format!("must be 1..=gpu.count ({}), got {}", g.count, g.numa_nodes),
            ));
        }
        if let NvLinkSpec::Pairs(pairs) = &g.nvlink {
            for (i, [a, b]) in pairs.iter().enumerate() {
                if a == b || *a >= g.count || *b >= g.count {
                    return Err(invalid(
                        &format!("gpu.nvlink[{i}]"),
                        format!(
                            "must join two different GPUs below gpu.count ({}), got [{a}, {b}]",
                            g.count
                        ),
                    ));
                }
            }
        }
        if g.mig_enabled && !g.mig_capable {
            return Err(invalid(
                "gpu.mig_enabled",
                "requires gpu.mig_capable = true".into(),
            ));
        }
        if !g.mig_capable && !self.mig_profiles.is_empty() {
            return Err(invalid(
                "mig_profiles",
                "declared for a GPU that is not mig_capable".into(),
            ));
        }
        if g.mig_capable && self.mig_profiles.is_empty() {
            return Err(invalid(
                "mig_profiles",
                "must list the profiles of a mig_capable GPU".into(),
            ));
        }
        for (i, p) in self.mig_profiles.iter().enumerate() {
            let field = format!("mig_profiles[{i}]");
            if p.compute_slices().is_none() {
                return Err(invalid(
                    &format!("{field}.name"),
                    format!("must look like `1g.10gb`, got `{}`", p.name),
                ));
            }
            if self.mig_profiles[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid(
                    &format!("{field}.name"),
                    format!("`{}` is declared twice", p.name),
                ));
            }
            if p.memory_mib == 0 || p.memory_mib > g.memory_mib {
                return Err(invalid(
                    &format!("{field}.memory_mib"),
                    format!("must be 1..=gpu.memory_mib ({})", g.memory_mib),
                ));
            }
            if p.size == 0 || p.starts.is_empty() {
                return Err(invalid(
                    &field,
                    "needs a positive size and at least one start".into(),
                ));
            }
            if let Some(start) = p.starts.iter().find(|s| *s + p.size > MIG_MEMORY_SLICES) {
                return Err(invalid(
                    &format!("{field}.starts"),
                    format!(
                        "start {start} with size {} runs past the {MIG_MEMORY_SLICES} memory slices",
                        p.size
                    ),
                ));
            }
        }
        if !g.mig_enabled && !self.mig_instances.is_empty() {
            return Err(invalid(
                "mig_instances",
                "declared while gpu.mig_enabled is false".into(),
            ));
        }
        let mut taken: Vec<(u32, MigPlacement)> = Vec::new();
        for (i, inst) in self.mig_instances.iter().enumerate() {
            let field = format!("mig_instances[{i}]");
            if inst.gpu >= g.count {
                return Err(invalid(
                    &format!("{field}.gpu"),
                    format!("must be below gpu.count ({}), got {}", g.count, inst.gpu),
                ));
            }
            let Some(profile) = self.mig_profiles.iter().find(|p| p.name == inst.profile) else {
                return Err(invalid(
                    &format!("{field}.profile"),
                    format!("`{}` is not in mig_profiles", inst.profile),
                ));
            };
            if !profile.starts.contains(&inst.start) {
                return Err(invalid(
                    &format!("{field}.start"),
                    format!(
                        "{} is not a valid placement of {} (valid: {:?})",
                        inst.start, profile.name, profile.starts
                    ),
                ));
            }
            let placement = MigPlacement {
                start: inst.start,
                size: profile.size,
            };
            if taken
                .iter()
                .any(|(gpu, p)| *gpu == inst.gpu && p.overlaps(&placement))
            {
                return Err(invalid(
                    &field,
                    format!("overlaps another MIG instance on GPU {}", inst.gpu),
                ));
            }
            taken.push((inst.gpu, placement));
        }
        Ok(())
    }

    /// NUMA node of GPU `index`: GPUs are split over the nodes in index order, as the PCIe
    /// roots of HGX boards are.
    pub fn numa_node(&self, index: u32) -> u32 {
        index * self.gpu.numa_nodes / self.gpu.count
    }

    /// A deterministic PCI bus id in NVML's format. Each NUMA node owns an equal share of the
    /// 256 buses and its GPUs sit 0x10 apart from bus 0x18 in it, like a real board's layout.
    pub fn pci_bus_id(&self, index: u32) -> String {
        let nodes = self.gpu.numa_nodes;
        let node = self.numa_node(index);
        let first_in_node = (0..index).filter(|i| self.numa_node(*i) == node).count() as u32;
        let per_node = self.gpu.count.div_ceil(nodes);
        let span = 0x100 / nodes;
        let step = ((span.saturating_sub(0x18)) / per_node).clamp(1, 0x10);
        let bus = node * span + 0x18 + first_in_node * step;
        format!("00000000:{bus:02X}:00.0")
    }

    /// NVLink peers of GPU `index`.
    pub fn nvlink_peers(&self, index: u32) -> Vec<u32> {
        match &self.gpu.nvlink {
            NvLinkSpec::None => Vec::new(),
            NvLinkSpec::All => (0..self.gpu.count).filter(|i| *i != index).collect(),
            NvLinkSpec::Pairs(pairs) => {
                let mut peers: Vec<u32> = pairs
                    .iter()
                    .filter_map(|[a, b]| match index {
                        i if i == *a => Some(*b),
                        i if i == *b => Some(*a),
                        _ => None,
                    })
                    .collect();
                peers.sort_unstable();
                peers.dedup();
                peers
            }
        }
    }
}

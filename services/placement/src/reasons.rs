//! Why a request could not be placed, counted per cause, in words a person can act on.
//!
//! Every node the core looked at is charged to exactly one cause (the first check it failed, in
//! the order: schedulable, has the GPU type, CPU, memory, disk, then the GPU mode's own checks),
//! so the node counts add up to the fleet size. A quota refusal is reported next to them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::request::{GpuDemand, PlacementRequest, Product};
use crate::snapshot::UNITS_PER_GPU;

/// Why one node cannot take a request (internal; aggregated into [`Reason`]s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    NotSchedulable,
    NoGpuType,
    Cpu,
    Memory,
    Disk,
    UnhealthyGpus,
    NoFreeGpus,
    TooFewFreeGpus { free: u32 },
    NoNvlinkSet,
    IommuGroupsBusy,
    MigModeOff,
    NoMigPosition,
    NoShareRoom,
}

/// One cause of refusal with the number of nodes it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Reason {
    /// The snapshot has no nodes at all.
    NoNodes,
    /// Not ready, cordoned or draining.
    NotSchedulable {
        nodes: u32,
    },
    NoGpuType {
        nodes: u32,
        gpu_type: String,
    },
    InsufficientCpu {
        nodes: u32,
        cpu_millis: u64,
    },
    InsufficientMemory {
        nodes: u32,
        memory_mib: u64,
    },
    InsufficientDisk {
        nodes: u32,
        disk_gib: u64,
    },
    /// The node's GPUs of the type are all unhealthy.
    UnhealthyGpus {
        nodes: u32,
        gpu_type: String,
    },
    /// No GPU of the type is free for this kind of work.
    NoFreeGpus {
        nodes: u32,
        gpu_type: String,
    },
    /// Some are free, fewer than wanted; `most_free` is the best any of these nodes has.
    TooFewFreeGpus {
        nodes: u32,
        gpu_type: String,
        wanted: u32,
        most_free: u32,
    },
    /// Enough free GPUs, but no set of `wanted` with NVLink between every pair.
    NoNvlinkSet {
        nodes: u32,
        gpu_type: String,
        wanted: u32,
    },
    /// Enough free GPUs, but no union of entirely free IOMMU groups of exactly `wanted` GPUs.
    IommuGroupsBusy {
        nodes: u32,
        gpu_type: String,
        wanted: u32,
    },
    /// The node has healthy GPUs of the type but none in MIG mode.
    MigModeOff {
        nodes: u32,
        gpu_type: String,
    },
    /// MIG-mode GPUs, but no free valid position for the profile on any of them.
    NoMigPosition {
        nodes: u32,
        gpu_type: String,
        profile: String,
    },
    /// No GPU with a free tenant slot and enough unreserved memory.
    NoShareRoom {
        nodes: u32,
        gpu_type: String,
        memory_mib: u64,
        tenant_limit: u32,
    },
    /// The org's quota would be exceeded. Amounts in GPU units (eighths of a GPU).
    QuotaExceeded {
        org: String,
        gpu_type: String,
        product: Product,
        limit_gpus: u64,
        used_units: u64,
        requested_units: u64,
    },
}

impl Reason {
    /// Nodes this cause applies to (0 for fleet- or org-wide causes).
    pub fn nodes(&self) -> u32 {
        use Reason::*;
        match self {
            NoNodes | QuotaExceeded { .. } => 0,
            NotSchedulable { nodes }
            | NoGpuType { nodes, .. }
            | InsufficientCpu { nodes, .. }
            | InsufficientMemory { nodes, .. }
            | InsufficientDisk { nodes, .. }
            | UnhealthyGpus { nodes, .. }
            | NoFreeGpus { nodes, .. }
            | TooFewFreeGpus { nodes, .. }
            | NoNvlinkSet { nodes, .. }
            | IommuGroupsBusy { nodes, .. }
            | MigModeOff { nodes, .. }
            | NoMigPosition { nodes, .. }
            | NoShareRoom { nodes, .. } => *nodes,
        }
    }
}

fn nodes_have(n: u32) -> String {
    if n == 1 {
        "1 node has".to_owned()
    } else {
        format!("{n} nodes have")
    }
}

/// `units` eighths of a GPU as a short decimal: 8 → "1", 12 → "1.5", 1 → "0.125".
pub fn gpus_from_units(units: u64) -> String {
    let whole = units / UNITS_PER_GPU;
    let frac = units % UNITS_PER_GPU;
    if frac == 0 {
        return whole.to_string();
    }
    let s = format!("{:.3}", frac as f64 / UNITS_PER_GPU as f64);
    let s = s.trim_end_matches('0');
    format!("{whole}{}", s.trim_start_matches('0'))
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Reason::*;
        match self {
            NoNodes => write!(f, "the fleet has no nodes"),
            NotSchedulable { nodes } => write!(
                f,
                "{} not schedulable (not ready, cordoned or draining)",
                if *nodes == 1 {
                    "1 node is".to_owned()
                } else {
                    format!("{nodes} nodes are")
                }
            ),
            NoGpuType { nodes, gpu_type } => {
                write!(f, "{} no {gpu_type} GPUs", nodes_have(*nodes))
            }
            InsufficientCpu { nodes, cpu_millis } => write!(
                f,
                "{} less than {cpu_millis} CPU millicores free",
                nodes_have(*nodes)
            ),
            InsufficientMemory { nodes, memory_mib } => write!(
                f,
                "{} less than {memory_mib} MiB of memory free",
                nodes_have(*nodes)
            ),
            InsufficientDisk { nodes, disk_gib } => write!(
                f,
                "{} less than {disk_gib} GiB of disk free",
                nodes_have(*nodes)
            ),
            UnhealthyGpus { nodes, gpu_type } => {
                write!(f, "{} only unhealthy {gpu_type} GPUs", nodes_have(*nodes))
            }
            NoFreeGpus { nodes, gpu_type } => {
                write!(f, "{} no free {gpu_type}", nodes_have(*nodes))
            }
            TooFewFreeGpus {
                nodes,
                gpu_type,
                wanted,
                most_free,
            } => write!(
                f,
                "{} free {gpu_type} GPUs but fewer than {wanted} (at most {most_free})",
                nodes_have(*nodes)
            ),
            NoNvlinkSet {
                nodes,
                gpu_type,
                wanted,
            } => write!(
                f,
                "{} {wanted} free {gpu_type} GPUs but not {wanted} NVLink-connected",
                nodes_have(*nodes)
            ),
            IommuGroupsBusy {
                nodes,
                gpu_type,
                wanted,
            } => write!(
                f,
                "{} {wanted} or more free {gpu_type} GPUs but no entirely free IOMMU groups \
                 adding up to exactly {wanted}",
                nodes_have(*nodes)
            ),
            MigModeOff { nodes, gpu_type } => {
                write!(f, "{} no {gpu_type} GPU in MIG mode", nodes_have(*nodes))
            }
            NoMigPosition {
                nodes,
                gpu_type,
                profile,
            } => write!(
                f,
                "{} no free {profile} position on their MIG-mode {gpu_type} GPUs",
                nodes_have(*nodes)
            ),
            NoShareRoom {
                nodes,
                gpu_type,
                memory_mib,
                tenant_limit,
            } => write!(
                f,
                "{} no {gpu_type} GPU with room for another {memory_mib} MiB share (at most \
                 {tenant_limit} {} per GPU)",
                nodes_have(*nodes),
                if *tenant_limit == 1 {
                    "tenant"
                } else {
                    "tenants"
                }
            ),
            QuotaExceeded {
                gpu_type,
                product,
                limit_gpus,
                used_units,
                requested_units,
                ..
            } => write!(
                f,
                "org quota for {gpu_type} {} is {limit_gpus} and {} are in use (this request needs {})",
                product.noun(),
                gpus_from_units(*used_units),
                gpus_from_units(*requested_units)
            ),
        }
    }
}

/// The answer when a request cannot be placed now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unschedulable {
    /// Node causes, most frequent first, then a quota refusal if any.
    pub reasons: Vec<Reason>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Counts node misses per cause.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    nodes: u32,
    counts: Vec<(Miss, u32)>,
    most_free: u32,
}

impl Tally {
    pub fn add(&mut self, miss: Miss) {
        self.nodes += 1;
        let key = match miss {
            Miss::TooFewFreeGpus { free } => {
                self.most_free = self.most_free.max(free);
                Miss::TooFewFreeGpus { free: 0 }
            }
            m => m,
        };
        match self.counts.iter_mut().find(|(m, _)| *m == key) {
            Some((_, c)) => *c += 1,
            None => self.counts.push((key, 1)),
        }
    }

    pub fn into_reasons(self, req: &PlacementRequest, tenant_limit: u32) -> Vec<Reason> {
        if self.nodes == 0 {
            return vec![Reason::NoNodes];
        }
        let t = || req.gpu_type.clone();
        let wanted = match req.gpu {
            GpuDemand::Whole { count, .. } => count,
            _ => 1,
        };
        let mut counts = self.counts;
        // Most frequent first; the order of first appearance breaks ties (stable sort).
        counts.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
        counts
            .into_iter()
            .map(|(miss, nodes)| match miss {
                Miss::NotSchedulable => Reason::NotSchedulable { nodes },
                Miss::NoGpuType => Reason::NoGpuType {
                    nodes,
                    gpu_type: t(),
                },
                Miss::Cpu => Reason::InsufficientCpu {
                    nodes,
                    cpu_millis: req.cpu_millis,
                },
                Miss::Memory => Reason::InsufficientMemory {
                    nodes,
                    memory_mib: req.memory_mib,
                },
                Miss::Disk => Reason::InsufficientDisk {
                    nodes,
                    disk_gib: req.disk_gib,
                },
                Miss::UnhealthyGpus => Reason::UnhealthyGpus {
                    nodes,
                    gpu_type: t(),
                },
                Miss::NoFreeGpus => Reason::NoFreeGpus {
                    nodes,
                    gpu_type: t(),
                },
                Miss::TooFewFreeGpus { .. } => Reason::TooFewFreeGpus {
                    nodes,
                    gpu_type: t(),
                    wanted,
                    most_free: self.most_free,
                },
                Miss::NoNvlinkSet => Reason::NoNvlinkSet {
                    nodes,
                    gpu_type: t(),
                    wanted,
                },
                Miss::IommuGroupsBusy => Reason::IommuGroupsBusy {
                    nodes,
                    gpu_type: t(),
                    wanted,
                },
                Miss::MigModeOff => Reason::MigModeOff {
                    nodes,
                    gpu_type: t(),
                },
                Miss::NoMigPosition => Reason::NoMigPosition {
                    nodes,
                    gpu_type: t(),
                    profile: match &req.gpu {
                        GpuDemand::Mig { profile } => profile.clone(),
                        _ => String::new(),
                    },
                },
                Miss::NoShareRoom => Reason::NoShareRoom {
                    nodes,
                    gpu_type: t(),
                    memory_mib: match req.gpu {
                        GpuDemand::Share { memory_mib } => memory_mib,
                        _ => 0,
                    },
                    tenant_limit,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_issue_example() {
        let u = Unschedulable {
            reasons: vec![
                Reason::NoFreeGpus {
                    nodes: 3,
                    gpu_type: "h100-80gb".into(),
                },
                Reason::NoNvlinkSet {
                    nodes: 2,
                    gpu_type: "h100-80gb".into(),
                    wanted: 4,
                },
                Reason::QuotaExceeded {
                    org: "acme".into(),
                    gpu_type: "h100-80gb".into(),
                    product: Product::Pod,
                    limit_gpus: 8,
                    used_units: 64,
                    requested_units: 32,
                },
            ],
        };
        assert_eq!(
            u.to_string(),
            "3 nodes have no free h100-80gb; 2 nodes have 4 free h100-80gb GPUs but not 4 \
             NVLink-connected; org quota for h100-80gb pods is 8 and 8 are in use (this request \
             needs 4)"
        );
    }

    #[test]
    fn fractional_gpus() {
        assert_eq!(gpus_from_units(12), "1.5");
        assert_eq!(gpus_from_units(1), "0.125");
        assert_eq!(gpus_from_units(0), "0");
        assert_eq!(gpus_from_units(2), "0.25");
    }
}

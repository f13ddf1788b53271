//! The fleet as the scheduler sees it at one instant: nodes, their GPUs and what already runs on
//! them, plus org quotas and usage. Built by the service from Postgres; plain data here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::request::{OrgId, Product, Tier};

/// Quota and usage are counted in eighths of a GPU so that MIG slices (which occupy 1..8
/// memory slices of 8) and shares can be charged fairly next to whole GPUs.
pub const UNITS_PER_GPU: u64 = 8;

/// Identifies one running (or scheduled) workload's allocation, so preemption can name victims.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllocationId(pub String);

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for AllocationId {
    fn from(s: &str) -> Self {
        AllocationId(s.to_owned())
    }
}

/// Non-GPU resources: free amounts on a node, or what one allocation holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Resources {
    pub const fn new(cpu_millis: u64, memory_mib: u64, disk_gib: u64) -> Self {
        Self {
            cpu_millis,
            memory_mib,
            disk_gib,
        }
    }

    pub fn covers(&self, want: &Resources) -> bool {
        self.cpu_millis >= want.cpu_millis
            && self.memory_mib >= want.memory_mib
            && self.disk_gib >= want.disk_gib
    }

    pub fn saturating_sub(&self, o: &Resources) -> Resources {
        Resources::new(
            self.cpu_millis.saturating_sub(o.cpu_millis),
            self.memory_mib.saturating_sub(o.memory_mib),
            self.disk_gib.saturating_sub(o.disk_gib),
        )
    }

    pub fn add(&self, o: &Resources) -> Resources {
        Resources::new(
            self.cpu_millis + o.cpu_millis,
            self.memory_mib + o.memory_mib,
            self.disk_gib + o.disk_gib,
        )
    }
}

/// One workload already placed on a node. GPUs it holds point back to it by [`AllocationId`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: AllocationId,
    pub org: OrgId,
    pub product: Product,
    pub tier: Tier,
    pub priority: i32,
    /// CPU, memory and disk it holds on the node (given back when it ends or is preempted).
    pub resources: Resources,
}

/// One MIG GPU instance present on a GPU, in NVML memory-slice units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigSlice {
    pub alloc: AllocationId,
    pub profile: String,
    pub start: u8,
    pub size: u8,
}

/// One time-sliced tenant of a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub alloc: AllocationId,
    pub memory_mib: u64,
}

/// What a GPU is used for now. The shapes exclude each other by construction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "use", content = "by", rename_all = "snake_case")]
pub enum GpuUse {
    #[default]
    Idle,
    /// Held exclusively (container with whole GPUs, or VFIO passthrough).
    Whole(AllocationId),
    /// MIG instances on a GPU in MIG mode (an empty list is as good as idle for MIG work).
    Mig(Vec<MigSlice>),
    /// Time-sliced tenants (an empty list is as good as idle).
    Shared(Vec<Share>),
}

impl GpuUse {
    /// Nothing runs on the GPU.
    pub fn is_empty(&self) -> bool {
        match self {
            GpuUse::Idle => true,
            GpuUse::Whole(_) => false,
            GpuUse::Mig(v) => v.is_empty(),
            GpuUse::Shared(v) => v.is_empty(),
        }
    }

    /// Whether allocation `id` holds (part of) this GPU.
    pub fn held_by(&self, id: &AllocationId) -> bool {
        match self {
            GpuUse::Idle => false,
            GpuUse::Whole(a) => a == id,
            GpuUse::Mig(v) => v.iter().any(|s| &s.alloc == id),
            GpuUse::Shared(v) => v.iter().any(|s| &s.alloc == id),
        }
    }

    /// Removes allocation `id` from this GPU; returns whether anything was removed.
    pub fn release(&mut self, id: &AllocationId) -> bool {
        let removed = match self {
            GpuUse::Idle => false,
            GpuUse::Whole(a) => a == id,
            GpuUse::Mig(v) => {
                let n = v.len();
                v.retain(|s| &s.alloc != id);
                v.len() != n
            }
            GpuUse::Shared(v) => {
                let n = v.len();
                v.retain(|s| &s.alloc != id);
                v.len() != n
            }
        };
        if removed && (matches!(self, GpuUse::Whole(_)) || self.is_empty()) {
            *self = GpuUse::Idle;
        }
        removed
    }
}

/// One physical GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub uuid: String,
    /// NVML index; NVLink peers refer to it.
    pub index: u32,
    pub gpu_type: String,
    pub memory_mib: u64,
    pub numa_node: Option<u32>,
    /// Linux IOMMU group; `None` means the GPU is alone in its group.
    pub iommu_group: Option<u32>,
    pub healthy: bool,
    /// MIG mode is on: the GPU hosts only MIG work.
    pub mig_enabled: bool,
    /// NVML indexes of GPUs this one reaches over NVLink. Either side reporting a link counts.
    pub nvlink_peers: Vec<u32>,
    pub used: GpuUse,
}

impl Gpu {
    /// A healthy, idle, non-MIG GPU without topology information.
    pub fn new(uuid: &str, index: u32, gpu_type: &str, memory_mib: u64) -> Self {
        Self {
            uuid: uuid.to_owned(),
            index,
            gpu_type: gpu_type.to_owned(),
            memory_mib,
            numa_node: None,
            iommu_group: None,
            healthy: true,
            mig_enabled: false,
            nvlink_peers: Vec::new(),
            used: GpuUse::Idle,
        }
    }
}

/// One GPU host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    /// Ready and neither cordoned nor draining.
    pub schedulable: bool,
    /// CPU, memory and disk not held by any allocation.
    pub free: Resources,
    pub gpus: Vec<Gpu>,
    /// Everything placed on the node (GPU and CPU-only work).
    pub allocations: Vec<Allocation>,
}

impl Node {
    pub fn new(id: &str, free: Resources, gpus: Vec<Gpu>) -> Self {
        Self {
            id: id.to_owned(),
            schedulable: true,
            free,
            gpus,
            allocations: Vec::new(),
        }
    }

    /// Whether GPUs at positions `a` and `b` of [`Node::gpus`] are NVLink-connected.
    pub fn nvlinked(&self, a: usize, b: usize) -> bool {
        let (ga, gb) = (&self.gpus[a], &self.gpus[b]);
        ga.nvlink_peers.contains(&gb.index) || gb.nvlink_peers.contains(&ga.index)
    }

    pub fn allocation(&self, id: &AllocationId) -> Option<&Allocation> {
        self.allocations.iter().find(|a| &a.id == id)
    }

    pub fn has_gpu_type(&self, gpu_type: &str) -> bool {
        self.gpus.iter().any(|g| g.gpu_type == gpu_type)
    }
}

/// Quota and usage are kept per org, GPU type and product.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QuotaKey {
    pub org: OrgId,
    pub gpu_type: String,
    pub product: Product,
}

impl QuotaKey {
    pub fn new(org: &str, gpu_type: &str, product: Product) -> Self {
        Self {
            org: org.to_owned(),
            gpu_type: gpu_type.to_owned(),
            product,
        }
    }
}

/// One entry of [`KeyedCounts`] in its serialised form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyedEntry {
    #[serde(flatten)]
    pub key: QuotaKey,
    pub value: u64,
}

/// A map keyed by [`QuotaKey`] that serialises as a list (JSON has no struct keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<KeyedEntry>", from = "Vec<KeyedEntry>")]
pub struct KeyedCounts(pub BTreeMap<QuotaKey, u64>);

impl From<KeyedCounts> for Vec<KeyedEntry> {
    fn from(k: KeyedCounts) -> Self {
        k.0.into_iter()
            .map(|(key, value)| KeyedEntry { key, value })
            .collect()
    }
}

impl From<Vec<KeyedEntry>> for KeyedCounts {
    fn from(v: Vec<KeyedEntry>) -> Self {
        KeyedCounts(v.into_iter().map(|e| (e.key, e.value)).collect())
    }
}

impl KeyedCounts {
    pub fn get(&self, key: &QuotaKey) -> Option<u64> {
        self.0.get(key).copied()
    }
    pub fn set(&mut self, key: QuotaKey, value: u64) {
        self.0.insert(key, value);
    }
    pub fn add(&mut self, key: QuotaKey, delta: u64) {
        *self.0.entry(key).or_default() += delta;
    }
    /// Subtracts `delta` (never below zero); an entry reaching zero is removed.
    pub fn sub(&mut self, key: &QuotaKey, delta: u64) {
        if let Some(v) = self.0.get_mut(key) {
            *v = v.saturating_sub(delta);
            if *v == 0 {
                self.0.remove(key);
            }
        }
    }
}

/// The whole input the core decides against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSnapshot {
    pub nodes: Vec<Node>,
    /// Maximum **whole GPUs** per org × GPU type × product; no entry means no limit.
    pub quotas: KeyedCounts,
    /// Current usage in GPU units (eighths, see [`UNITS_PER_GPU`]) per org × GPU type × product.
    /// [`crate::usage_from_nodes`] derives it from the nodes when the snapshot covers them all.
    pub usage: KeyedCounts,
}

impl FleetSnapshot {
    pub fn new(nodes: Vec<Node>) -> Self {
        let usage = crate::quota::usage_from_nodes(&nodes);
        Self {
            nodes,
            quotas: KeyedCounts::default(),
            usage,
        }
    }

    /// Sets org `org`'s limit for `gpu_type` × `product` to `max_gpus` whole GPUs.
    pub fn with_quota(
        mut self,
        org: &str,
        gpu_type: &str,
        product: Product,
        max_gpus: u64,
    ) -> Self {
        self.quotas
            .set(QuotaKey::new(org, gpu_type, product), max_gpus);
        self
    }

    /// Memory of a GPU of `gpu_type` anywhere in the fleet (GPU type ids name one memory size).
    pub fn gpu_memory_of(&self, gpu_type: &str) -> Option<u64> {
        self.nodes
            .iter()
            .flat_map(|n| n.gpus.iter())
            .find(|g| g.gpu_type == gpu_type)
            .map(|g| g.memory_mib)
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

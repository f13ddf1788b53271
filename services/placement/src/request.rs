//! What a tenant asked for: one workload's GPU, CPU, memory and disk demand plus who asks.

use serde::{Deserialize, Serialize};

/// An organisation id. Opaque to the core: only compared and printed.
pub type OrgId = String;

/// How the capacity is sold. Spot work may be preempted for on-demand work; on-demand never is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    OnDemand,
    Spot,
}

/// The product a workload belongs to; quotas are kept per org, GPU type and product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Product {
    /// IaaS: a VM with whole GPUs passed through.
    Instance,
    /// PaaS: a container with whole GPUs, a MIG slice or a time-sliced share.
    Pod,
    /// AaaS: one replica of a model-serving endpoint (placed like a pod).
    Endpoint,
}

impl Product {
    /// The API's plural noun, used in human-readable reasons.
    pub fn noun(self) -> &'static str {
        match self {
            Product::Instance => "instances",
            Product::Pod => "pods",
            Product::Endpoint => "endpoints",
        }
    }
}

/// The GPU part of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum GpuDemand {
    /// CPU-only work.
    None,
    /// `count` whole GPUs on one node, exclusively. `passthrough` (VM instances) additionally
    /// takes every GPU of each chosen GPU's IOMMU group, so the set must be made of entirely free
    /// groups adding up to exactly `count` GPUs.
    Whole { count: u32, passthrough: bool },
    /// One MIG GPU instance of `profile` (e.g. `3g.40gb`) on a GPU in MIG mode.
    Mig { profile: String },
    /// A time-sliced share of one GPU with a declared memory cap.
    Share { memory_mib: u64 },
}

/// One workload to place.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlacementRequest {
    pub org: OrgId,
    pub product: Product,
    pub tier: Tier,
    /// Higher is more important. Orders pending work and chooses preemption victims.
    pub priority: i32,
    /// GPU type id, e.g. `h100-80gb`. Ignored when `gpu` is [`GpuDemand::None`].
    pub gpu_type: String,
    pub gpu: GpuDemand,
    /// For multi-GPU whole requests: refuse sets that are not all-pairs NVLink-connected instead
    /// of merely preferring them.
    #[serde(default)]
    pub require_nvlink: bool,
    pub cpu_millis: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl PlacementRequest {
    fn base(org: &str, product: Product, gpu_type: &str, gpu: GpuDemand) -> Self {
        Self {
            org: org.to_owned(),
            product,
            tier: Tier::OnDemand,
            priority: 0,
            gpu_type: gpu_type.to_owned(),
            gpu,
            require_nvlink: false,
            cpu_millis: 0,
            memory_mib: 0,
            disk_gib: 0,
        }
    }

    /// An on-demand pod with `count` whole GPUs and no CPU/memory/disk demand (add with
    /// [`with_resources`](Self::with_resources)).
    pub fn whole(org: &str, gpu_type: &str, count: u32) -> Self {
        Self::base(
            org,
            Product::Pod,
            gpu_type,
            GpuDemand::Whole {
                count,
                passthrough: false,
            },
        )
    }

    /// An on-demand VM instance with `count` passed-through GPUs.
    pub fn passthrough(org: &str, gpu_type: &str, count: u32) -> Self {
        Self::base(
            org,
            Product::Instance,
            gpu_type,
            GpuDemand::Whole {
                count,
                passthrough: true,
            },
        )
    }

    /// An on-demand pod with one MIG slice of `profile`.
    pub fn mig(org: &str, gpu_type: &str, profile: &str) -> Self {
        Self::base(
            org,
            Product::Pod,
            gpu_type,
            GpuDemand::Mig {
                profile: profile.to_owned(),
            },
        )
    }

    /// An on-demand pod with a time-sliced share capped at `memory_mib`.
    pub fn share(org: &str, gpu_type: &str, memory_mib: u64) -> Self {
        Self::base(org, Product::Pod, gpu_type, GpuDemand::Share { memory_mib })
    }

    /// An on-demand CPU-only pod.
    pub fn cpu_only(org: &str, cpu_millis: u64, memory_mib: u64) -> Self {
        Self::base(org, Product::Pod, "", GpuDemand::None).with_resources(cpu_millis, memory_mib, 0)
    }

    pub fn with_resources(mut self, cpu_millis: u64, memory_mib: u64, disk_gib: u64) -> Self {
        self.cpu_millis = cpu_millis;
        self.memory_mib = memory_mib;
        self.disk_gib = disk_gib;
        self
    }

    pub fn spot(mut self) -> Self {
        self.tier = Tier::Spot;
        self
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn with_product(mut self, product: Product) -> Self {
        self.product = product;
        self
    }

    pub fn nvlink_required(mut self) -> Self {
        self.require_nvlink = true;
        self
    }

    /// Whether the request needs any GPU.
    pub fn wants_gpu(&self) -> bool {
        !matches!(self.gpu, GpuDemand::None)
    }
}

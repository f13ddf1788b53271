//! # kiln-placement — the scheduler's placement core
//!
//! Pure functions over plain data: no I/O, no async, no database. The scheduler service loads a
//! [`FleetSnapshot`] (nodes, their GPUs and what already runs on them, org quotas and usage)
//! from Postgres, asks [`place`] where a [`PlacementRequest`] should go, and commits the answer
//! in the same transaction as the capacity it consumes. Everything here can be tested
//! exhaustively and benchmarked without a database.
//!
//! ## The answer
//! [`place`] returns a [`Decision`]:
//! * [`Decision::Placed`] with a [`Placement`]: the node, the GPUs ([`GpuAssignment`]: whole
//!   GPU UUIDs, a MIG GPU + profile + start slice, or a share of one GPU with a memory cap), and
//!   the spot allocations to preempt first (usually none).
//! * [`Decision::Unschedulable`] with [`Reason`]s counted per cause; its `Display` is a
//!   sentence a person can act on: "3 nodes have no free h100-80gb; 2 nodes have 4 free
//!   h100-80gb GPUs but not 4 NVLink-connected; org quota for h100-80gb pods is 8 and 8 are in
//!   use (this request needs 4)".
//!
//! A [`PlacementError`] means the request itself is meaningless (a MIG profile the GPU type
//! does not have, zero GPUs), never that the fleet is full.
//!
//! ## The rules (see `../shared/DESIGN.md`, "GPU sharing modes")
//! * **Whole GPUs** ([`GpuDemand::Whole`]): healthy, idle, non-MIG GPUs of the type on one node;
//!   multi-GPU sets prefer all-pairs NVLink, then one NUMA node ([`PlacementRequest::require_nvlink`]
//!   makes NVLink mandatory). **Passthrough** takes whole IOMMU groups, all of whose GPUs must be
//!   free, adding up to exactly the requested count.
//! * **MIG** ([`GpuDemand::Mig`]): only on GPUs in MIG mode, only at the start positions of the
//!   model's geometry ([`mig`] holds the A100 40GB/80GB and H100 80GB tables), choosing the
//!   position that keeps the largest profiles placeable. A MIG-mode GPU takes nothing else.
//! * **Shares** ([`GpuDemand::Share`]): up to [`Policy::share_tenants_per_gpu`] tenants per GPU,
//!   memory caps summed within the GPU's memory; a shared GPU takes no whole or MIG work.
//! * **Packing** ([`Strategy`]): best-fit fills partly used GPUs and nodes first so that whole
//!   free GPUs and nodes stay available for large requests; first-fit is the baseline.
//!   [`fragmentation`] measures the result, [`simulate`] replays a trace for benchmarks.
//! * **Quotas** per org × GPU type × product, counted in eighths of a GPU ([`UNITS_PER_GPU`]).
//! * **Preemption**: an on-demand request that fits nowhere free may evict spot allocations on
//!   one node — the lowest priorities, then the fewest victims. On-demand work is never evicted.
//! * **Fair share** ([`fair_order`]): pending requests from several orgs are ordered by
//!   dominant-resource fairness, then priority, then age.
//!
//! [`apply`] and [`release`] update a snapshot with a placement or a departure (checking the
//! rules again, independently of the search), and [`check_invariants`] verifies a whole
//! snapshot; the simulator and the property tests are built on them.
//!
//! ## Performance: [`FleetIndex`] and [`place_indexed`]
//! [`place`] scans every node of the snapshot (cheap checks first, no heap allocation per
//! node). First-fit stops at the first node that fits; best-fit looks at all of them, which at
//! 10,000 nodes × 8 GPUs costs milliseconds per decision. For large fleets wrap the snapshot in
//! a [`FleetIndex`] (built once, then updated per placement and departure by
//! [`FleetIndex::apply`] / [`FleetIndex::release`] in time proportional to one node) and ask
//! [`place_indexed`]: it files nodes in buckets by GPU type and free whole GPUs (per NUMA
//! node), GPUs by share load and by MIG occupancy, computes a lower bound of best-fit's score
//! per bucket, and evaluates nodes best bucket first, stopping as soon as nothing unvisited can
//! score better. Its decisions are exactly [`place`]'s (a property test compares them on
//! random fleets). A refusal is explained in one pass over compact per-node briefs (reading a
//! node's GPUs only when its brief cannot tell) and preemption visits only nodes holding spot
//! work; first-fit and quota refusals go through [`place`] itself. [`simulate`] uses the index.

mod alternatives;
mod apply;
mod availability;
mod error;
mod fair;
mod frag;
mod index;
pub mod mig;
mod place;
mod preempt;
mod quota;
mod reasons;
mod request;
mod share;
mod sim;
mod snapshot;
mod whole;

pub use alternatives::{alternatives, describe};
pub use apply::{apply, check_invariants, release};
pub use availability::{TypeAvailability, availability, mig_placeable};
pub use error::PlacementError;
pub use fair::{Amounts, Pending, capacity_and_usage, demand, fair_order, fair_order_with};
pub use frag::{Fragmentation, fragmentation};
pub use index::{FleetIndex, place_indexed};
pub use place::{Decision, GpuAssignment, Placement, Policy, Strategy, place};
pub use preempt::without as without_allocations;
pub use quota::{request_units, share_units, usage_from_nodes};
pub use reasons::{Reason, Unschedulable, gpus_from_units};
pub use request::{GpuDemand, OrgId, PlacementRequest, Product, Tier};
pub use sim::{SimulationOutcome, TraceEvent, simulate, simulate_with};
pub use snapshot::{
    Allocation, AllocationId, FleetSnapshot, Gpu, GpuUse, KeyedCounts, KeyedEntry, MigSlice, Node,
    QuotaKey, Resources, Share, UNITS_PER_GPU,
};

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

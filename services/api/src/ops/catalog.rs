//! The GPU catalog (`GET /v1/gpu-types`): each GPU type with its MIG profiles and what could
//! be placed on it right now.
//!
//! Any signed-in caller may read it; it is deployment-wide, not tenant data, and shows counts
//! only (no nodes, no tenants). The figures come from [`kiln_placement::availability`], so they
//! follow the placement core's own rules; the module there documents each one.
//!
//! Which types are listed: every GPU type present in the fleet (a GPU not removed, on a node not
//! retired) and every type the core has a MIG geometry for, even with none in the fleet (all
//! zero), so the MIG-capable catalog is always visible. GPUs the operator has not mapped to a
//! type are left out: no request can name them.

use std::collections::{BTreeMap, HashMap};

use async_graphql::{ComplexObject, SimpleObject};
use kiln_placement::{AllocationId, Gpu, GpuUse, MigSlice, Node, Policy, Resources, Share};
use kiln_store::CatalogGpu;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::{AppState, Caller};

/// A GPU type and what is free of it now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuTypeView {
    /// The id requests name (`gpu_type`, `gpu.type`).
    #[schema(example = "h100-80gb")]
    pub id: String,
    #[schema(example = "NVIDIA H100 80GB")]
    pub name: String,
    /// Memory of one GPU, as marketed.
    #[schema(example = 80)]
    pub memory_gib: i64,
    /// MIG profiles a pod may ask for (`gpu: {type, mig_profile}`), smallest first; empty for
    /// types without MIG.
    #[schema(example = json!(["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]))]
    pub mig_profiles: Vec<String>,
    /// Prices in effect now (`null` when the catalog does not price this type), each
    /// `{amount_micros, currency}` per hour: `instance` and `pod` per GPU-hour, `mig` per
    /// slice-hour by profile, `share_gib` per GiB-hour of a share's memory cap, spot discount
    /// in basis points, `storage_gib_month` for stopped instances' disks, `endpoint` per request
    /// and per 1000 prompt/completion tokens, and the `price_version` they come from.
    #[schema(value_type = Option<Object>)]
    pub prices: Option<async_graphql::Json<serde_json::Value>>,
    pub available: GpuAvailabilityView,
}

/// Live availability of one GPU type, computed at request time.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
#[graphql(complex)]
pub struct GpuAvailabilityView {
    /// GPUs a whole-GPU request could take now: healthy, on ready nodes, not in MIG mode, and
    /// holding no allocation at all.
    pub whole: i64,
    /// Per MIG profile, how many more instances of **that profile alone** could be placed now
    /// on healthy MIG-mode GPUs of ready nodes: per GPU, added greedily at the lowest free valid
    /// start until none fits (memory and compute slices both counted), summed over GPUs. The
    /// counts are alternatives: placing one profile uses room the others would have used.
    /// Every profile of the type is listed (0 when none fits); empty for types without MIG.
    #[graphql(skip)]
    #[schema(example = json!({"1g.10gb": 7, "3g.40gb": 2, "7g.80gb": 1}))]
    pub mig: BTreeMap<String, i64>,
    pub shares: ShareAvailabilityView,
    /// GPUs present (not removed, on nodes that are not retired), whatever their state.
    pub total: i64,
    /// GPUs reporting unhealthy (degraded GPUs still take work and are not counted).
    pub unhealthy: i64,
}

#[ComplexObject]
impl GpuAvailabilityView {
    /// Per MIG profile, smallest first, how many more instances of that profile alone could be
    /// placed now (see REST's `available.mig`).
    async fn mig(&self) -> Vec<MigAvailabilityView> {
        self.mig
            .iter()
            .map(|(profile, available)| MigAvailabilityView {
                profile: profile.clone(),
                available: *available,
            })
            .collect()
    }
}

/// One MIG profile's availability (GraphQL has no maps).
#[derive(Debug, Clone, SimpleObject)]
pub struct MigAvailabilityView {
    pub profile: String,
    pub available: i64,
}

/// Time-sliced shares (`gpu: {type, share: {memory_gib}}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct ShareAvailabilityView {
    /// GPUs that can take one more share: healthy, on ready nodes, not in MIG mode, idle or
    /// shared below the per-GPU tenant limit, with memory left.
    pub gpus: i64,
    /// The largest `memory_gib` a share could ask for now (0 when none fits).
    pub max_memory_gib: i64,
}

/// The catalog, sorted by id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuTypeList {
    pub items: Vec<GpuTypeView>,
}

/// Every GPU type with its live availability. Any signed-in caller.
pub async fn list(state: &AppState, _caller: &Caller) -> Result<GpuTypeList, ApiError> {
    let rows = state.store.gpu_catalog().await?;
    let mut list = catalog(&rows, Policy::default().share_tenants_per_gpu);
    let mut prices = super::billing::current_prices(state).await?;
    for item in &mut list.items {
        item.prices = prices.remove(&item.id).map(async_graphql::Json);
    }
    Ok(list)
}

/// The catalog from the store's rows (pure; the scheduler uses `Policy::default()` too).
pub fn catalog(rows: &[CatalogGpu], share_tenants_per_gpu: u32) -> GpuTypeList {
    let nodes = fleet(rows);
    let availability = kiln_placement::availability(&nodes, share_tenants_per_gpu);
    let items = availability
        .into_iter()
        .map(|(id, a)| {
            let of_type = || rows.iter().filter(|r| r.gpu_type.as_deref() == Some(&id));
            let (name, memory_gib) = match marketed(&id) {
                Some(m) => m,
                None => (
                    most_common(of_type().map(|r| r.model.as_str())).unwrap_or_else(|| id.clone()),
                    of_type()
                        .map(|r| (r.memory_mib.max(0) + 512) / 1024)
                        .max()
                        .unwrap_or(0),
                ),
            };
            GpuTypeView {
                mig_profiles: a.mig.iter().map(|(p, _)| (*p).to_owned()).collect(),
                prices: None,
                available: GpuAvailabilityView {
                    whole: to_i64(a.whole),
                    mig: a
                        .mig
                        .iter()
                        .map(|(p, n)| ((*p).to_owned(), to_i64(*n)))
                        .collect(),
                    shares: ShareAvailabilityView {
                        gpus: to_i64(a.share_gpus),
                        max_memory_gib: to_i64(a.share_max_memory_mib / 1024),
                    },
                    total: to_i64(a.total),
                    unhealthy: to_i64(a.unhealthy),
                },
                id,
                name,
                memory_gib,
            }
        })
        .collect();
    GpuTypeList { items }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The marketing name and memory of a type id of the form `<family>-<n>gb` (what agents derive
/// from the driver's model name): `h100-80gb` → ("NVIDIA H100 80GB", 80).
pub(crate) fn marketed(id: &str) -> Option<(String, i64)> {
    let (family, size) = id.rsplit_once('-')?;
    let gib: i64 = size.strip_suffix("gb")?.parse().ok()?;
    if family.is_empty() || !family.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((
        format!("NVIDIA {} {gib}GB", family.to_ascii_uppercase()),
        gib,
    ))
}

fn most_common<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in names {
        *counts.entry(n).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .map(|(n, _)| n.to_owned())
}

/// The store's rows as the placement core's nodes (only what availability reads).
fn fleet(rows: &[CatalogGpu]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut pos: HashMap<Uuid, usize> = HashMap::new();
    for r in rows {
        let p = *pos.entry(r.node_id).or_insert_with(|| {
            let mut n = Node::new(&r.node_id.to_string(), Resources::default(), Vec::new());
            n.schedulable = r.node_ready;
            nodes.push(n);
            nodes.len() - 1
        });
        let mut gpu = Gpu::new(
            &r.uuid,
            0,
            r.gpu_type.as_deref().unwrap_or(""),
            r.memory_mib.max(0) as u64,
        );
        gpu.healthy = r.health != "unhealthy";
        gpu.mig_enabled = r.mig_enabled;
        for (i, s) in r.slots.0.iter().enumerate() {
            let alloc = AllocationId(i.to_string());
            match s.mode.as_str() {
                "whole" => gpu.used = GpuUse::Whole(alloc),
                "mig" => {
                    let slice = MigSlice {
                        alloc,
                        profile: s.mig_profile.clone().unwrap_or_default(),
                        start: s.start.clamp(0, 255) as u8,
                        size: (s.end - s.start).clamp(0, 255) as u8,
                    };
                    match &mut gpu.used {
                        GpuUse::Mig(v) => v.push(slice),
                        other => *other = GpuUse::Mig(vec![slice]),
                    }
                }
                _ => {
                    let share = Share {
                        alloc,
                        memory_mib: (s.end - s.start).max(0) as u64,
                    };
                    match &mut gpu.used {
                        GpuUse::Shared(v) => v.push(share),
                        other => *other = GpuUse::Shared(vec![share]),
                    }
                }
            }
        }
        nodes[p].gpus.push(gpu);
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_name_their_marketed_model_and_memory() {
        assert_eq!(marketed("h100-80gb"), Some(("NVIDIA H100 80GB".into(), 80)));
        assert_eq!(marketed("l40s-48gb"), Some(("NVIDIA L40S 48GB".into(), 48)));
        assert_eq!(marketed("custom"), None);
        assert_eq!(marketed("-80gb"), None);
    }
}

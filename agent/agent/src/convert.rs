//! From the inventory crate's plain data to the wire messages of `kiln.node.v1`.

// The contract only grows: `..Default::default()` keeps these conversions compiling when a field
// is added, until they are taught to fill it.
#![allow(clippy::needless_update)]

use kiln_inventory as inv;
use kiln_proto::node::v1 as pb;

/// The host's GPUs as `Register` carries them.
pub fn host_inventory(host: &inv::HostInventory) -> pb::HostInventory {
    pb::HostInventory {
        hostname: host.hostname.clone(),
        driver_version: host.driver_version.clone(),
        cuda_version: host.cuda_version.clone(),
        gpus: host.gpus.iter().map(|g| gpu(host, g)).collect(),
        ..Default::default()
    }
}

fn gpu(host: &inv::HostInventory, g: &inv::GpuInfo) -> pb::Gpu {
    // The NVLink row, by UUID, from the symmetric matrix (a link reported by one side only is
    // still a link).
    let row = host.gpus.iter().position(|x| x.index == g.index);
    let nvlink_peer_uuids = host
        .gpus
        .iter()
        .enumerate()
        .filter(|(j, _)| row.is_some_and(|i| host.nvlink_matrix[i][*j]))
        .map(|(_, peer)| peer.uuid.clone())
        .collect();
    pb::Gpu {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.name.clone(),
        memory_mib: g.memory_mib,
        pci_bus_id: g.pci_bus_id.clone(),
        numa_node: g.numa_node,
        mig_capable: g.mig.capable,
        mig_enabled: g.mig.enabled,
        mig_instances: g
            .mig
            .instances
            .iter()
            .map(|m| pb::MigInstance {
                profile: m.profile.clone(),
                start: m.placement.map_or(0, |p| p.start),
                size: m.placement.map_or(0, |p| p.size),
                uuid: m.uuid.clone(),
                ..Default::default()
            })
            .collect(),
        nvlink_peer_uuids,
        // The inventory source does not read IOMMU groups yet: unknown.
        iommu_group: None,
        gpu_type: g.gpu_type.clone().unwrap_or_default(),
        ..Default::default()
    }
}

pub fn health(h: &inv::Health) -> (pb::GpuHealth, String) {
    match h {
        inv::Health::Healthy => (pb::GpuHealth::Healthy, String::new()),
        inv::Health::Unhealthy { reason } => (pb::GpuHealth::Unhealthy, reason.clone()),
    }
}

/// Per-GPU health for a heartbeat.
pub fn health_statuses(samples: &[inv::GpuSample]) -> Vec<pb::GpuHealthStatus> {
    samples
        .iter()
        .map(|s| {
            let (health, reason) = health(&s.health);
            pb::GpuHealthStatus {
                uuid: s.uuid.clone(),
                health: health as i32,
                reason,
                ..Default::default()
            }
        })
        .collect()
}

/// One GPU's sample for a metrics report; `at_unix_ms` stamps its XID events. A gauge the
/// device cannot give is sent as 0 (the wire has no "unknown" for these fields).
pub fn sample(s: &inv::GpuSample, at_unix_ms: i64) -> pb::GpuSample {
    let (health, _) = health(&s.health);
    pb::GpuSample {
        uuid: s.uuid.clone(),
        temperature_c: s.temperature_c.unwrap_or(0),
        power_w: f64::from(s.power_w.unwrap_or(0)),
        sm_util_pct: s.sm_util_pct.unwrap_or(0),
        mem_util_pct: s.mem_util_pct.unwrap_or(0),
        memory_used_mib: s.memory_used_mib.unwrap_or(0),
        ecc_corrected: s.ecc_corrected.unwrap_or(0),
        ecc_uncorrected: s.ecc_uncorrected.unwrap_or(0),
        health: health as i32,
        xid_events: s
            .xid_events
            .iter()
            .map(|x| pb::XidEvent {
                code: u32::try_from(x.code).unwrap_or(u32::MAX),
                at_unix_ms,
                message: String::new(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_inventory::{GpuSource, SimulatedOptions, SimulatedSource};

    fn shipped(name: &str) -> SimulatedSource {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../inventory/inventories")
            .join(name);
        SimulatedSource::load(
            &path,
            SimulatedOptions {
                hostname: Some("conv-test".into()),
                fault_file: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn h100_host_converts_with_nvlink_rows_by_uuid() {
        let host = shipped("h100-sxm-8x.toml").inventory().unwrap();
        let pb = host_inventory(&host);
        assert_eq!(pb.hostname, "conv-test");
        assert_eq!(pb.driver_version, host.driver_version);
        assert_eq!(pb.cuda_version, host.cuda_version);
        assert_eq!(pb.gpus.len(), 8);
        for (g, src) in pb.gpus.iter().zip(&host.gpus) {
            assert_eq!(g.index, src.index);
            assert_eq!(g.uuid, src.uuid);
            assert!(g.uuid.starts_with("GPU-"));
            assert_eq!(g.model, src.name);
            assert_eq!(g.memory_mib, src.memory_mib);
            assert_eq!(g.pci_bus_id, src.pci_bus_id);
            assert_eq!(g.numa_node, src.numa_node);
            assert_eq!(g.mig_capable, src.mig.capable);
            assert_eq!(g.mig_enabled, src.mig.enabled);
            assert_eq!(g.mig_instances.len(), src.mig.instances.len());
            assert_eq!(g.gpu_type, "h100-80gb");
            assert!(!g.nvlink_peer_uuids.contains(&g.uuid), "no self link");
            for peer in &g.nvlink_peer_uuids {
                let j = host.gpus.iter().find(|x| &x.uuid == peer).unwrap().index;
                assert!(host.nvlink_connected(g.index, j));
            }
        }
        // NVSwitch: every H100 reaches the seven others.
        assert!(pb.gpus.iter().all(|g| g.nvlink_peer_uuids.len() == 7));
    }

    #[test]
    fn pcie_host_has_no_nvlink() {
        let host = shipped("l40s-2x.toml").inventory().unwrap();
        let pb = host_inventory(&host);
        assert_eq!(pb.gpus.len(), 2);
        assert!(pb.gpus.iter().all(|g| g.nvlink_peer_uuids.is_empty()));
        assert!(pb.gpus.iter().all(|g| !g.mig_capable));
    }

    #[test]
    fn samples_and_health_convert() {
        let source = shipped("l40s-2x.toml");
        source
            .inject(kiln_inventory::Fault::Xid { gpu: 1, code: 79 })
            .unwrap();
        let samples = source.sample().unwrap();
        let health = health_statuses(&samples);
        assert_eq!(health[0].health, pb::GpuHealth::Healthy as i32);
        assert_eq!(health[1].health, pb::GpuHealth::Unhealthy as i32);
        assert!(!health[1].reason.is_empty());
        let s = sample(&samples[1], 1234);
        assert_eq!(s.uuid, samples[1].uuid);
        assert_eq!(s.health, pb::GpuHealth::Unhealthy as i32);
        assert_eq!(
            s.xid_events,
            vec![pb::XidEvent {
                code: 79,
                at_unix_ms: 1234,
                message: String::new()
            }]
        );
        assert!(s.temperature_c > 0);
    }
}

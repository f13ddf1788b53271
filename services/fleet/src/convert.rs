//! Between the wire (`kiln.node.v1`) and the store's plain rows, with the bounds every field
//! from an agent is checked against: an agent is a remote peer, and nothing it sends may crash
//! the service or write unbounded data.

use kiln_proto::node::v1::{
    GpuHealth, GpuHealthStatus, MetricsReport, NodeState, ObservedReport, ObservedState,
    RegisterRequest,
};
use kiln_store::{
    GpuHealthReport, GpuRegistration, GpuSampleReport, MigInstanceRecord, NodeRegistration,
    ObservedRecord,
};
use time::OffsetDateTime;
use tonic::Status;
use uuid::Uuid;

/// More GPUs than any host has; a report past it is refused.
pub const MAX_GPUS: usize = 64;
pub const MAX_MIG_INSTANCES: usize = 7 * 2;
pub const MAX_TEXT: usize = 256;
pub const MAX_REASON: usize = 1024;
pub const MAX_XIDS: usize = 64;
pub const MAX_OBSERVED: usize = 4096;

fn text(field: &str, value: &str, max: usize) -> Result<String, Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} must be at most {max} bytes"
        )));
    }
    Ok(value.to_owned())
}

/// Clip free text (reasons, XID messages) instead of refusing the whole report.
fn clip(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_owned();
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// The inventory a `Register` carries, checked.
pub fn registration(req: &RegisterRequest) -> Result<NodeRegistration, Status> {
    let inv = req.inventory.clone().unwrap_or_default();
    let cap = req.capacity.unwrap_or_default();
    let hostname = inv.hostname.trim();
    if hostname.is_empty() {
        return Err(Status::invalid_argument("inventory.hostname is required"));
    }
    if inv.gpus.len() > MAX_GPUS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_GPUS} GPUs per node"
        )));
    }
    let mut gpus = Vec::with_capacity(inv.gpus.len());
    let mut seen = std::collections::HashSet::new();
    for (i, g) in inv.gpus.iter().enumerate() {
        let field = |f: &str| format!("inventory.gpus[{i}].{f}");
        if g.uuid.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{} is required",
                field("uuid")
            )));
        }
        if !seen.insert(g.uuid.as_str()) {
            return Err(Status::invalid_argument(format!(
                "GPU {} is listed twice",
                g.uuid
            )));
        }
        if g.mig_instances.len() > MAX_MIG_INSTANCES {
            return Err(Status::invalid_argument(format!(
                "{} lists more than {MAX_MIG_INSTANCES}",
                field("mig_instances")
            )));
        }
        if g.nvlink_peer_uuids.len() > MAX_GPUS {
            return Err(Status::invalid_argument(format!(
                "{} lists more than {MAX_GPUS}",
                field("nvlink_peer_uuids")
            )));
        }
        let gpu_type = if g.gpu_type.is_empty() {
            kiln_inventory::gpu_type_for(&g.model, g.memory_mib)
        } else {
            Some(text(&field("gpu_type"), &g.gpu_type, 64)?)
        };
        gpus.push(GpuRegistration {
            uuid: text(&field("uuid"), &g.uuid, MAX_TEXT)?,
            index: g.index,
            model: text(&field("model"), &g.model, MAX_TEXT)?,
            gpu_type,
            memory_mib: g.memory_mib,
            pci_bus_id: text(&field("pci_bus_id"), &g.pci_bus_id, 64)?,
            numa_node: g.numa_node,
            iommu_group: g.iommu_group,
            mig_capable: g.mig_capable,
            mig_enabled: g.mig_enabled,
            mig_instances: g
                .mig_instances
                .iter()
                .map(|m| {
                    Ok(MigInstanceRecord {
                        profile: text(&field("mig_instances.profile"), &m.profile, 32)?,
                        start: m.start,
                        size: m.size,
                        uuid: text(&field("mig_instances.uuid"), &m.uuid, MAX_TEXT)?,
                    })
                })
                .collect::<Result<_, Status>>()?,
            nvlink_peers: g
                .nvlink_peer_uuids
                .iter()
                .map(|p| text(&field("nvlink_peer_uuids"), p, MAX_TEXT))
                .collect::<Result<_, Status>>()?,
        });
    }
    let version = req.protocol_version.unwrap_or_default();
    Ok(NodeRegistration {
        hostname: text("inventory.hostname", hostname, 253)?,
        agent_version: text("agent_version", req.agent_version.trim(), 64)?,
        protocol_minor: version.minor,
        driver_version: text("inventory.driver_version", &inv.driver_version, 64)?,
        cuda_version: text("inventory.cuda_version", &inv.cuda_version, 64)?,
        cpu_cores: cap.cpu_cores,
        memory_mib: cap.memory_mib,
        disk_gib: cap.disk_gib,
        gpus,
    })
}

/// A node's public address: empty, or an IP address / DNS name (at most 253 characters of
/// letters, digits, `.`, `-`, `:` and `[]`), so what tenants are shown is a plain address.
pub fn public_address(raw: &str) -> Result<&str, Status> {
    let raw = raw.trim();
    let ok = raw.len() <= 253
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        return Err(Status::invalid_argument(
            "public_address must be an IP address or DNS name (at most 253 characters)",
        ));
    }
    Ok(raw)
}

/// A GPU health value as the store spells it; `None` for a value this version does not know
/// (treated as "no news", per the contract's rule for unknown enum values).
pub fn health(raw: i32) -> Option<&'static str> {
    match GpuHealth::try_from(raw).unwrap_or(GpuHealth::Unspecified) {
        GpuHealth::Healthy => Some("healthy"),
        GpuHealth::Degraded => Some("degraded"),
        GpuHealth::Unhealthy => Some("unhealthy"),
        GpuHealth::Unspecified => None,
    }
}

pub fn health_reports(statuses: &[GpuHealthStatus]) -> Result<Vec<GpuHealthReport>, Status> {
    if statuses.len() > MAX_GPUS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_GPUS} GPU health entries"
        )));
    }
    Ok(statuses
        .iter()
        .filter_map(|s| {
            Some(GpuHealthReport {
                uuid: clip(&s.uuid, MAX_TEXT),
                health: health(s.health)?,
                reason: clip(&s.reason, MAX_REASON),
            })
        })
        .collect())
}

fn at(unix_ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
}

fn small(v: u32) -> Option<i32> {
    i32::try_from(v).ok()
}

pub fn samples(report: &MetricsReport) -> Result<Vec<GpuSampleReport>, Status> {
    if report.samples.len() > MAX_GPUS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_GPUS} samples per report"
        )));
    }
    let sampled_at = at(report.sampled_at_unix_ms);
    Ok(report
        .samples
        .iter()
        .map(|s| {
            let xids = s
                .xid_events
                .iter()
                .take(MAX_XIDS)
                .map(|x| {
                    (
                        i32::try_from(x.code).unwrap_or(i32::MAX),
                        clip(&x.message, MAX_REASON),
                    )
                })
                .collect();
            GpuSampleReport {
                uuid: clip(&s.uuid, MAX_TEXT),
                sampled_at,
                temperature_c: small(s.temperature_c),
                power_w: s.power_w.is_finite().then_some(s.power_w),
                sm_util_pct: small(s.sm_util_pct.min(100)),
                mem_util_pct: small(s.mem_util_pct.min(100)),
                memory_used_mib: i64::try_from(s.memory_used_mib).ok(),
                ecc_corrected: i64::try_from(s.ecc_corrected).ok(),
                ecc_uncorrected: i64::try_from(s.ecc_uncorrected).ok(),
                xids,
            }
        })
        .collect())
}

pub fn observed_state(raw: i32) -> &'static str {
    match ObservedState::try_from(raw).unwrap_or(ObservedState::Unspecified) {
        ObservedState::Pending => "pending",
        ObservedState::Starting => "starting",
        ObservedState::Running => "running",
        ObservedState::Stopping => "stopping",
        ObservedState::Stopped => "stopped",
        ObservedState::Failed => "failed",
        ObservedState::Unspecified => "unknown",
    }
}

pub fn observed(report: &ObservedReport) -> Result<Vec<ObservedRecord>, Status> {
    if report.assignments.len() > MAX_OBSERVED {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_OBSERVED} assignments per report"
        )));
    }
    report
        .assignments
        .iter()
        .map(|a| {
            let id = parse_assignment(&a.assignment_id)?;
            let ports: Vec<serde_json::Value> = a
                .ports
                .iter()
                .take(64)
                .map(|p| {
                    serde_json::json!({
                        "port": p.port,
                        "protocol": if p.protocol == 2 { "udp" } else { "tcp" },
                        "host_port": p.host_port,
                    })
                })
                .collect();
            Ok(ObservedRecord {
                assignment_id: id,
                generation: i64::try_from(a.generation).unwrap_or(i64::MAX),
                state: observed_state(a.state),
                reason: clip(&a.reason, MAX_REASON),
                exit_code: a.exit_code,
                ports: serde_json::Value::Array(ports),
                observed_at: at(a.observed_at_unix_ms),
                runtime_ms: i64::try_from(a.runtime_ms).unwrap_or(i64::MAX),
            })
        })
        .collect()
}

fn parse_assignment(raw: &str) -> Result<Uuid, Status> {
    raw.parse::<kiln_domain::AssignmentId>()
        .map(|id| id.as_uuid())
        .map_err(|_| Status::invalid_argument(format!("{raw:?} is not an assignment id")))
}

/// The store's derived node state, on the wire (an unknown one as unspecified).
pub fn node_state(state: &str) -> NodeState {
    use kiln_domain::NodeState as S;
    match state.parse::<S>() {
        Ok(S::Ready) => NodeState::Ready,
        Ok(S::Cordoned) => NodeState::Cordoned,
        Ok(S::Draining) => NodeState::Draining,
        Ok(S::Unreachable) => NodeState::Unreachable,
        Ok(S::Lost) => NodeState::Lost,
        Ok(S::Retired) => NodeState::Retired,
        Err(_) => NodeState::Unspecified,
    }
}

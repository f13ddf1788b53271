//! Instances: a tenant's VMs with whole GPUs passed through, reached over SSH. Creating one
//! records a pending workload of kind `instance` (GPU mode `passthrough`) that the scheduler
//! places like a pod; its spec carries the SSH keys and a copy of the catalog image it boots.
//!
//! Power changes are new generations of the same assignment on the same node:
//! * **stop**: the VM is powered off; its GPUs are given back at once, its node's CPU, memory
//!   and disk stay held (the overlay disk lives on that node), it is billed for storage only;
//! * **start**: whole GPUs of its type on the same node are taken again (the ones it had when
//!   they are free) and the VM powered on; when the node has none free the start is refused
//!   (409) and nothing changes. An instance that holds no node any more (stopped by a drain or
//!   for credit, or failed) is queued to be placed anew instead;
//! * **reboot**: `reboot_count` goes up by one; the agent reboots a running VM when it sees it.
//!
//! Quotas are counted by the scheduler when it places an instance; a start on its own node
//! does not count them again.

use kiln_domain::{InstanceId, OrgId, Permission, WorkloadId, WorkloadName};
use kiln_proto::node::v1 as pb;
use kiln_store::{AssignmentKind, AssignmentPut, NewWorkload, OrgScope, TenantWorkloadRecord};
use prost::Message;
use sqlx::PgConnection;

use super::orgs::audit;
use super::{Checks, page};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::*;

pub const KIND: &str = "instance";
pub const MAX_GPUS: i64 = 8;
pub const MAX_KEYS: usize = 16;
pub const MAX_KEY_BYTES: usize = 16 * 1024;
pub const MAX_DISK_GIB: i64 = 10240;
pub const DEFAULT_DISK_GIB: i64 = 20;
pub const MIN_RSA_BITS: usize = 2048;

/// CPU and memory an instance gets per GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub cpu_millis_per_gpu: i64,
    pub memory_mib_per_gpu: i64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            cpu_millis_per_gpu: 8000,
            memory_mib_per_gpu: 64 * 1024,
        }
    }
}

/// `KILN_INSTANCE_SHAPE=cpu_millis=1000,memory_mib=256` (per GPU; either may be left out;
/// empty: the default).
pub fn parse_shape(raw: &str) -> Result<Shape, String> {
    let mut shape = Shape::default();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not key=value"))?;
        let v: i64 = v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("`{part}`: the value must be a positive whole number"))?;
        match k.trim() {
            "cpu_millis" => shape.cpu_millis_per_gpu = v,
            "memory_mib" => shape.memory_mib_per_gpu = v,
            other => return Err(format!("unknown key `{other}` (cpu_millis, memory_mib)")),
        }
    }
    Ok(shape)
}

/// An instance id from a path: anything malformed is simply an instance that does not exist.
pub fn parse_instance(raw: &str) -> Result<InstanceId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("instance"))
}

/// One OpenSSH public key, checked and re-encoded (`type base64 [comment]`): ed25519, ECDSA,
/// or RSA of at least 2048 bits.
pub fn check_ssh_key(raw: &str) -> Result<String, String> {
    use ssh_key::public::KeyData;
    let line = raw.trim();
    if line.is_empty() {
        return Err("is empty".into());
    }
    if line.len() > MAX_KEY_BYTES {
        return Err("is too long for a public key".into());
    }
    let key = ssh_key::PublicKey::from_openssh(line).map_err(|_| {
        "is not an OpenSSH public key (expected `ssh-ed25519 AAAA… comment`, as in ~/.ssh/id_ed25519.pub)"
            .to_owned()
    })?;
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => {}
        KeyData::Rsa(rsa) => {
            let bits = rsa
                .n
                .as_positive_bytes()
                .map(|b| match b.first() {
                    Some(first) => (b.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
                    None => 0,
                })
                .unwrap_or(0);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "is an RSA key of {bits} bits; RSA keys need at least {MIN_RSA_BITS} bits (or use ed25519)"
                ));
            }
        }
        _ => {
            return Err(format!(
                "is a {} key; use ed25519, ECDSA or RSA (at least {MIN_RSA_BITS} bits)",
                key.algorithm()
            ));
        }
    }
    key.to_openssh()
        .map_err(|_| "could not be re-encoded".to_owned())
}

pub async fn list(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<InstanceList, ApiError> {
    let page = page::<InstanceId>(limit, cursor, |p| p.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let p = state.store.workload_list(&scope, KIND, page).await?;
    Ok(InstanceList {
        items: p.items.iter().map(view).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn get(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    instance: &str,
) -> Result<InstanceView, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let id = parse_instance(instance)?;
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(kiln_store::StoreError::from)?;
    let w = state
        .store
        .workload_view(&mut conn, &scope, KIND, id.as_uuid())
        .await?;
    Ok(view(&w))
}

/// Validate and record a new instance (pending); the scheduler places it.
pub async fn create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    input: &CreateInstanceInput,
) -> Result<InstanceView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    super::billing::ensure_in_credit(state, conn, &scope).await?;
    let v = validate(state, conn, &scope, input).await?;
    let shape = state.config.instance_shape;
    let record = state
        .store
        .workload_create(
            conn,
            &scope,
            &NewWorkload {
                kind: KIND,
                name: v.name.as_str(),
                tier: if v.spot { "spot" } else { "on_demand" },
                priority: 0,
                gpu_mode: "passthrough",
                gpu_type: Some(&v.gpu_type),
                gpu_count: v.gpu_count as i32,
                mig_profile: None,
                share_memory_mib: None,
                cpu_millis: shape.cpu_millis_per_gpu * v.gpu_count,
                memory_mib: shape.memory_mib_per_gpu * v.gpu_count,
                disk_gib: v.disk_gib,
                spec: v.spec,
            },
        )
        .await?;
    let id = InstanceId::from_uuid(record.id);
    let event = audit(
        &scope,
        caller,
        "instance.create",
        id.to_string(),
        serde_json::json!({
            "name": v.name.as_str(),
            "image": input.image.trim(),
            "gpu_type": v.gpu_type,
            "gpu_count": v.gpu_count,
            "disk_gib": v.disk_gib,
            "ssh_keys": v.key_count,
            "spot": v.spot,
        }),
    );
    state.store.audit_record(conn, &event).await?;
    let w = state
        .store
        .workload_view(conn, &scope, KIND, record.id)
        .await?;
    Ok(view(&w))
}

struct Valid {
    name: WorkloadName,
    gpu_type: String,
    gpu_count: i64,
    disk_gib: i64,
    spot: bool,
    key_count: usize,
    spec: serde_json::Value,
}

/// Check every field, reporting all problems at once.
async fn validate(
    state: &AppState,
    conn: &mut PgConnection,
    scope: &OrgScope,
    input: &CreateInstanceInput,
) -> Result<Valid, ApiError> {
    let mut checks = Checks::default();
    let name = checks.take(WorkloadName::parse("name", &input.name));

    let gpu_type = input.gpu_type.trim().to_owned();
    if gpu_type.is_empty() {
        checks.push("gpu_type", "is required; see GET /v1/gpu-types");
    } else {
        let fleet = state
            .store
            .gpu_type_fleet_memory(conn, scope, &gpu_type)
            .await?;
        if fleet.is_none() && kiln_placement::mig::geometry(&gpu_type).is_none() {
            checks.push(
                "gpu_type",
                format!("unknown GPU type `{gpu_type}`; see GET /v1/gpu-types"),
            );
        }
    }
    if !(1..=MAX_GPUS).contains(&input.gpu_count) {
        checks.push(
            "gpu_count",
            format!("must be between 1 and {MAX_GPUS} whole GPUs"),
        );
    }

    let image_name = input.image.trim();
    let image = if image_name.is_empty() {
        checks.push("image", "is required; see GET /v1/images");
        None
    } else {
        match state.store.vm_image_get(conn, image_name).await? {
            Some(i) if i.status == "active" => Some(i),
            Some(_) => {
                checks.push(
                    "image",
                    format!("image `{image_name}` is deprecated; see GET /v1/images"),
                );
                None
            }
            None => {
                checks.push(
                    "image",
                    format!("unknown image `{image_name}`; see GET /v1/images"),
                );
                None
            }
        }
    };

    let min_disk = image.as_ref().map_or(1, |i| i.min_disk_gib);
    let disk_gib = input
        .disk_gib
        .unwrap_or_else(|| min_disk.max(DEFAULT_DISK_GIB));
    if !(1..=MAX_DISK_GIB).contains(&disk_gib) {
        checks.push(
            "disk_gib",
            format!("must be between {min_disk} and {MAX_DISK_GIB}"),
        );
    } else if disk_gib < min_disk {
        checks.push(
            "disk_gib",
            format!(
                "must be at least {min_disk} (the minimum of image `{image_name}`), at most {MAX_DISK_GIB}"
            ),
        );
    }

    let mut keys = Vec::new();
    if input.ssh_public_keys.is_empty() {
        checks.push(
            "ssh_public_keys",
            "give at least one OpenSSH public key: it is the only way in",
        );
    } else if input.ssh_public_keys.len() > MAX_KEYS {
        checks.push("ssh_public_keys", format!("at most {MAX_KEYS} keys"));
    } else {
        for (i, raw) in input.ssh_public_keys.iter().enumerate() {
            match check_ssh_key(raw) {
                Ok(k) => keys.push(k),
                Err(e) => checks.push(&format!("ssh_public_keys[{i}]"), e),
            }
        }
    }

    checks.finish()?;
    let (Some(name), Some(image)) = (name, image) else {
        return Err(ApiError::BadRequest("invalid instance".into()));
    };
    let spec = serde_json::json!({
        "image": image.name,
        "image_source": {
            "kernel": image.kernel,
            "initrd": image.initrd,
            "disk": image.disk,
            "kernel_args": image.kernel_args,
            "login_user": image.login_user,
        },
        "ssh_public_keys": keys,
        "power": "running",
        "reboot_count": 0,
    });
    Ok(Valid {
        name,
        gpu_type,
        gpu_count: input.gpu_count,
        disk_gib,
        spot: input.spot.unwrap_or(false),
        key_count: keys.len(),
        spec,
    })
}

/// A power change a tenant asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Stop,
    Start,
    Reboot,
}

impl Power {
    pub fn parse(raw: &str) -> Option<Power> {
        match raw {
            "stop" => Some(Power::Stop),
            "start" => Some(Power::Start),
            "reboot" => Some(Power::Reboot),
            _ => None,
        }
    }
    fn action(self) -> &'static str {
        match self {
            Power::Stop => "instance.stop",
            Power::Start => "instance.start",
            Power::Reboot => "instance.reboot",
        }
    }
}

/// Stop, start or reboot an instance (see the module's notes). Asking for what already holds
/// (stopping a stopped instance, starting a running one) changes nothing and is not an error.
pub async fn power(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    instance: &str,
    what: Power,
) -> Result<InstanceView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let id = parse_instance(instance)?;
    let w = state
        .store
        .instance_lock(conn, &scope, id.as_uuid())
        .await?;
    if w.state == "terminated" {
        return Err(ApiError::Conflict(
            "the instance is terminated; create a new one".into(),
        ));
    }
    let mut spec = w.spec.clone();
    let powered_on = spec.get("power").and_then(|v| v.as_str()) != Some("stopped");
    let assignment = match w.assignment_id {
        Some(a) => state.store.assignment_get(conn, a).await?,
        None => None,
    };
    let placed = w.node_id.is_some() && assignment.is_some();
    let who = who(caller);
    let changed = match what {
        Power::Stop => {
            if !powered_on || matches!(w.state.as_str(), "stopped" | "failed") {
                false
            } else {
                spec["power"] = "stopped".into();
                match (&assignment, w.node_id) {
                    (Some(a), Some(node)) => {
                        let gpus = state.store.instance_gpus_release(conn, w.id).await?;
                        spec["last_gpu_uuids"] = serde_json::json!(gpus);
                        let bytes = respec(&a.spec, |i| {
                            i.power = pb::PowerState::Stopped as i32;
                            i.gpu_uuids.clear();
                        })?;
                        put(state, conn, a.id, node, &bytes, &[]).await?;
                        state
                            .store
                            .instance_set(
                                conn,
                                w.id,
                                "stopping",
                                &format!("stop asked by {who}"),
                                &spec,
                            )
                            .await?;
                    }
                    _ => {
                        // Not placed yet: nothing to power off.
                        state
                            .store
                            .instance_set(
                                conn,
                                w.id,
                                "stopped",
                                &format!("stopped by {who} before it was placed"),
                                &spec,
                            )
                            .await?;
                    }
                }
                true
            }
        }
        Power::Start => {
            let down = matches!(w.state.as_str(), "stopped" | "stopping" | "failed");
            if !down && powered_on {
                false
            } else if let (true, Some(a), Some(node)) = (placed, &assignment, w.node_id) {
                let prefer: Vec<String> = spec
                    .get("last_gpu_uuids")
                    .and_then(|v| v.as_array())
                    .map(|v| {
                        v.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let gpu_type = w.gpu_type.clone().unwrap_or_default();
                let Some(gpus) = state
                    .store
                    .instance_gpus_take(conn, w.id, node, &gpu_type, w.gpu_count, &prefer)
                    .await?
                else {
                    return Err(ApiError::Conflict(format!(
                        "its node has no {} free {gpu_type} GPU(s) right now; the instance's disk \
                         is on that node, so it can start only there: try again later",
                        w.gpu_count
                    )));
                };
                spec["power"] = "running".into();
                let bytes = respec(&a.spec, |i| {
                    i.power = pb::PowerState::Running as i32;
                    i.gpu_uuids = gpus.clone();
                })?;
                put(state, conn, a.id, node, &bytes, &gpus).await?;
                state
                    .store
                    .instance_set(
                        conn,
                        w.id,
                        "starting",
                        &format!("start asked by {who}"),
                        &spec,
                    )
                    .await?;
                true
            } else if w.node_id.is_none() {
                spec["power"] = "running".into();
                state.store.instance_requeue(conn, w.id, &spec).await?;
                true
            } else {
                return Err(ApiError::Conflict(
                    "the instance is still being moved; try again in a moment".into(),
                ));
            }
        }
        Power::Reboot => {
            let (true, true, Some(a), Some(node)) = (
                powered_on,
                matches!(w.state.as_str(), "scheduled" | "starting" | "running"),
                &assignment,
                w.node_id,
            ) else {
                return Err(ApiError::Conflict(format!(
                    "only a running instance can be rebooted; this one is {}",
                    w.state
                )));
            };
            let count = spec
                .get("reboot_count")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
                + 1;
            spec["reboot_count"] = count.into();
            let bytes = respec(&a.spec, |i| i.reboot_count = count)?;
            put(state, conn, a.id, node, &bytes, &a.gpu_uuids).await?;
            state
                .store
                .instance_set(conn, w.id, &w.state, &w.state_reason, &spec)
                .await?;
            true
        }
    };
    if changed {
        let event = audit(
            &scope,
            caller,
            what.action(),
            id.to_string(),
            serde_json::json!({ "previous_state": w.state }),
        );
        state.store.audit_record(conn, &event).await?;
    }
    let w = state
        .store
        .workload_view(conn, &scope, KIND, id.as_uuid())
        .await?;
    Ok(view(&w))
}

/// The assignment's encoded spec with its instance part changed by `f`.
fn respec(spec: &[u8], f: impl FnOnce(&mut pb::InstanceSpec)) -> Result<Vec<u8>, ApiError> {
    let mut a = pb::Assignment::decode(spec).map_err(ApiError::internal)?;
    match &mut a.kind {
        Some(pb::assignment::Kind::Instance(i)) => f(i),
        _ => {
            return Err(ApiError::internal(std::io::Error::other(
                "an instance's assignment is not an instance",
            )));
        }
    }
    Ok(a.encode_to_vec())
}

async fn put(
    state: &AppState,
    conn: &mut PgConnection,
    assignment: uuid::Uuid,
    node: uuid::Uuid,
    spec: &[u8],
    gpus: &[String],
) -> Result<(), ApiError> {
    state
        .store
        .assignment_put(
            conn,
            AssignmentPut {
                id: kiln_domain::AssignmentId::from_uuid(assignment),
                node: kiln_domain::NodeId::from_uuid(node),
                kind: AssignmentKind::Instance,
                spec,
                gpu_uuids: gpus,
            },
        )
        .await?;
    Ok(())
}

/// Delete an instance: it becomes `terminated`, everything it holds (its disk too) is given
/// back at once and its node's agent is told to destroy the VM. Deleting again changes nothing.
pub async fn delete(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    instance: &str,
) -> Result<InstanceView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let id = parse_instance(instance)?;
    let current = state
        .store
        .workload_lock(conn, &scope, KIND, id.as_uuid())
        .await?;
    if current != "terminated" {
        let reason = format!("deleted by {}", who(caller));
        state
            .store
            .workload_release(conn, WorkloadId::from(id), "terminated", &reason)
            .await?;
        let event = audit(
            &scope,
            caller,
            "instance.delete",
            id.to_string(),
            serde_json::json!({ "previous_state": current }),
        );
        state.store.audit_record(conn, &event).await?;
    }
    let w = state
        .store
        .workload_view(conn, &scope, KIND, id.as_uuid())
        .await?;
    Ok(view(&w))
}

/// The instance's serial console output, as its agent pushes it through the workload log
/// pipeline (`PushLogs`): the last `tail` lines, oldest first.
pub async fn console(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    instance: &str,
    tail: usize,
) -> Result<Vec<LogLineView>, ApiError> {
    get(state, caller, org, instance).await?;
    let id = parse_instance(instance)?.as_uuid();
    let lines = state.logs.tail(id, tail).await.map_err(|e| {
        tracing::warn!(error = %e, "reading an instance's console failed");
        ApiError::Unavailable(
            "the console log is unavailable right now (the log store is unreachable)".into(),
        )
    })?;
    Ok(lines.into_iter().map(super::pods::log_view).collect())
}

/// The caller as a person reads it in `state_reason`.
fn who(caller: &Caller) -> String {
    match &caller.principal {
        kiln_store::Principal::User { user_id, .. } => user_id.to_string(),
        kiln_store::Principal::ApiKey { key_id, .. } => format!("API key {key_id}"),
    }
}

/// The tenant's view of an instance row.
pub fn view(w: &TenantWorkloadRecord) -> InstanceView {
    let spec = &w.spec;
    let text =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let keys: Vec<String> = spec
        .get("ssh_public_keys")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let user = Some(text(
        spec.get("image_source").and_then(|s| s.get("login_user")),
    ))
    .filter(|u| !u.is_empty())
    .unwrap_or_else(|| "root".to_owned());
    // Where the agent forwarded the guest's port 22: `[{port, protocol, host_port}]`.
    let ssh_port = w
        .observed_ports
        .as_ref()
        .and_then(|v| v.as_array())
        .and_then(|a| {
            a.iter().find_map(|p| {
                (p.get("port")?.as_i64()? == 22)
                    .then(|| p.get("host_port")?.as_i64())
                    .flatten()
                    .filter(|hp| *hp > 0)
            })
        });
    let live = matches!(w.state.as_str(), "starting" | "running");
    let ssh = match (ssh_port, &w.node_hostname, live) {
        (Some(port), Some(host), true) => Some(InstanceSshView {
            command: format!("ssh -p {port} {user}@{host}"),
            host: host.clone(),
            port,
            user,
        }),
        _ => None,
    };
    InstanceView {
        id: InstanceId::from_uuid(w.id).to_string(),
        name: w.name.clone(),
        image: text(spec.get("image")),
        state: w.state.clone(),
        state_reason: w.state_reason.clone(),
        power: if spec.get("power").and_then(|v| v.as_str()) == Some("stopped") {
            "stopped".into()
        } else {
            "running".into()
        },
        reboot_count: spec
            .get("reboot_count")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0),
        gpu_type: w.gpu_type.clone().unwrap_or_default(),
        gpu_count: i64::from(w.gpu_count),
        node: w
            .node_id
            .map(|n| kiln_domain::NodeId::from_uuid(n).to_string()),
        gpus: w.gpus.clone(),
        cpu: w.cpu_millis as f64 / 1000.0,
        memory_gib: w.memory_mib / 1024,
        disk_gib: w.disk_gib,
        ssh_public_keys: keys,
        ssh,
        spot: w.tier == "spot",
        created_at: ts(w.created_at),
        updated_at: ts(w.updated_at),
        cost_so_far: Some(async_graphql::Json(serde_json::json!(
            super::billing::money(w.cost_micros)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_override_is_read_per_gpu() {
        assert_eq!(parse_shape("").unwrap(), Shape::default());
        assert_eq!(
            parse_shape("cpu_millis=1000, memory_mib=256").unwrap(),
            Shape {
                cpu_millis_per_gpu: 1000,
                memory_mib_per_gpu: 256
            }
        );
        assert!(parse_shape("cpu=1").is_err());
        assert!(parse_shape("memory_mib=-1").is_err());
    }

    #[test]
    fn keys_that_are_not_openssh_public_keys_are_refused() {
        assert!(check_ssh_key("").is_err());
        assert!(check_ssh_key("ssh-ed25519 not-base64").is_err());
        assert!(check_ssh_key("-----BEGIN OPENSSH PRIVATE KEY-----").is_err());
    }
}

//! Pods: a tenant's GPU containers. Creating one records a pending workload of kind `pod` that
//! the scheduler places; deleting one gives its capacity back at once and removes it from its
//! node's assignments.
//!
//! Secret env values are sealed with the deployment's secrets key ([`crate::secrets`]) and kept
//! in the workload's `spec.env_secret`; plain values go to `spec.env`, which the scheduler
//! copies into the agent's assignment. No answer ever carries a secret's value.

use std::collections::{BTreeMap, BTreeSet};

use kiln_domain::{ImageRef, OrgId, Permission, PodId, WorkloadId, WorkloadName, env_key_problem};
use kiln_store::{NewWorkload, OrgScope, TenantWorkloadRecord};
use sqlx::PgConnection;

use super::orgs::audit;
use super::{Checks, page};
use crate::error::ApiError;
use crate::secrets::pod_env_context;
use crate::state::{AppState, Caller};
use crate::views::*;

pub const KIND: &str = "pod";

pub const MAX_GPUS: i64 = 8;
pub const MAX_PORTS: usize = 32;
pub const MAX_ENV: usize = 64;
/// Names plus values, in bytes.
pub const MAX_ENV_BYTES: usize = 32 * 1024;
pub const MAX_COMMAND_ARGS: usize = 64;
pub const MAX_COMMAND_BYTES: usize = 32 * 1024;
pub const DEFAULT_CPU: f64 = 1.0;
pub const DEFAULT_MEMORY_GIB: i64 = 4;
pub const DEFAULT_DISK_GIB: i64 = 10;

/// A pod id from a path: anything malformed is simply a pod that does not exist.
pub fn parse_pod(raw: &str) -> Result<PodId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("pod"))
}

pub async fn list(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<PodList, ApiError> {
    let page = page::<PodId>(limit, cursor, |p| p.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let p = state.store.workload_list(&scope, KIND, page).await?;
    Ok(PodList {
        items: p.items.iter().map(view).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn get(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    pod: &str,
) -> Result<PodView, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::WorkloadRead)
        .await?;
    let pod = parse_pod(pod)?;
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(kiln_store::StoreError::from)?;
    let w = state
        .store
        .workload_view(&mut conn, &scope, KIND, pod.as_uuid())
        .await?;
    Ok(view(&w))
}

/// Validate and record a new pod (pending); the scheduler places it.
pub async fn create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    input: &CreatePodInput,
) -> Result<PodView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    super::billing::ensure_in_credit(state, conn, &scope).await?;
    let pod = validate(state, conn, &scope, input).await?;
    let record = state
        .store
        .workload_create(
            conn,
            &scope,
            &NewWorkload {
                kind: KIND,
                name: pod.name.as_str(),
                tier: if pod.spot { "spot" } else { "on_demand" },
                priority: 0,
                gpu_mode: pod.gpu.mode(),
                gpu_type: pod.gpu.gpu_type(),
                gpu_count: pod.gpu.count(),
                mig_profile: pod.gpu.mig_profile(),
                share_memory_mib: pod.gpu.share_memory_mib(),
                cpu_millis: pod.cpu_millis,
                memory_mib: pod.memory_gib * 1024,
                disk_gib: pod.disk_gib,
                spec: pod.spec,
            },
        )
        .await?;
    let id = PodId::from_uuid(record.id);
    let event = audit(
        &scope,
        caller,
        "pod.create",
        id.to_string(),
        serde_json::json!({
            "name": pod.name.as_str(),
            "image": pod.image.as_str(),
            "gpu": input.gpu,
            "spot": pod.spot,
        }),
    );
    state.store.audit_record(conn, &event).await?;
    let w = state
        .store
        .workload_view(conn, &scope, KIND, record.id)
        .await?;
    Ok(view(&w))
}

/// Delete a pod: it becomes `terminated`, its GPUs, CPU and memory are free at once and its
/// node's agent is told to stop it. Deleting a pod that is already terminated changes nothing.
pub async fn delete(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    pod: &str,
) -> Result<PodView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::WorkloadWrite)
        .await?;
    let pod = parse_pod(pod)?;
    let current = state
        .store
        .workload_lock(conn, &scope, KIND, pod.as_uuid())
        .await?;
    if current != "terminated" {
        let reason = format!("deleted by {}", who(caller));
        state
            .store
            .workload_release(conn, WorkloadId::from(pod), "terminated", &reason)
            .await?;
        let event = audit(
            &scope,
            caller,
            "pod.delete",
            pod.to_string(),
            serde_json::json!({ "previous_state": current }),
        );
        state.store.audit_record(conn, &event).await?;
    }
    let w = state
        .store
        .workload_view(conn, &scope, KIND, pod.as_uuid())
        .await?;
    Ok(view(&w))
}

/// The caller as a person reads it in `state_reason`.
fn who(caller: &Caller) -> String {
    match &caller.principal {
        kiln_store::Principal::User { user_id, .. } => user_id.to_string(),
        kiln_store::Principal::ApiKey { key_id, .. } => format!("API key {key_id}"),
    }
}

/// What a pod asks for, validated.
enum GpuAsk {
    None,
    Whole { gpu_type: String, count: i64 },
    Mig { gpu_type: String, profile: String },
    Share { gpu_type: String, memory_gib: i64 },
}

impl GpuAsk {
    fn mode(&self) -> &'static str {
        match self {
            GpuAsk::None => "none",
            GpuAsk::Whole { .. } => "whole",
            GpuAsk::Mig { .. } => "mig",
            GpuAsk::Share { .. } => "share",
        }
    }
    fn gpu_type(&self) -> Option<&str> {
        match self {
            GpuAsk::None => None,
            GpuAsk::Whole { gpu_type, .. }
            | GpuAsk::Mig { gpu_type, .. }
            | GpuAsk::Share { gpu_type, .. } => Some(gpu_type),
        }
    }
    fn count(&self) -> i32 {
        match self {
            GpuAsk::Whole { count, .. } => *count as i32,
            _ => 0,
        }
    }
    fn mig_profile(&self) -> Option<&str> {
        match self {
            GpuAsk::Mig { profile, .. } => Some(profile),
            _ => None,
        }
    }
    fn share_memory_mib(&self) -> Option<i64> {
        match self {
            GpuAsk::Share { memory_gib, .. } => Some(memory_gib * 1024),
            _ => None,
        }
    }
}

struct ValidPod {
    name: WorkloadName,
    image: ImageRef,
    gpu: GpuAsk,
    cpu_millis: i64,
    memory_gib: i64,
    disk_gib: i64,
    spot: bool,
    spec: serde_json::Value,
}

/// Check every field, reporting all problems at once.
async fn validate(
    state: &AppState,
    conn: &mut PgConnection,
    scope: &OrgScope,
    input: &CreatePodInput,
) -> Result<ValidPod, ApiError> {
    let mut checks = Checks::default();
    let name = checks.take(WorkloadName::parse("name", &input.name));
    let image = checks.take(ImageRef::parse("image", &input.image));
    let gpu = match &input.gpu {
        None => Some(GpuAsk::None),
        Some(g) => validate_gpu(state, conn, scope, g, &mut checks).await?,
    };

    let cpu = input.cpu.unwrap_or(DEFAULT_CPU);
    let cpu_millis = if cpu.is_finite() && (0.1..=256.0).contains(&cpu) {
        Some((cpu * 1000.0).round() as i64)
    } else {
        checks.push("cpu", "must be between 0.1 and 256 cores");
        None
    };
    let memory_gib = input.memory_gib.unwrap_or(DEFAULT_MEMORY_GIB);
    if !(1..=2048).contains(&memory_gib) {
        checks.push("memory_gib", "must be between 1 and 2048");
    }
    let disk_gib = input.disk_gib.unwrap_or(DEFAULT_DISK_GIB);
    if !(1..=10240).contains(&disk_gib) {
        checks.push("disk_gib", "must be between 1 and 10240");
    }

    let ports = input.ports.clone().unwrap_or_default();
    if ports.len() > MAX_PORTS {
        checks.push("ports", format!("at most {MAX_PORTS} ports"));
    }
    if let Some(p) = ports.iter().find(|p| !(1..=65535).contains(*p)) {
        checks.push("ports", format!("{p} is not a port: use 1-65535"));
    }
    let distinct: BTreeSet<i64> = ports.iter().copied().collect();
    if distinct.len() != ports.len() {
        checks.push("ports", "each port may be listed only once");
    }

    let command = input.command.clone().unwrap_or_default();
    if command.len() > MAX_COMMAND_ARGS {
        checks.push("command", format!("at most {MAX_COMMAND_ARGS} arguments"));
    }
    if command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
        checks.push("command", "must be at most 32 KiB in all");
    }
    if command.iter().any(|a| a.contains('\0')) {
        checks.push("command", "arguments must not contain NUL characters");
    }

    let env = input.env.clone().unwrap_or_default();
    let (plain, secret) = validate_env(state, scope.org_id(), &env, &mut checks);

    checks.finish()?;
    let (Some(name), Some(image), Some(gpu), Some(cpu_millis)) = (name, image, gpu, cpu_millis)
    else {
        return Err(ApiError::BadRequest("invalid pod".into()));
    };
    let mut spec = serde_json::json!({
        "image": image.as_str(),
        "command": command,
        "env": plain,
        "ports": ports,
    });
    if !secret.is_empty() {
        spec["env_secret"] = serde_json::json!(secret);
    }
    Ok(ValidPod {
        name,
        image,
        gpu,
        cpu_millis,
        memory_gib,
        disk_gib,
        spot: input.spot.unwrap_or(false),
        spec,
    })
}

/// Plain values, and secret ones sealed; problems go to `checks`.
fn validate_env(
    state: &AppState,
    org: OrgId,
    env: &BTreeMap<String, EnvValueInput>,
    checks: &mut Checks,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut plain = BTreeMap::new();
    let mut secret = BTreeMap::new();
    if env.len() > MAX_ENV {
        checks.push("env", format!("at most {MAX_ENV} variables"));
    }
    let mut bytes = 0usize;
    for (key, value) in env {
        let field = format!("env.{}", printable(key));
        if let Some(problem) = env_key_problem(key) {
            checks.push(&field, problem);
        }
        let (value, is_secret) = match value {
            EnvValueInput::Plain(v) => (v, false),
            EnvValueInput::Detailed { value, secret } => (value, *secret),
        };
        bytes += key.len() + value.len();
        if value.contains('\0') {
            checks.push(&field, "values must not contain NUL characters");
            continue;
        }
        if !is_secret {
            plain.insert(key.clone(), value.clone());
            continue;
        }
        match &state.secrets {
            None => checks.push(
                &field,
                "secret values cannot be stored: this deployment has no secrets key \
                 (KILN_SECRETS_KEY); ask its operator",
            ),
            Some(sb) => match sb.seal(&pod_env_context(org, key), value) {
                Ok(sealed) => {
                    secret.insert(key.clone(), sealed);
                }
                Err(e) => {
                    tracing::error!(error = %e, "sealing a secret env value failed");
                    checks.push(&field, "could not be stored; try again");
                }
            },
        }
    }
    if bytes > MAX_ENV_BYTES {
        checks.push("env", "must be at most 32 KiB in all (names and values)");
    }
    (plain, secret)
}

/// A key for an error's field name: cut short and without control characters.
fn printable(key: &str) -> String {
    key.chars().filter(|c| !c.is_control()).take(64).collect()
}

async fn validate_gpu(
    state: &AppState,
    conn: &mut PgConnection,
    scope: &OrgScope,
    g: &GpuRequest,
    checks: &mut Checks,
) -> Result<Option<GpuAsk>, ApiError> {
    let gpu_type = g.gpu_type.trim().to_owned();
    let asked = [
        g.count.is_some(),
        g.mig_profile.is_some(),
        g.share.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if asked != 1 {
        checks.push(
            "gpu",
            if asked == 0 {
                "give one of count (whole GPUs), mig_profile or share"
            } else {
                "give only one of count (whole GPUs), mig_profile or share"
            },
        );
    }
    // Known: present in the fleet, or in the MIG tables.
    let memory_gib = if gpu_type.is_empty() {
        checks.push("gpu.type", "is required; see GET /v1/gpu-types");
        None
    } else {
        let fleet = state
            .store
            .gpu_type_fleet_memory(conn, scope, &gpu_type)
            .await?;
        let geometry = kiln_placement::mig::geometry(&gpu_type);
        if fleet.is_none() && geometry.is_none() {
            checks.push(
                "gpu.type",
                format!("unknown GPU type `{gpu_type}`; see GET /v1/gpu-types"),
            );
            None
        } else {
            let marketed = super::catalog::marketed(&gpu_type).map(|(_, gib)| gib);
            let from_fleet = fleet.map(|mib| (mib.max(0) + 512) / 1024);
            let from_mig = geometry.and_then(|geo| {
                geo.profiles
                    .iter()
                    .map(|p| p.memory_mib.div_ceil(1024) as i64)
                    .max()
            });
            Some(marketed.or(from_fleet).or(from_mig).unwrap_or(0))
        }
    };
    if asked != 1 {
        return Ok(None);
    }
    if let Some(count) = g.count {
        if !(1..=MAX_GPUS).contains(&count) {
            checks.push("gpu.count", format!("must be between 1 and {MAX_GPUS}"));
            return Ok(None);
        }
        return Ok(memory_gib.map(|_| GpuAsk::Whole { gpu_type, count }));
    }
    if let Some(profile) = &g.mig_profile {
        let profile = profile.trim();
        if memory_gib.is_none() {
            return Ok(None);
        }
        return match kiln_placement::mig::geometry(&gpu_type) {
            None => {
                checks.push(
                    "gpu.mig_profile",
                    format!("GPU type `{gpu_type}` has no MIG profiles; ask for count or share"),
                );
                Ok(None)
            }
            Some(geo) => match geo.profiles.iter().find(|p| p.name == profile) {
                Some(p) => Ok(Some(GpuAsk::Mig {
                    gpu_type,
                    profile: p.name.to_owned(),
                })),
                None => {
                    let valid: Vec<&str> = geo.profiles.iter().map(|p| p.name).collect();
                    checks.push(
                        "gpu.mig_profile",
                        format!(
                            "unknown MIG profile `{profile}` for {gpu_type}; one of {}",
                            valid.join(", ")
                        ),
                    );
                    Ok(None)
                }
            },
        };
    }
    let share = g.share.clone().unwrap_or_default();
    let Some(gib) = share.memory_gib else {
        checks.push("gpu.share.memory_gib", "is required");
        return Ok(None);
    };
    let Some(max) = memory_gib else {
        return Ok(None);
    };
    if gib < 1 || gib > max {
        checks.push(
            "gpu.share.memory_gib",
            format!("must be between 1 and {max} (the memory of one {gpu_type})"),
        );
        return Ok(None);
    }
    Ok(Some(GpuAsk::Share {
        gpu_type,
        memory_gib: gib,
    }))
}

/// The tenant's view of a pod row.
pub fn view(w: &TenantWorkloadRecord) -> PodView {
    let spec = &w.spec;
    let strings = |k: &str| -> Vec<String> {
        spec.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut env: BTreeMap<String, EnvValueView> = BTreeMap::new();
    if let Some(m) = spec.get("env").and_then(|v| v.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                env.insert(k.clone(), EnvValueView::Plain(s.to_owned()));
            }
        }
    }
    if let Some(m) = spec.get("env_secret").and_then(|v| v.as_object()) {
        for k in m.keys() {
            env.insert(k.clone(), EnvValueView::Secret { secret: true });
        }
    }
    // Where the agent bound each container port: `[{port, protocol, host_port}]`.
    let observed: BTreeMap<i64, i64> = w
        .observed_ports
        .as_ref()
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let port = p.get("port")?.as_i64()?;
                    let host_port = p.get("host_port")?.as_i64().filter(|hp| *hp > 0)?;
                    Some((port, host_port))
                })
                .collect()
        })
        .unwrap_or_default();
    let ports = spec
        .get("ports")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_i64)
                .map(|port| {
                    let host_port = observed.get(&port).copied();
                    PodPortView {
                        container_port: port,
                        host: host_port.and(w.node_hostname.clone()),
                        host_port,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let gpu = w
        .gpu_type
        .clone()
        .map(|gpu_type| match w.gpu_mode.as_str() {
            "mig" => GpuRequest {
                gpu_type,
                mig_profile: w.mig_profile.clone(),
                ..GpuRequest::default()
            },
            "share" => GpuRequest {
                gpu_type,
                share: Some(GpuShareRequest {
                    memory_gib: w.share_memory_mib.map(|m| m / 1024),
                }),
                ..GpuRequest::default()
            },
            _ => GpuRequest {
                gpu_type,
                count: Some(i64::from(w.gpu_count)),
                ..GpuRequest::default()
            },
        });
    PodView {
        id: PodId::from_uuid(w.id).to_string(),
        name: w.name.clone(),
        image: spec
            .get("image")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        state: w.state.clone(),
        state_reason: w.state_reason.clone(),
        gpu,
        node: w
            .node_id
            .map(|n| kiln_domain::NodeId::from_uuid(n).to_string()),
        gpus: w.gpus.clone(),
        cpu: w.cpu_millis as f64 / 1000.0,
        memory_gib: w.memory_mib / 1024,
        disk_gib: w.disk_gib,
        env,
        ports,
        command: strings("command"),
        spot: w.tier == "spot",
        created_at: ts(w.created_at),
        updated_at: ts(w.updated_at),
        cost_so_far: Some(async_graphql::Json(serde_json::json!(
            super::billing::money(w.cost_micros)
        ))),
    }
}

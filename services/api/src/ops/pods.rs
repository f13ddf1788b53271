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
use crate::state::{AppState, Caller};
use crate::views::*;
use kiln_auth::pod_env_context;

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
/// What happens when a pod's main process exits: restart after a failure (at most 3 times),
/// always restart, or never.
pub const RESTART_POLICIES: [&str; 3] = ["on_failure", "always", "never"];

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

/// How often a live view re-reads even without a wake-up (a lost notice costs this much).
const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a pod in `state` will not change again.
pub fn is_final(state: &str) -> bool {
    matches!(state, "terminated" | "failed" | "stopped")
}

/// The pod's live state: the view now, then each time it differs (state, reason, node, ports),
/// until it ends (`terminated`, `failed`, `stopped`) or the caller loses access. An unknown or
/// another org's pod is a 404 now, not an empty stream. Woken by the replica's [`LiveHub`]
/// (`crate::live`), re-checked every [`RECHECK`] in case a notice was lost.
pub async fn watch(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    pod: &str,
) -> Result<impl futures::Stream<Item = PodView> + Send + use<>, ApiError> {
    let first = get(state, caller, org, pod).await?;
    let id = parse_pod(pod)?.as_uuid();
    struct Live {
        state: AppState,
        caller: Caller,
        org: OrgId,
        pod: String,
        id: uuid::Uuid,
        rx: tokio::sync::watch::Receiver<u64>,
        pending: Option<PodView>,
        last: Option<String>,
        done: bool,
    }
    let live = Live {
        rx: state.live.subscribe(id),
        id,
        state: state.clone(),
        caller: caller.clone(),
        org,
        pod: pod.to_owned(),
        pending: Some(first),
        last: None,
        done: false,
    };
    let stopping = state.stopping();
    Ok(futures::StreamExt::take_until(
        futures::stream::unfold(live, |mut live| async move {
            loop {
                if live.done {
                    return None;
                }
                if let Some(view) = live.pending.take() {
                    let text = serde_json::to_string(&view).unwrap_or_default();
                    if live.last.as_deref() != Some(text.as_str()) {
                        live.done = is_final(&view.state);
                        live.last = Some(text);
                        return Some((view, live));
                    }
                }
                if let Ok(Err(_)) = tokio::time::timeout(RECHECK, live.rx.changed()).await {
                    // The hub forgot this channel: take a new one.
                    live.rx = live.state.live.subscribe(live.id);
                }
                match get(&live.state, &live.caller, live.org, &live.pod).await {
                    Ok(v) => live.pending = Some(v),
                    // Gone, or access lost: end the stream.
                    Err(_) => return None,
                }
            }
        }),
        stopping,
    ))
}

/// Most lines `tail` may ask for.
pub const MAX_TAIL: i64 = 5000;
/// Lines sent first when following, unless the caller says otherwise.
pub const DEFAULT_TAIL: i64 = 100;
/// How long one blocking read waits before the pod's state is checked again.
const FOLLOW_BLOCK: std::time::Duration = std::time::Duration::from_secs(2);

/// `tail` as asked, checked.
pub fn parse_tail(tail: Option<i64>) -> Result<usize, ApiError> {
    let tail = tail.unwrap_or(DEFAULT_TAIL);
    if !(0..=MAX_TAIL).contains(&tail) {
        return Err(ApiError::field(
            "tail",
            format!("must be between 0 and {MAX_TAIL}"),
        ));
    }
    Ok(tail as usize)
}

pub(crate) fn log_view(line: kiln_logs::LogLine) -> LogLineView {
    LogLineView {
        at: time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(line.at_unix_ms) * 1_000_000,
        )
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default(),
        source: line.source.as_str().to_owned(),
        text: line.text,
        cursor: line.cursor,
    }
}

fn log_error(e: kiln_logs::LogError) -> ApiError {
    tracing::warn!(error = %e, "reading workload output failed");
    ApiError::Unavailable(
        "pod logs are unavailable right now (the log store is unreachable)".into(),
    )
}

/// The pod's last `tail` lines of output, oldest first.
pub async fn logs(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    pod: &str,
    tail: usize,
) -> Result<Vec<LogLineView>, ApiError> {
    get(state, caller, org, pod).await?;
    let id = parse_pod(pod)?.as_uuid();
    let lines = state.logs.tail(id, tail).await.map_err(log_error)?;
    Ok(lines.into_iter().map(log_view).collect())
}

/// The pod's output as it comes: after `cursor` when the caller resumes (an SSE
/// `Last-Event-ID`), else the last `tail` lines first. Ends once the pod has ended and its last
/// lines are sent, or when the caller loses access.
pub async fn follow_logs(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    pod: &str,
    tail: usize,
    cursor: Option<&str>,
) -> Result<impl futures::Stream<Item = LogLineView> + Send + use<>, ApiError> {
    let view = get(state, caller, org, pod).await?;
    let id = parse_pod(pod)?.as_uuid();
    let (backlog, cursor) = match cursor.filter(|c| kiln_logs::is_cursor(c)) {
        Some(c) => (Vec::new(), c.to_owned()),
        None => {
            let backlog = state.logs.tail(id, tail).await.map_err(log_error)?;
            // Resume after the newest line there is, even if none of it was asked for.
            let newest = match backlog.last() {
                Some(l) => l.cursor.clone(),
                None => state
                    .logs
                    .tail(id, 1)
                    .await
                    .map_err(log_error)?
                    .pop()
                    .map(|l| l.cursor)
                    .unwrap_or_else(|| "0-0".to_owned()),
            };
            (backlog, newest)
        }
    };
    let follower = state.logs.follower().await.map_err(log_error)?;
    struct Follow {
        state: AppState,
        caller: Caller,
        org: OrgId,
        pod: String,
        id: uuid::Uuid,
        follower: kiln_logs::Follower,
        cursor: String,
        queue: std::collections::VecDeque<kiln_logs::LogLine>,
        ended: bool,
    }
    let f = Follow {
        state: state.clone(),
        caller: caller.clone(),
        org,
        pod: pod.to_owned(),
        id,
        follower,
        cursor,
        queue: backlog.into(),
        ended: is_final(&view.state),
    };
    let stopping = state.stopping();
    Ok(futures::StreamExt::take_until(
        futures::stream::unfold(f, |mut f| async move {
            loop {
                if let Some(line) = f.queue.pop_front() {
                    return Some((log_view(line), f));
                }
                let block = if f.ended {
                    std::time::Duration::from_millis(200)
                } else {
                    FOLLOW_BLOCK
                };
                match f.follower.wait(f.id, &f.cursor, block, 256).await {
                    Ok(lines) if !lines.is_empty() => {
                        f.cursor = lines.last().map(|l| l.cursor.clone()).unwrap_or(f.cursor);
                        f.queue.extend(lines);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "following workload output failed");
                        return None;
                    }
                }
                // Nothing new: the last lines of an ended pod are out.
                if f.ended {
                    return None;
                }
                match get(&f.state, &f.caller, f.org, &f.pod).await {
                    Ok(v) => f.ended = is_final(&v.state),
                    Err(_) => return None,
                }
            }
        }),
        stopping,
    ))
}

/// The caller as a person reads it in `state_reason`.
fn who(caller: &Caller) -> String {
    match &caller.principal {
        kiln_store::Principal::User { user_id, .. } => user_id.to_string(),
        kiln_store::Principal::ApiKey { key_id, .. } => format!("API key {key_id}"),
    }
}

/// What a pod asks for, validated.
pub(crate) enum GpuAsk {
    None,
    Whole { gpu_type: String, count: i64 },
    Mig { gpu_type: String, profile: String },
    Share { gpu_type: String, memory_gib: i64 },
}

impl GpuAsk {
    pub(crate) fn mode(&self) -> &'static str {
        match self {
            GpuAsk::None => "none",
            GpuAsk::Whole { .. } => "whole",
            GpuAsk::Mig { .. } => "mig",
            GpuAsk::Share { .. } => "share",
        }
    }
    pub(crate) fn gpu_type(&self) -> Option<&str> {
        match self {
            GpuAsk::None => None,
            GpuAsk::Whole { gpu_type, .. }
            | GpuAsk::Mig { gpu_type, .. }
            | GpuAsk::Share { gpu_type, .. } => Some(gpu_type),
        }
    }
    pub(crate) fn count(&self) -> i32 {
        match self {
            GpuAsk::Whole { count, .. } => *count as i32,
            _ => 0,
        }
    }
    pub(crate) fn mig_profile(&self) -> Option<&str> {
        match self {
            GpuAsk::Mig { profile, .. } => Some(profile),
            _ => None,
        }
    }
    pub(crate) fn share_memory_mib(&self) -> Option<i64> {
        match self {
            GpuAsk::Share { memory_gib, .. } => Some(memory_gib * 1024),
            _ => None,
        }
    }
}

pub(crate) struct ValidPod {
    pub(crate) name: WorkloadName,
    pub(crate) image: ImageRef,
    pub(crate) gpu: GpuAsk,
    pub(crate) cpu_millis: i64,
    pub(crate) memory_gib: i64,
    pub(crate) disk_gib: i64,
    pub(crate) spot: bool,
    pub(crate) spec: serde_json::Value,
}

/// Check every field, reporting all problems at once.
pub(crate) async fn validate(
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

    let restart_policy = input.restart_policy.as_deref().unwrap_or("on_failure");
    if !RESTART_POLICIES.contains(&restart_policy) {
        checks.push("restart_policy", "must be one of on_failure, always, never");
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
        "restart_policy": restart_policy,
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

/// The GPU a workload asked for, as the API shows it; `None` for CPU only.
pub fn gpu_request(
    mode: &str,
    gpu_type: Option<String>,
    count: i32,
    mig_profile: Option<String>,
    share_memory_mib: Option<i64>,
) -> Option<GpuRequest> {
    gpu_type.map(|gpu_type| match mode {
        "mig" => GpuRequest {
            gpu_type,
            mig_profile,
            ..GpuRequest::default()
        },
        "share" => GpuRequest {
            gpu_type,
            share: Some(GpuShareRequest {
                memory_gib: share_memory_mib.map(|m| m / 1024),
            }),
            ..GpuRequest::default()
        },
        _ => GpuRequest {
            gpu_type,
            count: Some(i64::from(count)),
            ..GpuRequest::default()
        },
    })
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
    let gpu = gpu_request(
        w.gpu_mode.as_str(),
        w.gpu_type.clone(),
        w.gpu_count,
        w.mig_profile.clone(),
        w.share_memory_mib,
    );
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
        restart_policy: spec
            .get("restart_policy")
            .and_then(|v| v.as_str())
            .unwrap_or("on_failure")
            .to_owned(),
        spot: w.tier == "spot",
        created_at: ts(w.created_at),
        updated_at: ts(w.updated_at),
        cost_so_far: Some(async_graphql::Json(serde_json::json!(
            super::billing::money(w.cost_micros)
        ))),
    }
}

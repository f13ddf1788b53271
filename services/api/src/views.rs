//! What callers send and receive. One set of types serves REST (serde + OpenAPI via utoipa) and
//! GraphQL (async-graphql derives), so both surfaces show the same data.

use async_graphql::{InputObject, SimpleObject};
use kiln_store::{ApiKeyRecord, AuditRecord, MemberRecord, NodeRecord, OrgRecord, UserRecord};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

/// RFC 3339 UTC.
pub fn ts(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn ots(t: Option<OffsetDateTime>) -> Option<String> {
    t.map(ts)
}

// ---- identity ----

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct UserView {
    #[schema(example = "usr_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub email: String,
    pub name: String,
    /// Whether the user operates this Kiln deployment.
    pub is_operator: bool,
    pub created_at: String,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> Self {
        Self {
            id: u.id.to_string(),
            email: u.email.to_string(),
            name: u.name.clone(),
            is_operator: u.is_operator,
            created_at: ts(u.created_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct MembershipView {
    pub org_id: String,
    pub org_name: String,
    /// owner, admin, member or viewer.
    pub role: String,
    /// The org made for the user at sign-up.
    pub personal: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct MeView {
    pub user: UserView,
    pub memberships: Vec<MembershipView>,
    /// Set when the caller is an API key rather than a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyPrincipalView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct ApiKeyPrincipalView {
    pub id: String,
    pub org_id: String,
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct OrgView {
    #[schema(example = "org_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub name: String,
    pub personal: bool,
    pub created_at: String,
    /// The caller's role in this org.
    pub role: String,
}

impl OrgView {
    pub fn new(o: &OrgRecord, role: kiln_domain::Role) -> Self {
        Self {
            id: o.id.to_string(),
            name: o.name.clone(),
            personal: o.personal,
            created_at: ts(o.created_at),
            role: role.to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct SignupView {
    pub user: UserView,
    pub org: OrgView,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct TokenPairView {
    /// A JWT to send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Opaque; exchange at `/v1/auth/refresh` for a new pair. Single use.
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    #[schema(example = "Bearer")]
    pub token_type: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct MemberView {
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub joined_at: String,
}

impl From<&MemberRecord> for MemberView {
    fn from(m: &MemberRecord) -> Self {
        Self {
            user_id: m.user_id.to_string(),
            email: m.email.clone(),
            name: m.name.clone(),
            role: m.role.to_string(),
            joined_at: ts(m.joined_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct ApiKeyView {
    #[schema(example = "key_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub name: String,
    /// The first characters of the key, to recognise it by.
    #[schema(example = "kiln_AbC1234")]
    pub prefix: String,
    pub role: String,
    pub created_by: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id.to_string(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            role: k.role.to_string(),
            created_by: k.created_by.map(|u| u.to_string()),
            created_at: ts(k.created_at),
            expires_at: ots(k.expires_at),
            revoked_at: ots(k.revoked_at),
            last_used_at: ots(k.last_used_at),
        }
    }
}

/// A new API key. `key` is the secret: it is shown this once and never again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct ApiKeyCreatedView {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub key: String,
    pub role: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct AuditEventView {
    pub id: String,
    #[schema(example = "api_key.create")]
    pub action: String,
    pub org_id: Option<String>,
    pub actor_user_id: Option<String>,
    pub actor_email: Option<String>,
    pub actor_api_key_id: Option<String>,
    pub target: Option<String>,
    pub ip: Option<String>,
    /// Event-specific details as a JSON object.
    #[schema(value_type = Object)]
    pub details: async_graphql::Json<serde_json::Value>,
    pub created_at: String,
}

impl From<&AuditRecord> for AuditEventView {
    fn from(e: &AuditRecord) -> Self {
        Self {
            id: e.id.to_string(),
            action: e.action.clone(),
            org_id: e.org_id.map(|o| o.to_string()),
            actor_user_id: e.actor_user.map(|u| u.to_string()),
            actor_email: e.actor_email.clone(),
            actor_api_key_id: e.actor_api_key.map(|k| k.to_string()),
            target: e.target.clone(),
            ip: e.ip.clone(),
            details: async_graphql::Json(e.details.clone()),
            created_at: ts(e.created_at),
        }
    }
}

// ---- fleet (operators only) ----

/// A GPU host that joined the fleet, with its GPUs. Its credential is never shown again after
/// the join.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct NodeView {
    #[schema(example = "node_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub hostname: String,
    /// ready, cordoned, draining, unreachable, lost or retired: the one state, derived from
    /// `admin_state` and `liveness`.
    pub state: String,
    /// active, cordoned, draining or retired: what operators decided.
    pub admin_state: String,
    /// online, unreachable or lost: whether the node is talking to the control plane.
    pub liveness: String,
    pub agent_version: String,
    pub joined_at: String,
    pub last_heartbeat_at: Option<String>,
    /// Set once the node's credential is revoked; the agent must join again with a new token.
    pub credential_revoked_at: Option<String>,
    /// When the agent last registered its inventory; null until it has.
    pub registered_at: Option<String>,
    pub driver_version: String,
    pub cuda_version: String,
    pub cpu_cores: i32,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// The newest revision of the node's assignment log.
    pub assignment_revision: i64,
    /// The newest revision the node's agent has applied.
    pub applied_revision: i64,
    pub gpu_summary: GpuSummaryView,
    /// The node's GPUs (those still present), in index order, with what runs on each.
    pub gpus: Vec<GpuView>,
}

impl NodeView {
    /// The node with its GPUs.
    pub fn new(n: &NodeRecord, gpus: Vec<GpuView>) -> Self {
        Self {
            id: n.id.to_string(),
            hostname: n.hostname.clone(),
            state: n.state.clone(),
            admin_state: n.admin_state.clone(),
            liveness: n.liveness.clone(),
            agent_version: n.agent_version.clone(),
            joined_at: ts(n.joined_at),
            last_heartbeat_at: ots(n.last_heartbeat_at),
            credential_revoked_at: ots(n.credential_revoked_at),
            registered_at: ots(n.registered_at),
            driver_version: n.driver_version.clone(),
            cuda_version: n.cuda_version.clone(),
            cpu_cores: n.cpu_cores,
            memory_mib: n.memory_mib,
            disk_gib: n.disk_gib,
            assignment_revision: n.assignment_revision,
            applied_revision: n.applied_revision,
            gpu_summary: GpuSummaryView::of(&gpus),
            gpus,
        }
    }
}

/// A node's GPUs at a glance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuSummaryView {
    pub count: i32,
    /// The distinct GPU types present, sorted (`unknown` for a model Kiln does not sell).
    pub gpu_types: Vec<String>,
    pub healthy: i32,
    pub degraded: i32,
    pub unhealthy: i32,
    /// GPUs with at least one assignment on them (or on one of their MIG instances).
    pub allocated: i32,
    /// Mean SM utilisation of the GPUs that reported a sample, in percent; null when none did.
    pub mean_sm_util_pct: Option<f64>,
}

impl GpuSummaryView {
    pub fn of(gpus: &[GpuView]) -> Self {
        let mut types: Vec<String> = gpus
            .iter()
            .map(|g| g.gpu_type.clone().unwrap_or_else(|| "unknown".to_owned()))
            .collect();
        types.sort();
        types.dedup();
        let count = |h: &str| gpus.iter().filter(|g| g.health == h).count() as i32;
        let utils: Vec<f64> = gpus
            .iter()
            .filter_map(|g| g.sm_util_pct.map(f64::from))
            .collect();
        Self {
            count: gpus.len() as i32,
            gpu_types: types,
            healthy: count("healthy"),
            degraded: count("degraded"),
            unhealthy: count("unhealthy"),
            allocated: gpus.iter().filter(|g| g.allocated).count() as i32,
            mean_sm_util_pct: (!utils.is_empty())
                .then(|| (utils.iter().sum::<f64>() / utils.len() as f64 * 10.0).round() / 10.0),
        }
    }
}

/// One GPU of a node: what it is, how it is doing, and what runs on it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuView {
    #[schema(example = "GPU-5f3c2a1e-0b7d-4c9a-8e6f-1a2b3c4d5e6f")]
    pub uuid: String,
    pub index: i32,
    #[schema(example = "NVIDIA H100 80GB HBM3")]
    pub model: String,
    /// The catalog GPU type (`h100-80gb`), or null for a model Kiln does not sell.
    pub gpu_type: Option<String>,
    pub memory_mib: i64,
    pub pci_bus_id: String,
    pub numa_node: Option<i32>,
    pub mig_capable: bool,
    pub mig_enabled: bool,
    /// The MIG instances carved out of the GPU (`start` and `size` in slices out of 8).
    pub mig_instances: Vec<MigInstanceView>,
    /// UUIDs of the GPUs this one has an NVLink to.
    pub nvlink_peers: Vec<String>,
    /// healthy, degraded or unhealthy. An unhealthy GPU takes no new work.
    pub health: String,
    /// Why the GPU is not healthy (empty when it is).
    pub health_reason: String,
    pub health_changed_at: String,
    /// When the latest metrics sample was taken; the fields below are from it.
    pub sampled_at: Option<String>,
    pub sm_util_pct: Option<i32>,
    pub mem_util_pct: Option<i32>,
    pub memory_used_mib: Option<i64>,
    pub temperature_c: Option<i32>,
    pub power_w: Option<f64>,
    pub ecc_corrected: Option<i64>,
    pub ecc_uncorrected: Option<i64>,
    /// Whether any assignment uses the GPU (or one of its MIG instances).
    pub allocated: bool,
    /// What runs on the GPU: the node's assignments that name it or one of its MIG instances.
    pub assignments: Vec<GpuAssignmentView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct MigInstanceView {
    #[schema(example = "3g.40gb")]
    pub profile: String,
    /// The first slice (0–7) the instance occupies.
    pub start: i32,
    /// How many slices it occupies.
    pub size: i32,
    pub uuid: String,
    /// Whether an assignment uses this instance.
    pub allocated: bool,
}

/// An assignment on a GPU, with what the node's agent last reported about it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuAssignmentView {
    #[schema(example = "asg_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    /// pod or instance.
    pub kind: String,
    pub generation: i64,
    /// The MIG instance it uses, when it uses one rather than the whole GPU.
    pub mig_uuid: Option<String>,
    /// What the agent last reported (e.g. running, failed, stopped), or `pending` when it has
    /// not reported this generation yet.
    pub state: String,
    pub reason: String,
}

/// Something that happened to a GPU: an XID error or a health change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuEventView {
    pub gpu_uuid: String,
    pub at: String,
    /// xid or health.
    pub kind: String,
    /// The XID code, for XID events.
    pub code: Option<i32>,
    pub message: String,
}

/// One node in full: the node and its GPUs, and the newest GPU events (at most 20).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct NodeDetailView {
    #[serde(flatten)]
    #[graphql(flatten)]
    pub node: NodeView,
    pub gpu_events: Vec<GpuEventView>,
}

/// GPU capacity of one GPU type across the fleet.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GpuTypeCapacityView {
    #[schema(example = "h100-80gb")]
    pub gpu_type: String,
    /// GPUs present on nodes that are not retired.
    pub total: i64,
    /// Healthy (or degraded) GPUs on ready nodes: where new work can go.
    pub schedulable: i64,
    pub unhealthy: i64,
}

/// The fleet's GPU capacity per GPU type.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct FleetCapacityView {
    pub items: Vec<GpuTypeCapacityView>,
}

/// A new bootstrap token. `token` is the secret: it is shown this once and can be spent once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct NodeTokenCreatedView {
    #[schema(example = "ntk_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub token: String,
    pub note: String,
    pub created_at: String,
    pub expires_at: String,
}

// ---- lists ----

macro_rules! list_view {
    ($name:ident, $item:ty) => {
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
        pub struct $name {
            pub items: Vec<$item>,
            /// Pass as `cursor` to get the next page; null on the last page.
            pub next_cursor: Option<String>,
        }
    };
}

list_view!(OrgList, OrgView);
list_view!(MemberList, MemberView);
list_view!(ApiKeyList, ApiKeyView);
list_view!(AuditList, AuditEventView);
list_view!(NodeList, NodeView);

// ---- inputs ----
// Fields default to empty so a missing field is reported per field ("is required") rather
// than as a JSON error.

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct SignupInput {
    #[schema(example = "ada@example.com")]
    pub email: String,
    /// At least 12 characters, not your email.
    pub password: String,
    #[schema(example = "Ada Lovelace")]
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct LoginInput {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct RefreshInput {
    pub refresh_token: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct LogoutInput {
    /// Optional: end the session this refresh token belongs to (else the caller's session).
    pub refresh_token: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreateOrgInput {
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct AddMemberInput {
    /// The email of someone who has signed up.
    pub email: String,
    /// owner, admin, member or viewer.
    pub role: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct UpdateMemberInput {
    pub role: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreateApiKeyInput {
    pub name: String,
    /// The key's role in the org; at most the creator's own. Default `member`.
    pub role: Option<String>,
    /// When the key stops working, RFC 3339. Omit for a key that does not expire.
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreateNodeTokenInput {
    /// How long the token may be used, in seconds: 60 to 604800 (7 days). Default 3600.
    pub ttl_secs: Option<i64>,
    /// Free text for operators, e.g. the host it is meant for. At most 200 characters.
    pub note: Option<String>,
}

// ---- pods ----

/// The GPU a pod asks for: a `type` and exactly one of `count` (whole GPUs), `mig_profile` (a
/// MIG slice) or `share` (a time-sliced share of one GPU's memory). Types and their profiles:
/// `GET /v1/gpu-types`.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, SimpleObject, InputObject,
)]
#[graphql(input_name = "GpuRequestInput")]
#[serde(default)]
pub struct GpuRequest {
    #[serde(rename = "type")]
    #[graphql(name = "type")]
    #[schema(example = "h100-80gb")]
    pub gpu_type: String,
    /// Whole GPUs, 1–8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// A MIG profile of the type, e.g. `3g.40gb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share: Option<GpuShareRequest>,
}

/// A time-sliced share of one GPU.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, SimpleObject, InputObject,
)]
#[graphql(input_name = "GpuShareRequestInput")]
#[serde(default)]
pub struct GpuShareRequest {
    /// GPU memory reserved for the pod, 1 up to the GPU's memory.
    pub memory_gib: Option<i64>,
}

/// An env value as given: a plain string, or `{value, secret: true}` for a value stored
/// encrypted and never shown again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EnvValueInput {
    Plain(String),
    Detailed {
        value: String,
        #[serde(default)]
        secret: bool,
    },
}

/// An env value as shown: the value of a plain variable, or `{secret: true}` for a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EnvValueView {
    Plain(String),
    Secret { secret: bool },
}

/// A new pod. Omitted `gpu` makes a CPU-only pod.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreatePodInput {
    /// A lowercase DNS label, 1–63 characters.
    #[schema(example = "llama-server")]
    pub name: String,
    /// A container image reference: `name[:tag][@sha256:…]`.
    #[schema(example = "vllm/vllm-openai:v0.6.3")]
    pub image: String,
    pub gpu: Option<GpuRequest>,
    /// CPU cores, 0.1–256 (fractions allowed). Default 1.
    #[schema(example = 2.5)]
    pub cpu: Option<f64>,
    /// Memory in GiB, 1–2048. Default 4.
    pub memory_gib: Option<i64>,
    /// Scratch disk in GiB, 1–10240. Default 10.
    pub disk_gib: Option<i64>,
    /// Environment: `{"KEY": "value"}` or `{"KEY": {"value": "…", "secret": true}}`. At most 64
    /// variables and 32 KiB in all; names match `[A-Za-z_][A-Za-z0-9_]*`.
    #[schema(value_type = Option<Object>, example = json!({"MODEL": "llama-3-8b", "HF_TOKEN": {"value": "hf_…", "secret": true}}))]
    pub env: Option<std::collections::BTreeMap<String, EnvValueInput>>,
    /// Container ports to expose, 1–65535, distinct, at most 32.
    #[schema(example = json!([8000]))]
    pub ports: Option<Vec<i64>>,
    /// The command and its arguments (at most 64); the image's default when omitted.
    pub command: Option<Vec<String>>,
    /// Run as spot capacity: cheaper, may be preempted. Default false.
    pub spot: Option<bool>,
    /// When the main process exits: `on_failure` (default: restart after a non-zero exit, at
    /// most 3 times, then `failed`), `always` (restart after any exit), `never`.
    #[schema(example = "on_failure")]
    pub restart_policy: Option<String>,
}

/// An exposed port and, once the node's agent reports it, where to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct PodPortView {
    pub container_port: i64,
    /// The node's address; null until the agent reports the port bound.
    pub host: Option<String>,
    pub host_port: Option<i64>,
}

/// A pod: a GPU container the scheduler places on a node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct PodView {
    #[schema(example = "pod_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub name: String,
    pub image: String,
    /// pending, scheduled, starting, running, stopping, stopped, terminated or failed.
    pub state: String,
    /// Why it is in that state (for pending: what it waits for).
    pub state_reason: String,
    /// The GPU as asked; null for a CPU-only pod.
    pub gpu: Option<GpuRequest>,
    /// The node it is placed on, or null.
    pub node: Option<String>,
    /// UUIDs of the GPUs it holds (for a MIG slice or share, the GPU it is on).
    pub gpus: Vec<String>,
    pub cpu: f64,
    pub memory_gib: i64,
    pub disk_gib: i64,
    /// Plain values as given; secrets as `{"secret": true}`, never their value.
    #[schema(value_type = Object, example = json!({"MODEL": "llama-3-8b", "HF_TOKEN": {"secret": true}}))]
    pub env: std::collections::BTreeMap<String, EnvValueView>,
    pub ports: Vec<PodPortView>,
    pub command: Vec<String>,
    pub spot: bool,
    /// `on_failure`, `always` or `never`.
    pub restart_policy: String,
    pub created_at: String,
    pub updated_at: String,
    /// What it has been charged so far (`{amount_micros, currency}`), current to within a
    /// billing tick.
    #[schema(value_type = Option<Object>)]
    pub cost_so_far: Option<async_graphql::Json<serde_json::Value>>,
}

list_view!(PodList, PodView);

/// A new endpoint: a model server image run as replicas behind the gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreateEndpointInput {
    /// A lowercase DNS label, 1–63 characters, unique among the org's endpoints.
    #[schema(example = "llama")]
    pub name: String,
    /// The model server's image, `name[:tag][@sha256:…]`.
    #[schema(example = "kiln/demo-model:1")]
    pub image: String,
    /// Each replica's GPU, as for pods; omitted: CPU only.
    pub gpu: Option<GpuRequest>,
    /// The port the server listens on inside the container.
    #[schema(example = 8000)]
    pub port: i64,
    /// A path answering 200 when a replica is ready. Default `/`.
    #[schema(example = "/healthz")]
    pub health_path: Option<String>,
    /// Replicas kept at least, 0–64 (0: scale to zero when idle). Default 1.
    pub min_replicas: Option<i64>,
    /// Replicas at most, 1–64, ≥ `min_replicas`. Default `max(min_replicas, 1)`.
    pub max_replicas: Option<i64>,
    /// CPU cores per replica, 0.1–256. Default 1.
    pub cpu: Option<f64>,
    /// Memory in GiB per replica. Default 4.
    pub memory_gib: Option<i64>,
    /// Environment, as for pods (secret values sealed, never shown).
    #[schema(value_type = Option<Object>)]
    pub env: Option<std::collections::BTreeMap<String, EnvValueInput>>,
    /// The command and its arguments; the image's default when omitted.
    pub command: Option<Vec<String>>,
    /// Run replicas on spot capacity. Default false.
    pub spot: Option<bool>,
    /// What callers may do, enforced by the gateway (429 with `Retry-After` beyond it).
    /// Default: per key 50 requests/s, burst 100, 32 in flight; no limit in total.
    pub limits: Option<EndpointLimitsSpec>,
    /// How replicas follow the load. Default: 4 calls in flight per replica, scale down after
    /// 60 s of less load, to zero (when `min_replicas` is 0) after 300 s without a call.
    pub autoscaling: Option<AutoscalingSpec>,
    /// What orgs you grant the endpoint to pay you per call (see `…/grants`). Omitted: they
    /// call it free of any charge of yours. Your own calls are priced by the catalog either way.
    pub price: Option<EndpointPriceSpec>,
}

/// An endpoint's price for the orgs its owner grants it to, in integer micro-units: per
/// request, per 1,000 prompt tokens and per 1,000 completion tokens (rounded down over each
/// rating pass's calls). Paid from the caller's paid balance to the owner's.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, SimpleObject, InputObject,
)]
#[graphql(input_name = "EndpointPriceInput")]
#[serde(default)]
pub struct EndpointPriceSpec {
    /// Per answered request (status below 500), 0–10⁹. Default 0.
    #[schema(example = 2000)]
    pub per_request_micros: Option<i64>,
    /// Per 1,000 prompt tokens, 0–10⁹. Default 0.
    #[schema(example = 500)]
    pub per_1k_prompt_tokens_micros: Option<i64>,
    /// Per 1,000 completion tokens, 0–10⁹. Default 0.
    #[schema(example = 1500)]
    pub per_1k_completion_tokens_micros: Option<i64>,
    /// `USD` (the default, and the only one).
    pub currency: Option<String>,
}

/// Let another org's API keys call an endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreateEndpointGrantInput {
    /// The org to grant, `org_…`.
    #[schema(example = "org_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub org: String,
}

/// An org granted an endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct EndpointGrantView {
    pub endpoint: String,
    pub org: String,
    pub org_name: String,
    pub created_at: String,
}

list_view!(EndpointGrantList, EndpointGrantView);

/// Another org's endpoint your org's API keys may call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct GrantedEndpointView {
    pub id: String,
    pub name: String,
    /// Call it here with one of your org's API keys.
    pub url: String,
    pub owner_org: String,
    pub owner_org_name: String,
    /// What each call costs your org (paid to the owner); none: free.
    pub price: Option<EndpointPriceSpec>,
    pub granted_at: String,
}

list_view!(GrantedEndpointList, GrantedEndpointView);

/// How an endpoint's replicas follow its load (calls in flight, as the gateways count them).
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, SimpleObject, InputObject,
)]
#[graphql(input_name = "AutoscalingInput")]
#[serde(default)]
pub struct AutoscalingSpec {
    /// Calls in flight per replica to aim for, 1–10000.
    #[schema(example = 4)]
    pub target_concurrency: Option<i64>,
    /// Seconds less load must last before replicas are removed, 0–86400.
    #[schema(example = 60)]
    pub scale_down_window_s: Option<i64>,
    /// With `min_replicas` 0: seconds without a call before the last replica goes, 1–604800.
    #[schema(example = 300)]
    pub scale_to_zero_after_s: Option<i64>,
}

/// One caller's (or all callers') allowance: a token bucket and calls in flight.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, SimpleObject, InputObject,
)]
#[graphql(input_name = "CallLimitInput")]
#[serde(default)]
pub struct CallLimit {
    /// Sustained requests per second (the bucket's refill rate).
    #[schema(example = 50.0)]
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once after a quiet spell. Default: twice the rate.
    #[schema(example = 100)]
    pub burst: Option<i64>,
    /// Calls in flight at most.
    #[schema(example = 32)]
    pub concurrent: Option<i64>,
}

/// An endpoint's limits: per API key (always bounded) and for the endpoint in total (a field
/// left out: unlimited).
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, SimpleObject, InputObject,
)]
#[graphql(input_name = "EndpointLimitsInput")]
#[serde(default)]
pub struct EndpointLimitsSpec {
    pub per_key: Option<CallLimit>,
    pub total: Option<CallLimit>,
}

/// One replica of an endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct EndpointReplicaView {
    /// The replica's workload id (`wl_…`).
    pub id: String,
    pub state: String,
    pub state_reason: String,
    pub node: Option<String>,
    pub created_at: String,
}

/// An endpoint: call it at `url` with an API key of its org.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct EndpointView {
    #[schema(example = "ep_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub name: String,
    /// `ANY <url>/<path…>` reaches a ready replica's `<path…>`.
    #[schema(example = "https://gateway.example/v1/endpoints/ep_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub url: String,
    pub image: String,
    pub gpu: Option<GpuRequest>,
    pub port: i64,
    pub health_path: String,
    pub min_replicas: i64,
    pub max_replicas: i64,
    /// Replicas the endpoint should have now.
    pub desired_replicas: i64,
    /// What callers may do (enforced by the gateway).
    pub limits: EndpointLimitsSpec,
    /// How replicas follow the load.
    pub autoscaling: AutoscalingSpec,
    /// What granted orgs pay per call; none: they call free of any charge of yours.
    pub price: Option<EndpointPriceSpec>,
    /// `ready` (a replica takes calls), `starting`, `idle` (scaled to zero) or `deleted`.
    pub state: String,
    /// Live replicas, oldest first.
    pub replicas: Vec<EndpointReplicaView>,
    pub created_at: String,
    pub updated_at: String,
}

list_view!(EndpointList, EndpointView);

/// An endpoint's calls in one time bucket.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct TrafficBucketView {
    /// The bucket's start (RFC 3339).
    pub start: String,
    pub calls: i64,
    /// Calls per second over the bucket.
    pub requests_per_second: f64,
    /// Answers with status ≥ 500.
    pub errors: i64,
    /// Latency through the gateway, milliseconds (none for a bucket without calls).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// An endpoint's traffic over the last `minutes`: every bucket (empty ones too), and totals.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct EndpointTrafficView {
    pub from: String,
    pub to: String,
    pub bucket_seconds: i64,
    pub buckets: Vec<TrafficBucketView>,
    pub calls: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// One line of a pod's output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct LogLineView {
    /// When the container wrote it (RFC 3339).
    pub at: String,
    /// `stdout`, `stderr`, or `agent` (a line the node agent wrote about the pod).
    pub source: String,
    pub text: String,
    /// Resume after this line: the SSE event id when following.
    pub cursor: String,
}

// ---- instances and the VM image catalog ----

/// A new instance: a VM with whole GPUs passed through, reached over SSH.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct CreateInstanceInput {
    /// A lowercase DNS label, 1–63 characters; also the guest's hostname.
    #[schema(example = "trainer")]
    pub name: String,
    /// A GPU type id from `GET /v1/gpu-types`.
    #[schema(example = "h100-80gb")]
    pub gpu_type: String,
    /// Whole GPUs, 1–8, passed through to the VM.
    #[schema(example = 1)]
    pub gpu_count: i64,
    /// An active image's name from `GET /v1/images`.
    #[schema(example = "kiln-tiny")]
    pub image: String,
    /// OpenSSH public keys (`ssh-ed25519 …`, `ecdsa-sha2-nistp256 …`, `ssh-rsa …` of at least
    /// 2048 bits), 1–16, installed for the image's login user.
    pub ssh_public_keys: Vec<String>,
    /// The instance's own disk, GiB: at least the image's `min_disk_gib`, at most 10240.
    /// Default: the image's minimum, or 20 if that is smaller.
    pub disk_gib: Option<i64>,
    /// Run on spare capacity at a lower price; may be preempted. Default false.
    pub spot: Option<bool>,
}

/// How to reach an instance over SSH.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct InstanceSshView {
    /// The node's public address.
    pub host: String,
    /// The host port forwarded to the guest's port 22.
    pub port: i64,
    /// The image's login user.
    pub user: String,
    /// A ready command line, e.g. `ssh -p 40022 root@gpu-7.example.net`.
    pub command: String,
}

/// An instance: a VM the scheduler places on a node, with whole GPUs passed through.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct InstanceView {
    #[schema(example = "ins_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub name: String,
    /// The catalog image it was created from.
    pub image: String,
    /// pending, scheduled, starting, running, stopping, stopped, terminated or failed.
    pub state: String,
    /// Why it is in that state (for pending: what it waits for).
    pub state_reason: String,
    /// What the tenant asked for last: `running` or `stopped`.
    pub power: String,
    /// Reboots asked for so far.
    pub reboot_count: i64,
    pub gpu_type: String,
    pub gpu_count: i64,
    /// The node it is placed on (a stopped instance keeps its node and disk), or null.
    pub node: Option<String>,
    /// UUIDs of the GPUs passed through (none while stopped).
    pub gpus: Vec<String>,
    pub cpu: f64,
    pub memory_gib: i64,
    pub disk_gib: i64,
    pub ssh_public_keys: Vec<String>,
    /// Null until the node reports the SSH port forwarded.
    pub ssh: Option<InstanceSshView>,
    pub spot: bool,
    pub created_at: String,
    pub updated_at: String,
    /// What it has been charged so far (`{amount_micros, currency}`), current to within a
    /// billing tick.
    #[schema(value_type = Option<Object>)]
    pub cost_so_far: Option<async_graphql::Json<serde_json::Value>>,
}

list_view!(InstanceList, InstanceView);

/// A VM image of the catalog.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct VmImageView {
    #[schema(example = "kiln-tiny")]
    pub name: String,
    pub description: String,
    /// The kernel the node boots (a path on the node); empty: the disk's own boot loader.
    pub kernel: String,
    pub initrd: String,
    /// The base disk instances' overlays back onto (a path on the node); empty: a blank disk.
    pub disk: String,
    pub kernel_args: String,
    /// The user tenants log in as over SSH.
    pub login_user: String,
    /// Instances of this image ask for at least this much disk, GiB.
    pub min_disk_gib: i64,
    /// `active` (can be launched) or `deprecated` (running instances keep it; no new ones).
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&kiln_store::VmImageRecord> for VmImageView {
    fn from(i: &kiln_store::VmImageRecord) -> Self {
        Self {
            name: i.name.clone(),
            description: i.description.clone(),
            kernel: i.kernel.clone(),
            initrd: i.initrd.clone(),
            disk: i.disk.clone(),
            kernel_args: i.kernel_args.clone(),
            login_user: i.login_user.clone(),
            min_disk_gib: i.min_disk_gib,
            status: i.status.clone(),
            created_at: ts(i.created_at),
            updated_at: ts(i.updated_at),
        }
    }
}

/// The catalog's images.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct VmImageList {
    pub items: Vec<VmImageView>,
}

/// An image's fields, as an operator sets them (`PUT` replaces them all; omitted ones take
/// their defaults). At least one of `kernel` and `disk` is required.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, InputObject)]
#[serde(default)]
pub struct VmImageInput {
    /// Only for `POST /v1/admin/images`: lowercase letters, digits, `.`, `_`, `-`, 1–63.
    pub name: Option<String>,
    pub description: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub disk: Option<String>,
    pub kernel_args: Option<String>,
    /// Default `root`.
    pub login_user: Option<String>,
    /// 1–10240, default 1.
    pub min_disk_gib: Option<i64>,
    /// `active` (default) or `deprecated`.
    pub status: Option<String>,
}

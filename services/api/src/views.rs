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

/// A GPU host that joined the fleet. Its credential is never shown again after the join.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, SimpleObject)]
pub struct NodeView {
    #[schema(example = "node_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d")]
    pub id: String,
    pub hostname: String,
    /// ready, cordoned, draining, unreachable, lost or retired.
    pub state: String,
    pub agent_version: String,
    pub joined_at: String,
    pub last_heartbeat_at: Option<String>,
    /// Set once the node's credential is revoked; the agent must join again with a new token.
    pub credential_revoked_at: Option<String>,
}

impl From<&NodeRecord> for NodeView {
    fn from(n: &NodeRecord) -> Self {
        Self {
            id: n.id.to_string(),
            hostname: n.hostname.clone(),
            state: n.state.clone(),
            agent_version: n.agent_version.clone(),
            joined_at: ts(n.joined_at),
            last_heartbeat_at: ots(n.last_heartbeat_at),
            credential_revoked_at: ots(n.credential_revoked_at),
        }
    }
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

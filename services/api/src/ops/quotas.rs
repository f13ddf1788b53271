//! Org GPU quotas: the most GPUs of one type an org may hold at once for one product. Operators
//! set and remove them (the admin surface, 404 for anyone else); an org's members may read
//! their own org's quotas, so a refusal from the scheduler ("org quota for h100-80gb pods is 8
//! and 8 are in use") can be checked against the numbers.
//!
//! The scheduler enforces them; no row means no limit.

use kiln_domain::{OrgId, Permission};
use kiln_store::{AuditEvent, QuotaRecord, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::fleet::require_operator;
use super::{Checks, parse_org};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::ts;

/// The products a quota can limit.
pub const PRODUCTS: [&str; 3] = ["instance", "pod", "endpoint"];
/// The largest quota an operator can set, in GPUs.
pub const MAX_QUOTA_GPUS: i64 = 100_000;
const MAX_GPU_TYPE_CHARS: usize = 64;

/// Set (or replace) one quota.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SetQuotaInput {
    /// The GPU type, as in `/v1/gpu-types`: 1 to 64 characters of `a-z`, `0-9` and `-`.
    #[schema(example = "h100-80gb")]
    pub gpu_type: String,
    /// `instance`, `pod` or `endpoint`.
    #[schema(example = "pod")]
    pub product: String,
    /// The most GPUs (whole-GPU equivalents: a MIG slice or a share counts its fraction) the
    /// org may hold at once, 0 to 100000. 0 allows none.
    #[schema(example = 8)]
    pub max_gpus: Option<i64>,
}

/// One quota of an org.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaView {
    #[schema(example = "h100-80gb")]
    pub gpu_type: String,
    /// `instance`, `pod` or `endpoint`.
    #[schema(example = "pod")]
    pub product: String,
    /// The most GPUs (whole-GPU equivalents) the org may hold at once.
    pub max_gpus: i32,
    pub updated_at: String,
}

impl From<&QuotaRecord> for QuotaView {
    fn from(q: &QuotaRecord) -> Self {
        Self {
            gpu_type: q.gpu_type.clone(),
            product: q.product.clone(),
            max_gpus: q.max_gpus,
            updated_at: ts(q.updated_at),
        }
    }
}

/// An org's quotas, by GPU type then product. A GPU type and product without one is unlimited.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaList {
    pub items: Vec<QuotaView>,
}

fn views(records: &[QuotaRecord]) -> QuotaList {
    QuotaList {
        items: records.iter().map(QuotaView::from).collect(),
    }
}

fn audit(
    caller: &Caller,
    org: OrgId,
    action: &'static str,
    gpu_type: &str,
    product: &str,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        org_id: Some(org),
        actor_user: caller.principal.user_id(),
        actor_api_key: None,
        action,
        target: Some(format!("{gpu_type}/{product}")),
        ip: caller.client.ip.clone(),
        details,
    }
}

/// Whether a store error is the quota's org not existing (its foreign key).
fn is_unknown_org(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(sqlx::Error::Database(db)) if db.is_foreign_key_violation())
}

/// Check a quota's fields, reporting every bad one.
fn validate(input: &SetQuotaInput) -> Result<(String, String, i32), ApiError> {
    let mut checks = Checks::default();
    let gpu_type = input.gpu_type.trim();
    if gpu_type.is_empty() {
        checks.push("gpu_type", "is required");
    } else if gpu_type.chars().count() > MAX_GPU_TYPE_CHARS {
        checks.push(
            "gpu_type",
            format!("must be at most {MAX_GPU_TYPE_CHARS} characters"),
        );
    } else if !gpu_type
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        checks.push(
            "gpu_type",
            "may contain only lowercase letters, digits and `-` (e.g. h100-80gb)",
        );
    }
    let product = input.product.trim().to_ascii_lowercase();
    if !PRODUCTS.contains(&product.as_str()) {
        checks.push("product", "must be one of instance, pod, endpoint");
    }
    let max_gpus = match input.max_gpus {
        None => {
            checks.push("max_gpus", "is required");
            0
        }
        Some(n) if (0..=MAX_QUOTA_GPUS).contains(&n) => n as i32,
        Some(_) => {
            checks.push(
                "max_gpus",
                format!("must be between 0 and {MAX_QUOTA_GPUS}"),
            );
            0
        }
    };
    checks.finish()?;
    Ok((gpu_type.to_owned(), product, max_gpus))
}

/// An org's quotas, for operators (any org).
pub async fn admin_list(
    state: &AppState,
    caller: &Caller,
    org: &str,
) -> Result<QuotaList, ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    Ok(views(&state.store.quota_list(org).await?))
}

/// Set or replace one quota of an org, audited as `quota.set` in the org's audit log.
pub async fn set(
    state: &AppState,
    caller: &Caller,
    org: &str,
    input: &SetQuotaInput,
) -> Result<QuotaView, ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    let (gpu_type, product, max_gpus) = validate(input)?;
    let mut tx = state.store.begin().await?;
    let record = state
        .store
        .quota_set(&mut tx, org, &gpu_type, &product, max_gpus)
        .await
        .map_err(|e| {
            if is_unknown_org(&e) {
                ApiError::NotFound("org")
            } else {
                e.into()
            }
        })?;
    let event = audit(
        caller,
        org,
        "quota.set",
        &gpu_type,
        &product,
        serde_json::json!({ "gpu_type": gpu_type, "product": product, "max_gpus": max_gpus }),
    );
    state.store.audit_record(&mut tx, &event).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(QuotaView::from(&record))
}

/// Remove one quota of an org (the org is then unlimited there), audited as `quota.remove`.
/// 404 when there was none.
pub async fn remove(
    state: &AppState,
    caller: &Caller,
    org: &str,
    gpu_type: &str,
    product: &str,
) -> Result<(), ApiError> {
    require_operator(caller)?;
    let org = parse_org(org)?;
    let mut tx = state.store.begin().await?;
    if !state
        .store
        .quota_remove(&mut tx, org, gpu_type, product)
        .await?
    {
        return Err(ApiError::NotFound("quota"));
    }
    let event = audit(
        caller,
        org,
        "quota.remove",
        gpu_type,
        product,
        serde_json::json!({ "gpu_type": gpu_type, "product": product }),
    );
    state.store.audit_record(&mut tx, &event).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// An org's quotas, for its members (any role that may see the org). Others get 404.
pub async fn list(state: &AppState, caller: &Caller, org: OrgId) -> Result<QuotaList, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::OrgRead)
        .await?;
    Ok(views(&state.store.quota_list(scope.org_id()).await?))
}

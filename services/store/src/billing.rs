//! Billing's tables: the price catalog, the ledger (postings and their entries), org billing
//! settings, rating cursors, suspensions, metered usage events and invoices.
//!
//! This module only reads and writes rows; what a charge is, how promotional credit is spent,
//! how an invoice groups its lines and when an org is out of credit are decided by
//! `kiln-billing-core` in the callers. The schema keeps the ledger honest on its own: every
//! posting balances (a deferred constraint trigger), postings are append-only, and a posting's
//! idempotency key is unique, so [`Store::ledger_post`] of something already posted is a no-op.

use std::collections::BTreeMap;

use kiln_domain::{InvoiceId, OrgId, PostingId};
use sqlx::PgConnection;
use sqlx::types::Json;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::{OrgScope, PageOf, PageRequest, Store, StoreError, StoreResult};

// ---------------------------------------------------------------------------------------------
// The price catalog

/// One GPU type's prices in a version (micro-units; `None` = not sold).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GpuPriceRecord {
    pub gpu_type: String,
    pub instance_gpu_hour_micros: Option<i64>,
    pub pod_gpu_hour_micros: Option<i64>,
    #[serde(default)]
    pub mig_hour_micros: BTreeMap<String, i64>,
    pub share_gib_hour_micros: Option<i64>,
    pub spot_discount_bps: i32,
    pub endpoint_per_request_micros: Option<i64>,
    pub endpoint_per_1k_prompt_micros: Option<i64>,
    pub endpoint_per_1k_completion_micros: Option<i64>,
}

/// A price version with all its GPU types' prices.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PriceVersionRecord {
    pub id: Uuid,
    pub effective_from: OffsetDateTime,
    pub storage_gib_month_micros: Option<i64>,
    pub note: String,
    pub created_at: OffsetDateTime,
    pub gpus: Json<Vec<GpuPriceRecord>>,
}

/// A new version, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewPriceVersion<'a> {
    pub effective_from: OffsetDateTime,
    pub storage_gib_month_micros: Option<i64>,
    pub note: &'a str,
    pub created_by: Option<Uuid>,
    pub gpus: &'a [GpuPriceRecord],
}

/// What deleting a price version did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceVersionDelete {
    Deleted,
    /// It has taken effect: it is history and stays.
    InEffect,
    NotFound,
}

const PRICE_VERSION_SELECT: &str = "SELECT v.id, v.effective_from, v.storage_gib_month_micros, \
     v.note, v.created_at, COALESCE((SELECT jsonb_agg(jsonb_build_object( \
         'gpu_type', g.gpu_type, \
         'instance_gpu_hour_micros', g.instance_gpu_hour_micros, \
         'pod_gpu_hour_micros', g.pod_gpu_hour_micros, \
         'mig_hour_micros', g.mig_hour_micros, \
         'share_gib_hour_micros', g.share_gib_hour_micros, \
         'spot_discount_bps', g.spot_discount_bps, \
         'endpoint_per_request_micros', g.endpoint_per_request_micros, \
         'endpoint_per_1k_prompt_micros', g.endpoint_per_1k_prompt_micros, \
         'endpoint_per_1k_completion_micros', g.endpoint_per_1k_completion_micros) \
         ORDER BY g.gpu_type) FROM gpu_prices g WHERE g.version_id = v.id), '[]') AS gpus \
     FROM price_versions v";

// ---------------------------------------------------------------------------------------------
// The ledger

/// One entry of a posting to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub account: String,
    pub org_id: Option<Uuid>,
    pub amount_micros: i64,
}

/// What a charge posting is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeDetail {
    pub workload_id: Uuid,
    pub workload_kind: Option<String>,
    pub product: String,
    pub gpu_type: Option<String>,
    pub detail: Option<String>,
    pub tier: String,
    pub period_end: OffsetDateTime,
    pub price_version: OffsetDateTime,
    pub unit: String,
    pub quantity: i64,
}

/// A posting to write: balanced entries under an idempotency key.
#[derive(Debug, Clone)]
pub struct NewPosting {
    pub key: String,
    pub org_id: Option<Uuid>,
    /// charge, usage, top_up, promo_grant or promo_expiry.
    pub kind: &'static str,
    pub at: OffsetDateTime,
    pub amount_micros: i64,
    pub description: String,
    pub charge: Option<ChargeDetail>,
    pub reference: Option<String>,
    pub entries: Vec<NewEntry>,
}

/// One entry of a recorded posting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryRecord {
    pub account: String,
    pub amount_micros: i64,
}

/// A recorded posting with its entries.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PostingRecord {
    pub id: Uuid,
    pub idempotency_key: String,
    pub org_id: Option<Uuid>,
    pub kind: String,
    pub at: OffsetDateTime,
    pub amount_micros: i64,
    pub currency: String,
    pub description: String,
    pub workload_id: Option<Uuid>,
    pub workload_kind: Option<String>,
    pub product: Option<String>,
    pub gpu_type: Option<String>,
    pub detail: Option<String>,
    pub tier: Option<String>,
    pub period_end: Option<OffsetDateTime>,
    pub price_version: Option<OffsetDateTime>,
    pub unit: Option<String>,
    pub quantity: Option<i64>,
    pub reference: Option<String>,
    pub created_at: OffsetDateTime,
    pub entries: Json<Vec<EntryRecord>>,
}

const POSTING_COLUMNS: &str = "p.id, p.idempotency_key, p.org_id, p.kind, p.at, \
     p.amount_micros, p.currency, p.description, p.workload_id, p.workload_kind, p.product, \
     p.gpu_type, p.detail, p.tier, p.period_end, p.price_version, p.unit, p.quantity, \
     p.reference, p.created_at, \
     COALESCE((SELECT jsonb_agg(jsonb_build_object('account', e.account, \
         'amount_micros', e.amount_micros) ORDER BY e.amount_micros, e.account) \
         FROM ledger_entries e WHERE e.posting_id = p.id), '[]') AS entries";

/// What an org can spend and on what terms, read in one statement.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FundsRecord {
    pub org_id: Uuid,
    /// The paid balance (negative = drawn on the credit limit).
    pub paid_micros: i64,
    /// Unexpired promotional credit.
    pub promo_micros: i64,
    pub credit_limit_micros: i64,
    pub monthly_budget_micros: Option<i64>,
    pub credit_exhausted_at: Option<OffsetDateTime>,
    pub budget_alert_month: Option<Date>,
    pub budget_alert_percent: Option<i32>,
}

/// A promotional account with what is left on it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PromoBalance {
    pub account: String,
    pub org_id: Uuid,
    pub expires_at: OffsetDateTime,
    pub balance_micros: i64,
}

/// Org billing settings, as operators set them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BillingSettingsRecord {
    pub org_id: Uuid,
    pub credit_limit_micros: i64,
    pub monthly_budget_micros: Option<i64>,
    pub credit_exhausted_at: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
}

// ---------------------------------------------------------------------------------------------
// Rating

/// A workload whose history has something unrated, with its rating cursor locked.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RatingWork {
    pub workload_id: Uuid,
    pub org_id: Uuid,
    pub rated_until: OffsetDateTime,
    pub kind: String,
    pub tier: String,
    pub gpu_mode: String,
    pub gpu_type: Option<String>,
    pub gpu_count: i32,
    pub mig_profile: Option<String>,
    pub share_memory_mib: Option<i64>,
    pub disk_gib: i64,
}

/// One row of a workload's state history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HistoryRow {
    pub workload_id: Uuid,
    pub state: String,
    pub at: OffsetDateTime,
}

/// A workload of an org to stop or resume for credit.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SuspendableWorkload {
    pub id: Uuid,
    pub kind: String,
    pub state: String,
}

// ---------------------------------------------------------------------------------------------
// Usage and invoices

/// Metered quantity and cost of one group (per product and unit) over a period.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UsageRow {
    /// The workload (`wl_…` uuid), GPU type or day (`YYYY-MM-DD`), as grouped.
    pub group_key: Option<String>,
    pub workload_kind: Option<String>,
    pub product: String,
    pub gpu_type: Option<String>,
    pub unit: String,
    pub quantity: i64,
    pub amount_micros: i64,
}

/// What to group usage by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Workload,
    GpuType,
    Day,
}

/// A charge posting as the invoice core reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChargeRecord {
    pub idempotency_key: String,
    pub org_id: Uuid,
    pub workload_id: Uuid,
    pub product: String,
    pub gpu_type: Option<String>,
    pub detail: Option<String>,
    pub tier: String,
    pub at: OffsetDateTime,
    pub period_end: OffsetDateTime,
    pub price_version: OffsetDateTime,
    pub unit: String,
    pub quantity: i64,
    pub amount_micros: i64,
}

/// One invoice line as stored (`lines` jsonb).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InvoiceLineRecord {
    pub product: String,
    pub gpu_type: Option<String>,
    pub detail: Option<String>,
    pub unit: String,
    pub quantity: i64,
    pub amount_micros: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvoiceRecord {
    pub id: Uuid,
    pub org_id: Uuid,
    pub month: Date,
    pub status: String,
    pub currency: String,
    pub total_micros: i64,
    pub lines: Json<Vec<InvoiceLineRecord>>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const INVOICE_COLUMNS: &str =
    "id, org_id, month, status, currency, total_micros, lines, created_at, updated_at";

impl Store {
    // ----- prices ------------------------------------------------------------------------------

    /// Every price version, oldest first: the whole price book.
    pub async fn price_versions(&self) -> StoreResult<Vec<PriceVersionRecord>> {
        Ok(
            sqlx::query_as(&format!("{PRICE_VERSION_SELECT} ORDER BY v.effective_from"))
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn price_version_get(&self, id: Uuid) -> StoreResult<PriceVersionRecord> {
        sqlx::query_as(&format!("{PRICE_VERSION_SELECT} WHERE v.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound {
                what: "price version",
            })
    }

    /// Record a new price version. Another version at the same instant is `Conflict`.
    pub async fn price_version_create(
        &self,
        conn: &mut PgConnection,
        new: &NewPriceVersion<'_>,
    ) -> StoreResult<PriceVersionRecord> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO price_versions (id, effective_from, storage_gib_month_micros, note, created_by)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(new.effective_from)
        .bind(new.storage_gib_month_micros)
        .bind(new.note)
        .bind(new.created_by)
        .execute(&mut *conn)
        .await
        .map_err(|e| StoreError::from_unique(e, "price version at that instant"))?;
        for g in new.gpus {
            sqlx::query(
                "INSERT INTO gpu_prices (version_id, gpu_type, instance_gpu_hour_micros,
                     pod_gpu_hour_micros, mig_hour_micros, share_gib_hour_micros, spot_discount_bps,
                     endpoint_per_request_micros, endpoint_per_1k_prompt_micros,
                     endpoint_per_1k_completion_micros)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(id)
            .bind(&g.gpu_type)
            .bind(g.instance_gpu_hour_micros)
            .bind(g.pod_gpu_hour_micros)
            .bind(Json(&g.mig_hour_micros))
            .bind(g.share_gib_hour_micros)
            .bind(g.spot_discount_bps)
            .bind(g.endpoint_per_request_micros)
            .bind(g.endpoint_per_1k_prompt_micros)
            .bind(g.endpoint_per_1k_completion_micros)
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::from_unique(e, "GPU type in this version"))?;
        }
        sqlx::query_as(&format!("{PRICE_VERSION_SELECT} WHERE v.id = $1"))
            .bind(id)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from)
    }

    /// Delete a version that has not taken effect yet.
    pub async fn price_version_delete(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> StoreResult<PriceVersionDelete> {
        let row: Option<(bool,)> = sqlx::query_as(
            "SELECT effective_from <= now() FROM price_versions WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            None => Ok(PriceVersionDelete::NotFound),
            Some((true,)) => Ok(PriceVersionDelete::InEffect),
            Some((false,)) => {
                sqlx::query("DELETE FROM price_versions WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                Ok(PriceVersionDelete::Deleted)
            }
        }
    }

    // ----- the ledger --------------------------------------------------------------------------

    /// Append postings, skipping any whose idempotency key is already there (including a
    /// duplicate within `postings`). Answers the keys that were new. The entries of each must
    /// balance (the schema refuses the commit otherwise) and name existing accounts.
    pub async fn ledger_post(
        &self,
        conn: &mut PgConnection,
        postings: &[NewPosting],
    ) -> StoreResult<Vec<String>> {
        if postings.is_empty() {
            return Ok(Vec::new());
        }
        let n = postings.len();
        let mut ids = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut orgs = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut ats = Vec::with_capacity(n);
        let mut amounts = Vec::with_capacity(n);
        let mut descriptions = Vec::with_capacity(n);
        let mut workloads = Vec::with_capacity(n);
        let mut workload_kinds = Vec::with_capacity(n);
        let mut products = Vec::with_capacity(n);
        let mut gpu_types = Vec::with_capacity(n);
        let mut details = Vec::with_capacity(n);
        let mut tiers = Vec::with_capacity(n);
        let mut period_ends = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut units = Vec::with_capacity(n);
        let mut quantities = Vec::with_capacity(n);
        let mut references = Vec::with_capacity(n);
        let (mut e_posting, mut e_account, mut e_org, mut e_amount) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for p in postings {
            let id = Uuid::now_v7();
            ids.push(id);
            keys.push(p.key.clone());
            orgs.push(p.org_id);
            kinds.push(p.kind);
            ats.push(p.at);
            amounts.push(p.amount_micros);
            descriptions.push(p.description.clone());
            let c = p.charge.as_ref();
            workloads.push(c.map(|c| c.workload_id));
            workload_kinds.push(c.and_then(|c| c.workload_kind.clone()));
            products.push(c.map(|c| c.product.clone()));
            gpu_types.push(c.and_then(|c| c.gpu_type.clone()));
            details.push(c.and_then(|c| c.detail.clone()));
            tiers.push(c.map(|c| c.tier.clone()));
            period_ends.push(c.map(|c| c.period_end));
            versions.push(c.map(|c| c.price_version));
            units.push(c.map(|c| c.unit.clone()));
            quantities.push(c.map(|c| c.quantity));
            references.push(p.reference.clone());
            for e in &p.entries {
                e_posting.push(id);
                e_account.push(e.account.clone());
                e_org.push(e.org_id);
                e_amount.push(e.amount_micros);
            }
        }
        let inserted: Vec<(Uuid, String)> = sqlx::query_as(
            "INSERT INTO ledger_postings (id, idempotency_key, org_id, kind, at, amount_micros,
                 description, workload_id, workload_kind, product, gpu_type, detail, tier,
                 period_end, price_version, unit, quantity, reference)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[],
                 $5::timestamptz[], $6::int8[], $7::text[], $8::uuid[], $9::text[], $10::text[],
                 $11::text[], $12::text[], $13::text[], $14::timestamptz[], $15::timestamptz[],
                 $16::text[], $17::int8[], $18::text[])
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id, idempotency_key",
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&orgs)
        .bind(&kinds)
        .bind(&ats)
        .bind(&amounts)
        .bind(&descriptions)
        .bind(&workloads)
        .bind(&workload_kinds)
        .bind(&products)
        .bind(&gpu_types)
        .bind(&details)
        .bind(&tiers)
        .bind(&period_ends)
        .bind(&versions)
        .bind(&units)
        .bind(&quantities)
        .bind(&references)
        .fetch_all(&mut *conn)
        .await?;
        if inserted.is_empty() {
            return Ok(Vec::new());
        }
        let new_ids: Vec<Uuid> = inserted.iter().map(|(id, _)| *id).collect();
        sqlx::query(
            "INSERT INTO ledger_entries (posting_id, account, org_id, amount_micros)
             SELECT e.p, e.a, e.o, e.m
             FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::int8[]) AS e(p, a, o, m)
             WHERE e.p = ANY($5)",
        )
        .bind(&e_posting)
        .bind(&e_account)
        .bind(&e_org)
        .bind(&e_amount)
        .bind(&new_ids)
        .execute(&mut *conn)
        .await?;
        Ok(inserted.into_iter().map(|(_, k)| k).collect())
    }

    /// The posting recorded under `key`, if any.
    pub async fn ledger_posting_by_key(
        &self,
        conn: &mut PgConnection,
        key: &str,
    ) -> StoreResult<Option<PostingRecord>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {POSTING_COLUMNS} FROM ledger_postings p WHERE p.idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?)
    }

    /// The org's postings, newest first; the cursor is the last posting's id.
    pub async fn ledger_list(
        &self,
        scope: &OrgScope,
        page: PageRequest,
    ) -> StoreResult<PageOf<PostingRecord>> {
        let rows: Vec<PostingRecord> = sqlx::query_as(&format!(
            "SELECT {POSTING_COLUMNS} FROM ledger_postings p
             WHERE p.org_id = $1 AND ($2::uuid IS NULL OR p.id < $2)
             ORDER BY p.id DESC LIMIT $3"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        Ok(page.finish(rows, |p| PostingId::from_uuid(p.id).to_string()))
    }

    /// Create a promotional account (idempotent; the same name with another expiry is
    /// `Conflict`).
    pub async fn promo_account_create(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
        account: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<()> {
        let (same,): (bool,) = sqlx::query_as(
            "WITH ins AS (
                 INSERT INTO ledger_accounts (name, org_id, kind, expires_at)
                 VALUES ($1, $2, 'promo', $3) ON CONFLICT (name) DO NOTHING RETURNING expires_at)
             SELECT COALESCE((SELECT expires_at = $3 FROM ins),
                             (SELECT expires_at = $3 AND org_id = $2 FROM ledger_accounts WHERE name = $1))",
        )
        .bind(account)
        .bind(org)
        .bind(expires_at)
        .fetch_one(&mut *conn)
        .await?;
        if same {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                what: "promotional grant with another expiry",
            })
        }
    }

    /// Lock the billing rows of `orgs` (in id order, so lockers never deadlock) for the rest
    /// of the transaction: whoever spends or expires an org's credit holds it.
    pub async fn billing_orgs_lock(
        &self,
        conn: &mut PgConnection,
        orgs: &[Uuid],
    ) -> StoreResult<()> {
        sqlx::query(
            "SELECT org_id FROM billing_settings WHERE org_id = ANY($1) ORDER BY org_id FOR UPDATE",
        )
        .bind(orgs)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Promotional accounts of `orgs` usable at `at` with credit left, soonest expiry first.
    pub async fn promo_balances(
        &self,
        conn: &mut PgConnection,
        orgs: &[Uuid],
        at: OffsetDateTime,
    ) -> StoreResult<Vec<PromoBalance>> {
        Ok(sqlx::query_as(
            "SELECT a.name AS account, a.org_id, a.expires_at,
                    COALESCE(sum(e.amount_micros), 0)::int8 AS balance_micros
             FROM ledger_accounts a JOIN ledger_entries e ON e.account = a.name
             WHERE a.kind = 'promo' AND a.org_id = ANY($1) AND a.expires_at > $2
             GROUP BY a.name
             HAVING sum(e.amount_micros) > 0
             ORDER BY a.expires_at, a.name",
        )
        .bind(orgs)
        .bind(at)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Promotional accounts expired by `now` with credit left (to post out), at most `limit`.
    pub async fn promos_expired(
        &self,
        conn: &mut PgConnection,
        now: OffsetDateTime,
        limit: i64,
    ) -> StoreResult<Vec<PromoBalance>> {
        Ok(sqlx::query_as(
            "SELECT a.name AS account, a.org_id, a.expires_at,
                    COALESCE(sum(e.amount_micros), 0)::int8 AS balance_micros
             FROM ledger_accounts a JOIN ledger_entries e ON e.account = a.name
             WHERE a.kind = 'promo' AND a.expires_at <= $1
             GROUP BY a.name
             HAVING sum(e.amount_micros) > 0
             ORDER BY a.expires_at, a.name LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// The funds and credit terms of `orgs` at `at` (promotional credit expired by then does
    /// not count), read on `conn`.
    pub async fn billing_funds(
        &self,
        conn: &mut PgConnection,
        orgs: &[Uuid],
        at: OffsetDateTime,
    ) -> StoreResult<Vec<FundsRecord>> {
        Ok(sqlx::query_as(
            "SELECT s.org_id,
                    COALESCE((SELECT sum(e.amount_micros) FROM ledger_entries e
                              WHERE e.account = 'org:' || s.org_id || ':balance'), 0)::int8
                        AS paid_micros,
                    COALESCE((SELECT sum(e.amount_micros) FROM ledger_accounts a
                              JOIN ledger_entries e ON e.account = a.name
                              WHERE a.kind = 'promo' AND a.org_id = s.org_id
                                AND a.expires_at > $2), 0)::int8 AS promo_micros,
                    s.credit_limit_micros, s.monthly_budget_micros, s.credit_exhausted_at,
                    s.budget_alert_month, s.budget_alert_percent
             FROM billing_settings s WHERE s.org_id = ANY($1) ORDER BY s.org_id",
        )
        .bind(orgs)
        .bind(at)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// What each of `orgs` was charged from `from` on (charges and usage accruing then).
    pub async fn billing_charged_since(
        &self,
        conn: &mut PgConnection,
        orgs: &[Uuid],
        from: OffsetDateTime,
    ) -> StoreResult<Vec<(Uuid, i64)>> {
        Ok(sqlx::query_as(
            "SELECT org_id, sum(amount_micros)::int8 FROM ledger_postings
             WHERE org_id = ANY($1) AND kind IN ('charge', 'usage') AND at >= $2
             GROUP BY org_id",
        )
        .bind(orgs)
        .bind(from)
        .fetch_all(&mut *conn)
        .await?)
    }

    // ----- settings ----------------------------------------------------------------------------

    pub async fn billing_settings(&self, org: OrgId) -> StoreResult<BillingSettingsRecord> {
        sqlx::query_as(
            "SELECT org_id, credit_limit_micros, monthly_budget_micros, credit_exhausted_at,
                    updated_at FROM billing_settings WHERE org_id = $1",
        )
        .bind(org.as_uuid())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "org" })
    }

    /// Set an org's credit limit and monthly budget (operators only: the caller checks).
    pub async fn billing_settings_set(
        &self,
        conn: &mut PgConnection,
        org: OrgId,
        credit_limit_micros: i64,
        monthly_budget_micros: Option<i64>,
    ) -> StoreResult<BillingSettingsRecord> {
        sqlx::query_as(
            "UPDATE billing_settings SET credit_limit_micros = $2, monthly_budget_micros = $3,
                 updated_at = now()
             WHERE org_id = $1
             RETURNING org_id, credit_limit_micros, monthly_budget_micros, credit_exhausted_at,
                       updated_at",
        )
        .bind(org.as_uuid())
        .bind(credit_limit_micros)
        .bind(monthly_budget_micros)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound { what: "org" })
    }

    /// Orgs kiln-billing has marked out of credit.
    pub async fn billing_orgs_exhausted(&self, conn: &mut PgConnection) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT org_id FROM billing_settings WHERE credit_exhausted_at IS NOT NULL
             ORDER BY org_id",
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows.into_iter().map(|(o,)| o).collect())
    }

    /// Mark an org out of credit since `at` (first time only); answers whether it changed.
    pub async fn billing_mark_exhausted(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
        at: OffsetDateTime,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE billing_settings SET credit_exhausted_at = $2
             WHERE org_id = $1 AND credit_exhausted_at IS NULL",
        )
        .bind(org)
        .bind(at)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Clear an org's out-of-credit mark; answers whether it was set.
    pub async fn billing_clear_exhausted(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE billing_settings SET credit_exhausted_at = NULL
             WHERE org_id = $1 AND credit_exhausted_at IS NOT NULL",
        )
        .bind(org)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Record that the org was alerted at `percent` of its budget for `month`.
    pub async fn billing_budget_alerted(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
        month: Date,
        percent: i32,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE billing_settings SET budget_alert_month = $2, budget_alert_percent = $3
             WHERE org_id = $1",
        )
        .bind(org)
        .bind(month)
        .bind(percent)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The org's workloads that hold or may soon hold capacity (and so cost or will cost),
    /// locked, for stopping when it is out of credit.
    pub async fn billing_workloads_active(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
    ) -> StoreResult<Vec<SuspendableWorkload>> {
        Ok(sqlx::query_as(
            "SELECT id, kind, state FROM workloads
             WHERE org_id = $1
               AND state IN ('pending', 'scheduled', 'starting', 'running', 'stopping')
             ORDER BY id FOR UPDATE",
        )
        .bind(org)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Remember that billing stopped `workload` (from `previous_state`).
    pub async fn billing_suspension_record(
        &self,
        conn: &mut PgConnection,
        workload: Uuid,
        org: Uuid,
        previous_state: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO billing_suspensions (workload_id, org_id, previous_state)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(workload)
        .bind(org)
        .bind(previous_state)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Forget the org's suspensions and answer the workloads still stopped by them (locked),
    /// which the caller queues again. A workload deleted meanwhile is not returned.
    pub async fn billing_suspensions_take(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
    ) -> StoreResult<Vec<SuspendableWorkload>> {
        Ok(sqlx::query_as(
            "WITH gone AS (DELETE FROM billing_suspensions WHERE org_id = $1 RETURNING workload_id)
             SELECT w.id, w.kind, w.state FROM workloads w JOIN gone g ON g.workload_id = w.id
             WHERE w.state = 'stopped' ORDER BY w.id FOR UPDATE OF w",
        )
        .bind(org)
        .fetch_all(&mut *conn)
        .await?)
    }

    // ----- rating ------------------------------------------------------------------------------

    /// Lock up to `limit` rating cursors with something to rate before `before` — a workload
    /// that is running (or a stopped instance keeping its disk) or whose history moved since
    /// the cursor — skipping cursors another rater holds and the workloads in `skip`.
    pub async fn rating_claim(
        &self,
        conn: &mut PgConnection,
        before: OffsetDateTime,
        limit: i64,
        skip: &[Uuid],
    ) -> StoreResult<Vec<RatingWork>> {
        Ok(sqlx::query_as(
            "SELECT c.workload_id, c.org_id, c.rated_until, w.kind, w.tier, w.gpu_mode,
                    w.gpu_type, w.gpu_count, w.mig_profile, w.share_memory_mib, w.disk_gib
             FROM billing_rating_cursors c JOIN workloads w ON w.id = c.workload_id
             WHERE c.rated_until < $1
               AND (w.state IN ('running', 'stopping')
                    OR (w.kind = 'instance' AND w.state = 'stopped' AND w.disk_gib > 0)
                    OR EXISTS (SELECT 1 FROM workload_state_history h
                               WHERE h.workload_id = c.workload_id AND h.at > c.rated_until))
               AND NOT (c.workload_id = ANY($3))
             ORDER BY c.rated_until, c.workload_id
             LIMIT $2
             FOR UPDATE OF c SKIP LOCKED",
        )
        .bind(before)
        .bind(limit)
        .bind(skip)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// The state histories of `workloads` up to `until`, each in order.
    pub async fn workload_histories(
        &self,
        conn: &mut PgConnection,
        workloads: &[Uuid],
        until: OffsetDateTime,
    ) -> StoreResult<Vec<HistoryRow>> {
        Ok(sqlx::query_as(
            "SELECT workload_id, state, at FROM workload_state_history
             WHERE workload_id = ANY($1) AND at < $2
             ORDER BY workload_id, at, id",
        )
        .bind(workloads)
        .bind(until)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Move the cursors of `workloads` to `until`.
    pub async fn rating_advance(
        &self,
        conn: &mut PgConnection,
        workloads: &[Uuid],
        until: OffsetDateTime,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE billing_rating_cursors SET rated_until = $2, updated_at = now()
             WHERE workload_id = ANY($1)",
        )
        .bind(workloads)
        .bind(until)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// How far behind the rating is: now minus the oldest cursor of a workload that is
    /// running (0 when nothing runs).
    pub async fn rating_lag(&self) -> StoreResult<f64> {
        let (lag,): (Option<f64>,) = sqlx::query_as(
            "SELECT extract(epoch FROM now() - min(c.rated_until))::float8
             FROM billing_rating_cursors c JOIN workloads w ON w.id = c.workload_id
             WHERE w.state IN ('running', 'stopping')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(lag.unwrap_or(0.0).max(0.0))
    }

    // ----- usage and invoices ------------------------------------------------------------------

    /// The org's charges accruing in `[from, to)`, summed per group, product and unit.
    pub async fn usage_summary(
        &self,
        scope: &OrgScope,
        from: OffsetDateTime,
        to: OffsetDateTime,
        group: UsageGroup,
    ) -> StoreResult<Vec<UsageRow>> {
        let key = match group {
            UsageGroup::Workload => "p.workload_id::text",
            UsageGroup::GpuType => "p.gpu_type",
            UsageGroup::Day => "to_char(p.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        };
        let kind = match group {
            UsageGroup::Workload => "p.workload_kind",
            _ => "NULL::text",
        };
        Ok(sqlx::query_as(&format!(
            "SELECT {key} AS group_key, {kind} AS workload_kind, p.product, p.gpu_type, p.unit,
                    sum(p.quantity)::int8 AS quantity, sum(p.amount_micros)::int8 AS amount_micros
             FROM ledger_postings p
             WHERE p.org_id = $1 AND p.kind IN ('charge', 'usage') AND p.at >= $2 AND p.at < $3
             GROUP BY 1, 2, p.product, p.gpu_type, p.unit
             ORDER BY 1, p.product, p.gpu_type NULLS FIRST, p.unit"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The charge postings of `orgs` accruing in `[from, to)`.
    pub async fn charges_between(
        &self,
        conn: &mut PgConnection,
        orgs: &[Uuid],
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> StoreResult<Vec<ChargeRecord>> {
        Ok(sqlx::query_as(
            "SELECT idempotency_key, org_id, workload_id, product, gpu_type, detail, tier, at,
                    period_end, price_version, unit, quantity, amount_micros
             FROM ledger_postings
             WHERE kind IN ('charge', 'usage') AND org_id = ANY($1) AND at >= $2 AND at < $3
             ORDER BY org_id, at, idempotency_key",
        )
        .bind(orgs)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// What the ledger drew from the org's own accounts (paid and promotional) by charges
    /// accruing in `[from, to)`: the figure an invoice for that period must equal.
    pub async fn ledger_org_charged(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> StoreResult<i64> {
        let (sum,): (Option<i64>,) = sqlx::query_as(
            "SELECT (-sum(e.amount_micros))::int8 FROM ledger_entries e
             JOIN ledger_postings p ON p.id = e.posting_id
             WHERE p.kind IN ('charge', 'usage') AND p.org_id = $1 AND e.org_id = $1
               AND p.at >= $2 AND p.at < $3",
        )
        .bind(org)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *conn)
        .await?;
        Ok(sum.unwrap_or(0))
    }

    /// Orgs with charges accruing in `[from, to)` and no final invoice for `month`, at most
    /// `limit`, in id order after `after`.
    pub async fn orgs_to_invoice(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        month: Date,
        after: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT DISTINCT p.org_id FROM ledger_postings p
             WHERE p.kind IN ('charge', 'usage') AND p.at >= $1 AND p.at < $2
               AND p.org_id IS NOT NULL AND ($4::uuid IS NULL OR p.org_id > $4)
               AND EXISTS (SELECT 1 FROM orgs o WHERE o.id = p.org_id)
               AND NOT EXISTS (SELECT 1 FROM invoices i WHERE i.org_id = p.org_id
                               AND i.month = $3 AND i.status = 'final')
             ORDER BY p.org_id LIMIT $5",
        )
        .bind(from)
        .bind(to)
        .bind(month)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(o,)| o).collect())
    }

    /// Write (or rewrite) the org's invoice for `month`; a final invoice never changes, and
    /// the stored one is answered either way.
    pub async fn invoice_put(
        &self,
        conn: &mut PgConnection,
        org: Uuid,
        month: Date,
        status: &str,
        total_micros: i64,
        lines: &[InvoiceLineRecord],
    ) -> StoreResult<InvoiceRecord> {
        sqlx::query(
            "INSERT INTO invoices (id, org_id, month, status, total_micros, lines)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (org_id, month) DO UPDATE
                 SET status = EXCLUDED.status, total_micros = EXCLUDED.total_micros,
                     lines = EXCLUDED.lines, updated_at = now()
                 WHERE invoices.status = 'draft'",
        )
        .bind(Uuid::now_v7())
        .bind(org)
        .bind(month)
        .bind(status)
        .bind(total_micros)
        .bind(Json(lines))
        .execute(&mut *conn)
        .await?;
        Ok(sqlx::query_as(&format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE org_id = $1 AND month = $2"
        ))
        .bind(org)
        .bind(month)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// The org's invoices, newest month first.
    pub async fn invoice_list(
        &self,
        scope: &OrgScope,
        page: PageRequest,
    ) -> StoreResult<PageOf<InvoiceRecord>> {
        let rows: Vec<InvoiceRecord> = sqlx::query_as(&format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices
             WHERE org_id = $1 AND ($2::uuid IS NULL
                   OR month < (SELECT month FROM invoices WHERE id = $2))
             ORDER BY month DESC LIMIT $3"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        Ok(page.finish(rows, |i| InvoiceId::from_uuid(i.id).to_string()))
    }

    pub async fn invoice_get(&self, scope: &OrgScope, id: Uuid) -> StoreResult<InvoiceRecord> {
        sqlx::query_as(&format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE id = $1 AND org_id = $2"
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "invoice" })
    }

    /// Whether `month`'s final invoices were all written.
    pub async fn month_closed(&self, month: Date) -> StoreResult<bool> {
        let row: Option<(Date,)> =
            sqlx::query_as("SELECT month FROM billing_month_closes WHERE month = $1")
                .bind(month)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// The advisory lock that orders posting charges (shared) against a month starting to
    /// close (exclusive).
    const MONTH_CLOSE_LOCK: i64 = 0x6b69_6c6e_6269_6c6c; // "kilnbill"

    /// Mark `month` as closing, once every charge-posting transaction in flight has committed
    /// (they hold the shared lock): from this commit on, new charges for it or any earlier
    /// month go onto the next open month's invoice.
    pub async fn month_closing_mark(&self, month: Date) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(Self::MONTH_CLOSE_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO billing_month_closing (month) VALUES ($1) ON CONFLICT (month) DO NOTHING",
        )
        .bind(month)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The latest month whose final invoices are being or have been written, read under the
    /// shared lock held to the end of `conn`'s transaction (so that month cannot start closing
    /// before the charges this transaction posts are committed).
    pub async fn month_latest_closing(&self, conn: &mut PgConnection) -> StoreResult<Option<Date>> {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(Self::MONTH_CLOSE_LOCK)
            .execute(&mut *conn)
            .await?;
        let (month,): (Option<Date>,) =
            sqlx::query_as("SELECT max(month) FROM billing_month_closing")
                .fetch_one(&mut *conn)
                .await?;
        Ok(month)
    }

    /// Record that `month` is closed with `invoices` written.
    pub async fn month_close_record(&self, month: Date, invoices: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO billing_month_closes (month, invoices) VALUES ($1, $2)
             ON CONFLICT (month) DO NOTHING",
        )
        .bind(month)
        .bind(invoices as i32)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether an org exists (for operator routes that name one).
    pub async fn org_exists(&self, conn: &mut PgConnection, org: OrgId) -> StoreResult<bool> {
        let row: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM orgs WHERE id = $1")
            .bind(org.as_uuid())
            .fetch_optional(&mut *conn)
            .await?;
        Ok(row.is_some())
    }
}

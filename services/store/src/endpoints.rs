//! Endpoints: a model server deployed as replicas (workloads of kind `endpoint_replica` that
//! the scheduler places and agents run like pods), reached through the gateway.
//!
//! Tenant methods take an [`OrgScope`]; [`Store::endpoint_route`] is the gateway's read (it
//! checks the caller's org itself) and [`Store::endpoint_replica_shortfalls`] the endpoint
//! controller's.

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::scheduling::{NewWorkload, insert_workload, wake_schedulers};
use crate::workloads::TenantWorkloadRecord;
use crate::{OrgScope, PageOf, PageRequest, Store, StoreError, StoreResult};

/// What every replica of an endpoint asks for: the owned form of a [`NewWorkload`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaTemplate {
    pub tier: String,
    pub gpu_mode: String,
    pub gpu_type: Option<String>,
    pub gpu_count: i32,
    pub mig_profile: Option<String>,
    pub share_memory_mib: Option<i64>,
    pub cpu_millis: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// The pod-shaped spec the agent gets (image, command, env, ports = [port]).
    pub spec: serde_json::Value,
}

impl ReplicaTemplate {
    fn workload<'a>(&'a self, name: &'a str) -> NewWorkload<'a> {
        NewWorkload {
            kind: "endpoint_replica",
            name,
            tier: &self.tier,
            priority: 0,
            gpu_mode: &self.gpu_mode,
            gpu_type: self.gpu_type.as_deref(),
            gpu_count: self.gpu_count,
            mig_profile: self.mig_profile.as_deref(),
            share_memory_mib: self.share_memory_mib,
            cpu_millis: self.cpu_millis,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            spec: self.spec.clone(),
        }
    }
}

/// A new endpoint, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewEndpoint<'a> {
    pub name: &'a str,
    pub port: i32,
    pub health_path: &'a str,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub limits: EndpointLimits,
    pub autoscaling: Autoscaling,
    pub replica: ReplicaTemplate,
    pub price: Option<EndpointPrice>,
}

/// What a call to an endpoint by an org the owner granted costs that org, paid to the owner:
/// micro-USD per request and per 1,000 prompt and completion tokens (see the
/// `…_endpoint_prices_grants` migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EndpointPrice {
    pub per_request_micros: i64,
    pub per_1k_prompt_tokens_micros: i64,
    pub per_1k_completion_tokens_micros: i64,
}

impl EndpointPrice {
    /// From the three nullable columns (all set, or none).
    pub fn from_columns(
        per_request: Option<i64>,
        prompt: Option<i64>,
        completion: Option<i64>,
    ) -> Option<Self> {
        Some(Self {
            per_request_micros: per_request?,
            per_1k_prompt_tokens_micros: prompt?,
            per_1k_completion_tokens_micros: completion?,
        })
    }
}

/// An org an endpoint's owner lets call the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EndpointGrantRecord {
    pub endpoint_id: Uuid,
    pub org_id: Uuid,
    pub org_name: String,
    pub created_at: OffsetDateTime,
}

/// An endpoint another org granted the caller's org: what the grantee may know of it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GrantedEndpointRecord {
    pub endpoint_id: Uuid,
    pub endpoint_name: String,
    pub owner_org_id: Uuid,
    pub owner_org_name: String,
    pub price_per_request_micros: Option<i64>,
    pub price_per_1k_prompt_tokens_micros: Option<i64>,
    pub price_per_1k_completion_tokens_micros: Option<i64>,
    pub created_at: OffsetDateTime,
}

impl GrantedEndpointRecord {
    pub fn price(&self) -> Option<EndpointPrice> {
        EndpointPrice::from_columns(
            self.price_per_request_micros,
            self.price_per_1k_prompt_tokens_micros,
            self.price_per_1k_completion_tokens_micros,
        )
    }
}

/// How an endpoint scales (see the `…_endpoint_autoscaling` migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Autoscaling {
    pub target_concurrency: i32,
    pub scale_down_window_s: i32,
    pub scale_to_zero_after_s: i32,
}

impl Default for Autoscaling {
    /// The database's defaults.
    fn default() -> Self {
        Self {
            target_concurrency: 4,
            scale_down_window_s: 60,
            scale_to_zero_after_s: 300,
        }
    }
}

/// An endpoint's calls in one time bucket (from its usage events).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TrafficBucket {
    pub start: OffsetDateTime,
    pub calls: i64,
    /// Answers with status 500 or more (the replica's, or the gateway's 502).
    pub errors: i64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// An endpoint's calls over a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct TrafficTotals {
    pub calls: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// What the autoscaler needs of one live endpoint.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScalingTarget {
    pub id: Uuid,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub desired_replicas: i32,
    #[sqlx(flatten)]
    pub autoscaling: Autoscaling,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: i32,
}

/// What an endpoint lets its callers do (enforced by the gateways).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointLimits {
    pub per_key_rate: RateLimit,
    pub per_key_concurrency: i32,
    pub total_rate: Option<RateLimit>,
    pub total_concurrency: Option<i32>,
}

impl EndpointLimits {
    /// From the `endpoints` columns: `key_*` and `total_*` (rate per second, burst, concurrency).
    fn from_columns(key: (f64, i32, i32), total: (Option<f64>, Option<i32>, Option<i32>)) -> Self {
        Self {
            per_key_rate: RateLimit {
                per_second: key.0,
                burst: key.1,
            },
            per_key_concurrency: key.2,
            total_rate: total
                .0
                .zip(total.1)
                .map(|(per_second, burst)| RateLimit { per_second, burst }),
            total_concurrency: total.2,
        }
    }
}

impl Default for EndpointLimits {
    /// The database's defaults.
    fn default() -> Self {
        Self {
            per_key_rate: RateLimit {
                per_second: 50.0,
                burst: 100,
            },
            per_key_concurrency: 32,
            total_rate: None,
            total_concurrency: None,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRecord {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub state: String,
    pub spec: serde_json::Value,
    pub port: i32,
    pub health_path: String,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub desired_replicas: i32,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub key_rate_per_s: f64,
    pub key_burst: i32,
    pub key_concurrency: i32,
    pub total_rate_per_s: Option<f64>,
    pub total_burst: Option<i32>,
    pub total_concurrency: Option<i32>,
    #[sqlx(flatten)]
    pub autoscaling: Autoscaling,
    pub price_per_request_micros: Option<i64>,
    pub price_per_1k_prompt_tokens_micros: Option<i64>,
    pub price_per_1k_completion_tokens_micros: Option<i64>,
}

impl EndpointRecord {
    /// The price the owner charges the orgs it granted, if any.
    pub fn price(&self) -> Option<EndpointPrice> {
        EndpointPrice::from_columns(
            self.price_per_request_micros,
            self.price_per_1k_prompt_tokens_micros,
            self.price_per_1k_completion_tokens_micros,
        )
    }

    pub fn limits(&self) -> EndpointLimits {
        EndpointLimits::from_columns(
            (self.key_rate_per_s, self.key_burst, self.key_concurrency),
            (
                self.total_rate_per_s,
                self.total_burst,
                self.total_concurrency,
            ),
        )
    }

    /// What each replica asks for.
    pub fn replica(&self) -> Option<ReplicaTemplate> {
        serde_json::from_value(self.spec.get("replica")?.clone()).ok()
    }
}

/// A replica the gateway can send a call to: running, with the endpoint's port published.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReadyReplica {
    pub workload_id: Uuid,
    pub host: String,
    pub host_port: i32,
}

/// What the gateway needs to route a call.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRoute {
    pub id: Uuid,
    pub org_id: Uuid,
    pub ready: Vec<ReadyReplica>,
    /// Replicas placed or starting: calls may wait for one instead of failing at once.
    pub coming: i64,
    pub limits: EndpointLimits,
    /// Orgs besides the owner whose keys may call it.
    pub grantees: Vec<Uuid>,
    /// What a grantee's call costs it (paid to the owner).
    pub price: Option<EndpointPrice>,
}

impl EndpointRoute {
    /// Whether a key of `org` may call this endpoint: the owner's, or a granted org's.
    pub fn admits(&self, org: Uuid) -> bool {
        self.org_id == org || self.grantees.contains(&org)
    }
}

/// An endpoint whose live replicas are not as many as it should have.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReplicaImbalance {
    pub endpoint_id: Uuid,
    /// Replicas to add (negative: to remove).
    pub missing: i64,
}

const ENDPOINT_COLUMNS: &str = "id, org_id, name, state, spec, port, health_path, min_replicas, \
     max_replicas, desired_replicas, created_at, updated_at, key_rate_per_s, key_burst, \
     key_concurrency, total_rate_per_s, total_burst, total_concurrency, target_concurrency, \
     scale_down_window_s, scale_to_zero_after_s, price_per_request_micros, \
     price_per_1k_prompt_tokens_micros, price_per_1k_completion_tokens_micros";

/// Whether the endpoint `e`'s org is out of credit: kiln-billing has stopped its work, so no
/// replica is added until a top-up lifts the mark (billing then resumes what it stopped).
const OUT_OF_CREDIT: &str = "EXISTS (SELECT 1 FROM billing_settings b
     WHERE b.org_id = e.org_id AND b.credit_exhausted_at IS NOT NULL)";

/// Replica states that count as live (not ended).
const LIVE: &str = "('pending', 'scheduled', 'starting', 'running', 'stopping')";

impl Store {
    /// Record an endpoint and its first `min_replicas` replicas (pending), and wake the
    /// schedulers. A live endpoint of the same name in the org is a conflict.
    pub async fn endpoint_create(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        new: &NewEndpoint<'_>,
    ) -> StoreResult<EndpointRecord> {
        let spec = serde_json::json!({ "replica": new.replica });
        let row: Option<EndpointRecord> = sqlx::query_as(&format!(
            "INSERT INTO endpoints (id, org_id, name, spec, port, health_path, min_replicas,
                 max_replicas, desired_replicas, key_rate_per_s, key_burst, key_concurrency,
                 total_rate_per_s, total_burst, total_concurrency, target_concurrency,
                 scale_down_window_s, scale_to_zero_after_s, price_per_request_micros,
                 price_per_1k_prompt_tokens_micros, price_per_1k_completion_tokens_micros)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $9, $10, $11, $12, $13, $14, $15, $16,
                 $17, $18, $19, $20)
             ON CONFLICT (org_id, name) WHERE state = 'active' DO NOTHING
             RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(scope.org_id().as_uuid())
        .bind(new.name)
        .bind(&spec)
        .bind(new.port)
        .bind(new.health_path)
        .bind(new.min_replicas)
        .bind(new.max_replicas)
        .bind(new.limits.per_key_rate.per_second)
        .bind(new.limits.per_key_rate.burst)
        .bind(new.limits.per_key_concurrency)
        .bind(new.limits.total_rate.map(|r| r.per_second))
        .bind(new.limits.total_rate.map(|r| r.burst))
        .bind(new.limits.total_concurrency)
        .bind(new.autoscaling.target_concurrency)
        .bind(new.autoscaling.scale_down_window_s)
        .bind(new.autoscaling.scale_to_zero_after_s)
        .bind(new.price.map(|p| p.per_request_micros))
        .bind(new.price.map(|p| p.per_1k_prompt_tokens_micros))
        .bind(new.price.map(|p| p.per_1k_completion_tokens_micros))
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::Conflict {
                what: "an endpoint with this name",
            });
        };
        self.endpoint_add_replicas(conn, &row, i64::from(new.min_replicas))
            .await?;
        Ok(row)
    }

    /// Add `n` pending replicas to an endpoint and wake the schedulers.
    pub async fn endpoint_add_replicas(
        &self,
        conn: &mut PgConnection,
        endpoint: &EndpointRecord,
        n: i64,
    ) -> StoreResult<()> {
        if n <= 0 {
            return Ok(());
        }
        let Some(template) = endpoint.replica() else {
            return Err(StoreError::NotFound {
                what: "endpoint replica template",
            });
        };
        for _ in 0..n {
            let name = format!(
                "{}-{}",
                endpoint.name,
                &Uuid::new_v4().simple().to_string()[..6]
            );
            insert_workload(
                conn,
                endpoint.org_id,
                Some(endpoint.id),
                &template.workload(&name),
            )
            .await?;
        }
        wake_schedulers(conn).await
    }

    /// The org's live endpoints, newest first.
    pub async fn endpoint_list(
        &self,
        scope: &OrgScope,
        page: PageRequest,
    ) -> StoreResult<PageOf<EndpointRecord>> {
        let rows: Vec<EndpointRecord> = sqlx::query_as(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints
             WHERE org_id = $1 AND state = 'active' AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        Ok(page.finish(rows, |e| {
            kiln_domain::EndpointId::from_uuid(e.id).to_string()
        }))
    }

    /// One endpoint of the scope's org (deleted ones too, so a delete can be answered).
    pub async fn endpoint_get(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
    ) -> StoreResult<EndpointRecord> {
        sqlx::query_as(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = $1 AND org_id = $2"
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound { what: "endpoint" })
    }

    /// The endpoint's live replicas, as its tenant sees them (oldest first).
    pub async fn endpoint_replicas(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
    ) -> StoreResult<Vec<TenantWorkloadRecord>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {} FROM workloads w LEFT JOIN nodes n ON n.id = w.node_id
             WHERE w.endpoint_id = $1 AND w.org_id = $2 AND w.state IN {LIVE}
             ORDER BY w.id",
            crate::workloads::TENANT_COLUMNS
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Delete an endpoint: it stops taking calls, and its live replicas are terminated (their
    /// capacity freed at once, their agents told). Answers whether it was live.
    pub async fn endpoint_delete(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
        reason: &str,
    ) -> StoreResult<bool> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT state FROM endpoints WHERE id = $1 AND org_id = $2 FOR UPDATE")
                .bind(id)
                .bind(scope.org_id().as_uuid())
                .fetch_optional(&mut *conn)
                .await?;
        let Some((state,)) = row else {
            return Err(StoreError::NotFound { what: "endpoint" });
        };
        if state == "deleted" {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE endpoints SET state = 'deleted', deleted_at = now(), updated_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
        let replicas: Vec<(Uuid,)> = sqlx::query_as(&format!(
            "SELECT id FROM workloads WHERE endpoint_id = $1 AND state IN {LIVE}"
        ))
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        for (w,) in replicas {
            self.workload_release(
                conn,
                kiln_domain::WorkloadId::from_uuid(w),
                "terminated",
                reason,
            )
            .await?;
        }
        Ok(true)
    }

    /// The gateway's view of a live endpoint: its org, the replicas that can take a call now
    /// (running, with the endpoint's port published), and how many more are on their way.
    /// `None` for an unknown or deleted endpoint.
    pub async fn endpoint_route(&self, id: Uuid) -> StoreResult<Option<EndpointRoute>> {
        // One statement (the gateway runs it per call): no row for an unknown or deleted
        // endpoint, one row without a replica when none is ready, else a row per ready replica.
        #[derive(sqlx::FromRow)]
        struct Row {
            org_id: Uuid,
            coming: i64,
            key_rate_per_s: f64,
            key_burst: i32,
            key_concurrency: i32,
            total_rate_per_s: Option<f64>,
            total_burst: Option<i32>,
            total_concurrency: Option<i32>,
            grantees: Vec<Uuid>,
            price_per_request_micros: Option<i64>,
            price_per_1k_prompt_tokens_micros: Option<i64>,
            price_per_1k_completion_tokens_micros: Option<i64>,
            workload_id: Option<Uuid>,
            host: Option<String>,
            host_port: Option<i32>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT e.org_id,
                    (SELECT count(*) FROM workloads
                     WHERE endpoint_id = e.id AND state IN ('pending', 'scheduled', 'starting'))
                        AS coming,
                    e.key_rate_per_s, e.key_burst, e.key_concurrency, e.total_rate_per_s,
                    e.total_burst, e.total_concurrency,
                    ARRAY(SELECT g.org_id FROM endpoint_grants g WHERE g.endpoint_id = e.id)
                        AS grantees,
                    e.price_per_request_micros, e.price_per_1k_prompt_tokens_micros,
                    e.price_per_1k_completion_tokens_micros,
                    r.workload_id, r.host, r.host_port
             FROM endpoints e
             LEFT JOIN LATERAL (
                 SELECT w.id AS workload_id,
                        COALESCE(NULLIF(n.public_address, ''), n.hostname) AS host,
                        (p->>'host_port')::int AS host_port
                 FROM workloads w
                 JOIN nodes n ON n.id = w.node_id
                 JOIN node_observed o ON o.assignment_id = w.assignment_id AND o.node_id = w.node_id
                 CROSS JOIN LATERAL jsonb_array_elements(o.ports) AS p
                 WHERE w.endpoint_id = e.id AND w.state = 'running'
                   AND (p->>'port')::int = e.port AND (p->>'host_port')::int > 0
             ) r ON true
             WHERE e.id = $1 AND e.state = 'active'
             ORDER BY r.workload_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let (org_id, coming) = (first.org_id, first.coming);
        let grantees = first.grantees.clone();
        let price = EndpointPrice::from_columns(
            first.price_per_request_micros,
            first.price_per_1k_prompt_tokens_micros,
            first.price_per_1k_completion_tokens_micros,
        );
        let limits = EndpointLimits::from_columns(
            (first.key_rate_per_s, first.key_burst, first.key_concurrency),
            (
                first.total_rate_per_s,
                first.total_burst,
                first.total_concurrency,
            ),
        );
        let ready = rows
            .into_iter()
            .filter_map(|r| {
                Some(ReadyReplica {
                    workload_id: r.workload_id?,
                    host: r.host?,
                    host_port: r.host_port?,
                })
            })
            .collect();
        Ok(Some(EndpointRoute {
            id,
            org_id,
            ready,
            coming,
            limits,
            grantees,
            price,
        }))
    }

    /// Live endpoints with fewer live replicas than they should have (a replica failed, was
    /// lost with its node, or was deleted behind the endpoint's back; the autoscaler asked for
    /// more) — of orgs that can pay — or with more (the autoscaler asked for fewer).
    pub async fn endpoint_replica_imbalances(&self) -> StoreResult<Vec<ReplicaImbalance>> {
        Ok(sqlx::query_as(&format!(
            "SELECT e.id AS endpoint_id,
                    e.desired_replicas - count(w.id) FILTER (WHERE w.state IN {LIVE}) AS missing
             FROM endpoints e LEFT JOIN workloads w ON w.endpoint_id = e.id
             WHERE e.state = 'active'
             GROUP BY e.id
             HAVING (e.desired_replicas > count(w.id) FILTER (WHERE w.state IN {LIVE})
                     AND NOT bool_or({OUT_OF_CREDIT}))
                 OR e.desired_replicas < count(w.id) FILTER (WHERE w.state IN {LIVE})"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Bring one endpoint to its desired replicas under its row lock (so two controllers
    /// never both add or remove the same replica): adds what is missing (unless its org is out
    /// of credit), or terminates the surplus — replicas not yet running first, then the
    /// newest. Answers the change (negative: removed).
    pub async fn endpoint_reconcile_replicas(&self, id: Uuid) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        let row: Option<EndpointRecord> = sqlx::query_as(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints e WHERE id = $1 AND state = 'active'
             FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(endpoint) = row else {
            return Ok(0);
        };
        let (live, out_of_credit): (i64, bool) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM workloads WHERE endpoint_id = $1 AND state IN {LIVE}),
                    EXISTS (SELECT 1 FROM billing_settings b
                            WHERE b.org_id = $2 AND b.credit_exhausted_at IS NOT NULL)"
        ))
        .bind(id)
        .bind(endpoint.org_id)
        .fetch_one(&mut *tx)
        .await?;
        let missing = i64::from(endpoint.desired_replicas) - live;
        let change = if missing > 0 && !out_of_credit {
            self.endpoint_add_replicas(&mut tx, &endpoint, missing)
                .await?;
            missing
        } else if missing < 0 {
            let surplus: Vec<(Uuid,)> = sqlx::query_as(&format!(
                "SELECT id FROM workloads WHERE endpoint_id = $1 AND state IN {LIVE}
                 ORDER BY state = 'running', created_at DESC, id DESC LIMIT $2"
            ))
            .bind(id)
            .bind(-missing)
            .fetch_all(&mut *tx)
            .await?;
            for (w,) in &surplus {
                self.workload_release(
                    &mut tx,
                    kiln_domain::WorkloadId::from_uuid(*w),
                    "terminated",
                    "scaled down: the endpoint needs fewer replicas",
                )
                .await?;
            }
            -(surplus.len() as i64)
        } else {
            0
        };
        tx.commit().await?;
        Ok(change)
    }

    /// Endpoint `id`'s calls from `since` in buckets of `bucket_s` seconds (only buckets that
    /// had calls), oldest first, and the totals.
    pub async fn endpoint_traffic(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        since: OffsetDateTime,
        bucket_s: i64,
    ) -> StoreResult<(Vec<TrafficBucket>, TrafficTotals)> {
        let buckets = sqlx::query_as(
            "SELECT date_bin(make_interval(secs => $3), occurred_at, $2) AS start,
                    count(*) AS calls,
                    count(*) FILTER (WHERE status >= 500) AS errors,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99_ms
             FROM usage_events WHERE endpoint_id = $1 AND occurred_at >= $2
             GROUP BY 1 ORDER BY 1",
        )
        .bind(id)
        .bind(since)
        .bind(bucket_s as f64)
        .fetch_all(&mut *conn)
        .await?;
        let totals = sqlx::query_as(
            "SELECT count(*) AS calls, count(*) FILTER (WHERE status >= 500) AS errors,
                    COALESCE(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                    COALESCE(sum(completion_tokens), 0)::bigint AS completion_tokens
             FROM usage_events WHERE endpoint_id = $1 AND occurred_at >= $2",
        )
        .bind(id)
        .bind(since)
        .fetch_one(&mut *conn)
        .await?;
        Ok((buckets, totals))
    }

    /// Every live endpoint, with what the autoscaler needs to know.
    pub async fn endpoint_scaling_targets(&self) -> StoreResult<Vec<ScalingTarget>> {
        Ok(sqlx::query_as(
            "SELECT id, min_replicas, max_replicas, desired_replicas, target_concurrency,
                    scale_down_window_s, scale_to_zero_after_s
             FROM endpoints WHERE state = 'active'",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Set how many replicas an endpoint should have (kept within its min and max); answers
    /// whether it changed.
    pub async fn endpoint_set_desired(&self, id: Uuid, desired: i32) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE endpoints SET desired_replicas = GREATEST(min_replicas, LEAST(max_replicas, $2)),
                 updated_at = now()
             WHERE id = $1 AND state = 'active'
               AND desired_replicas <> GREATEST(min_replicas, LEAST(max_replicas, $2))",
        )
        .bind(id)
        .bind(desired)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

impl Store {
    /// Set (or with `None` remove) the price the endpoint's grantees pay. Calls answered before
    /// keep the price they were answered under.
    pub async fn endpoint_price_set(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
        price: Option<EndpointPrice>,
    ) -> StoreResult<EndpointRecord> {
        sqlx::query_as(&format!(
            "UPDATE endpoints SET price_per_request_micros = $3,
                 price_per_1k_prompt_tokens_micros = $4,
                 price_per_1k_completion_tokens_micros = $5, updated_at = now()
             WHERE id = $1 AND org_id = $2 AND state = 'active'
             RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .bind(price.map(|p| p.per_request_micros))
        .bind(price.map(|p| p.per_1k_prompt_tokens_micros))
        .bind(price.map(|p| p.per_1k_completion_tokens_micros))
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound { what: "endpoint" })
    }

    /// Let `grantee`'s API keys call the scope's live endpoint `id`. Granting twice answers the
    /// first grant. An unknown grantee org is `NotFound { what: "org" }`.
    pub async fn endpoint_grant_add(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
        grantee: Uuid,
    ) -> StoreResult<EndpointGrantRecord> {
        let live: Option<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM endpoints WHERE id = $1 AND org_id = $2 AND state = 'active'
             FOR SHARE",
        )
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        if live.is_none() {
            return Err(StoreError::NotFound { what: "endpoint" });
        }
        let row: Option<EndpointGrantRecord> = sqlx::query_as(
            "WITH ins AS (
                 INSERT INTO endpoint_grants (endpoint_id, org_id)
                 SELECT $1, o.id FROM orgs o WHERE o.id = $2
                 ON CONFLICT (endpoint_id, org_id) DO NOTHING
                 RETURNING endpoint_id, org_id, created_at)
             SELECT g.endpoint_id, g.org_id, o.name AS org_name, g.created_at
             FROM (SELECT * FROM ins
                   UNION ALL
                   SELECT endpoint_id, org_id, created_at FROM endpoint_grants
                   WHERE endpoint_id = $1 AND org_id = $2) g
             JOIN orgs o ON o.id = g.org_id
             LIMIT 1",
        )
        .bind(id)
        .bind(grantee)
        .fetch_optional(&mut *conn)
        .await?;
        row.ok_or(StoreError::NotFound { what: "org" })
    }

    /// Take a grant back: the grantee's keys get 404 from the gateways at once. Answers
    /// whether there was one.
    pub async fn endpoint_grant_remove(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
        grantee: Uuid,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "DELETE FROM endpoint_grants g USING endpoints e
             WHERE g.endpoint_id = $1 AND g.org_id = $3 AND e.id = g.endpoint_id AND e.org_id = $2",
        )
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .bind(grantee)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The orgs the scope's endpoint `id` is granted to, oldest grant first.
    pub async fn endpoint_grant_list(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
    ) -> StoreResult<Vec<EndpointGrantRecord>> {
        Ok(sqlx::query_as(
            "SELECT g.endpoint_id, g.org_id, o.name AS org_name, g.created_at
             FROM endpoint_grants g
             JOIN endpoints e ON e.id = g.endpoint_id
             JOIN orgs o ON o.id = g.org_id
             WHERE g.endpoint_id = $1 AND e.org_id = $2
             ORDER BY g.created_at, g.org_id",
        )
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Live endpoints of other orgs that the scope's org may call, newest grant first.
    pub async fn endpoints_granted_to(
        &self,
        scope: &OrgScope,
    ) -> StoreResult<Vec<GrantedEndpointRecord>> {
        Ok(sqlx::query_as(
            "SELECT e.id AS endpoint_id, e.name AS endpoint_name, e.org_id AS owner_org_id,
                    o.name AS owner_org_name, e.price_per_request_micros,
                    e.price_per_1k_prompt_tokens_micros, e.price_per_1k_completion_tokens_micros,
                    g.created_at
             FROM endpoint_grants g
             JOIN endpoints e ON e.id = g.endpoint_id AND e.state = 'active'
             JOIN orgs o ON o.id = e.org_id
             WHERE g.org_id = $1
             ORDER BY g.created_at DESC, e.id
             LIMIT 500",
        )
        .bind(scope.org_id().as_uuid())
        .fetch_all(&self.pool)
        .await?)
    }
}

//! The Postgres data store: every SQL statement of the control plane lives in this crate.
//!
//! Methods are named resource-first (`org_create`, `member_list`, `api_key_revoke`). Methods that
//! read or change tenant data take an [`OrgScope`], and the only way to get one is
//! [`Store::authorize`], which checks the caller's membership (or API key) and the permission
//! table. That makes tenant isolation a property of the types: a handler that forgot to authorise
//! does not compile.
//!
//! Methods that change several rows take `&mut PgConnection` so the caller can run them in one
//! transaction together with the `Idempotency-Key` claim ([`idempotency`]).

pub mod api_keys;
pub mod audit;
pub mod billing;
pub mod catalog;
pub mod endpoints;
pub mod fleet;
pub mod idempotency;
pub mod images;
pub mod instances;
pub mod nodes;
pub mod orgs;
pub mod quotas;
pub mod scheduling;
pub mod scope;
pub mod usage;
pub mod users;
pub mod wakers;
pub mod workloads;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub use api_keys::{ApiKeyAuth, ApiKeyRecord, NewApiKey};
pub use audit::{AuditEvent, AuditRecord};
pub use billing::{
    BillingSettingsRecord, ChargeDetail, ChargeRecord, EntryRecord, FundsRecord, GpuPriceRecord,
    HistoryRow, InvoiceLineRecord, InvoiceRecord, NewEntry, NewPosting, NewPriceVersion,
    PostingRecord, PriceVersionDelete, PriceVersionRecord, PromoBalance, RatingWork,
    SuspendableWorkload, UsageGroup, UsageRow,
};
pub use catalog::{CatalogGpu, CatalogSlot};
pub use endpoints::{
    Autoscaling, EndpointGrantRecord, EndpointLimits, EndpointPrice, EndpointRecord, EndpointRoute,
    GrantedEndpointRecord, NewEndpoint, RateLimit, ReadyReplica, ReplicaImbalance, ReplicaTemplate,
    ScalingTarget, TrafficBucket, TrafficTotals,
};
pub use fleet::{
    ASSIGNMENT_CHANNEL, AssignmentEventRecord, AssignmentKind, AssignmentPut, AssignmentRecord,
    AssignmentSnapshot, CREDENTIAL_CHANNEL, CapacityRow, GpuEventRecord, GpuHealthReport,
    GpuRecord, GpuRegistration, GpuSampleReport, LivenessChange, MigInstanceRecord,
    NodeRegistration, NodeStatus, ObservedOutcome, ObservedRecord, ObservedView,
};
pub use idempotency::{Claim, IdempotencyScope};
pub use images::{VmImageFields, VmImageRecord};
pub use nodes::{JoinError, NewNode, NewNodeToken, NodeRecord, NodeTokenRecord};
pub use orgs::{MemberRecord, OrgRecord};
pub use quotas::QuotaRecord;
pub use scheduling::{
    FREED, GpuHold, NewWorkload, PENDING_CHANNEL, PlaceError, PlacementCommit, SchedAllocation,
    SchedFleet, SchedGpu, SchedNode, WorkloadRecord,
};
pub use scope::{AuthzError, OrgScope, Principal};
pub use usage::{CallToRate, UsageEventRow};
pub use users::{Me, MembershipView, RefreshOutcome, UserRecord};
pub use wakers::Wakers;
pub use workloads::TenantWorkloadRecord;

/// The schema, embedded; applied at start-up and by `kiln-api migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A database transaction, as handed to multi-step methods.
pub type Tx = Transaction<'static, Postgres>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("{what} already exists")]
    Conflict { what: &'static str },
    #[error("an org must keep at least one owner")]
    LastOwner,
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Map a unique-violation to `Conflict`, everything else to `Database`.
    fn from_unique(err: sqlx::Error, what: &'static str) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                StoreError::Conflict { what }
            }
            _ => StoreError::Database(err),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One page of a list, ordered by creation, with the cursor for the next.
#[derive(Debug, Clone)]
pub struct PageOf<T> {
    pub items: Vec<T>,
    /// Opaque to callers; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Where a list starts and how long it is.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub limit: u32,
    pub after: Option<Uuid>,
}

impl PageRequest {
    pub const DEFAULT_LIMIT: u32 = 50;
    pub const MAX_LIMIT: u32 = 200;

    fn fetch(&self) -> i64 {
        i64::from(self.limit) + 1
    }

    fn finish<T>(&self, mut rows: Vec<T>, id_of: impl Fn(&T) -> String) -> PageOf<T> {
        let more = rows.len() > self.limit as usize;
        rows.truncate(self.limit as usize);
        let next_cursor = if more { rows.last().map(id_of) } else { None };
        PageOf {
            items: rows,
            next_cursor,
        }
    }
}

/// The handle every control-plane service holds.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connect with a bounded pool.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let opts: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    /// Connect a pool whose commits do not wait for the WAL to reach disk
    /// (`synchronous_commit = off`), for writes that may be lost in a database crash without
    /// harm — heartbeats and metrics samples, which the next report restates. Anything else
    /// goes through a [`Store::connect`] pool.
    pub async fn connect_relaxed(url: &str, max_connections: u32) -> StoreResult<Self> {
        let opts: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .options([("synchronous_commit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A pool of one connection to the same database, outside this store's pool: for a
    /// connection held for a process's life (a `LISTEN`, a session advisory lock), so it never
    /// takes a connection the store's callers are counting on. Connects when first used, and
    /// closes when the store's pool does (so a test's database can be dropped). Must be called
    /// inside a Tokio runtime.
    pub fn dedicated_pool(&self) -> PgPool {
        let dedicated = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with((*self.pool.connect_options()).clone());
        let (main, closing) = (self.pool.clone(), dedicated.clone());
        tokio::spawn(async move {
            main.close_event().await;
            closing.close().await;
        });
        dedicated
    }

    pub async fn begin(&self) -> StoreResult<Tx> {
        Ok(self.pool.begin().await?)
    }

    /// Readiness: the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

//! The rater: workload state history into ledger charges, continuously.
//!
//! A pass rates every workload with something unrated up to `now − settle` (whole seconds):
//! batches of rating cursors are locked with `SKIP LOCKED`, their histories rated by
//! [`kiln_billing_core::rate_until`] from the cursor on, the charges posted and the cursors
//! moved — all in one transaction. So any number of raters (replicas, or a re-run after a
//! crash) can run at once: a cursor is held by one of them, a committed window is never rated
//! again, and a posting's idempotency key (workload, product, period, price version) makes a
//! replayed window a no-op even if a cursor were reset. `settle` leaves room for state
//! changes still committing (their history rows carry the time they were made).
//!
//! Workloads the core cannot rate (no price for their GPU type) keep their cursor: they are
//! rated, from where they were, once the catalog prices them. Never silently free.
//!
//! Endpoint calls (the gateway's `usage_events`) are rated in the same pass ([`Rater::calls`]):
//! unrated calls are claimed `SKIP LOCKED`, grouped by the core into aggregates
//! ([`kiln_billing_core::rate_calls`]: one org, endpoint, GPU type, price version and month
//! each), the aggregates' charges posted and every call marked with the key of the aggregate
//! that charged it, in one transaction. A call is charged once however many raters run.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kiln_billing_core::{Charge, MeteredCall, PriceBook, rate_calls, rate_until};
use kiln_store::Store;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::BillingError;
use crate::convert::{odt, price_book, shape, transition, ts};
use crate::ledger::{post_charges, post_resales};

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RatingReport {
    /// Workloads rated (cursor moved).
    pub workloads: usize,
    /// New charge postings.
    pub postings: usize,
    /// Workloads that could not be rated (unpriced or malformed); their cursors stay.
    pub unrated: usize,
    /// Endpoint calls rated (charged, or free for a server error).
    pub calls: usize,
    /// Endpoint calls that could not be rated yet (their endpoint's GPU type is not priced).
    pub calls_unrated: usize,
    /// Orgs that were charged (their credit needs a look).
    pub charged_orgs: BTreeSet<Uuid>,
}

#[derive(Debug, Clone)]
pub struct Rater {
    store: Store,
    /// How far behind now rating stops, so state changes still committing are seen.
    pub settle: Duration,
    /// Cursors (and endpoint calls) per transaction.
    pub batch: i64,
}

impl Rater {
    pub fn new(store: Store, settle: Duration) -> Self {
        Self {
            store,
            settle,
            batch: 1_000,
        }
    }

    /// Rate everything unrated up to `now − settle`.
    pub async fn pass(&self, now: OffsetDateTime) -> Result<RatingReport, BillingError> {
        let until = whole_second(now - self.settle);
        let book = price_book(&self.store.price_versions().await?)?;
        let mut report = RatingReport::default();
        let mut skip: Vec<Uuid> = Vec::new();
        loop {
            let claimed = self
                .batch_pass(&book, until, &mut skip, &mut report)
                .await?;
            if claimed < self.batch as usize {
                break;
            }
        }
        self.calls(&book, until, &mut report).await?;
        metrics::counter!("kiln_billing_postings_total").increment(report.postings as u64);
        Ok(report)
    }

    /// One transaction: claim a batch, rate it, post, move the cursors. Answers how many
    /// cursors it claimed.
    async fn batch_pass(
        &self,
        book: &PriceBook,
        until: OffsetDateTime,
        skip: &mut Vec<Uuid>,
        report: &mut RatingReport,
    ) -> Result<usize, BillingError> {
        let mut tx = self.store.begin().await?;
        let work = self
            .store
            .rating_claim(&mut tx, until, self.batch, skip)
            .await?;
        if work.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = work.iter().map(|w| w.workload_id).collect();
        let mut histories: HashMap<Uuid, Vec<kiln_billing_core::Transition>> = HashMap::new();
        for row in self.store.workload_histories(&mut tx, &ids, until).await? {
            histories
                .entry(row.workload_id)
                .or_default()
                .push(transition(&row));
        }
        let mut charges: Vec<(Charge, Option<&str>)> = Vec::new();
        let mut rated: Vec<Uuid> = Vec::with_capacity(work.len());
        for w in &work {
            let history = histories.remove(&w.workload_id).unwrap_or_default();
            let rated_charges = shape(w).and_then(|s| {
                Ok(rate_until(
                    &history,
                    &s,
                    book,
                    ts(w.rated_until),
                    ts(until),
                )?)
            });
            match rated_charges {
                Ok(c) => {
                    charges.extend(c.into_iter().map(|c| (c, Some(w.kind.as_str()))));
                    rated.push(w.workload_id);
                }
                Err(e) => {
                    tracing::warn!(workload = %w.workload_id, error = %e,
                        "cannot rate this workload yet; it will be rated once it can be");
                    metrics::counter!("kiln_billing_unrated_total").increment(1);
                    skip.push(w.workload_id);
                    report.unrated += 1;
                }
            }
        }
        report
            .charged_orgs
            .extend(charges.iter().map(|(c, _)| c.org));
        report.postings += post_charges(&self.store, &mut tx, &charges).await?;
        self.store.rating_advance(&mut tx, &rated, until).await?;
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        report.workloads += rated.len();
        Ok(work.len())
    }
}

impl Rater {
    /// Rate every unrated endpoint call that happened before `until`, a batch per transaction.
    pub async fn calls(
        &self,
        book: &PriceBook,
        until: OffsetDateTime,
        report: &mut RatingReport,
    ) -> Result<(), BillingError> {
        // Endpoints whose calls cannot be rated yet: left for a later pass, not re-claimed now.
        let mut skip: Vec<Uuid> = Vec::new();
        loop {
            let mut tx = self.store.begin().await?;
            let claimed = self
                .store
                .usage_calls_claim(&mut tx, until, self.batch, &skip)
                .await?;
            if claimed.is_empty() {
                return Ok(());
            }
            let calls: Vec<MeteredCall> = claimed
                .iter()
                .map(|c| MeteredCall {
                    id: c.id,
                    org: c.org_id,
                    endpoint: c.endpoint_id,
                    gpu_type: c.gpu_type.clone(),
                    at: ts(c.occurred_at),
                    status: u16::try_from(c.status).unwrap_or(u16::MAX),
                    prompt_tokens: c.prompt_tokens.unwrap_or(0),
                    completion_tokens: c.completion_tokens.unwrap_or(0),
                    caller: c.caller_org_id.unwrap_or(c.org_id),
                    resale: c.resale().map(crate::convert::endpoint_prices),
                })
                .collect();
            let rated = rate_calls(&calls, book);
            if !rated.unrated.is_empty() {
                let endpoints: BTreeSet<Uuid> = rated
                    .unrated
                    .iter()
                    .filter_map(|(id, _)| calls.iter().find(|c| c.id == *id))
                    .map(|c| c.endpoint)
                    .collect();
                if let Some((id, e)) = rated.unrated.first() {
                    tracing::warn!(call = %id, error = %e, unrated = rated.unrated.len(),
                        "cannot rate these endpoint calls yet; they will be rated once they can be");
                }
                metrics::counter!("kiln_billing_calls_unrated_total")
                    .increment(rated.unrated.len() as u64);
                report.calls_unrated += rated.unrated.len();
                skip.extend(endpoints);
            }
            let charges: Vec<(Charge, Option<&str>)> = rated
                .charges
                .into_iter()
                .map(|c| (c, Some("endpoint")))
                .collect();
            report
                .charged_orgs
                .extend(charges.iter().map(|(c, _)| c.org));
            report.postings += post_charges(&self.store, &mut tx, &charges).await?;
            report
                .charged_orgs
                .extend(rated.resales.iter().map(|r| r.charge.org));
            report.postings += post_resales(&self.store, &mut tx, &rated.resales).await?;
            self.store.usage_calls_rated(&mut tx, &rated.rated).await?;
            tx.commit().await.map_err(kiln_store::StoreError::from)?;
            report.calls += rated.rated.len();
            metrics::counter!("kiln_billing_calls_rated_total").increment(rated.rated.len() as u64);
            if claimed.len() < self.batch as usize {
                return Ok(());
            }
        }
    }
}

/// `t` rounded down to a whole second (billing counts whole seconds; whole-second cuts keep
/// posting keys on one grid).
pub fn whole_second(t: OffsetDateTime) -> OffsetDateTime {
    odt(kiln_billing_core::Timestamp::from_secs(ts(t).second()))
}

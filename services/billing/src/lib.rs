//! `kiln-billing`: money follows usage.
//!
//! The rules are [`kiln_billing_core`]'s (pure, property-tested); this crate runs them against
//! Postgres through [`kiln_store`]:
//!
//! * [`rater`] — workload state history into ledger charges every tick (well under a minute),
//!   and metered endpoint usage per request and token; safe with any number of replicas.
//! * [`ledger`] — charges spending promotional credit first, idempotent top-ups and grants,
//!   promotional credit expiry.
//! * [`limits`] — out of credit: 402 for new work (the API asks [`limits::standing`]), running
//!   work stopped after a grace period, everything queued again after a top-up; budget alerts.
//! * [`invoices`] — monthly invoices, on demand (draft) and at month close (final).
//!
//! [`Billing::run`] is the service loop; every step is a conditional or idempotent write, so
//! replicas may run side by side.

pub mod config;
pub mod convert;
pub mod invoices;
pub mod ledger;
pub mod limits;
pub mod rater;

use std::future::Future;
use std::sync::Arc;

use kiln_store::{Store, StoreError};
use time::OffsetDateTime;
use tokio::net::TcpListener;

pub use config::BillingConfig;
pub use limits::{EnforcementReport, Enforcer};
pub use rater::{Rater, RatingReport};

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the price catalog is inconsistent")]
    PriceBook(#[from] kiln_billing_core::PriceBookError),
    #[error("rating failed")]
    Rate(#[from] kiln_billing_core::RateError),
    #[error("the ledger refused a posting")]
    Ledger(#[from] kiln_billing_core::LedgerError),
    #[error("the posting is invalid")]
    Posting(#[from] kiln_billing_core::PostingError),
    #[error("money arithmetic overflowed")]
    Money(#[from] kiln_billing_core::MoneyError),
    #[error("unrecognised {0} `{1}`")]
    Unrecognised(&'static str, String),
    #[error("this reference was already used with a different amount")]
    ReferenceReused,
    #[error("a row written in this transaction could not be read back")]
    Vanished,
}

/// Everything a running kiln-billing needs.
pub struct Billing {
    pub store: Store,
    pub config: BillingConfig,
    pub ops_listener: TcpListener,
}

/// What one tick of the service did.
#[derive(Debug, Clone, Default)]
pub struct TickReport {
    pub rating: RatingReport,
    pub enforcement: EnforcementReport,
    pub promos_expired: usize,
    pub invoices_closed: usize,
}

/// One tick: rate, expire promotional credit, enforce limits, close last month if due.
pub async fn tick(
    store: &Store,
    config: &BillingConfig,
    now: OffsetDateTime,
) -> Result<TickReport, BillingError> {
    let rater = Rater::new(store.clone(), config.settle());
    let rating = rater.pass(now).await?;
    let promos_expired = {
        let mut tx = store.begin().await?;
        let n = ledger::expire_promos(store, &mut tx, now, 1_000).await?;
        tx.commit().await.map_err(StoreError::from)?;
        n
    };
    let enforcement = Enforcer::new(store.clone(), config.grace())
        .pass(&rating.charged_orgs, now)
        .await?;
    let mut invoices_closed = 0;
    let month = invoices::previous_month(now);
    if invoices::closed(month, now, config.invoice_close_delay())
        && !store.month_closed(convert::month_date(month)).await?
    {
        store.month_closing_mark(convert::month_date(month)).await?;
        invoices_closed = invoices::close_month(store, month, 500).await?;
        store
            .month_close_record(convert::month_date(month), invoices_closed as i64)
            .await?;
        tracing::info!(%month, invoices = invoices_closed, "month closed");
    }
    Ok(TickReport {
        rating,
        enforcement,
        promos_expired,
        invoices_closed,
    })
}

impl Billing {
    /// Serve ops and tick every `KILN_RATING_TICK_MS` until `shutdown`; a tick under way
    /// then finishes (the binary bounds it by `KILN_SHUTDOWN_GRACE_SECS`).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Billing {
            store,
            config,
            ops_listener,
        } = self;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let health_store = store.clone();
        let health: kiln_telemetry::HealthCheck = Arc::new(move || {
            let store = health_store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        });
        let ops = kiln_telemetry::ops_router::<()>("kiln-billing", health);
        let mut ops_stop = stop_rx.clone();
        let ops_task = tokio::spawn(async move {
            axum::serve(ops_listener, ops)
                .with_graceful_shutdown(async move {
                    let _ = ops_stop.wait_for(|s| *s).await;
                })
                .await
        });
        let mut interval = tokio::time::interval(config.tick());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Stop first: once asked, no new tick starts (the one under way has finished).
            tokio::select! {
                biased;
                _ = stop_rx.wait_for(|s| *s) => break,
                _ = interval.tick() => {}
            }
            let started = std::time::Instant::now();
            match tick(&store, &config, OffsetDateTime::now_utc()).await {
                Ok(r) => {
                    metrics::histogram!("kiln_billing_tick_seconds")
                        .record(started.elapsed().as_secs_f64());
                    if r.rating.postings > 0 || !r.enforcement.stopped.is_empty() {
                        tracing::debug!(
                            postings = r.rating.postings,
                            workloads = r.rating.workloads,
                            stopped = r.enforcement.stopped.len(),
                            resumed = r.enforcement.resumed.len(),
                            "billing tick"
                        );
                    }
                }
                Err(e) => {
                    metrics::counter!("kiln_billing_tick_errors_total").increment(1);
                    tracing::error!(error = %error_chain(&e), "billing tick failed; retrying next tick");
                }
            }
            if let Ok(lag) = store.rating_lag().await {
                metrics::gauge!("kiln_billing_rating_lag_seconds").set(lag);
            }
        }
        ops_task.await??;
        Ok(())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

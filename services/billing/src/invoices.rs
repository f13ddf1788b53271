//! Monthly invoices: the core groups a month's charge postings into lines
//! ([`kiln_billing_core::invoice`]); the total therefore equals what the ledger drew from the
//! org's accounts for charges accruing in that month.
//!
//! An invoice for a month that has not closed yet (on demand) is a `draft` and is rewritten
//! when asked again; at month close (`close_delay` after the month ends, so the last charges
//! are rated) kiln-billing writes every org's `final` invoice, which never changes. Before the
//! first, the month is marked closing (`billing_month_closing`, ordered against charge postings
//! by an advisory lock): a charge for it rated after that is posted onto the next open month
//! (`ledger::post_charges`), so every charge is on exactly one invoice.

use std::collections::BTreeMap;

use kiln_billing_core::{Charge, Month, invoice};
use kiln_store::{InvoiceLineRecord, InvoiceRecord, Store};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::BillingError;
use crate::convert::{charge, month_date, odt, ts};

/// Whether `month` has closed at `now` (its end plus `close_delay` has passed).
pub fn closed(month: Month, now: OffsetDateTime, close_delay: std::time::Duration) -> bool {
    odt(month.end()) + close_delay <= now
}

fn lines(inv: &kiln_billing_core::Invoice) -> Vec<InvoiceLineRecord> {
    inv.lines
        .iter()
        .map(|l| InvoiceLineRecord {
            product: l.product.code().to_owned(),
            gpu_type: l.gpu_type.clone(),
            detail: l.detail.clone(),
            unit: l.unit.code().to_owned(),
            quantity: l.quantity,
            amount_micros: l.amount.micros,
        })
        .collect()
}

/// Write the invoices of `orgs` for `month` from their charges, in `conn`'s transaction.
pub async fn write(
    store: &Store,
    conn: &mut PgConnection,
    orgs: &[Uuid],
    month: Month,
    status: &str,
) -> Result<Vec<InvoiceRecord>, BillingError> {
    let rows = store
        .charges_between(conn, orgs, odt(month.start()), odt(month.end()))
        .await?;
    let mut by_org: BTreeMap<Uuid, Vec<Charge>> = BTreeMap::new();
    for r in &rows {
        by_org.entry(r.org_id).or_default().push(charge(r)?);
    }
    let mut out = Vec::with_capacity(orgs.len());
    for org in orgs {
        let charges = by_org.remove(org).unwrap_or_default();
        let inv = invoice(*org, month, &charges)?;
        out.push(
            store
                .invoice_put(
                    conn,
                    *org,
                    month_date(month),
                    status,
                    inv.total.micros,
                    &lines(&inv),
                )
                .await?,
        );
    }
    Ok(out)
}

/// The org's invoice for `month` now: final once the month has closed, else a draft.
pub async fn on_demand(
    store: &Store,
    org: Uuid,
    month: Month,
    now: OffsetDateTime,
    close_delay: std::time::Duration,
) -> Result<InvoiceRecord, BillingError> {
    let status = if closed(month, now, close_delay) {
        // A final invoice never changes: charges for the month rated from now on go on the
        // next open month's.
        store.month_closing_mark(month_date(month)).await?;
        "final"
    } else {
        "draft"
    };
    let mut tx = store.begin().await?;
    let mut written = write(store, &mut tx, &[org], month, status).await?;
    tx.commit().await.map_err(kiln_store::StoreError::from)?;
    written.pop().ok_or(BillingError::Vanished)
}

/// Close `month`: a final invoice for every org charged in it that has none, `batch` orgs per
/// transaction. Answers how many were written.
pub async fn close_month(store: &Store, month: Month, batch: i64) -> Result<usize, BillingError> {
    let (from, to) = (odt(month.start()), odt(month.end()));
    let mut after = None;
    let mut written = 0;
    loop {
        let orgs = store
            .orgs_to_invoice(from, to, month_date(month), after, batch)
            .await?;
        let Some(last) = orgs.last().copied() else {
            break;
        };
        let mut tx = store.begin().await?;
        written += write(store, &mut tx, &orgs, month, "final").await?.len();
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        after = Some(last);
    }
    Ok(written)
}

/// The month before the one `now` is in.
pub fn previous_month(now: OffsetDateTime) -> Month {
    let this = Month::of(ts(now));
    Month::of(kiln_billing_core::Timestamp(this.start().0 - 1))
}

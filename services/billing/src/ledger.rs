//! Writing to the ledger with the core's rules: charges spend promotional credit first (read
//! under the org's lock, so two writers cannot spend the same credit), top-ups and promotional
//! grants are idempotent on their reference, expired promotional credit is posted out.

use std::collections::{BTreeMap, BTreeSet};

use kiln_billing_core::{Account, Charge, Money, Posting, Resale};
use kiln_store::{NewPosting, PostingRecord, Store};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::BillingError;
use crate::convert::{charge_posting, entries, month_of_date, odt, resale_posting, ts};

/// Post `charges` (each with its workload's kind) in `conn`'s transaction: lock their orgs,
/// read their usable promotional credit, and let the core split each charge. Charges already
/// posted (same key) are skipped. Answers how many postings were new.
pub async fn post_charges(
    store: &Store,
    conn: &mut PgConnection,
    charges: &[(Charge, Option<&str>)],
) -> Result<usize, BillingError> {
    let items: Vec<(&Charge, Option<&str>, Option<Uuid>)> =
        charges.iter().map(|(c, kind)| (c, *kind, None)).collect();
    post_items(store, conn, &items).await
}

/// Post granted callers' payments to endpoint owners (`Posting::for_resale`: from the
/// caller's paid balance to the owner's), like [`post_charges`] in every other respect.
pub async fn post_resales(
    store: &Store,
    conn: &mut PgConnection,
    resales: &[Resale],
) -> Result<usize, BillingError> {
    let items: Vec<(&Charge, Option<&str>, Option<Uuid>)> = resales
        .iter()
        .map(|r| (&r.charge, Some("endpoint"), Some(r.payee)))
        .collect();
    post_items(store, conn, &items).await
}

/// Charges, each with its workload's kind and, for a resale, the org it pays.
async fn post_items(
    store: &Store,
    conn: &mut PgConnection,
    charges: &[(&Charge, Option<&str>, Option<Uuid>)],
) -> Result<usize, BillingError> {
    let charges: Vec<&(&Charge, Option<&str>, Option<Uuid>)> = charges
        .iter()
        .filter(|(c, _, _)| c.amount.micros > 0)
        .collect();
    if charges.is_empty() {
        return Ok(0);
    }
    let orgs: Vec<Uuid> = charges
        .iter()
        .map(|(c, _, _)| c.org)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    store.billing_orgs_lock(conn, &orgs).await?;
    // Charges for a month whose final invoices are written (rated late: a rater down longer
    // than the close delay, a workload priced only later) go on the next open month's invoice.
    let open_from = store
        .month_latest_closing(conn)
        .await?
        .map(|m| odt(month_of_date(m).end()));
    let earliest = charges
        .iter()
        .map(|(c, _, _)| c.start)
        .min()
        .unwrap_or_default();
    // What is left on each promotional account, kept in step as this batch spends it.
    let mut promos: BTreeMap<Uuid, Vec<(Account, Money, OffsetDateTime)>> = BTreeMap::new();
    for p in store.promo_balances(conn, &orgs, odt(earliest)).await? {
        let Ok(account) = p.account.parse::<Account>() else {
            continue;
        };
        promos.entry(p.org_id).or_default().push((
            account,
            Money::from_micros(p.balance_micros),
            p.expires_at,
        ));
    }
    let mut postings: Vec<NewPosting> = Vec::with_capacity(charges.len());
    for &&(charge, kind, payee) in &charges {
        let org_promos = promos.entry(charge.org).or_default();
        let usable: Vec<(Account, Money)> = org_promos
            .iter()
            .filter(|(_, left, expires)| left.micros > 0 && ts(*expires) > charge.start)
            .map(|(a, left, _)| (a.clone(), *left))
            .collect();
        let mut posting = match payee {
            None => charge_posting(charge, kind, &usable)?,
            Some(payee) => resale_posting(charge, payee)?,
        };
        if let Some(open_from) = open_from
            && posting.at < open_from
        {
            posting.description = format!(
                "{} (accrued from {}, after that month's invoice)",
                posting.description,
                posting
                    .at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            );
            posting.at = open_from;
        }
        for entry in &posting.entries {
            if let Some((_, left, _)) = org_promos
                .iter_mut()
                .find(|(a, _, _)| a.to_string() == entry.account)
            {
                *left = Money::from_micros(left.micros + entry.amount_micros);
            }
        }
        postings.push(posting);
    }
    Ok(store.ledger_post(conn, &postings).await?.len())
}

/// What a top-up did.
#[derive(Debug, Clone)]
pub enum TopUp {
    /// Posted now.
    New(PostingRecord),
    /// The same reference was already posted with the same amount: nothing changed.
    Duplicate(PostingRecord),
}

/// Credit `amount` to the org's paid balance, idempotent on `(org, reference)`: a reference
/// already used for this org with the same amount answers the first posting; with another
/// amount it is [`BillingError::ReferenceReused`].
pub async fn top_up(
    store: &Store,
    conn: &mut PgConnection,
    org: Uuid,
    amount: Money,
    reference: &str,
    description: &str,
    at: OffsetDateTime,
) -> Result<TopUp, BillingError> {
    let posting = Posting::top_up(org, amount, &format!("{org}:{reference}"), ts(at))?;
    let row = NewPosting {
        key: posting.key().to_owned(),
        org_id: Some(org),
        kind: "top_up",
        at,
        amount_micros: amount.micros,
        description: description.to_owned(),
        charge: None,
        reference: Some(reference.to_owned()),
        entries: entries(&posting),
    };
    let new = !store.ledger_post(conn, &[row]).await?.is_empty();
    let recorded = store
        .ledger_posting_by_key(conn, posting.key())
        .await?
        .ok_or(BillingError::Vanished)?;
    if new {
        return Ok(TopUp::New(recorded));
    }
    if recorded.amount_micros != amount.micros || recorded.org_id != Some(org) {
        return Err(BillingError::ReferenceReused);
    }
    Ok(TopUp::Duplicate(recorded))
}

/// Grant promotional credit spendable until `expires_at`, idempotent on `(org, grant)`.
pub async fn grant_promo(
    store: &Store,
    conn: &mut PgConnection,
    org: Uuid,
    grant: &str,
    amount: Money,
    expires_at: OffsetDateTime,
    at: OffsetDateTime,
) -> Result<TopUp, BillingError> {
    let posting = Posting::promo_grant(org, grant, amount, ts(at))?;
    let account = Account::OrgPromo {
        org,
        grant: grant.to_owned(),
    };
    store
        .promo_account_create(conn, org, &account.to_string(), expires_at)
        .await?;
    let row = NewPosting {
        key: posting.key().to_owned(),
        org_id: Some(org),
        kind: "promo_grant",
        at,
        amount_micros: amount.micros,
        description: format!("promotional credit `{grant}`, expires {expires_at}"),
        charge: None,
        reference: Some(grant.to_owned()),
        entries: entries(&posting),
    };
    let new = !store.ledger_post(conn, &[row]).await?.is_empty();
    let recorded = store
        .ledger_posting_by_key(conn, posting.key())
        .await?
        .ok_or(BillingError::Vanished)?;
    if new {
        Ok(TopUp::New(recorded))
    } else if recorded.amount_micros != amount.micros {
        Err(BillingError::ReferenceReused)
    } else {
        Ok(TopUp::Duplicate(recorded))
    }
}

/// Post out what is left of promotional credit expired by `now` (up to `limit` accounts), under
/// the orgs' locks. Answers how many accounts were expired.
pub async fn expire_promos(
    store: &Store,
    conn: &mut PgConnection,
    now: OffsetDateTime,
    limit: i64,
) -> Result<usize, BillingError> {
    let candidates = store.promos_expired(conn, now, limit).await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let orgs: Vec<Uuid> = candidates
        .iter()
        .map(|p| p.org_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    store.billing_orgs_lock(conn, &orgs).await?;
    // Re-read under the locks: a charge may have spent some meanwhile.
    let expired = store.promos_expired(conn, now, limit).await?;
    let mut rows = Vec::with_capacity(expired.len());
    for p in expired.iter().filter(|p| orgs.contains(&p.org_id)) {
        let Ok(account) = p.account.parse::<Account>() else {
            continue;
        };
        let posting = Posting::promo_expiry(
            account,
            Money::from_micros(p.balance_micros),
            ts(p.expires_at),
        )?;
        rows.push(NewPosting {
            key: posting.key().to_owned(),
            org_id: Some(p.org_id),
            kind: "promo_expiry",
            at: p.expires_at,
            amount_micros: p.balance_micros,
            description: format!("promotional credit {} expired", p.account),
            charge: None,
            reference: None,
            entries: entries(&posting),
        });
    }
    Ok(store.ledger_post(conn, &rows).await?.len())
}

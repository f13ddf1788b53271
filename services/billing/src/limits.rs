//! Credit limits and budgets, enforced: the core decides ([`credit_decision`],
//! [`budget_decision`]), this module does what it says.
//!
//! * When an org's funds (paid balance + unexpired promotional credit + credit limit) reach
//!   zero, it is marked out of credit (`billing_settings.credit_exhausted_at`, audited
//!   `billing.credit_exhausted`). The API refuses new work with 402 from that moment — it asks
//!   [`standing`] itself, so the refusal starts and lifts exactly with the funds.
//! * After the grace period its workloads are stopped: released (capacity back, the agent
//!   stops them) to `stopped` with a reason, remembered in `billing_suspensions`, audited
//!   `billing.workloads_stopped`. Instances keep their disks: stopping frees GPUs only.
//! * Once it is back in credit (a top-up, a payment, a higher limit), the mark is cleared and
//!   the stopped workloads are queued again (`billing.credit_restored`).
//! * Monthly budgets raise 50/80/100 % alerts once each per month (`billing.budget_alert`).

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_billing_core::{
    AlertLevel, CreditPolicy, Decision, Money, Month, Operation, OrgFunds, budget_decision,
    credit_decision,
};
use kiln_domain::{OrgId, WorkloadId};
use kiln_store::{AuditEvent, FundsRecord, Store};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::BillingError;
use crate::convert::{month_date, odt, ts};

/// The highest budget alert (percent) raised in the month `now` is in, if any: an alert of an
/// earlier month is history (the audit log keeps it), not this month's state.
pub fn budget_alert_this_month(f: &FundsRecord, now: OffsetDateTime) -> Option<i32> {
    let this_month = month_date(Month::of(ts(now)));
    match (f.budget_alert_month, f.budget_alert_percent) {
        (Some(m), Some(p)) if m == this_month && f.monthly_budget_micros.is_some() => Some(p),
        _ => None,
    }
}

/// The reason a workload stopped for credit carries.
pub const STOPPED_REASON: &str = "stopped: the org is out of credit (its balance reached its credit limit); \
     it starts again after a top-up";
pub const RESUMED_REASON: &str = "queued again: the org is back in credit";

fn funds(f: &FundsRecord) -> OrgFunds {
    OrgFunds {
        paid: Money::from_micros(f.paid_micros),
        promo: Money::from_micros(f.promo_micros),
    }
}

fn policy(f: &FundsRecord, grace: Duration) -> CreditPolicy {
    CreditPolicy {
        credit_limit: Money::from_micros(f.credit_limit_micros),
        grace_secs: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
    }
}

/// Whether `org` may start new work now (the API's 402 check): `Ok(None)` when it may,
/// `Ok(Some(funds))` with what it has when it is out of credit.
pub async fn standing(
    store: &Store,
    conn: &mut PgConnection,
    org: Uuid,
    now: OffsetDateTime,
) -> Result<Option<FundsRecord>, BillingError> {
    let Some(f) = store
        .billing_funds(conn, &[org], now)
        .await?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let decision = credit_decision(
        funds(&f),
        policy(&f, Duration::ZERO),
        Operation::NewWork,
        None,
        ts(now),
    )?;
    Ok((decision == Decision::Refuse402).then_some(f))
}

/// What an enforcement pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnforcementReport {
    pub exhausted: Vec<Uuid>,
    pub stopped: Vec<Uuid>,
    pub restored: Vec<Uuid>,
    pub resumed: Vec<Uuid>,
    pub alerts: Vec<(Uuid, i64)>,
}

#[derive(Debug, Clone)]
pub struct Enforcer {
    store: Store,
    pub grace: Duration,
}

impl Enforcer {
    pub fn new(store: Store, grace: Duration) -> Self {
        Self { store, grace }
    }

    /// Look at the orgs just charged and every org marked out of credit; do what the core
    /// decides for each.
    pub async fn pass(
        &self,
        charged: &BTreeSet<Uuid>,
        now: OffsetDateTime,
    ) -> Result<EnforcementReport, BillingError> {
        let mut conn = self
            .store
            .pool()
            .acquire()
            .await
            .map_err(kiln_store::StoreError::from)?;
        let mut orgs: BTreeSet<Uuid> = charged.clone();
        orgs.extend(self.store.billing_orgs_exhausted(&mut conn).await?);
        // One read for many orgs first; only those with something to do get a transaction
        // (which reads again under the org's lock).
        let orgs: Vec<Uuid> = orgs.into_iter().collect();
        let mut todo = Vec::new();
        for chunk in orgs.chunks(1_000) {
            for f in self.store.billing_funds(&mut conn, chunk, now).await? {
                let out = credit_decision(
                    funds(&f),
                    policy(&f, self.grace),
                    Operation::NewWork,
                    None,
                    ts(now),
                )? == Decision::Refuse402;
                let budgeted = f.monthly_budget_micros.is_some() && charged.contains(&f.org_id);
                if out || f.credit_exhausted_at.is_some() || budgeted {
                    todo.push(f.org_id);
                }
            }
        }
        drop(conn);
        let mut report = EnforcementReport::default();
        for org in todo {
            self.org_pass(org, charged.contains(&org), now, &mut report)
                .await?;
        }
        Ok(report)
    }

    async fn org_pass(
        &self,
        org: Uuid,
        charged: bool,
        now: OffsetDateTime,
        report: &mut EnforcementReport,
    ) -> Result<(), BillingError> {
        let mut tx = self.store.begin().await?;
        self.store.billing_orgs_lock(&mut tx, &[org]).await?;
        let Some(f) = self
            .store
            .billing_funds(&mut tx, &[org], now)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(());
        };
        let decision = credit_decision(
            funds(&f),
            policy(&f, self.grace),
            Operation::Running,
            f.credit_exhausted_at.map(ts),
            ts(now),
        )?;
        match decision {
            Decision::StopAfterGrace { at } => {
                if f.credit_exhausted_at.is_none()
                    && self.store.billing_mark_exhausted(&mut tx, org, now).await?
                {
                    report.exhausted.push(org);
                    let details = serde_json::json!({
                        "balance_micros": f.paid_micros,
                        "promo_micros": f.promo_micros,
                        "credit_limit_micros": f.credit_limit_micros,
                        "workloads_stop_at": odt(at).to_string(),
                    });
                    audit(
                        &self.store,
                        &mut tx,
                        org,
                        "billing.credit_exhausted",
                        details,
                    )
                    .await?;
                }
                if at <= ts(now) {
                    let active = self.store.billing_workloads_active(&mut tx, org).await?;
                    let mut stopped = Vec::new();
                    for w in &active {
                        self.store
                            .billing_suspension_record(&mut tx, w.id, org, &w.state)
                            .await?;
                        self.store
                            .workload_release(
                                &mut tx,
                                WorkloadId::from_uuid(w.id),
                                "stopped",
                                STOPPED_REASON,
                            )
                            .await?;
                        stopped.push(serde_json::json!({
                            "workload": WorkloadId::from_uuid(w.id).to_string(),
                            "kind": w.kind,
                            "previous_state": w.state,
                        }));
                        report.stopped.push(w.id);
                    }
                    if !stopped.is_empty() {
                        tracing::warn!(%org, stopped = stopped.len(), "org out of credit: its workloads were stopped");
                        audit(
                            &self.store,
                            &mut tx,
                            org,
                            "billing.workloads_stopped",
                            serde_json::json!({ "workloads": stopped }),
                        )
                        .await?;
                    }
                }
            }
            Decision::Allow if f.credit_exhausted_at.is_some() => {
                self.store.billing_clear_exhausted(&mut tx, org).await?;
                report.restored.push(org);
                let resumed = self.store.billing_suspensions_take(&mut tx, org).await?;
                for w in &resumed {
                    self.store
                        .workload_release(
                            &mut tx,
                            WorkloadId::from_uuid(w.id),
                            "pending",
                            RESUMED_REASON,
                        )
                        .await?;
                    report.resumed.push(w.id);
                }
                let details = serde_json::json!({
                    "balance_micros": f.paid_micros,
                    "resumed": resumed.iter().map(|w| WorkloadId::from_uuid(w.id).to_string()).collect::<Vec<_>>(),
                });
                audit(
                    &self.store,
                    &mut tx,
                    org,
                    "billing.credit_restored",
                    details,
                )
                .await?;
            }
            _ => {}
        }
        if charged && let Some(budget) = f.monthly_budget_micros {
            let month = kiln_billing_core::Month::of(ts(now));
            let spent = self
                .store
                .billing_charged_since(&mut tx, &[org], odt(month.start()))
                .await?
                .first()
                .map_or(0, |(_, s)| *s);
            let this_month = month_date(month);
            let already = budget_alert_this_month(&f, now).and_then(level);
            if let Decision::Alert(level) = budget_decision(
                Money::from_micros(spent),
                Some(Money::from_micros(budget)),
                already,
            ) {
                let percent = level.percent();
                self.store
                    .billing_budget_alerted(&mut tx, org, this_month, percent as i32)
                    .await?;
                audit(
                    &self.store,
                    &mut tx,
                    org,
                    "billing.budget_alert",
                    serde_json::json!({
                        "percent": percent,
                        "month": Month::of(ts(now)).to_string(),
                        "spent_micros": spent,
                        "budget_micros": budget,
                    }),
                )
                .await?;
                report.alerts.push((org, percent));
            }
        }
        tx.commit().await.map_err(kiln_store::StoreError::from)?;
        Ok(())
    }
}

fn level(percent: i32) -> Option<AlertLevel> {
    AlertLevel::ALL
        .into_iter()
        .find(|l| l.percent() == i64::from(percent))
}

async fn audit(
    store: &Store,
    conn: &mut PgConnection,
    org: Uuid,
    action: &'static str,
    details: serde_json::Value,
) -> Result<(), BillingError> {
    store
        .audit_record(
            conn,
            &AuditEvent {
                org_id: Some(OrgId::from_uuid(org)),
                actor_user: None,
                actor_api_key: None,
                action,
                target: Some(OrgId::from_uuid(org).to_string()),
                ip: None,
                details,
            },
        )
        .await?;
    Ok(())
}

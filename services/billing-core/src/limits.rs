//! Credit-limit and budget decisions: pure functions that say what to do; the service does it.

use crate::ledger::OrgFunds;
use crate::money::{Money, MoneyError};
use crate::time::Timestamp;

/// Budget alert thresholds, in percent of the monthly budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertLevel {
    Pct50,
    Pct80,
    Pct100,
}

impl AlertLevel {
    pub const ALL: [AlertLevel; 3] = [AlertLevel::Pct50, AlertLevel::Pct80, AlertLevel::Pct100];

    pub fn percent(self) -> i64 {
        match self {
            Self::Pct50 => 50,
            Self::Pct80 => 80,
            Self::Pct100 => 100,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Tell the org (audit log, console): its spend crossed this share of its monthly budget.
    Alert(AlertLevel),
    /// Refuse with 402 Payment Required.
    Refuse402,
    /// Out of credit: stop this running workload at `at` (instances keep their disks).
    StopAfterGrace {
        at: Timestamp,
    },
}

/// What is being asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Creating or starting a pod, instance or endpoint.
    NewWork,
    /// One endpoint call.
    EndpointCall,
    /// A workload that is already running.
    Running,
}

/// An org's credit terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditPolicy {
    /// How far the paid balance may go below zero (>= 0).
    pub credit_limit: Money,
    /// How long running work keeps going once credit runs out, in seconds.
    pub grace_secs: i64,
}

/// Whether `op` may proceed given the org's funds. Credit runs out when paid balance + usable
/// promo + credit limit is zero or less; from then new work and endpoint calls are refused with
/// 402, and running work is stopped `grace_secs` after `exhausted_since` (the first time the
/// service saw it exhausted; `None` means now).
pub fn credit_decision(
    funds: OrgFunds,
    policy: CreditPolicy,
    op: Operation,
    exhausted_since: Option<Timestamp>,
    now: Timestamp,
) -> Result<Decision, MoneyError> {
    let headroom = funds.total()?.checked_add(policy.credit_limit)?;
    if headroom.micros > 0 {
        return Ok(Decision::Allow);
    }
    Ok(match op {
        Operation::NewWork | Operation::EndpointCall => Decision::Refuse402,
        Operation::Running => {
            let since = exhausted_since.unwrap_or(now);
            let grace = policy.grace_secs.max(0).saturating_mul(1_000_000);
            Decision::StopAfterGrace {
                at: Timestamp(since.0.saturating_add(grace)),
            }
        }
    })
}

/// The alert to raise for a month's spend against an optional budget: the highest threshold
/// crossed that is above `already_alerted` (so each level is raised once a month), else `Allow`.
/// A budget only alerts; the credit limit is what stops work.
pub fn budget_decision(
    spent_this_month: Money,
    budget: Option<Money>,
    already_alerted: Option<AlertLevel>,
) -> Decision {
    let Some(budget) = budget.filter(|b| b.micros > 0) else {
        return Decision::Allow;
    };
    let spent = i128::from(spent_this_month.micros) * 100;
    AlertLevel::ALL
        .into_iter()
        .rev()
        .find(|level| spent >= i128::from(budget.micros) * i128::from(level.percent()))
        .filter(|level| Some(*level) > already_alerted)
        .map_or(Decision::Allow, Decision::Alert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn funds(paid: i64, promo: i64) -> OrgFunds {
        OrgFunds {
            paid: Money::from_micros(paid),
            promo: Money::from_micros(promo),
        }
    }

    const POLICY: CreditPolicy = CreditPolicy {
        credit_limit: Money::from_micros(100),
        grace_secs: 300,
    };

    #[test]
    fn credit_runs_out_at_the_limit() {
        let now = Timestamp::from_secs(1_000);
        let d = |f, op| credit_decision(f, POLICY, op, None, now).unwrap();
        assert_eq!(d(funds(10, 0), Operation::NewWork), Decision::Allow);
        assert_eq!(d(funds(-99, 0), Operation::EndpointCall), Decision::Allow);
        assert_eq!(
            d(funds(-150, 50), Operation::Running),
            Decision::StopAfterGrace {
                at: Timestamp::from_secs(1_300)
            }
        );
        assert_eq!(d(funds(-100, 0), Operation::NewWork), Decision::Refuse402);
        assert_eq!(
            d(funds(-100, 0), Operation::EndpointCall),
            Decision::Refuse402
        );
        assert_eq!(d(funds(-100, 1), Operation::NewWork), Decision::Allow);
        let since = Some(Timestamp::from_secs(900));
        assert_eq!(
            credit_decision(funds(-500, 0), POLICY, Operation::Running, since, now).unwrap(),
            Decision::StopAfterGrace {
                at: Timestamp::from_secs(1_200)
            }
        );
        assert!(
            credit_decision(funds(i64::MAX, 1), POLICY, Operation::NewWork, None, now).is_err()
        );
    }

    #[test]
    fn budget_alerts_once_per_level() {
        let b = Some(Money::from_micros(1_000));
        let m = Money::from_micros;
        assert_eq!(budget_decision(m(499), b, None), Decision::Allow);
        assert_eq!(
            budget_decision(m(500), b, None),
            Decision::Alert(AlertLevel::Pct50)
        );
        assert_eq!(
            budget_decision(m(500), b, Some(AlertLevel::Pct50)),
            Decision::Allow
        );
        assert_eq!(
            budget_decision(m(850), b, Some(AlertLevel::Pct50)),
            Decision::Alert(AlertLevel::Pct80)
        );
        assert_eq!(
            budget_decision(m(5_000), b, None),
            Decision::Alert(AlertLevel::Pct100)
        );
        assert_eq!(
            budget_decision(m(5_000), b, Some(AlertLevel::Pct100)),
            Decision::Allow
        );
        assert_eq!(budget_decision(m(5_000), None, None), Decision::Allow);
        assert_eq!(
            budget_decision(m(i64::MAX), Some(m(i64::MAX)), None),
            Decision::Alert(AlertLevel::Pct100)
        );
    }
}

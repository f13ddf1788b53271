//! Metering: a workload's state history into billable intervals.
//!
//! Compute is billable from `running` to the first of stopped/terminated/failed/lost after it,
//! or `pending` when the workload was handed back to the queue (`stopping` is still billed); a
//! workload may run several times. A stopped instance's disk is
//! billed as storage from `stopped` until it runs again or is terminated/failed/lost.

use std::str::FromStr;

use crate::time::Timestamp;

/// A workload state as recorded in `workload_state_history.state`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Scheduled,
    Starting,
    Running,
    Stopping,
    Stopped,
    Terminated,
    Failed,
    Lost,
    /// A state this crate does not know; it neither opens nor closes an interval.
    Other(String),
}

impl FromStr for State {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => Self::Pending,
            "scheduled" => Self::Scheduled,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "terminated" => Self::Terminated,
            "failed" => Self::Failed,
            "lost" => Self::Lost,
            other => Self::Other(other.to_string()),
        })
    }
}

/// One row of the state history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: State,
    pub at: Timestamp,
}

impl Transition {
    pub fn new(state: State, at: Timestamp) -> Self {
        Self { state, at }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IntervalKind {
    /// The workload was running (GPU time).
    Compute,
    /// An instance was stopped with its disk kept.
    Storage,
}

/// `[start, end)`; `end` is `None` while the interval is still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BillableInterval {
    pub kind: IntervalKind,
    pub start: Timestamp,
    pub end: Option<Timestamp>,
}

/// The billable intervals of a history, in order. Rows are ordered by `at`, keeping the given
/// order among equal timestamps (pass them ordered by `(at, id)`). Empty intervals are dropped.
/// `storage` says whether stopped periods bill storage (instances with a disk).
pub fn meter(history: &[Transition], storage: bool) -> Vec<BillableInterval> {
    let mut rows: Vec<&Transition> = history.iter().collect();
    rows.sort_by_key(|t| t.at);
    let mut out = Vec::new();
    let mut compute: Option<Timestamp> = None;
    let mut stored: Option<Timestamp> = None;
    let mut close = |kind, open: &mut Option<Timestamp>, at: Timestamp| {
        if let Some(start) = open.take()
            && at > start
        {
            out.push(BillableInterval {
                kind,
                start,
                end: Some(at),
            });
        }
    };
    for t in rows {
        match t.state {
            State::Running => {
                close(IntervalKind::Storage, &mut stored, t.at);
                compute.get_or_insert(t.at);
            }
            State::Stopped => {
                close(IntervalKind::Compute, &mut compute, t.at);
                if storage {
                    stored.get_or_insert(t.at);
                }
            }
            State::Terminated | State::Failed | State::Lost => {
                close(IntervalKind::Compute, &mut compute, t.at);
                close(IntervalKind::Storage, &mut stored, t.at);
            }
            // Handed back to the queue (its node was lost or drained): it holds nothing until
            // it runs again.
            State::Pending => close(IntervalKind::Compute, &mut compute, t.at),
            _ => {}
        }
    }
    for (kind, open) in [
        (IntervalKind::Compute, compute),
        (IntervalKind::Storage, stored),
    ] {
        if let Some(start) = open {
            out.push(BillableInterval {
                kind,
                start,
                end: None,
            });
        }
    }
    out.sort_by_key(|i| (i.start, i.kind));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(rows: &[(&str, i64)]) -> Vec<Transition> {
        rows.iter()
            .map(|(s, at)| Transition::new(s.parse().unwrap(), Timestamp(*at)))
            .collect()
    }

    fn iv(kind: IntervalKind, start: i64, end: Option<i64>) -> BillableInterval {
        BillableInterval {
            kind,
            start: Timestamp(start),
            end: end.map(Timestamp),
        }
    }

    use IntervalKind::{Compute, Storage};

    #[test]
    fn running_until_the_first_end_state() {
        let hist = h(&[
            ("pending", 0),
            ("starting", 5),
            ("running", 10),
            ("stopping", 20),
            ("stopped", 30),
        ]);
        assert_eq!(meter(&hist, false), vec![iv(Compute, 10, Some(30))]);
        let hist = h(&[("running", 10), ("failed", 15), ("terminated", 40)]);
        assert_eq!(meter(&hist, true), vec![iv(Compute, 10, Some(15))]);
        let hist = h(&[("running", 10), ("lost", 12)]);
        assert_eq!(meter(&hist, false), vec![iv(Compute, 10, Some(12))]);
    }

    #[test]
    fn repeated_runs_and_open_intervals() {
        let hist = h(&[
            ("running", 10),
            ("stopped", 20),
            ("starting", 25),
            ("running", 30),
            ("running", 35),
        ]);
        assert_eq!(
            meter(&hist, false),
            vec![iv(Compute, 10, Some(20)), iv(Compute, 30, None)]
        );
    }

    #[test]
    fn a_run_handed_back_to_the_queue_stops_billing_until_it_runs_again() {
        let hist = h(&[
            ("running", 10),
            ("pending", 20),
            ("scheduled", 25),
            ("running", 30),
        ]);
        assert_eq!(
            meter(&hist, false),
            vec![iv(Compute, 10, Some(20)), iv(Compute, 30, None)]
        );
    }

    #[test]
    fn stopped_instances_bill_storage() {
        let hist = h(&[
            ("running", 10),
            ("stopped", 20),
            ("running", 50),
            ("stopped", 60),
            ("terminated", 90),
        ]);
        assert_eq!(
            meter(&hist, true),
            vec![
                iv(Compute, 10, Some(20)),
                iv(Storage, 20, Some(50)),
                iv(Compute, 50, Some(60)),
                iv(Storage, 60, Some(90)),
            ]
        );
        let hist = h(&[("running", 10), ("stopped", 20)]);
        assert_eq!(
            meter(&hist, true),
            vec![iv(Compute, 10, Some(20)), iv(Storage, 20, None)]
        );
    }

    #[test]
    fn order_and_oddities() {
        // Out-of-order rows are sorted; unknown states and end states without a run are ignored.
        let hist = h(&[
            ("stopped", 30),
            ("running", 10),
            ("weird", 15),
            ("failed", 5),
        ]);
        assert_eq!(meter(&hist, false), vec![iv(Compute, 10, Some(30))]);
        // A zero-length run is dropped.
        assert_eq!(meter(&h(&[("running", 10), ("failed", 10)]), false), vec![]);
        assert_eq!(
            "bogus".parse::<State>().unwrap(),
            State::Other("bogus".into())
        );
    }
}

//! A trace simulator for benchmarks: arrivals are placed (and applied) one by one, departures
//! release their allocation, and the outcome counts what fitted and how fragmented the fleet
//! ended up. Pure and deterministic; timing it is the caller's business.

use serde::{Deserialize, Serialize};

use crate::frag::{Fragmentation, fragmentation};
use crate::index::{FleetIndex, place_indexed};
use crate::place::{Decision, Policy, Strategy};
use crate::request::PlacementRequest;
use crate::snapshot::{AllocationId, FleetSnapshot};

/// One step of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TraceEvent {
    /// A request arrives and is placed now or refused (there is no queue).
    Arrive {
        id: AllocationId,
        request: PlacementRequest,
    },
    /// Allocation `id` ends. Ignored if it was refused or preempted.
    Depart { id: AllocationId },
}

/// What a trace did to a fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimulationOutcome {
    pub placed: u64,
    pub refused: u64,
    /// Spot allocations evicted for on-demand arrivals.
    pub preempted: u64,
    /// Requests the core rejected as invalid (e.g. unknown MIG profile).
    pub invalid: u64,
    /// Allocated share of GPU capacity (0..=1) just before the first refusal; `None` if nothing
    /// was refused. The packing benchmark's headline figure.
    pub alloc_at_first_reject: Option<f64>,
    /// Fragmentation of the fleet after the last event.
    pub fragmentation: Fragmentation,
}

/// Runs `events` against a copy of `fleet` with `strategy` (other policy knobs at default).
pub fn simulate(
    strategy: Strategy,
    fleet: &FleetSnapshot,
    events: &[TraceEvent],
) -> SimulationOutcome {
    simulate_with(&Policy::with_strategy(strategy), fleet, events)
}

/// [`simulate`] with a full [`Policy`].
pub fn simulate_with(
    policy: &Policy,
    fleet: &FleetSnapshot,
    events: &[TraceEvent],
) -> SimulationOutcome {
    let mut index = FleetIndex::new(fleet.clone());
    let mut out = SimulationOutcome {
        placed: 0,
        refused: 0,
        preempted: 0,
        invalid: 0,
        alloc_at_first_reject: None,
        fragmentation: Fragmentation::default(),
    };
    for ev in events {
        match ev {
            TraceEvent::Arrive { id, request } => match place_indexed(request, &index, policy) {
                Ok(Decision::Placed(p)) => {
                    let victims = p.preempt.len() as u64;
                    if index.apply(policy, request, &p, id.clone()).is_ok() {
                        out.placed += 1;
                        out.preempted += victims;
                    } else {
                        out.invalid += 1;
                    }
                }
                Ok(Decision::Unschedulable(_)) => {
                    if out.alloc_at_first_reject.is_none() {
                        out.alloc_at_first_reject =
                            Some(fragmentation(index.fleet()).utilisation());
                    }
                    out.refused += 1;
                }
                Err(_) => out.invalid += 1,
            },
            TraceEvent::Depart { id } => {
                let _ = index.release(id);
            }
        }
    }
    out.fragmentation = fragmentation(index.fleet());
    out
}

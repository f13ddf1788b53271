//! What the agent has applied, and the pure rules for applying the next assignment event.
//!
//! The rules are the contract's (`node.proto`, `WatchRequest`, `Assignment`, `AssignmentRemoval`):
//!
//! * an event whose revision is not greater than the applied revision is never applied again;
//! * an upsert applies only if its generation is greater than the applied one for the same
//!   assignment (equal is a no-op; older is refused, so a delayed message cannot roll a workload
//!   back);
//! * a removal older than the applied generation is ignored;
//! * a snapshot is the complete desired state: everything it lists is upserted by the same
//!   generation rule and everything it does not list is removed.
//!
//! [`AppliedState::plan`] turns an event into the runtime actions and the next state, without
//! doing anything; the agent executes the actions, persists the next state (`state.json`,
//! atomically) and only then reports the revision as applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_proto::node::v1::assignment::Kind;
use kiln_proto::node::v1::assignment_event::Event;
use kiln_proto::node::v1::gpu_allocation::Kind as GpuKind;
use kiln_proto::node::v1::{Assignment, AssignmentEvent};
use serde::{Deserialize, Serialize};

/// The applied-state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// Everything the agent has applied: the acknowledgement it resumes from after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    /// The node this state belongs to: a state left by another node identity (the agent
    /// joined again) is discarded, since its revisions count another node's events.
    #[serde(default)]
    pub node_id: String,
    /// The revision of the last applied event; 0 before the first.
    pub applied_revision: u64,
    /// Per assignment ID, what was applied.
    pub assignments: BTreeMap<String, AppliedAssignment>,
}

/// One applied assignment, as much as the agent needs to restore GPU loads and its runtime's
/// bookkeeping after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedAssignment {
    pub generation: u64,
    pub kind: SpecKind,
    /// Every GPU the assignment touches (whole, passthrough, the MIG slice's GPU, the share's).
    pub gpu_uuids: Vec<String>,
    /// How it uses them.
    pub gpu_use: GpuUse,
}

/// The assignment's kind (the spec's oneof case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecKind {
    Pod,
    Instance,
    /// A kind this agent version does not know (an unset oneof).
    Unknown,
}

impl SpecKind {
    pub fn of(assignment: &Assignment) -> Self {
        match assignment.kind {
            Some(Kind::Pod(_)) => SpecKind::Pod,
            Some(Kind::Instance(_)) => SpecKind::Instance,
            None => SpecKind::Unknown,
        }
    }

    /// The plural noun operators know it by.
    pub fn plural(self) -> &'static str {
        match self {
            SpecKind::Pod => "pods",
            SpecKind::Instance => "instances",
            SpecKind::Unknown => "this kind of assignment",
        }
    }
}

/// How an assignment uses GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum GpuUse {
    None,
    /// Whole GPUs for a pod.
    Whole {
        uuids: Vec<String>,
    },
    /// Whole GPUs passed through to an instance.
    Passthrough {
        uuids: Vec<String>,
    },
    Mig {
        gpu_uuid: String,
        profile: String,
    },
    Share {
        gpu_uuid: String,
        memory_cap_mib: u64,
    },
}

impl GpuUse {
    pub fn of(assignment: &Assignment) -> Self {
        match &assignment.kind {
            Some(Kind::Pod(pod)) => match pod.gpus.as_ref().and_then(|g| g.kind.as_ref()) {
                Some(GpuKind::Whole(w)) => GpuUse::Whole {
                    uuids: w.gpu_uuids.clone(),
                },
                Some(GpuKind::Mig(m)) => GpuUse::Mig {
                    gpu_uuid: m.gpu_uuid.clone(),
                    profile: m.profile.clone(),
                },
                Some(GpuKind::Share(s)) => GpuUse::Share {
                    gpu_uuid: s.gpu_uuid.clone(),
                    memory_cap_mib: s.memory_cap_mib,
                },
                None => GpuUse::None,
            },
            Some(Kind::Instance(inst)) if !inst.gpu_uuids.is_empty() => GpuUse::Passthrough {
                uuids: inst.gpu_uuids.clone(),
            },
            _ => GpuUse::None,
        }
    }

    pub fn gpu_uuids(&self) -> Vec<String> {
        match self {
            GpuUse::None => Vec::new(),
            GpuUse::Whole { uuids } | GpuUse::Passthrough { uuids } => uuids.clone(),
            GpuUse::Mig { gpu_uuid, .. } | GpuUse::Share { gpu_uuid, .. } => {
                vec![gpu_uuid.clone()]
            }
        }
    }
}

impl AppliedAssignment {
    pub fn of(assignment: &Assignment) -> Self {
        let gpu_use = GpuUse::of(assignment);
        Self {
            generation: assignment.generation,
            kind: SpecKind::of(assignment),
            gpu_uuids: gpu_use.gpu_uuids(),
            gpu_use,
        }
    }
}

/// What the runtime must do for an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create the assignment or change it to this generation.
    Apply(Box<Assignment>),
    /// Stop and remove it.
    Remove {
        assignment_id: String,
        generation: u64,
    },
}

/// The event's kind, as logged (`kind = "upsert" | "remove" | "snapshot" | "unknown"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Upsert,
    Remove,
    Snapshot,
    /// An event kind this agent version does not understand: acknowledged, nothing done.
    Unknown,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Upsert => "upsert",
            EventKind::Remove => "remove",
            EventKind::Snapshot => "snapshot",
            EventKind::Unknown => "unknown",
        }
    }
}

/// A change the generation rule refused (logged as a warning, never applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub assignment_id: String,
    /// "upsert" or "removal".
    pub what: &'static str,
    pub offered_generation: u64,
    pub applied_generation: u64,
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Its revision is not greater than the applied one: already applied, never again.
    AlreadyApplied {
        revision: u64,
        applied_revision: u64,
    },
    Apply(Plan),
}

/// The actions for an event and the state after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub revision: u64,
    pub kind: EventKind,
    /// The assignment the event is about (for a snapshot: every ID it lists, comma-separated).
    pub subject: String,
    pub actions: Vec<Action>,
    pub refused: Vec<Refusal>,
    pub next: AppliedState,
}

impl AppliedState {
    /// Decides what applying `event` means, without doing it.
    pub fn plan(&self, event: &AssignmentEvent) -> Step {
        self.plan_in_stream(event, false)
    }

    /// Like [`plan`](Self::plan), for an event at `first` position of a stream. The contract
    /// starts a stream with a snapshot when `from_revision` is newer than any revision the
    /// control plane issued (its history went backwards, e.g. a restored database): such a
    /// snapshot, with a revision *below* the applied one, is applied and becomes the new
    /// applied revision, since otherwise every later event would be ignored as old. Anything
    /// else at or below the applied revision is never applied again.
    pub fn plan_in_stream(&self, event: &AssignmentEvent, first: bool) -> Step {
        let rewind = first
            && event.revision < self.applied_revision
            && matches!(event.event, Some(Event::Snapshot(_)));
        if event.revision <= self.applied_revision && !rewind {
            return Step::AlreadyApplied {
                revision: event.revision,
                applied_revision: self.applied_revision,
            };
        }
        let mut next = self.clone();
        next.applied_revision = event.revision;
        let mut actions = Vec::new();
        let mut refused = Vec::new();
        let (kind, subject) = match &event.event {
            Some(Event::Upsert(a)) => {
                upsert(&mut next, a, &mut actions, &mut refused);
                (EventKind::Upsert, a.assignment_id.clone())
            }
            Some(Event::Remove(r)) => {
                match next.assignments.get(&r.assignment_id) {
                    Some(applied) if r.generation < applied.generation => {
                        refused.push(Refusal {
                            assignment_id: r.assignment_id.clone(),
                            what: "removal",
                            offered_generation: r.generation,
                            applied_generation: applied.generation,
                        });
                    }
                    Some(_) => {
                        next.assignments.remove(&r.assignment_id);
                        actions.push(Action::Remove {
                            assignment_id: r.assignment_id.clone(),
                            generation: r.generation,
                        });
                    }
                    // Not here: nothing to stop.
                    None => {}
                }
                (EventKind::Remove, r.assignment_id.clone())
            }
            Some(Event::Snapshot(s)) => {
                let listed: std::collections::BTreeSet<&str> = s
                    .assignments
                    .iter()
                    .map(|a| a.assignment_id.as_str())
                    .collect();
                let gone: Vec<(String, u64)> = next
                    .assignments
                    .iter()
                    .filter(|(id, _)| !listed.contains(id.as_str()))
                    .map(|(id, a)| (id.clone(), a.generation))
                    .collect();
                for (id, generation) in gone {
                    next.assignments.remove(&id);
                    actions.push(Action::Remove {
                        assignment_id: id,
                        generation,
                    });
                }
                for a in &s.assignments {
                    upsert(&mut next, a, &mut actions, &mut refused);
                }
                let subject = listed.into_iter().collect::<Vec<_>>().join(",");
                (EventKind::Snapshot, subject)
            }
            None => (EventKind::Unknown, String::new()),
        };
        Step::Apply(Plan {
            revision: event.revision,
            kind,
            subject,
            actions,
            refused,
            next,
        })
    }

    /// Reads `state.json`; a missing file is the empty state (revision 0).
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_str(&text).map_err(|e| StateError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Writes `state.json` atomically (temporary file, fsync, rename, directory fsync).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(self).expect("the state serialises");
        crate::fsutil::write_atomic(path, &bytes, 0o600).map_err(|source| StateError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

fn upsert(
    next: &mut AppliedState,
    a: &Assignment,
    actions: &mut Vec<Action>,
    refused: &mut Vec<Refusal>,
) {
    match next.assignments.get(&a.assignment_id) {
        Some(applied) if a.generation < applied.generation => refused.push(Refusal {
            assignment_id: a.assignment_id.clone(),
            what: "upsert",
            offered_generation: a.generation,
            applied_generation: applied.generation,
        }),
        // The same generation again: already in place.
        Some(applied) if a.generation == applied.generation => {}
        _ => {
            next.assignments
                .insert(a.assignment_id.clone(), AppliedAssignment::of(a));
            actions.push(Action::Apply(Box::new(a.clone())));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("could not read applied state {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "applied state {} is not valid ({message}); remove it to resynchronise from a snapshot",
        path.display()
    )]
    Parse { path: PathBuf, message: String },
    #[error("could not write applied state {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::node::v1::{
        AssignmentRemoval, AssignmentSnapshot, GpuAllocation, GpuShare, InstanceSpec, MigSlice,
        PodSpec, WholeGpus,
    };

    fn pod(id: &str, generation: u64) -> Assignment {
        Assignment {
            trace_parent: String::new(),
            assignment_id: id.into(),
            generation,
            kind: Some(Kind::Pod(PodSpec {
                image: "kiln/test:1".into(),
                gpus: Some(GpuAllocation {
                    kind: Some(GpuKind::Whole(WholeGpus {
                        gpu_uuids: vec!["GPU-a".into()],
                    })),
                }),
                ..Default::default()
            })),
        }
    }

    fn up(revision: u64, a: Assignment) -> AssignmentEvent {
        AssignmentEvent {
            revision,
            event: Some(Event::Upsert(a)),
        }
    }

    fn rm(revision: u64, id: &str, generation: u64) -> AssignmentEvent {
        AssignmentEvent {
            revision,
            event: Some(Event::Remove(AssignmentRemoval {
                assignment_id: id.into(),
                generation,
            })),
        }
    }

    fn snap(revision: u64, assignments: Vec<Assignment>) -> AssignmentEvent {
        AssignmentEvent {
            revision,
            event: Some(Event::Snapshot(AssignmentSnapshot { assignments })),
        }
    }

    /// Plans and adopts the next state, as the agent does after persisting it.
    fn apply(state: &mut AppliedState, event: AssignmentEvent) -> Plan {
        match state.plan(&event) {
            Step::Apply(plan) => {
                *state = plan.next.clone();
                plan
            }
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    #[test]
    fn upsert_creates_then_newer_generation_changes() {
        let mut s = AppliedState::default();
        let p = apply(&mut s, up(1, pod("a", 1)));
        assert_eq!(p.kind, EventKind::Upsert);
        assert_eq!(p.subject, "a");
        assert_eq!(p.actions, vec![Action::Apply(Box::new(pod("a", 1)))]);
        assert_eq!(s.applied_revision, 1);
        assert_eq!(s.assignments["a"].generation, 1);
        assert_eq!(s.assignments["a"].kind, SpecKind::Pod);
        assert_eq!(s.assignments["a"].gpu_uuids, vec!["GPU-a".to_owned()]);

        let p = apply(&mut s, up(2, pod("a", 3)));
        assert_eq!(p.actions, vec![Action::Apply(Box::new(pod("a", 3)))]);
        assert_eq!(s.assignments["a"].generation, 3);
    }

    #[test]
    fn same_generation_is_a_no_op_and_older_is_refused() {
        let mut s = AppliedState::default();
        apply(&mut s, up(1, pod("a", 5)));
        let p = apply(&mut s, up(2, pod("a", 5)));
        assert!(p.actions.is_empty());
        assert!(p.refused.is_empty());
        assert_eq!(s.applied_revision, 2, "the revision still advances");

        let p = apply(&mut s, up(3, pod("a", 4)));
        assert!(p.actions.is_empty());
        assert_eq!(
            p.refused,
            vec![Refusal {
                assignment_id: "a".into(),
                what: "upsert",
                offered_generation: 4,
                applied_generation: 5
            }]
        );
        assert_eq!(s.assignments["a"].generation, 5, "never rolled back");
        assert_eq!(s.applied_revision, 3);
    }

    #[test]
    fn removal_respects_generation() {
        let mut s = AppliedState::default();
        apply(&mut s, up(1, pod("a", 5)));
        let p = apply(&mut s, rm(2, "a", 4));
        assert!(p.actions.is_empty());
        assert_eq!(p.refused.len(), 1);
        assert!(s.assignments.contains_key("a"));

        let p = apply(&mut s, rm(3, "a", 5));
        assert_eq!(
            p.actions,
            vec![Action::Remove {
                assignment_id: "a".into(),
                generation: 5
            }]
        );
        assert!(s.assignments.is_empty());

        // Removing what is not there does nothing but advance the revision.
        let p = apply(&mut s, rm(4, "zzz", 1));
        assert!(p.actions.is_empty() && p.refused.is_empty());
        assert_eq!(s.applied_revision, 4);
    }

    #[test]
    fn never_replays_an_applied_revision() {
        let mut s = AppliedState::default();
        apply(&mut s, up(1, pod("a", 1)));
        apply(&mut s, up(2, pod("b", 1)));
        for old in [0, 1, 2] {
            assert_eq!(
                s.plan(&up(old, pod("c", 9))),
                Step::AlreadyApplied {
                    revision: old,
                    applied_revision: 2
                }
            );
        }
        // Also after a round trip through the file, as after a restart.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        s.save(&path).unwrap();
        let restored = AppliedState::load(&path).unwrap();
        assert_eq!(restored, s);
        assert!(matches!(
            restored.plan(&rm(2, "a", 1)),
            Step::AlreadyApplied { .. }
        ));
        assert!(matches!(restored.plan(&rm(3, "a", 1)), Step::Apply(_)));
    }

    #[test]
    fn snapshot_makes_the_node_match_exactly() {
        let mut s = AppliedState::default();
        apply(&mut s, up(1, pod("keep", 2)));
        apply(&mut s, up(2, pod("gone", 1)));
        apply(&mut s, up(3, pod("newer-here", 7)));

        let p = apply(
            &mut s,
            snap(
                10,
                vec![pod("keep", 2), pod("new", 1), pod("newer-here", 6)],
            ),
        );
        assert_eq!(p.kind, EventKind::Snapshot);
        assert_eq!(p.subject, "keep,new,newer-here");
        assert_eq!(
            p.actions,
            vec![
                Action::Remove {
                    assignment_id: "gone".into(),
                    generation: 1
                },
                Action::Apply(Box::new(pod("new", 1))),
            ]
        );
        assert_eq!(p.refused.len(), 1, "an older generation is refused");
        assert_eq!(s.applied_revision, 10);
        assert_eq!(
            s.assignments.keys().collect::<Vec<_>>(),
            vec!["keep", "new", "newer-here"]
        );
        assert_eq!(s.assignments["newer-here"].generation, 7);

        // An empty snapshot removes everything.
        let p = apply(&mut s, snap(11, vec![]));
        assert_eq!(p.actions.len(), 3);
        assert!(s.assignments.is_empty());
    }

    #[test]
    fn a_first_snapshot_below_the_applied_revision_rewinds() {
        let mut s = AppliedState::default();
        apply(&mut s, up(1, pod("a", 1)));
        apply(&mut s, up(10, pod("b", 1)));
        let rewound = snap(7, vec![pod("a", 1)]);
        // Mid-stream, an old snapshot is never applied.
        assert!(matches!(s.plan(&rewound), Step::AlreadyApplied { .. }));
        assert!(matches!(
            s.plan_in_stream(&up(7, pod("c", 1)), true),
            Step::AlreadyApplied { .. }
        ));
        // At the start of a stream it is the control plane's whole truth.
        let Step::Apply(plan) = s.plan_in_stream(&rewound, true) else {
            panic!("expected a plan")
        };
        assert_eq!(plan.next.applied_revision, 7);
        assert_eq!(plan.next.assignments.keys().collect::<Vec<_>>(), vec!["a"]);
        // The same revision as applied is already in place.
        assert!(matches!(
            s.plan_in_stream(&snap(10, vec![]), true),
            Step::AlreadyApplied { .. }
        ));
    }

    #[test]
    fn unknown_event_kinds_are_acknowledged_and_do_nothing() {
        let mut s = AppliedState::default();
        apply(&mut s, up(1, pod("a", 1)));
        let p = apply(
            &mut s,
            AssignmentEvent {
                revision: 2,
                event: None,
            },
        );
        assert_eq!(p.kind, EventKind::Unknown);
        assert!(p.actions.is_empty());
        assert_eq!(s.applied_revision, 2);
        assert_eq!(s.assignments.len(), 1);
    }

    #[test]
    fn gpu_use_of_each_mode() {
        let with = |kind| Assignment {
            trace_parent: String::new(),
            assignment_id: "x".into(),
            generation: 1,
            kind: Some(Kind::Pod(PodSpec {
                gpus: Some(GpuAllocation { kind: Some(kind) }),
                ..Default::default()
            })),
        };
        let mig = AppliedAssignment::of(&with(GpuKind::Mig(MigSlice {
            gpu_uuid: "GPU-m".into(),
            profile: "3g.40gb".into(),
            start: 4,
            mig_device_uuid: String::new(),
        })));
        assert_eq!(mig.gpu_uuids, vec!["GPU-m".to_owned()]);
        assert_eq!(
            mig.gpu_use,
            GpuUse::Mig {
                gpu_uuid: "GPU-m".into(),
                profile: "3g.40gb".into()
            }
        );
        let share = AppliedAssignment::of(&with(GpuKind::Share(GpuShare {
            gpu_uuid: "GPU-s".into(),
            memory_cap_mib: 8192,
        })));
        assert_eq!(share.gpu_uuids, vec!["GPU-s".to_owned()]);
        let inst = AppliedAssignment::of(&Assignment {
            trace_parent: String::new(),
            assignment_id: "i".into(),
            generation: 1,
            kind: Some(Kind::Instance(InstanceSpec {
                gpu_uuids: vec!["GPU-1".into(), "GPU-2".into()],
                ..Default::default()
            })),
        });
        assert_eq!(inst.kind, SpecKind::Instance);
        assert_eq!(inst.gpu_uuids.len(), 2);
        let cpu_only = AppliedAssignment::of(&Assignment {
            trace_parent: String::new(),
            assignment_id: "c".into(),
            generation: 1,
            kind: Some(Kind::Pod(PodSpec::default())),
        });
        assert_eq!(cpu_only.gpu_use, GpuUse::None);
        assert!(cpu_only.gpu_uuids.is_empty());
    }

    #[test]
    fn state_file_format_is_stable() {
        let mut s = AppliedState::default();
        apply(&mut s, up(4, pod("a", 2)));
        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(json["applied_revision"], 4);
        assert_eq!(json["assignments"]["a"]["generation"], 2);
        assert_eq!(json["assignments"]["a"]["kind"], "pod");
        assert_eq!(json["assignments"]["a"]["gpu_uuids"][0], "GPU-a");
        assert_eq!(json["assignments"]["a"]["gpu_use"]["mode"], "whole");
    }
}

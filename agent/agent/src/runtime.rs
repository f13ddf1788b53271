//! Where assignments become workloads: Docker for pods ([`crate::docker`]), QEMU for instances
//! ([`crate::qemu`]). [`PlaceholderRuntime`] keeps what no runtime runs and says honestly that nothing
//! runs it (`OBSERVED_STATE_PENDING`), never a made-up "running"; [`NodeRuntime`] sends each
//! assignment to the runtime for its kind.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use kiln_proto::node::v1::{Assignment, ObservedAssignment, ObservedState};

use crate::state::{AppliedState, SpecKind};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime failed to remove assignment {assignment_id}: {message}")]
    Remove {
        assignment_id: String,
        message: String,
    },
}

/// Makes assignments real on this node and says what it sees.
pub trait Runtime: Send + Sync + 'static {
    /// Creates the assignment or changes it to its generation; returns what it sees right after.
    /// A failure is reported as `OBSERVED_STATE_FAILED` with a reason, not as an error.
    fn apply(&self, assignment: &Assignment) -> impl Future<Output = ObservedAssignment> + Send;

    /// Stops and removes an assignment (a removal up to `generation`).
    fn remove(
        &self,
        assignment_id: &str,
        generation: u64,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Everything this runtime has on the node now: a complete report.
    fn observe_all(&self) -> impl Future<Output = Vec<ObservedAssignment>> + Send;
}

/// Milliseconds since the Unix epoch, by this host's clock.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Keeps every assignment and reports it pending, because this agent cannot run it yet.
#[derive(Debug, Default)]
pub struct PlaceholderRuntime {
    held: Mutex<BTreeMap<String, (u64, SpecKind)>>,
}

impl PlaceholderRuntime {
    /// A runtime that already holds what a previous run of the agent applied.
    pub fn restore(state: &AppliedState) -> Self {
        Self {
            held: Mutex::new(
                state
                    .assignments
                    .iter()
                    .map(|(id, a)| (id.clone(), (a.generation, a.kind)))
                    .collect(),
            ),
        }
    }

    fn observed(id: &str, generation: u64, kind: SpecKind) -> ObservedAssignment {
        ObservedAssignment {
            assignment_id: id.to_owned(),
            generation,
            state: ObservedState::Pending as i32,
            reason: match kind {
                SpecKind::Unknown => {
                    "this agent does not understand this kind of assignment".to_owned()
                }
                kind => format!("this agent has no runtime for {} yet", kind.plural()),
            },
            exit_code: None,
            ports: Vec::new(),
            runtime_ms: 0,
            observed_at_unix_ms: now_unix_ms(),
        }
    }
}

impl Runtime for PlaceholderRuntime {
    async fn apply(&self, assignment: &Assignment) -> ObservedAssignment {
        let kind = SpecKind::of(assignment);
        self.held.lock().expect("not poisoned").insert(
            assignment.assignment_id.clone(),
            (assignment.generation, kind),
        );
        Self::observed(&assignment.assignment_id, assignment.generation, kind)
    }

    async fn remove(&self, assignment_id: &str, _generation: u64) -> Result<(), RuntimeError> {
        self.held
            .lock()
            .expect("not poisoned")
            .remove(assignment_id);
        Ok(())
    }

    async fn observe_all(&self) -> Vec<ObservedAssignment> {
        self.held
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(id, (generation, kind))| Self::observed(id, *generation, *kind))
            .collect()
    }
}

/// The agent's runtime: pods to Docker and instances to QEMU when those are in use,
/// everything else (and what has no runtime) to the placeholder.
#[derive(Debug)]
pub struct NodeRuntime {
    pub docker: Option<crate::docker::DockerRuntime>,
    pub qemu: Option<crate::qemu::QemuRuntime>,
    pub placeholder: PlaceholderRuntime,
}

impl NodeRuntime {
    /// Restores all halves from the applied state: pods go to Docker (when in use), instances
    /// to QEMU (when in use), the rest to the placeholder.
    pub fn restore(
        docker: Option<crate::docker::DockerRuntime>,
        qemu: Option<crate::qemu::QemuRuntime>,
        state: &AppliedState,
    ) -> Self {
        let mut rest = state.clone();
        if docker.is_some() {
            rest.assignments.retain(|_, a| a.kind != SpecKind::Pod);
        }
        if qemu.is_some() {
            rest.assignments.retain(|_, a| a.kind != SpecKind::Instance);
        }
        Self {
            docker,
            qemu,
            placeholder: PlaceholderRuntime::restore(&rest),
        }
    }
}

impl Runtime for NodeRuntime {
    async fn apply(&self, assignment: &Assignment) -> ObservedAssignment {
        match (SpecKind::of(assignment), &self.docker, &self.qemu) {
            (SpecKind::Pod, Some(d), _) => d.apply(assignment).await,
            (SpecKind::Instance, _, Some(q)) => q.apply(assignment).await,
            _ => self.placeholder.apply(assignment).await,
        }
    }

    async fn remove(&self, assignment_id: &str, generation: u64) -> Result<(), RuntimeError> {
        self.placeholder.remove(assignment_id, generation).await?;
        if let Some(q) = &self.qemu
            && q.holds(assignment_id)
        {
            return q.remove(assignment_id, generation).await;
        }
        match &self.docker {
            // Only pods Docker holds: an instance's removal is not a container's (and a stray
            // container without a spec is removed by Docker's reconcile).
            Some(d) if d.holds(assignment_id) => d.remove(assignment_id, generation).await,
            _ => Ok(()),
        }
    }

    async fn observe_all(&self) -> Vec<ObservedAssignment> {
        let mut all = self.placeholder.observe_all().await;
        if let Some(d) = &self.docker {
            all.extend(d.observe_all().await);
        }
        if let Some(q) = &self.qemu {
            all.extend(q.observe_all().await);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::node::v1::assignment::Kind;
    use kiln_proto::node::v1::{InstanceSpec, PodSpec};

    #[tokio::test]
    async fn placeholder_reports_pending_with_an_honest_reason() {
        let rt = PlaceholderRuntime::default();
        let pod = Assignment {
            trace_parent: String::new(),
            assignment_id: "asg_pod".into(),
            generation: 2,
            kind: Some(Kind::Pod(PodSpec::default())),
        };
        let vm = Assignment {
            trace_parent: String::new(),
            assignment_id: "asg_vm".into(),
            generation: 1,
            kind: Some(Kind::Instance(InstanceSpec::default())),
        };
        let o = rt.apply(&pod).await;
        assert_eq!(o.state, ObservedState::Pending as i32);
        assert_eq!(o.generation, 2);
        assert_eq!(o.reason, "this agent has no runtime for pods yet");
        let o = rt.apply(&vm).await;
        assert_eq!(o.reason, "this agent has no runtime for instances yet");
        assert_eq!(rt.observe_all().await.len(), 2);
        rt.remove("asg_pod", 2).await.unwrap();
        let all = rt.observe_all().await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].assignment_id, "asg_vm");
    }
}

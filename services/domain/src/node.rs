//! A node's lifecycle as plain data: what the operator decided, whether the node is talking to
//! us, and the one state everybody else reads, derived from both.
//!
//! The database derives `nodes.state` with the same rule (a generated column), and the lifecycle
//! controller moves liveness with the same thresholds; this module is where the rule is written
//! down and tested.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What the operator decided about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminState {
    /// Takes new work.
    Active,
    /// Keeps its work; takes no new work.
    Cordoned,
    /// Its work is moved or stopped; takes no new work.
    Draining,
    /// Out of the fleet for good; its credential no longer works.
    Retired,
}

/// Whether the node is talking to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Liveness {
    Online,
    /// Silent past the grace period; its work is kept for now.
    Unreachable,
    /// Silent past the loss timeout; its work was declared lost.
    Lost,
}

/// The node's state as operators, the scheduler and the agent see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    Ready,
    Cordoned,
    Draining,
    Unreachable,
    Lost,
    Retired,
}

impl NodeState {
    /// The one state of a node: retirement beats everything, then silence, then the operator's
    /// cordon or drain.
    pub fn effective(admin: AdminState, liveness: Liveness) -> NodeState {
        match (admin, liveness) {
            (AdminState::Retired, _) => NodeState::Retired,
            (_, Liveness::Lost) => NodeState::Lost,
            (_, Liveness::Unreachable) => NodeState::Unreachable,
            (AdminState::Draining, Liveness::Online) => NodeState::Draining,
            (AdminState::Cordoned, Liveness::Online) => NodeState::Cordoned,
            (AdminState::Active, Liveness::Online) => NodeState::Ready,
        }
    }

    /// Whether new work may be placed on the node.
    pub fn accepts_work(self) -> bool {
        self == NodeState::Ready
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Unreachable => "unreachable",
            NodeState::Lost => "lost",
            NodeState::Retired => "retired",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown node state {0:?}")]
pub struct NodeStateParseError(pub String);

impl FromStr for NodeState {
    type Err = NodeStateParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ready" => NodeState::Ready,
            "cordoned" => NodeState::Cordoned,
            "draining" => NodeState::Draining,
            "unreachable" => NodeState::Unreachable,
            "lost" => NodeState::Lost,
            "retired" => NodeState::Retired,
            other => return Err(NodeStateParseError(other.to_owned())),
        })
    }
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Cordoned => "cordoned",
            AdminState::Draining => "draining",
            AdminState::Retired => "retired",
        }
    }

    /// Whether an operator may move a node from `self` to `to`. Retirement is final; everything
    /// else may go anywhere (uncordon of a draining node stops the drain).
    pub fn may_become(self, _to: AdminState) -> bool {
        self != AdminState::Retired
    }
}

impl FromStr for AdminState {
    type Err = NodeStateParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "active" => AdminState::Active,
            "cordoned" => AdminState::Cordoned,
            "draining" => AdminState::Draining,
            "retired" => AdminState::Retired,
            other => return Err(NodeStateParseError(other.to_owned())),
        })
    }
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Online => "online",
            Liveness::Unreachable => "unreachable",
            Liveness::Lost => "lost",
        }
    }
}

impl FromStr for Liveness {
    type Err = NodeStateParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "online" => Liveness::Online,
            "unreachable" => Liveness::Unreachable,
            "lost" => Liveness::Lost,
            other => return Err(NodeStateParseError(other.to_owned())),
        })
    }
}

/// How long a node may be silent before it is unreachable, and then lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessPolicy {
    /// Silence (time since the last heartbeat) after which a node is unreachable.
    pub unreachable_after: Duration,
    /// Silence after which it is lost and its work handed back to the scheduler.
    pub lost_after: Duration,
}

impl Default for LivenessPolicy {
    /// Three missed 10 s heartbeats make a node unreachable; five minutes make it lost.
    fn default() -> Self {
        Self {
            unreachable_after: Duration::from_secs(30),
            lost_after: Duration::from_secs(300),
        }
    }
}

impl LivenessPolicy {
    /// What a node silent for `silence` should be, given what it is now. A heartbeat (zero
    /// silence) brings back any node; loss is never undone by more silence.
    pub fn liveness_after(&self, silence: Duration, now: Liveness) -> Liveness {
        if silence >= self.lost_after || (now == Liveness::Lost && silence > Duration::ZERO) {
            Liveness::Lost
        } else if silence >= self.unreachable_after {
            Liveness::Unreachable
        } else {
            Liveness::Online
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retirement_beats_silence_and_silence_beats_cordon() {
        use AdminState::*;
        use Liveness::*;
        assert_eq!(NodeState::effective(Retired, Lost), NodeState::Retired);
        assert_eq!(
            NodeState::effective(Cordoned, Unreachable),
            NodeState::Unreachable
        );
        assert_eq!(NodeState::effective(Draining, Lost), NodeState::Lost);
        assert_eq!(NodeState::effective(Cordoned, Online), NodeState::Cordoned);
        assert_eq!(NodeState::effective(Draining, Online), NodeState::Draining);
        assert_eq!(NodeState::effective(Active, Online), NodeState::Ready);
        assert!(NodeState::Ready.accepts_work());
        for s in [
            NodeState::Cordoned,
            NodeState::Draining,
            NodeState::Unreachable,
            NodeState::Lost,
            NodeState::Retired,
        ] {
            assert!(!s.accepts_work(), "{s} must not take work");
            assert_eq!(s.as_str().parse::<NodeState>().unwrap(), s);
        }
    }

    #[test]
    fn silence_makes_a_node_unreachable_then_lost() {
        let p = LivenessPolicy {
            unreachable_after: Duration::from_secs(3),
            lost_after: Duration::from_secs(6),
        };
        let s = Duration::from_secs;
        assert_eq!(p.liveness_after(s(2), Liveness::Online), Liveness::Online);
        assert_eq!(
            p.liveness_after(s(3), Liveness::Online),
            Liveness::Unreachable
        );
        assert_eq!(
            p.liveness_after(s(6), Liveness::Unreachable),
            Liveness::Lost
        );
        // A lost node stays lost until it heartbeats again.
        assert_eq!(p.liveness_after(s(1), Liveness::Lost), Liveness::Lost);
        assert_eq!(
            p.liveness_after(Duration::ZERO, Liveness::Lost),
            Liveness::Online
        );
    }

    #[test]
    fn retirement_is_final() {
        assert!(!AdminState::Retired.may_become(AdminState::Active));
        assert!(AdminState::Draining.may_become(AdminState::Active));
    }
}

//! The node state machine: one table of legal transitions, each caused by a
//! named event, and the event record every transition leaves behind.
//!
//! [`Node::apply`](crate::model::Node) is the only way the core changes a
//! node's state. It is a pure function: it returns the node as it must be
//! written and the [`Event`] for the history, or a typed
//! [`TransitionError`]; it never overwrites silently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{Actor, Node, NodeId, PoolKey, PowerState, SessionId};
use crate::time::Timestamp;

/// Where a node is in its life. The first six are the user document's; one
/// transient state, `Contextualizing`, makes allocation honest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Controlled by Duffy, not installed (or dirty after use): waiting to be
    /// installed by the reconciler.
    Active,
    /// Being installed.
    Provisioning,
    /// Installed and waiting in its pool's warm pool.
    Ready,
    /// Claimed by a session, being prepared for the project (SSH keys);
    /// not yet handed over.
    Contextualizing,
    /// Handed to a session.
    Deployed,
    /// Install or preparation failed, or held for debugging after
    /// `/Node/fail`.
    Failed,
    /// Not managed by Duffy (administrative downtime).
    Reserved,
}

impl NodeState {
    /// Every state, in a fixed order.
    pub const ALL: [NodeState; 7] = [
        NodeState::Active,
        NodeState::Provisioning,
        NodeState::Ready,
        NodeState::Contextualizing,
        NodeState::Deployed,
        NodeState::Failed,
        NodeState::Reserved,
    ];

    /// The name shown in the inventory and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "Active",
            NodeState::Provisioning => "Provisioning",
            NodeState::Ready => "Ready",
            NodeState::Contextualizing => "Contextualizing",
            NodeState::Deployed => "Deployed",
            NodeState::Failed => "Failed",
            NodeState::Reserved => "Reserved",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| format!("unknown node state {s:?}"))
    }
}

/// The named events that move a node, with what each carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The reconciler starts installing `image` (from Active, or from Ready
    /// when the installed image went stale).
    InstallStarted {
        /// What is being installed.
        image: PoolKey,
        /// Why (e.g. "fill 7/x86_64", "stale").
        why: String,
    },
    /// Start-up recovery re-drives an install a crash interrupted.
    InstallRestarted,
    /// One install attempt failed; the reconciler will retry.
    InstallAttemptFailed {
        /// The installer's words.
        reason: String,
    },
    /// The install finished; the node joins its warm pool.
    InstallSucceeded {
        /// The new OS's SSH host key, if the installer reported it.
        host_key: Option<String>,
    },
    /// Every attempt failed; `retry_at` is when the node gets another
    /// chance (`None`: an operator must recover it).
    InstallFailed {
        /// What went wrong, as the installer or the BMC reported it.
        reason: String,
        /// End of the cool-down.
        retry_at: Option<Timestamp>,
    },
    /// Claimed for a new session.
    Allocated {
        /// The session.
        session: SessionId,
    },
    /// Prepared for the project and handed over.
    Prepared,
    /// Claimed and handed over at once: the installer has nothing to
    /// prepare, so allocation is a single write.
    Delivered {
        /// The session.
        session: SessionId,
    },
    /// Preparing for the project failed.
    PrepareFailed {
        /// What went wrong, as the contextualizer reported it.
        reason: String,
        /// End of the cool-down, as for [`Cause::InstallFailed`].
        retry_at: Option<Timestamp>,
    },
    /// Another node of the same allocation failed, or the allocation was
    /// interrupted: this node goes back to be reinstalled.
    AllocationAborted {
        /// Why the allocation ended (the sibling node's failure, or the
        /// interruption).
        reason: String,
    },
    /// The session was released with `/Node/done`.
    Released,
    /// The session's lifetime ran out: the reconciler takes the node back
    /// to be reinstalled. Its own cause, so that the history says why.
    SessionExpired,
    /// The session's job called `/Node/fail`: held for debugging.
    FailedByUser {
        /// End of the hold.
        hold_until: Timestamp,
    },
    /// A Failed node's hold or cool-down ended; it goes back to be
    /// reinstalled.
    HoldExpired,
    /// An operator took the node out of the pool.
    SetAdmin,
    /// An operator put the node back (from Reserved or Failed).
    Recovered,
    /// The service was paused: the warm pool is powered down.
    PoweredDown,
    /// The BMC reported a power state other than the store's belief.
    PowerMismatch {
        /// What the BMC said.
        observed: PowerState,
    },
    /// The BMC reported the power state of a node whose power the store
    /// did not know (a new farm's first check): recorded, not a mismatch.
    PowerObserved {
        /// What the BMC said.
        observed: PowerState,
    },
}

/// The name of a [`Cause`], as kept in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)] // each mirrors the documented Cause variant of the same name
pub enum CauseKind {
    InstallStarted,
    InstallRestarted,
    InstallAttemptFailed,
    InstallSucceeded,
    InstallFailed,
    Allocated,
    Prepared,
    Delivered,
    PrepareFailed,
    AllocationAborted,
    Released,
    FailedByUser,
    HoldExpired,
    SetAdmin,
    Recovered,
    PoweredDown,
    PowerMismatch,
    PowerObserved,
    SessionExpired,
    /// Not a transition: the node was added to the farm.
    Added,
}

impl CauseKind {
    /// Every kind, in a fixed order.
    pub const ALL: [CauseKind; 20] = [
        CauseKind::InstallStarted,
        CauseKind::InstallRestarted,
        CauseKind::InstallAttemptFailed,
        CauseKind::InstallSucceeded,
        CauseKind::InstallFailed,
        CauseKind::Allocated,
        CauseKind::Prepared,
        CauseKind::Delivered,
        CauseKind::PrepareFailed,
        CauseKind::AllocationAborted,
        CauseKind::Released,
        CauseKind::FailedByUser,
        CauseKind::HoldExpired,
        CauseKind::SetAdmin,
        CauseKind::Recovered,
        CauseKind::PoweredDown,
        CauseKind::PowerMismatch,
        CauseKind::PowerObserved,
        CauseKind::SessionExpired,
        CauseKind::Added,
    ];

    /// Stable name for storage.
    pub fn as_str(self) -> &'static str {
        match self {
            CauseKind::InstallStarted => "install_started",
            CauseKind::InstallRestarted => "install_restarted",
            CauseKind::InstallAttemptFailed => "install_attempt_failed",
            CauseKind::InstallSucceeded => "install_succeeded",
            CauseKind::InstallFailed => "install_failed",
            CauseKind::Allocated => "allocated",
            CauseKind::Prepared => "prepared",
            CauseKind::Delivered => "delivered",
            CauseKind::PrepareFailed => "prepare_failed",
            CauseKind::AllocationAborted => "allocation_aborted",
            CauseKind::Released => "released",
            CauseKind::FailedByUser => "failed_by_user",
            CauseKind::HoldExpired => "hold_expired",
            CauseKind::SetAdmin => "set_admin",
            CauseKind::Recovered => "recovered",
            CauseKind::PoweredDown => "powered_down",
            CauseKind::PowerMismatch => "power_mismatch",
            CauseKind::PowerObserved => "power_observed",
            CauseKind::SessionExpired => "session_expired",
            CauseKind::Added => "added",
        }
    }
}

impl fmt::Display for CauseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CauseKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CauseKind::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| format!("unknown cause {s:?}"))
    }
}

impl Cause {
    /// The event name.
    pub fn kind(&self) -> CauseKind {
        match self {
            Cause::InstallStarted { .. } => CauseKind::InstallStarted,
            Cause::InstallRestarted => CauseKind::InstallRestarted,
            Cause::InstallAttemptFailed { .. } => CauseKind::InstallAttemptFailed,
            Cause::InstallSucceeded { .. } => CauseKind::InstallSucceeded,
            Cause::InstallFailed { .. } => CauseKind::InstallFailed,
            Cause::Allocated { .. } => CauseKind::Allocated,
            Cause::Prepared => CauseKind::Prepared,
            Cause::Delivered { .. } => CauseKind::Delivered,
            Cause::PrepareFailed { .. } => CauseKind::PrepareFailed,
            Cause::AllocationAborted { .. } => CauseKind::AllocationAborted,
            Cause::Released => CauseKind::Released,
            Cause::FailedByUser { .. } => CauseKind::FailedByUser,
            Cause::HoldExpired => CauseKind::HoldExpired,
            Cause::SetAdmin => CauseKind::SetAdmin,
            Cause::Recovered => CauseKind::Recovered,
            Cause::PoweredDown => CauseKind::PoweredDown,
            Cause::PowerMismatch { .. } => CauseKind::PowerMismatch,
            Cause::PowerObserved { .. } => CauseKind::PowerObserved,
            Cause::SessionExpired => CauseKind::SessionExpired,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Cause::InstallStarted { image, why } => Some(format!("{image} ({why})")),
            Cause::InstallAttemptFailed { reason }
            | Cause::InstallFailed { reason, .. }
            | Cause::PrepareFailed { reason, .. }
            | Cause::AllocationAborted { reason } => Some(reason.clone()),
            Cause::FailedByUser { hold_until } => Some(format!("held until {hold_until}")),
            Cause::SessionExpired => Some("the session's lifetime ran out".to_string()),
            Cause::PowerMismatch { observed } | Cause::PowerObserved { observed } => {
                Some(format!("BMC reports power {}", observed.as_str()))
            }
            _ => None,
        }
    }
}

use NodeState as S;

/// The transition table: for each event, the states it may leave and the
/// state it enters. `None` as target means "stays where it is" (an
/// observation recorded in the history without moving the node).
pub const TRANSITIONS: &[(CauseKind, &[NodeState], Option<NodeState>)] = &[
    (CauseKind::InstallStarted, &[S::Active, S::Ready], Some(S::Provisioning)),
    (CauseKind::InstallRestarted, &[S::Provisioning], Some(S::Provisioning)),
    (CauseKind::InstallAttemptFailed, &[S::Provisioning], Some(S::Provisioning)),
    (CauseKind::InstallSucceeded, &[S::Provisioning], Some(S::Ready)),
    (CauseKind::InstallFailed, &[S::Provisioning], Some(S::Failed)),
    (CauseKind::Allocated, &[S::Ready], Some(S::Contextualizing)),
    (CauseKind::Prepared, &[S::Contextualizing], Some(S::Deployed)),
    (CauseKind::Delivered, &[S::Ready], Some(S::Deployed)),
    (CauseKind::PrepareFailed, &[S::Contextualizing], Some(S::Failed)),
    (CauseKind::AllocationAborted, &[S::Contextualizing], Some(S::Active)),
    (CauseKind::Released, &[S::Deployed, S::Failed], Some(S::Active)),
    (CauseKind::SessionExpired, &[S::Deployed], Some(S::Active)),
    (CauseKind::FailedByUser, &[S::Deployed], Some(S::Failed)),
    (CauseKind::HoldExpired, &[S::Failed], Some(S::Active)),
    (CauseKind::SetAdmin, &[S::Active, S::Ready, S::Provisioning, S::Failed], Some(S::Reserved)),
    (CauseKind::Recovered, &[S::Reserved, S::Failed], Some(S::Active)),
    (CauseKind::PoweredDown, &[S::Ready], Some(S::Active)),
    (CauseKind::PowerMismatch, &NodeState::ALL, None),
    (CauseKind::PowerObserved, &NodeState::ALL, None),
];

/// Looks up `(from, cause)` in [`TRANSITIONS`]: the target state, or `None`
/// if the table has no such transition.
pub fn target(from: NodeState, cause: CauseKind) -> Option<NodeState> {
    TRANSITIONS.iter().find(|(c, froms, _)| *c == cause && froms.contains(&from)).map(|(_, _, to)| to.unwrap_or(from))
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The table has no such transition.
    #[error("node {hostname} is {from}; {cause} is not allowed from {from}")]
    Illegal {
        /// The node.
        hostname: String,
        /// Its state.
        from: NodeState,
        /// The event refused.
        cause: CauseKind,
    },
    /// The transition exists but the node's circumstances forbid it.
    #[error("node {hostname}: {cause} refused: {why}")]
    Guard {
        /// The node.
        hostname: String,
        /// The event refused.
        cause: CauseKind,
        /// What stood in the way.
        why: &'static str,
    },
}

/// One line of a node's history: every transition leaves one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log, assigned by the store (0 until stored).
    pub seq: u64,
    /// The node.
    pub node: NodeId,
    /// State before.
    pub from: NodeState,
    /// State after.
    pub to: NodeState,
    /// The event's name.
    pub cause: CauseKind,
    /// Free text: reasons, images, hold times.
    pub detail: Option<String>,
    /// Who caused it.
    pub actor: Actor,
    /// The session involved, if any.
    pub session: Option<SessionId>,
    /// When.
    pub at: Timestamp,
}

impl Event {
    /// The event recorded when a node is added to the farm.
    pub fn added(node: &Node, actor: Actor) -> Event {
        Event {
            seq: 0,
            node: node.id,
            from: node.state,
            to: node.state,
            cause: CauseKind::Added,
            detail: None,
            actor,
            session: None,
            at: node.state_since,
        }
    }
}

impl Node {
    /// Applies `cause` at `now` on behalf of `actor`: the node as it must be
    /// written (version bumped) and the event for its history.
    ///
    /// Guards beyond the table: a held Failed node can only be released by
    /// its own session; a Failed node's hold must have run out for
    /// `HoldExpired`; a node held by a session cannot be set to admin
    /// downtime or recovered (release it first).
    pub fn apply(&self, cause: Cause, actor: Actor, now: Timestamp) -> Result<(Node, Event), TransitionError> {
        let kind = cause.kind();
        let to = target(self.state, kind).ok_or_else(|| TransitionError::Illegal {
            hostname: self.hostname.clone(),
            from: self.state,
            cause: kind,
        })?;
        let guard = |why: &'static str| TransitionError::Guard { hostname: self.hostname.clone(), cause: kind, why };
        let mut n = self.clone();
        let detail = cause.detail();
        let session_before = self.session.clone();
        match cause {
            Cause::InstallStarted { image, .. } => {
                if !self.can_host(&image) {
                    return Err(guard("the hardware cannot carry that image (arch or flavor)"));
                }
                n.image = Some(image);
                n.installed_at = None;
                n.host_key = None;
                n.power = PowerState::On;
            }
            Cause::InstallRestarted | Cause::InstallAttemptFailed { .. } => {}
            Cause::InstallSucceeded { host_key } => {
                n.installed_at = Some(now);
                n.host_key = host_key;
            }
            Cause::InstallFailed { reason, retry_at } | Cause::PrepareFailed { reason, retry_at } => {
                n.fail_reason = Some(reason);
                n.hold_until = retry_at;
                n.session = None;
                n.installed_at = None;
            }
            Cause::Allocated { session } | Cause::Delivered { session } => {
                n.session = Some(session);
                n.used_count += 1;
            }
            Cause::Prepared => {}
            Cause::AllocationAborted { .. } => {
                n.session = None;
                n.installed_at = None;
            }
            Cause::Released => {
                if self.state == S::Failed && self.session.is_none() {
                    return Err(guard("the node is not held by a session"));
                }
                n.session = None;
                n.hold_until = None;
                n.fail_reason = None;
                n.installed_at = None;
            }
            Cause::SessionExpired => {
                n.session = None;
                n.installed_at = None;
            }
            Cause::FailedByUser { hold_until } => {
                n.hold_until = Some(hold_until);
                n.fail_reason = Some("failed by user".to_string());
            }
            Cause::HoldExpired => match self.hold_until {
                Some(t) if t <= now => {
                    n.session = None;
                    n.hold_until = None;
                    n.fail_reason = None;
                    n.installed_at = None;
                }
                Some(_) => return Err(guard("the hold has not run out")),
                None => return Err(guard("the node is held until an operator recovers it")),
            },
            Cause::SetAdmin => {
                if self.session.is_some() {
                    return Err(guard("the node is held by a session; release it first"));
                }
                n.hold_until = None;
                n.installed_at = None;
            }
            Cause::Recovered => {
                if self.session.is_some() {
                    return Err(guard("the node is held by a session; release it first"));
                }
                n.hold_until = None;
                n.fail_reason = None;
                n.installed_at = None;
            }
            Cause::PoweredDown => {
                n.installed_at = None;
                n.power = PowerState::Off;
            }
            Cause::PowerMismatch { observed } | Cause::PowerObserved { observed } => {
                n.power = observed;
            }
        }
        if to != S::Failed {
            n.fail_reason = None;
            n.hold_until = None;
        }
        if matches!(to, S::Active | S::Reserved | S::Failed) {
            n.image = if to == S::Failed { self.image.clone() } else { None };
        }
        if to != self.state {
            n.state_since = now;
        }
        n.state = to;
        n.version = self.version + 1;
        let event = Event {
            seq: 0,
            node: self.id,
            from: self.state,
            to,
            cause: kind,
            detail,
            actor,
            session: n.session.clone().or(session_before),
            at: now,
        };
        Ok((n, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, NewNode};

    fn node(state: NodeState) -> Node {
        let mut n = NewNode::new("n1.example", Arch::X86_64).into_node(NodeId(1), Timestamp(0));
        n.state = state;
        n
    }

    fn pool() -> PoolKey {
        PoolKey::new("7", Arch::X86_64, None)
    }

    fn cause_of(kind: CauseKind) -> Cause {
        match kind {
            CauseKind::InstallStarted => Cause::InstallStarted { image: pool(), why: "test".into() },
            CauseKind::InstallRestarted => Cause::InstallRestarted,
            CauseKind::InstallAttemptFailed => Cause::InstallAttemptFailed { reason: "x".into() },
            CauseKind::InstallSucceeded => Cause::InstallSucceeded { host_key: None },
            CauseKind::InstallFailed => Cause::InstallFailed { reason: "x".into(), retry_at: None },
            CauseKind::Allocated => Cause::Allocated { session: SessionId("s".into()) },
            CauseKind::Prepared => Cause::Prepared,
            CauseKind::Delivered => Cause::Delivered { session: SessionId("s".into()) },
            CauseKind::PrepareFailed => Cause::PrepareFailed { reason: "x".into(), retry_at: None },
            CauseKind::AllocationAborted => Cause::AllocationAborted { reason: "x".into() },
            CauseKind::Released => Cause::Released,
            CauseKind::FailedByUser => Cause::FailedByUser { hold_until: Timestamp(100) },
            CauseKind::HoldExpired => Cause::HoldExpired,
            CauseKind::SetAdmin => Cause::SetAdmin,
            CauseKind::Recovered => Cause::Recovered,
            CauseKind::PoweredDown => Cause::PoweredDown,
            CauseKind::PowerMismatch => Cause::PowerMismatch { observed: PowerState::Off },
            CauseKind::PowerObserved => Cause::PowerObserved { observed: PowerState::On },
            CauseKind::SessionExpired => Cause::SessionExpired,
            CauseKind::Added => unreachable!("not a transition"),
        }
    }

    /// A node in `state` with whatever circumstances make the table's
    /// transitions pass their guards (a session where one is required...).
    fn node_for(state: NodeState, kind: CauseKind) -> Node {
        let mut n = node(state);
        match (state, kind) {
            (S::Failed, CauseKind::Released) | (S::Deployed, _) | (S::Contextualizing, _) => {
                n.session = Some(SessionId("s".into()))
            }
            (S::Failed, CauseKind::HoldExpired) => n.hold_until = Some(Timestamp(5)),
            _ => {}
        }
        n
    }

    #[test]
    fn every_legal_transition_applies_and_records_an_event() {
        let mut count = 0;
        for (kind, froms, to) in TRANSITIONS {
            for &from in *froms {
                let n = node_for(from, *kind);
                let (after, ev) = n
                    .apply(cause_of(*kind), Actor::Operator, Timestamp(10))
                    .unwrap_or_else(|e| panic!("{kind} from {from}: {e}"));
                let expect = to.unwrap_or(from);
                assert_eq!(after.state, expect, "{kind} from {from}");
                assert_eq!(after.version, n.version + 1);
                assert_eq!((ev.from, ev.to, ev.cause, ev.at), (from, expect, *kind, Timestamp(10)));
                assert_eq!(ev.node, n.id);
                count += 1;
            }
        }
        assert!(count >= 28, "table unexpectedly small: {count}");
    }

    #[test]
    fn every_illegal_transition_is_a_typed_error() {
        let mut refused = 0;
        for kind in CauseKind::ALL.into_iter().filter(|k| *k != CauseKind::Added) {
            for from in NodeState::ALL {
                if target(from, kind).is_some() {
                    continue;
                }
                let n = node_for(from, kind);
                let err = n.apply(cause_of(kind), Actor::Operator, Timestamp(10)).unwrap_err();
                assert_eq!(err, TransitionError::Illegal { hostname: "n1.example".into(), from, cause: kind });
                refused += 1;
            }
        }
        assert!(refused > 60);
    }

    #[test]
    fn guards_refuse_with_reasons() {
        // A Failed node not held by a session cannot be "released".
        let err = node(S::Failed).apply(Cause::Released, Actor::Operator, Timestamp(1)).unwrap_err();
        assert!(matches!(err, TransitionError::Guard { cause: CauseKind::Released, .. }));
        // The hold must have run out.
        let mut n = node(S::Failed);
        n.hold_until = Some(Timestamp(100));
        assert!(n.apply(Cause::HoldExpired, Actor::Reconciler, Timestamp(99)).is_err());
        assert!(n.apply(Cause::HoldExpired, Actor::Reconciler, Timestamp(100)).is_ok());
        // Held until an operator acts.
        assert!(node(S::Failed).apply(Cause::HoldExpired, Actor::Reconciler, Timestamp(1)).is_err());
        // Not while held by a session.
        let mut held = node(S::Failed);
        held.session = Some(SessionId("s".into()));
        assert!(held.apply(Cause::SetAdmin, Actor::Operator, Timestamp(1)).is_err());
        assert!(held.apply(Cause::Recovered, Actor::Operator, Timestamp(1)).is_err());
        // Hardware must fit the image.
        let mut arm = node(S::Active);
        arm.hardware_arch = Arch::Aarch64;
        let e = arm.apply(Cause::InstallStarted { image: pool(), why: "t".into() }, Actor::Reconciler, Timestamp(1));
        assert!(matches!(e, Err(TransitionError::Guard { .. })));
    }

    #[test]
    fn allocation_counts_use_and_release_clears() {
        let mut n = node(S::Ready);
        n.image = Some(pool());
        n.installed_at = Some(Timestamp(1));
        let (n, _) = n
            .apply(Cause::Allocated { session: SessionId("s1".into()) }, Actor::Key(crate::KeyId(1)), Timestamp(2))
            .unwrap();
        assert_eq!((n.used_count, n.session.as_ref().map(|s| s.as_str())), (1, Some("s1")));
        let (n, _) = n.apply(Cause::Prepared, Actor::Key(crate::KeyId(1)), Timestamp(3)).unwrap();
        let (n, ev) = n
            .apply(Cause::FailedByUser { hold_until: Timestamp(50) }, Actor::Key(crate::KeyId(1)), Timestamp(4))
            .unwrap();
        assert_eq!((n.state, n.hold_until), (S::Failed, Some(Timestamp(50))));
        assert_eq!(ev.session.as_ref().map(|s| s.as_str()), Some("s1"));
        let (n, ev) = n.apply(Cause::Released, Actor::Key(crate::KeyId(1)), Timestamp(5)).unwrap();
        assert_eq!((n.state, n.session.clone(), n.image.clone(), n.hold_until), (S::Active, None, None, None));
        assert_eq!(ev.session.as_ref().map(|s| s.as_str()), Some("s1"), "history keeps the session");
        assert_eq!(n.state_since, Timestamp(5));
    }

    #[test]
    fn names_round_trip() {
        for s in NodeState::ALL {
            assert_eq!(s.as_str().parse::<NodeState>(), Ok(s));
        }
        for c in CauseKind::ALL {
            assert_eq!(c.as_str().parse::<CauseKind>(), Ok(c));
        }
    }
}

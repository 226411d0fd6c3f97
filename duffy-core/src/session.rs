//! The session state machine: one table of legal transitions, each caused
//! by a named event, as for nodes ([`crate::state`]).
//!
//! [`Session::apply`] is the only way the core changes a session's state.
//! It is pure: it returns the session as it must be written (version
//! bumped) and a [`SessionEvent`] describing the change, or a typed
//! [`SessionTransitionError`].
//!
//! Session events are not stored: every node event already names its
//! session, so a session's history is the history of its nodes, and the
//! hot path writes one row per change, not two. The engine logs them.

use std::fmt;

use crate::model::{Session, SessionId, SessionState};
use crate::time::Timestamp;

/// The named events that move a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCause {
    /// Every node was prepared: the nodes are handed over, the lease runs
    /// until `lease_until`.
    Delivered {
        /// End of the lease.
        lease_until: Timestamp,
    },
    /// The allocation failed or was interrupted: nothing was handed over.
    Aborted {
        /// Why.
        reason: String,
    },
    /// The job released the session with `/Node/done`.
    Released,
    /// The job called `/Node/fail`: the nodes are held for debugging.
    FailedByUser {
        /// End of the hold.
        hold_until: Timestamp,
    },
    /// A failed session's hold ran out; its nodes are reclaimed.
    HoldExpired,
    /// The job asked for more time: the expiry moves to `until`. Refused
    /// once the session has expired, for an instant not after the current
    /// expiry, and past `max_until` (the maximum lifetime, `None`: no
    /// maximum) with [`SessionTransitionError::BeyondMaxLifetime`].
    Extended {
        /// The new expiry.
        until: Timestamp,
        /// The latest expiry the policy allows for this session.
        max_until: Option<Timestamp>,
    },
    /// A delivered session's expiry passed: it ends and its nodes are
    /// reclaimed (reinstalled). A session in Fail keeps its hold instead.
    Expired,
}

/// The name of a [`SessionCause`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each mirrors the documented SessionCause variant of the same name
pub enum SessionCauseKind {
    Delivered,
    Aborted,
    Released,
    FailedByUser,
    HoldExpired,
    Extended,
    Expired,
}

impl SessionCauseKind {
    /// Stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionCauseKind::Delivered => "delivered",
            SessionCauseKind::Aborted => "aborted",
            SessionCauseKind::Released => "released",
            SessionCauseKind::FailedByUser => "failed_by_user",
            SessionCauseKind::HoldExpired => "hold_expired",
            SessionCauseKind::Extended => "extended",
            SessionCauseKind::Expired => "expired",
        }
    }
}

impl fmt::Display for SessionCauseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SessionCause {
    /// The event name.
    pub fn kind(&self) -> SessionCauseKind {
        match self {
            SessionCause::Delivered { .. } => SessionCauseKind::Delivered,
            SessionCause::Aborted { .. } => SessionCauseKind::Aborted,
            SessionCause::Released => SessionCauseKind::Released,
            SessionCause::FailedByUser { .. } => SessionCauseKind::FailedByUser,
            SessionCause::HoldExpired => SessionCauseKind::HoldExpired,
            SessionCause::Extended { .. } => SessionCauseKind::Extended,
            SessionCause::Expired => SessionCauseKind::Expired,
        }
    }
}

use SessionState as S;

/// The transition table: for each event, the states it may leave and the
/// state it enters.
pub const SESSION_TRANSITIONS: &[(SessionCauseKind, &[SessionState], SessionState)] = &[
    (SessionCauseKind::Delivered, &[S::Allocating], S::Prod),
    (SessionCauseKind::Aborted, &[S::Allocating], S::Aborted),
    (SessionCauseKind::Released, &[S::Prod, S::Fail], S::Done),
    (SessionCauseKind::FailedByUser, &[S::Prod], S::Fail),
    (SessionCauseKind::HoldExpired, &[S::Fail], S::Done),
    (SessionCauseKind::Extended, &[S::Prod], S::Prod),
    (SessionCauseKind::Expired, &[S::Prod], S::Done),
];

/// Looks up `(from, cause)` in [`SESSION_TRANSITIONS`].
pub fn session_target(from: SessionState, cause: SessionCauseKind) -> Option<SessionState> {
    SESSION_TRANSITIONS.iter().find(|(c, froms, _)| *c == cause && froms.contains(&from)).map(|(_, _, to)| *to)
}

/// Why a session transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionTransitionError {
    /// The table has no such transition.
    #[error("session {id} is {from}; {cause} is not allowed from {from}")]
    Illegal {
        /// The session.
        id: SessionId,
        /// Its state.
        from: &'static str,
        /// The event refused.
        cause: SessionCauseKind,
    },
    /// The transition exists but the session's circumstances forbid it.
    #[error("session {id}: {cause} refused: {why}")]
    Guard {
        /// The session.
        id: SessionId,
        /// The event refused.
        cause: SessionCauseKind,
        /// What stood in the way.
        why: &'static str,
    },
    /// An extension past the session's maximum lifetime.
    #[error(
        "session {id}: cannot extend to {requested}: the maximum lifetime ends at {max_until}; \
         extend to {max_until} at most"
    )]
    BeyondMaxLifetime {
        /// The session.
        id: SessionId,
        /// The expiry asked for.
        requested: Timestamp,
        /// The latest expiry allowed.
        max_until: Timestamp,
    },
}

/// A session's change, for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    /// The session.
    pub session: SessionId,
    /// State before.
    pub from: SessionState,
    /// State after.
    pub to: SessionState,
    /// The event's name.
    pub cause: SessionCauseKind,
    /// When.
    pub at: Timestamp,
}

impl Session {
    /// Applies `cause` at `now`: the session as it must be written (version
    /// bumped, times and reasons set) and its event.
    ///
    /// Guards beyond the table: a hold ends only once it has run out; a
    /// session expires only once its expiry has passed; an extension must
    /// come before the expiry, move it later, and stay within the maximum
    /// lifetime. Delivery sets the expiry to the lease's end.
    pub fn apply(
        &self,
        cause: SessionCause,
        now: Timestamp,
    ) -> Result<(Session, SessionEvent), SessionTransitionError> {
        let kind = cause.kind();
        let to = session_target(self.state, kind).ok_or_else(|| SessionTransitionError::Illegal {
            id: self.id.clone(),
            from: self.state.as_str(),
            cause: kind,
        })?;
        let mut s = self.clone();
        match cause {
            SessionCause::Delivered { lease_until } => {
                s.delivered_at = Some(now);
                s.lease_until = Some(lease_until);
                s.expires_at = Some(lease_until);
            }
            SessionCause::Aborted { reason } => {
                s.ended_at = Some(now);
                s.end_reason = Some(reason);
            }
            SessionCause::Released => {
                s.ended_at = Some(now);
            }
            SessionCause::FailedByUser { hold_until } => {
                s.hold_until = Some(hold_until);
            }
            SessionCause::HoldExpired => {
                if self.hold_until.is_none_or(|t| t > now) {
                    return Err(SessionTransitionError::Guard {
                        id: self.id.clone(),
                        cause: kind,
                        why: "the hold has not run out",
                    });
                }
                s.ended_at = Some(now);
                s.end_reason = Some("fail hold expired; nodes reclaimed".into());
            }
            SessionCause::Extended { until, max_until } => {
                let guard = |why| SessionTransitionError::Guard { id: self.id.clone(), cause: kind, why };
                match self.expires_at {
                    None => return Err(guard("the session has no expiry")),
                    Some(t) if t <= now => return Err(guard("the session has expired")),
                    Some(t) if until <= t => return Err(guard("an extension must end after the current expiry")),
                    Some(_) => {}
                }
                if let Some(max_until) = max_until.filter(|m| until > *m) {
                    return Err(SessionTransitionError::BeyondMaxLifetime {
                        id: self.id.clone(),
                        requested: until,
                        max_until,
                    });
                }
                s.expires_at = Some(until);
            }
            SessionCause::Expired => {
                if self.expires_at.is_none_or(|t| t > now) {
                    return Err(SessionTransitionError::Guard {
                        id: self.id.clone(),
                        cause: kind,
                        why: "the session has not expired",
                    });
                }
                s.ended_at = Some(now);
                s.end_reason = Some("lifetime expired; nodes reclaimed".into());
            }
        }
        s.state = to;
        s.version = self.version + 1;
        let event = SessionEvent { session: self.id.clone(), from: self.state, to, cause: kind, at: now };
        Ok((s, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, KeyId, PoolKey};

    const ALL_STATES: [SessionState; 5] = [S::Allocating, S::Prod, S::Fail, S::Done, S::Aborted];

    fn session(state: SessionState) -> Session {
        Session {
            id: SessionId("s".into()),
            project: "p".into(),
            key_id: KeyId(1),
            state,
            pool: PoolKey::new("7", Arch::X86_64, None),
            nodes: vec![],
            created_at: Timestamp(0),
            delivered_at: None,
            lease_until: None,
            expires_at: Some(Timestamp(10)),
            hold_until: Some(Timestamp(5)),
            ended_at: None,
            end_reason: None,
            version: 3,
        }
    }

    fn cause_of(kind: SessionCauseKind) -> SessionCause {
        match kind {
            SessionCauseKind::Delivered => SessionCause::Delivered { lease_until: Timestamp(100) },
            SessionCauseKind::Aborted => SessionCause::Aborted { reason: "x".into() },
            SessionCauseKind::Released => SessionCause::Released,
            SessionCauseKind::FailedByUser => SessionCause::FailedByUser { hold_until: Timestamp(50) },
            SessionCauseKind::HoldExpired => SessionCause::HoldExpired,
            SessionCauseKind::Extended => SessionCause::Extended { until: Timestamp(20), max_until: None },
            SessionCauseKind::Expired => SessionCause::Expired,
        }
    }

    /// A session in `from` whose circumstances pass `kind`'s guards at
    /// time 10 (an extension needs an expiry still ahead).
    fn session_for(from: SessionState, kind: SessionCauseKind) -> Session {
        let mut s = session(from);
        if kind == SessionCauseKind::Extended {
            s.expires_at = Some(Timestamp(15));
        }
        s
    }

    #[test]
    fn every_pair_follows_the_table() {
        for (kind, _, _) in SESSION_TRANSITIONS {
            for from in ALL_STATES {
                let r = session_for(from, *kind).apply(cause_of(*kind), Timestamp(10));
                match session_target(from, *kind) {
                    Some(to) => {
                        let (s, e) = r.unwrap_or_else(|e| panic!("{from:?} {kind}: {e}"));
                        assert_eq!((s.state, s.version, e.from, e.to, e.cause), (to, 4, from, to, *kind));
                    }
                    None => assert!(
                        matches!(r, Err(SessionTransitionError::Illegal { .. })),
                        "{from:?} {kind} should be illegal"
                    ),
                }
            }
        }
    }

    #[test]
    fn dead_sessions_never_move() {
        for kind in SESSION_TRANSITIONS.iter().map(|(k, _, _)| *k) {
            for from in [S::Done, S::Aborted] {
                assert!(session_target(from, kind).is_none(), "{from:?} {kind}");
            }
        }
    }

    #[test]
    fn a_hold_ends_only_once_it_ran_out() {
        let s = session(S::Fail);
        assert!(matches!(s.apply(SessionCause::HoldExpired, Timestamp(4)), Err(SessionTransitionError::Guard { .. })));
        let (done, _) = s.apply(SessionCause::HoldExpired, Timestamp(5)).unwrap();
        assert_eq!((done.state, done.ended_at), (S::Done, Some(Timestamp(5))));
    }

    #[test]
    fn delivery_and_failure_record_their_times() {
        let (p, _) =
            session(S::Allocating).apply(SessionCause::Delivered { lease_until: Timestamp(70) }, Timestamp(7)).unwrap();
        assert_eq!((p.delivered_at, p.lease_until), (Some(Timestamp(7)), Some(Timestamp(70))));
        let (f, _) = p.apply(SessionCause::FailedByUser { hold_until: Timestamp(90) }, Timestamp(8)).unwrap();
        assert_eq!((f.state, f.hold_until), (S::Fail, Some(Timestamp(90))));
        let (a, _) = session(S::Allocating).apply(SessionCause::Aborted { reason: "r".into() }, Timestamp(9)).unwrap();
        assert_eq!((a.ended_at, a.end_reason.as_deref()), (Some(Timestamp(9)), Some("r")));
    }

    #[test]
    fn delivery_sets_the_expiry_to_the_lease() {
        let mut s = session(S::Allocating);
        s.expires_at = None;
        let (p, _) = s.apply(SessionCause::Delivered { lease_until: Timestamp(70) }, Timestamp(7)).unwrap();
        assert_eq!((p.lease_until, p.expires_at), (Some(Timestamp(70)), Some(Timestamp(70))));
    }

    #[test]
    fn extensions_move_the_expiry_not_the_lease() {
        let mut s = session(S::Prod);
        s.lease_until = Some(Timestamp(100));
        s.expires_at = Some(Timestamp(100));
        let ext =
            |until, max: Option<i64>| SessionCause::Extended { until: Timestamp(until), max_until: max.map(Timestamp) };
        let (e, ev) = s.apply(ext(150, Some(200)), Timestamp(50)).unwrap();
        assert_eq!(
            (e.state, e.lease_until, e.expires_at, e.version),
            (S::Prod, Some(Timestamp(100)), Some(Timestamp(150)), 4)
        );
        assert_eq!((ev.from, ev.to, ev.cause), (S::Prod, S::Prod, SessionCauseKind::Extended));
        // Up to the maximum exactly, and without a maximum as far as asked.
        assert_eq!(e.apply(ext(200, Some(200)), Timestamp(60)).unwrap().0.expires_at, Some(Timestamp(200)));
        assert_eq!(e.apply(ext(9_999, None), Timestamp(60)).unwrap().0.expires_at, Some(Timestamp(9_999)));
        // Past the maximum: a typed error that says the maximum.
        let err = e.apply(ext(201, Some(200)), Timestamp(60)).unwrap_err();
        assert_eq!(
            err,
            SessionTransitionError::BeyondMaxLifetime {
                id: SessionId("s".into()),
                requested: Timestamp(201),
                max_until: Timestamp(200)
            }
        );
        assert!(err.to_string().contains("maximum lifetime ends at"), "{err}");
        // Not earlier than (or at) the current expiry, not once expired.
        for (until, now) in [(150, 60), (120, 60), (300, 150), (300, 151)] {
            assert!(
                matches!(e.apply(ext(until, None), Timestamp(now)), Err(SessionTransitionError::Guard { .. })),
                "extend to {until} at {now}"
            );
        }
        // Only a Prod session.
        for from in [S::Allocating, S::Fail, S::Done, S::Aborted] {
            let mut x = session(from);
            x.expires_at = Some(Timestamp(100));
            assert!(matches!(x.apply(ext(150, None), Timestamp(50)), Err(SessionTransitionError::Illegal { .. })));
        }
    }

    #[test]
    fn a_session_expires_only_once_its_expiry_passed() {
        let mut s = session(S::Prod);
        s.expires_at = Some(Timestamp(100));
        assert!(matches!(s.apply(SessionCause::Expired, Timestamp(99)), Err(SessionTransitionError::Guard { .. })));
        let (d, ev) = s.apply(SessionCause::Expired, Timestamp(100)).unwrap();
        assert_eq!((d.state, d.ended_at, ev.cause), (S::Done, Some(Timestamp(100)), SessionCauseKind::Expired));
        assert!(d.end_reason.as_deref().is_some_and(|r| r.contains("expired")));
        s.expires_at = None;
        assert!(matches!(s.apply(SessionCause::Expired, Timestamp(1_000)), Err(SessionTransitionError::Guard { .. })));
        // A failed session keeps its hold: expiry is not a transition from Fail.
        let mut f = session(S::Fail);
        f.expires_at = Some(Timestamp(1));
        assert!(matches!(f.apply(SessionCause::Expired, Timestamp(100)), Err(SessionTransitionError::Illegal { .. })));
    }
}

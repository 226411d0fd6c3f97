//! # duffy-core
//!
//! The pure core of Duffy, the service that keeps a farm of test machines
//! installed and hands them to CI jobs: the node state machine, the pool
//! planner, session leases, the engine and the reconciler, behind the
//! traits that backends implement ([`Store`], [`PowerController`],
//! [`Installer`], [`Clock`]).
//!
//! The core performs no I/O and never reads the OS clock: time comes from
//! an injected [`Clock`] and every side effect goes through a trait. With
//! the `testkit` feature it ships an in-memory store, a simulated farm, a
//! manual clock and the `Store` conformance suite.

pub mod auth;
pub mod engine;
pub mod installer;
pub mod keys;
pub mod model;
pub mod planner;
pub mod policy;
pub mod power;
pub mod reconciler;
pub mod session;
pub mod state;
pub mod store;
pub mod time;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use auth::{hash_api_key, verify_api_key};
pub use engine::{
    Allocation, Engine, EngineBuilder, EngineError, NodeRequest, Overtime, Principal, SessionIds, UuidSessionIds,
};
pub use installer::{Blame, Contextualizer, InstallError, Installed, Installer, PrepareError};
pub use model::*;
pub use planner::{Plan, PlanInput, PlannedInstall, plan};
pub use policy::{Policy, RateLimit};
pub use power::{BootDevice, PowerAction, PowerController, PowerError, PowerErrorKind};
pub use reconciler::{OpDone, OpOutcome, PassReport, Reconciler};
pub use session::{SESSION_TRANSITIONS, SessionCause, SessionCauseKind, SessionEvent, SessionTransitionError};
pub use state::{Cause, CauseKind, Event, NodeState, TransitionError};
pub use store::{
    Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Guard, HandBack, HandBackKind,
    HandBackRefusal, NodeWrite, SessionWrite, Store, StoreError,
};
pub use time::{Clock, Timestamp};

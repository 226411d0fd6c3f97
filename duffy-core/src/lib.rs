//! # duffy-core
//!
//! The pure core of Duffy, the service that keeps a farm of test machines
//! installed and hands them to CI jobs: the node state machine, the pool
//! planner, session leases, the engine and the reconciler, behind the
//! traits that backends implement ([`Store`], [`PowerController`],
//! [`Installer`], [`Clock`]).
//!
//! The core performs no I/O and never reads the OS clock (but in the
//! opt-in `clock` module, which an embedder injects): time comes from an
//! injected [`Clock`] and every side effect goes through a trait.
//!
//! Besides the engine it ships, for embedders:
//! - [`mem::MemStore`], the in-memory [`Store`] (always compiled);
//! - `sim` (feature `sim`), the simulated farm that `duffy serve` runs on
//!   by default;
//! - `clock::SystemClock` (feature `tokio`), wall time and tokio timers:
//!   the one place the core reads the OS clock;
//! - `testkit` (feature `testkit`, for tests only), the manual clock, the
//!   deterministic harness, the store wrapper with hooks and the `Store`
//!   conformance suite;
//! - `mock` (feature `mock`), mockall mocks of [`Store`],
//!   [`PowerController`], [`Installer`], [`Contextualizer`] and [`Clock`],
//!   for embedders' unit tests.

pub mod audit;
pub mod auth;
pub mod dump;
pub mod engine;
pub mod installer;
pub mod keys;
pub mod mem;
pub mod model;
pub mod planner;
pub mod policy;
pub mod power;
pub mod queue;
pub mod reconciler;
pub mod session;
pub mod sessions;
pub mod state;
pub mod store;
pub mod tickets;
pub mod time;

#[cfg(feature = "tokio")]
pub mod clock;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "testkit")]
pub mod testkit;

#[cfg(feature = "mock")]
pub mod mock;

pub use auth::{hash_api_key, verify_api_key};
pub use engine::{
    Allocation, Engine, EngineBuilder, EngineError, NodeRequest, Overtime, Principal, SessionIds, UuidSessionIds,
};
pub use installer::{Blame, Contextualizer, InstallError, Installed, Installer, PrepareError, SessionContext};
pub use model::*;
pub use planner::{Plan, PlanInput, PlannedInstall, plan};
pub use policy::{Policy, RateLimit};
pub use power::{BootDevice, PowerAction, PowerController, PowerError, PowerErrorKind};
pub use queue::{QueueFull, QueuedRequest, RequestId, WaitQueue};
pub use reconciler::{AttemptFailure, OpDone, OpOutcome, PassReport, Reconciler, ReconcilerObserver};
pub use session::{SESSION_TRANSITIONS, SessionCause, SessionCauseKind, SessionEvent, SessionTransitionError};
pub use sessions::{Created, PoolStatus, QueueState, QueueStatus, SessionRequest, SessionScope, SessionView};
pub use state::{Cause, CauseKind, Event, NodeState, TransitionError};
pub use store::{
    Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Guard, HandBack, HandBackKind,
    HandBackRefusal, NodeCount, NodeGroup, NodeWrite, SessionWrite, StorageFault, Store, StoreError, StoreHealth,
};
pub use tickets::InstallTickets;
pub use time::{Clock, OutOfRange, ParseTimestampError, Timestamp};

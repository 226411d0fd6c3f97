//! The test kit (cargo feature `testkit`): test aids, for this workspace's
//! tests and an embedder's. Nothing in it belongs in a production build;
//! the product's own in-memory store and simulated farm are
//! [`crate::mem`] and [`crate::sim`].
//!
//! - [`ManualClock`]: time that moves only when the test says so.
//! - [`InterceptStore`]: any store behind hooks that can fail or delay
//!   each call, or ([`InterceptStore::yielding`]) yield to the executor a
//!   seeded number of times around every call, so that concurrent
//!   operations interleave at every `await`.
//! - [`Harness`]: an in-memory store, a simulated farm, the engine and
//!   reconciler on one thread and a manual clock, for deterministic
//!   simulations.
//! - [`conformance`]: the suite every `Store` backend must pass, and
//!   [`race`]: the 64-task race each backend runs (through several stores
//!   on one database where it has replicas).

mod clock;
pub mod conformance;
mod harness;
mod intercept;
pub mod race;
mod yielding;

pub use clock::ManualClock;
pub use harness::Harness;
pub use intercept::{AfterHook, Hook, InterceptStore};
pub use yielding::Yields;

//! The test kit (cargo feature `testkit`): everything needed to run the
//! whole system in one process, deterministically, without hardware.
//!
//! - [`MemStore`]: an in-memory [`Store`](crate::Store).
//! - [`ManualClock`]: time that moves only when the test says so.
//! - [`SimFarm`]: simulated power and installer with seeded latency and
//!   failure rates.
//! - [`SeededSessionIds`]: reproducible session ids.
//! - [`InterceptStore`]: any store behind hooks that can fail or delay
//!   each call, or ([`InterceptStore::yielding`]) yield to the executor a
//!   seeded number of times around every call, so that concurrent
//!   operations interleave at every `await`.
//! - [`Harness`]: all of the above plus the engine and reconciler on one
//!   thread, for deterministic simulations.
//! - [`conformance`]: the suite every `Store` backend must pass.

mod clock;
pub mod conformance;
mod harness;
mod intercept;
mod mem_store;
mod sim;
mod yielding;

pub use clock::ManualClock;
pub use harness::Harness;
pub use intercept::{AfterHook, Hook, InterceptStore};
pub use mem_store::MemStore;
pub use sim::{SeededSessionIds, SimConfig, SimFarm};
pub use yielding::Yields;

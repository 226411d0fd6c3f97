//! Mocks of the traits the core drives (cargo feature `mock`), generated
//! by [mockall](https://docs.rs/mockall) from the trait declarations
//! themselves, so they never drift from them: [`MockStore`],
//! [`MockPowerController`], [`MockInstaller`], [`MockContextualizer`] and
//! [`MockClock`].
//!
//! They are for unit tests of error paths, here and in embedders: make a
//! store refuse a commit, a BMC fail on its third call, a contextualizer
//! refuse a project, and assert what the engine then did and did not call
//! (`times`, `never`, `withf`, a `mockall::Sequence`). Behaviour over time
//! is better tested with the real parts (the test kit's in-memory store,
//! simulated farm and manual clock, or a real backend).
//!
//! An `async` trait method is mocked as returning its output directly: the
//! future the engine awaits is ready at once. A call that must *hang*
//! needs a hand-written implementation. [`Clock::sleep_until`] returns its
//! future, so a [`MockClock`] decides when each sleep ends: [`sleep_over`]
//! for a deadline to pass at once, [`sleep_forever`] for one that never
//! comes.
//!
//! ```
//! use std::sync::Arc;
//!
//! use duffy_core::mock::{MockClock, MockStore, sleep_over};
//! use duffy_core::{Clock, Store, StoreError, Timestamp};
//!
//! // A clock stopped at one instant, whose every deadline has passed.
//! let mut clock = MockClock::new();
//! clock.expect_now().return_const(Timestamp::from_millis(1_000));
//! clock.expect_sleep_until().returning(|_| sleep_over());
//! let clock: Arc<dyn Clock> = Arc::new(clock);
//! futures::executor::block_on(clock.sleep_until(Timestamp::from_millis(60_000)));
//!
//! // A store that is closed the first time it is asked, and never asked
//! // again (a second call panics, and so does dropping the mock before
//! // the first).
//! let mut store = MockStore::new();
//! store.expect_paused().times(1).returning(|| Err(StoreError::Closed));
//! let store: Arc<dyn Store> = Arc::new(store);
//! let err = futures::executor::block_on(store.paused()).unwrap_err();
//! assert_eq!(err.to_string(), "the store is closed");
//! ```
//!
//! [`Clock::sleep_until`]: crate::Clock::sleep_until

pub use crate::installer::{MockContextualizer, MockInstaller};
pub use crate::power::MockPowerController;
pub use crate::store::MockStore;
pub use crate::tickets::MockInstallTickets;
use crate::time::BoxFuture;
pub use crate::time::MockClock;

/// A sleep whose deadline has already passed: what a [`MockClock`]'s
/// `sleep_until` returns to make a timeout or a backoff end at once.
pub fn sleep_over() -> BoxFuture<()> {
    Box::pin(std::future::ready(()))
}

/// A sleep that never ends: what a [`MockClock`]'s `sleep_until` returns
/// for a deadline the test must never reach.
pub fn sleep_forever() -> BoxFuture<()> {
    Box::pin(std::future::pending())
}

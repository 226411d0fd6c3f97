//! Yielding to the executor around every store call, so that concurrent
//! engine operations interleave.
//!
//! The engine's correctness rests on its read → compare-and-set windows
//! being safe whatever runs in between. [`MemStore`](crate::mem::MemStore)
//! answers every call without ever returning `Pending`, so on a
//! single-threaded executor one operation runs from one clock wait to the
//! next without anyone else getting a turn: the windows never interleave
//! and no test can see what happens when they do.
//! [`InterceptStore::yielding`] yields a seeded-random number of times
//! before and after each inner call, which lets every other ready task run
//! at every `await` on the store, in an order that the seed fixes (on a
//! deterministic executor such as the [`Harness`](super::Harness)'s, the
//! same seed gives the same interleaving).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::intercept::InterceptStore;
use crate::store::Store;
use crate::time::BoxFuture;

/// The yields of one [`InterceptStore::yielding`] store: the seeded
/// sequence of counts, and how many it has made.
#[derive(Debug)]
pub struct Yields {
    rng: Mutex<ChaCha8Rng>,
    max_yields: u32,
    made: AtomicU64,
}

impl Yields {
    /// How many times the store has yielded so far: a test can check that
    /// its operations really were interleaved.
    pub fn made(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }

    fn pause(self: &Arc<Self>) -> BoxFuture<()> {
        let n = if self.max_yields == 0 {
            0
        } else {
            self.rng.lock().unwrap_or_else(|p| p.into_inner()).gen_range(0..=self.max_yields)
        };
        let me = self.clone();
        Box::pin(async move {
            for _ in 0..n {
                YieldNow { yielded: false }.await;
                me.made.fetch_add(1, Ordering::Relaxed);
            }
        })
    }
}

impl InterceptStore {
    /// Wraps `inner` so that before and after every call it yields to the
    /// executor between 0 and `max_yields` times (inclusive), drawn from a
    /// generator seeded with `seed` (0 never yields). Answers are the
    /// inner store's, unchanged.
    pub fn yielding(inner: Arc<dyn Store>, seed: u64, max_yields: u32) -> (InterceptStore, Arc<Yields>) {
        let yields =
            Arc::new(Yields { rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)), max_yields, made: AtomicU64::new(0) });
        let before = yields.clone();
        let after = yields.clone();
        let store = InterceptStore::new(
            inner,
            Arc::new(move |_| {
                let pause = before.pause();
                Box::pin(async move {
                    pause.await;
                    Ok(())
                })
            }),
        )
        .with_after(Arc::new(move |_| after.pause()));
        (store, yields)
    }
}

/// Returns `Pending` once after waking its own task, so the executor runs
/// every other ready task before coming back. Written here rather than
/// taken from a runtime (`tokio::task::yield_now`) because the test kit's
/// harness runs on `futures`' `LocalPool`, and the wrapper must work on any
/// executor.
struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

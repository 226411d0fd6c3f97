use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::time::{BoxFuture, Clock, Timestamp};

#[derive(Debug, Default)]
struct State {
    now: Timestamp,
    next_id: u64,
    // (deadline, registration order) -> waker: woken in deadline order.
    sleepers: BTreeMap<(Timestamp, u64), Option<Waker>>,
}

/// A clock that moves only when told to. Sleeps complete when
/// [`ManualClock::advance`] or [`ManualClock::set`] passes their deadline,
/// which makes a simulated day run in milliseconds and every run
/// reproducible.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    state: Arc<Mutex<State>>,
}

impl ManualClock {
    /// A clock starting at `start`.
    pub fn new(start: Timestamp) -> Self {
        let c = ManualClock::default();
        c.lock().now = start;
        c
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a bug in this
        // file; keep going with the data as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves time forward by `d`, waking every sleep that is due.
    pub fn advance(&self, d: Duration) {
        let t = self.now().plus(d);
        self.set(t);
    }

    /// Moves time to `t` (never backwards), waking every sleep that is due.
    pub fn set(&self, t: Timestamp) {
        let wakers: Vec<Waker> = {
            let mut s = self.lock();
            if t > s.now {
                s.now = t;
            }
            let now = s.now;
            let due: Vec<_> = s.sleepers.range(..=(now, u64::MAX)).map(|(k, _)| *k).collect();
            due.into_iter().filter_map(|k| s.sleepers.remove(&k).flatten()).collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// The earliest deadline anyone is sleeping until, if any.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.lock().sleepers.keys().next().map(|(t, _)| *t)
    }
}

struct Sleep {
    clock: ManualClock,
    deadline: Timestamp,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.clock.lock();
        if s.now >= self.deadline {
            if let Some(id) = self.id {
                s.sleepers.remove(&(self.deadline, id));
            }
            return Poll::Ready(());
        }
        let id = match self.id {
            Some(id) => id,
            None => {
                s.next_id += 1;
                s.next_id
            }
        };
        s.sleepers.insert((self.deadline, id), Some(cx.waker().clone()));
        drop(s);
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.clock.lock().sleepers.remove(&(self.deadline, id));
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.lock().now
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<()> {
        Box::pin(Sleep { clock: self.clone(), deadline, id: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn sleeps_complete_only_when_time_passes() {
        let c = ManualClock::new(Timestamp(1000));
        let mut a = c.sleep_until(Timestamp(1500));
        let mut b = crate::time::sleep(&c, Duration::from_millis(100));
        assert!(a.as_mut().now_or_never().is_none());
        assert!(b.as_mut().now_or_never().is_none());
        assert_eq!(c.next_deadline(), Some(Timestamp(1100)));
        c.advance(Duration::from_millis(100));
        assert!(b.as_mut().now_or_never().is_some());
        assert_eq!(c.next_deadline(), Some(Timestamp(1500)));
        drop(a);
        assert_eq!(c.next_deadline(), None, "a dropped sleep deregisters");
        c.set(Timestamp(10));
        assert_eq!(c.now(), Timestamp(1100), "never backwards");
    }
}

//! The production clock: wall time from the OS, sleeps on tokio's timer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use duffy_core::time::BoxFuture;
use duffy_core::{Clock, Timestamp};

/// Wall-clock time (UTC milliseconds) and tokio sleeps. The only place the
/// service reads the OS clock; duffy-core gets its time from here.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Timestamp::from_millis(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<()> {
        let wait = deadline.since(self.now());
        Box::pin(async move {
            if wait > Duration::ZERO {
                tokio::time::sleep(wait).await;
            }
        })
    }
}

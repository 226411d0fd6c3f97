//! The system clock (feature `tokio`): wall time from the OS, sleeps on
//! tokio's timer. This is the clock of an engine that runs real machines.
//!
//! It is the only code in duffy-core that reads the OS clock, and it is
//! compiled only with the `tokio` feature; everything else in the core
//! takes its time from the injected [`Clock`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::time::{BoxFuture, Clock, Timestamp};

/// Wall-clock time (UTC milliseconds) and tokio sleeps. Its sleeps need a
/// tokio runtime with the timer enabled (`enable_time`, or
/// `#[tokio::main]`).
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

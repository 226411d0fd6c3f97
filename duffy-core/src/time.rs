//! Time as the core sees it: a [`Timestamp`] it is given, never one it reads.
//!
//! The core never asks the operating system what time it is. Every operation
//! takes its "now" from an injected [`Clock`], and every wait (install
//! timeouts, retry backoff, the reconciler's tick) is a [`Clock::sleep_until`]
//! future. A test swaps in a manual clock and the whole farm runs
//! deterministically, a simulated day in a second.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::future::{Either, select};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The epoch itself.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// Builds a timestamp from milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus `d`, saturating instead of overflowing.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// This instant minus `d`, saturating instead of overflowing.
    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }

    /// How long after `earlier` this instant is; zero if it is not after it.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

impl fmt::Display for Timestamp {
    /// Formats as an RFC 3339 UTC time with milliseconds, computed without
    /// any OS or timezone call (civil-from-days, proleptic Gregorian).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.rem_euclid(1000);
        let secs = self.0.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", sod / 3600, (sod % 3600) / 60, sod % 60)
    }
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A duration in whole milliseconds, saturating at `i64::MAX`.
pub fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A boxed, sendable future, as returned by [`Clock::sleep_until`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The source of time for everything in the core.
///
/// Production code uses a clock backed by the OS and the async runtime (see
/// `clock::SystemClock`, feature `tokio`); tests use the test kit's `ManualClock`, whose
/// sleeps complete only when the test moves time forward.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// A future that completes once [`Clock::now`] has reached `deadline`.
    /// Completes at once if the deadline is already past.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<()>;
}

/// Sleeps for `d` on `clock`.
pub fn sleep(clock: &dyn Clock, d: Duration) -> BoxFuture<()> {
    clock.sleep_until(clock.now().plus(d))
}

/// Marker error: the operation did not finish before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {0:?}")]
pub struct Elapsed(pub Duration);

/// Runs `fut` with a deadline measured on `clock`.
///
/// The future is dropped (cancelled) when the deadline passes first.
pub async fn timeout<F: Future>(clock: &dyn Clock, d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let sleep = sleep(clock, d);
    let fut = std::pin::pin!(fut);
    match select(fut, sleep).await {
        Either::Left((out, _)) => Ok(out),
        Either::Right(((), _)) => Err(Elapsed(d)),
    }
}

/// Parses a duration as configuration files write it: a number of seconds
/// (`"2"`, `"0.5"`) or a number with a unit, `ms`, `s`, `m`, `h` or `d`
/// (`"500ms"`, `"30s"`, `"10m"`, `"1h"`, `"90d"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        format!("invalid duration {s:?}; use seconds or e.g. \"500ms\", \"30s\", \"10m\", \"1h\", \"90d\"")
    })?;
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("invalid duration {s:?}"))
}

/// Serde helpers for [`Duration`] fields in configuration files: an integer
/// or fractional number of seconds, or a string [`parse_duration`] accepts.
/// Use with `#[serde(deserialize_with = "duffy_core::time::serde_duration::deserialize")]`.
pub mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
        Text(String),
    }

    /// Deserializes a [`Duration`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Duration::from_secs(n)),
            Raw::Float(f) => {
                Duration::try_from_secs_f64(f).map_err(|_| serde::de::Error::custom(format!("invalid duration {f} s")))
            }
            Raw::Text(s) => super::parse_duration(&s).map_err(serde::de::Error::custom),
        }
    }

    /// Deserializes an `Option<Duration>` (for `#[serde(default)]` fields).
    pub fn deserialize_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_configuration_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration(" 3 "), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(deserialize_with = "serde_duration::deserialize")]
            a: Duration,
            #[serde(deserialize_with = "serde_duration::deserialize")]
            b: Duration,
            #[serde(deserialize_with = "serde_duration::deserialize")]
            c: Duration,
        }
        let c: C = serde_json::from_str(r#"{"a": 2, "b": 0.25, "c": "1m"}"#).unwrap();
        assert_eq!((c.a, c.b, c.c), (Duration::from_secs(2), Duration::from_millis(250), Duration::from_secs(60)));
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(1_764_021_962_123).to_string(), "2025-11-24T22:06:02.123Z");
        assert_eq!(Timestamp(951_782_400_000).to_string(), "2000-02-29T00:00:00.000Z");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp(i64::MAX - 5);
        assert_eq!(t.plus(Duration::from_secs(1)), Timestamp(i64::MAX));
        assert_eq!(Timestamp(10).since(Timestamp(20)), Duration::ZERO);
        assert_eq!(Timestamp(20).since(Timestamp(10)), Duration::from_millis(10));
        assert_eq!(Timestamp(i64::MIN + 1).minus(Duration::from_secs(1)), Timestamp(i64::MIN));
    }
}

//! Time as the core sees it: a [`Timestamp`] it is given, never one it reads.
//!
//! The core never asks the operating system what time it is. Every operation
//! takes its "now" from an injected [`Clock`], and every wait (install
//! timeouts, retry backoff, the reconciler's tick) is a [`Clock::sleep_until`]
//! future. A test swaps in a manual clock and the whole farm runs
//! deterministically, a simulated day in a second.
//!
//! chrono does the calendar work at the public boundary ([`Timestamp`]'s
//! RFC 3339 text and its conversions to and from `DateTime<Utc>`), built
//! without its `clock` and `now` features: the core cannot read the OS
//! clock through it either. Features are unified across a build, so this
//! holds only while no crate in the workspace turns them on; these two
//! examples check it (chrono is there, its clock is not):
//!
//! ```
//! let epoch: duffy_core::Timestamp = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH.into();
//! assert_eq!(epoch, duffy_core::Timestamp::EPOCH);
//! ```
//!
//! ```compile_fail
//! let now = chrono::Utc::now(); // needs chrono's `now` feature
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use futures::future::{Either, select};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
///
/// The core's own instant: plain arithmetic, no time zone, no OS call.
/// At the public boundary it converts to and from chrono's
/// `DateTime<Utc>` (`From`/`TryFrom`), is written as RFC 3339 (`Display`)
/// and read from it (`FromStr`); chrono does the calendar work, and is
/// built without its `clock` feature, so it cannot read the OS clock
/// either.
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
    /// Formats as RFC 3339 in UTC with milliseconds
    /// (`2026-01-01T00:00:00.000Z`), through chrono's RFC 3339 writer: the
    /// form `/Overtime`, the operator's `key list` and the logs show. Years
    /// outside 0000–9999, which RFC 3339 cannot write, get ISO 8601's
    /// explicit sign (`+10000-01-01T00:00:00.000Z`); an instant beyond
    /// the calendar's range (see [`OutOfRange`]) is written as its
    /// milliseconds since the epoch, never as a wrong date.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DateTime::<Utc>::try_from(*self) {
            Ok(dt) => f.pad(&dt.to_rfc3339_opts(SecondsFormat::Millis, true)),
            Err(_) => write!(f, "{} ms since the epoch (outside the calendar)", self.0),
        }
    }
}

impl From<DateTime<Utc>> for Timestamp {
    /// The instant's milliseconds since the epoch; a finer part is dropped
    /// (rounded towards the past). Every `DateTime<Utc>` fits.
    fn from(dt: DateTime<Utc>) -> Self {
        Timestamp(dt.timestamp_millis())
    }
}

impl TryFrom<Timestamp> for DateTime<Utc> {
    type Error = OutOfRange;

    /// The same instant as a chrono date-time; fails only for timestamps
    /// more than about 262,000 years from the epoch, which chrono's
    /// calendar does not reach (an `i64` of milliseconds reaches 292
    /// million years).
    fn try_from(t: Timestamp) -> Result<Self, Self::Error> {
        DateTime::from_timestamp_millis(t.0).ok_or(OutOfRange(t))
    }
}

/// A [`Timestamp`] too far from the epoch to be a calendar date: chrono's
/// `DateTime<Utc>` spans the years -262143 to 262142.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} ms since the epoch is outside the calendar's range ({} to {})",
    .0.as_millis(), DateTime::<Utc>::MIN_UTC.year(), DateTime::<Utc>::MAX_UTC.year())]
pub struct OutOfRange(pub Timestamp);

impl FromStr for Timestamp {
    type Err = ParseTimestampError;

    /// Parses an RFC 3339 date-time with any offset (`Z`, `+02:00`) and
    /// any number of fractional digits, as chrono's strict RFC 3339
    /// parser reads it: what [`Timestamp`]'s `Display` writes for the
    /// years 0000–9999 parses back to the same timestamp. A fraction finer
    /// than a millisecond is dropped (rounded towards the past).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DateTime::parse_from_rfc3339(s)
            .map(|dt| Timestamp::from(dt.with_timezone(&Utc)))
            .map_err(|source| ParseTimestampError { input: s.chars().take(MAX_SHOWN_INPUT).collect(), source })
    }
}

/// How much of a refused input a [`ParseTimestampError`] repeats: enough
/// to recognise it, never an unbounded echo of what a caller sent.
const MAX_SHOWN_INPUT: usize = 64;

/// A string that is not an RFC 3339 date-time. Says what was wrong, and
/// what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid timestamp {input:?}: {source}; expected an RFC 3339 date-time such as \
    \"2026-01-01T00:00:00.000Z\" or \"2026-01-01T01:00:00+01:00\""
)]
pub struct ParseTimestampError {
    /// The input (its first 64 characters).
    input: String,
    /// chrono's reason.
    #[source]
    source: chrono::ParseError,
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
#[cfg_attr(feature = "mock", mockall::automock)]
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

    /// What the hand-written civil-from-days formatter wrote before chrono
    /// took over, for the years 0000–9999 (the RFC 3339 range): chrono
    /// must write exactly the same.
    const FORMATTED_BEFORE_CHRONO: &[(i64, &str)] = &[
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (999, "1970-01-01T00:00:00.999Z"),
        (1000, "1970-01-01T00:00:01.000Z"),
        (-999, "1969-12-31T23:59:59.001Z"),
        (-1000, "1969-12-31T23:59:59.000Z"),
        (-1001, "1969-12-31T23:59:58.999Z"),
        (86_399_999, "1970-01-01T23:59:59.999Z"),
        (86_400_000, "1970-01-02T00:00:00.000Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
        (951_868_799_999, "2000-02-29T23:59:59.999Z"),
        (1_764_021_962_123, "2025-11-24T22:06:02.123Z"),
        (1_767_225_600_000, "2026-01-01T00:00:00.000Z"),
        (1_700_000_000_000, "2023-11-14T22:13:20.000Z"),
        (4_102_444_800_000, "2100-01-01T00:00:00.000Z"),
        (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        (68_719_476_736_000, "4147-08-20T07:32:16.000Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        (-2_208_988_800_000, "1900-01-01T00:00:00.000Z"),
        (-62_135_596_800_000, "0001-01-01T00:00:00.000Z"),
        (-62_167_219_200_000, "0000-01-01T00:00:00.000Z"),
    ];

    #[test]
    fn formats_rfc3339_exactly_as_before() {
        for &(ms, text) in FORMATTED_BEFORE_CHRONO {
            assert_eq!(Timestamp(ms).to_string(), text, "{ms} ms");
            assert_eq!(text.parse::<Timestamp>(), Ok(Timestamp(ms)), "{text} parses back");
        }
        // Padding applies to the whole text, as for a string.
        assert_eq!(format!("[{:>26}]", Timestamp(0)), "[  1970-01-01T00:00:00.000Z]");
    }

    #[test]
    fn formats_years_rfc3339_cannot_write() {
        // Beyond 9999 and before 0000: ISO 8601's expanded years, signed.
        // (The hand-written formatter wrote "10000-01-01…" and "-001-12-31…".)
        assert_eq!(Timestamp(253_402_300_800_000).to_string(), "+10000-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(-62_167_219_200_001).to_string(), "-0001-12-31T23:59:59.999Z");
        // Beyond the calendar: the number itself, never a wrong date.
        assert_eq!(Timestamp(i64::MAX).to_string(), "9223372036854775807 ms since the epoch (outside the calendar)");
        assert_eq!(Timestamp(i64::MIN).to_string(), "-9223372036854775808 ms since the epoch (outside the calendar)");
        // RFC 3339 parsing takes four-digit years only.
        assert!("+10000-01-01T00:00:00.000Z".parse::<Timestamp>().is_err());
    }

    #[test]
    fn the_epoch_is_chronos_epoch() {
        assert_eq!(DateTime::<Utc>::try_from(Timestamp::EPOCH), Ok(DateTime::UNIX_EPOCH));
        assert_eq!(Timestamp::from(DateTime::UNIX_EPOCH), Timestamp::EPOCH);
        assert_eq!("1970-01-01T00:00:00Z".parse::<Timestamp>(), Ok(Timestamp::EPOCH));
    }

    #[test]
    fn converts_to_and_from_chrono() {
        let dt = DateTime::parse_from_rfc3339("2026-01-01T00:00:00.250Z").expect("valid").with_timezone(&Utc);
        assert_eq!(Timestamp::from(dt), Timestamp(1_767_225_600_250));
        // Negative times: before the epoch, milliseconds count backwards.
        let before = DateTime::<Utc>::try_from(Timestamp(-1)).expect("in range");
        assert_eq!(before.to_rfc3339_opts(SecondsFormat::Millis, true), "1969-12-31T23:59:59.999Z");
        assert_eq!(Timestamp::from(before), Timestamp(-1));
        // A finer part is dropped towards the past, before the epoch too.
        let micros = DateTime::from_timestamp_micros(-1).expect("in range");
        assert_eq!(Timestamp::from(micros), Timestamp(-1));
        let micros = DateTime::from_timestamp_micros(1_999).expect("in range");
        assert_eq!(Timestamp::from(micros), Timestamp(1));
        // chrono's whole range fits, and comes back unchanged.
        for dt in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            let dt = DateTime::from_timestamp_millis(dt.timestamp_millis()).expect("in range");
            assert_eq!(DateTime::<Utc>::try_from(Timestamp::from(dt)), Ok(dt));
        }
    }

    #[test]
    fn timestamps_beyond_the_calendar_do_not_convert() {
        let last = Timestamp::from(DateTime::<Utc>::MAX_UTC);
        let first = Timestamp::from(DateTime::<Utc>::MIN_UTC);
        assert!(DateTime::<Utc>::try_from(last).is_ok());
        assert!(DateTime::<Utc>::try_from(first).is_ok());
        for t in [Timestamp(last.0 + 1), Timestamp(first.0 - 1), Timestamp(i64::MAX), Timestamp(i64::MIN)] {
            assert_eq!(DateTime::<Utc>::try_from(t), Err(OutOfRange(t)));
        }
        assert_eq!(
            OutOfRange(Timestamp(i64::MAX)).to_string(),
            "9223372036854775807 ms since the epoch is outside the calendar's range (-262143 to 262142)"
        );
    }

    #[test]
    fn parses_rfc3339_with_any_offset() {
        let t = Timestamp(1_767_225_600_000);
        assert_eq!("2026-01-01T00:00:00Z".parse(), Ok(t));
        assert_eq!("2026-01-01T00:00:00.000Z".parse(), Ok(t));
        assert_eq!("2026-01-01T01:00:00+01:00".parse(), Ok(t));
        assert_eq!("2025-12-31T19:30:00-04:30".parse(), Ok(t));
        assert_eq!("2026-01-01t00:00:00z".parse(), Ok(t), "RFC 3339 letters are case-insensitive");
        assert_eq!("2026-01-01T00:00:00.123999999Z".parse(), Ok(Timestamp(t.0 + 123)), "finer than 1 ms is dropped");
        assert_eq!("1969-12-31T23:59:59.9999Z".parse(), Ok(Timestamp(-1)), "dropped towards the past");
    }

    #[test]
    fn refuses_what_is_not_rfc3339_and_says_why() {
        for bad in [
            "",
            "yesterday",
            "1767225600000",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-01-01 00:00:00 UTC",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00Z trailing",
            "26-01-01T00:00:00Z",
        ] {
            let e = bad.parse::<Timestamp>().expect_err(bad);
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("invalid timestamp {bad:?}: ")), "{msg}");
            assert!(msg.contains("expected an RFC 3339 date-time such as \"2026-01-01T00:00:00.000Z\""), "{msg}");
            assert!(std::error::Error::source(&e).is_some(), "chrono's reason is the source");
        }
        // A long input is not echoed whole.
        let long = format!("2026-01-01T00:00:00Z{}", "x".repeat(10_000));
        let msg = long.parse::<Timestamp>().expect_err("trailing junk").to_string();
        assert!(msg.len() < 400, "{} bytes", msg.len());
        assert!(msg.contains(&long[..MAX_SHOWN_INPUT]));
    }

    proptest::proptest! {
        /// Every timestamp in the RFC 3339 range is written and read back
        /// unchanged, and converts to chrono and back unchanged.
        #[test]
        fn round_trips_through_text_and_chrono(ms in -62_167_219_200_000i64..=253_402_300_799_999) {
            let t = Timestamp(ms);
            let text = t.to_string();
            proptest::prop_assert_eq!(text.len(), 24);
            proptest::prop_assert_eq!(text.parse::<Timestamp>(), Ok(t));
            let dt = DateTime::<Utc>::try_from(t).expect("in range");
            proptest::prop_assert_eq!(Timestamp::from(dt), t);
            proptest::prop_assert_eq!(dt.timestamp_millis(), ms);
        }
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

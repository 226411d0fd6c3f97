//! Every duration, limit and quota the engine obeys. Nothing here is a
//! constant buried in code: all of it is configuration with documented
//! defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// At most `max` sessions per key in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sessions allowed in the window.
    pub max: u32,
    /// The sliding window.
    #[serde(with = "secs")]
    pub window: Duration,
}

/// The engine's and reconciler's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// A session's lease, when its request asks for no lifetime of its
    /// own: the session expires (its nodes are reclaimed) at its end
    /// unless extended, and `/Overtime` lists sessions still running past
    /// it (60 min).
    #[serde(with = "secs")]
    pub lease: Duration,
    /// The longest a session may live, counted from its creation: the
    /// most a request may ask for, and how far extensions may take it
    /// (6 h; `"off"`: no maximum).
    #[serde(with = "opt_secs")]
    pub max_lifetime: Option<Duration>,
    /// How long `/Node/fail` holds nodes for debugging before they are
    /// reclaimed (12 h).
    #[serde(with = "secs")]
    pub fail_hold: Duration,
    /// Ready nodes older than this are reinstalled (24 h).
    #[serde(with = "secs")]
    pub reinstall_age: Duration,
    /// Most installs running at once, over the whole farm (8).
    pub max_concurrent_installs: usize,
    /// Deadline of one install attempt (45 min).
    #[serde(with = "secs")]
    pub install_timeout: Duration,
    /// Attempts per install before the node is Failed (3).
    pub install_attempts: u32,
    /// Wait before the first retry; doubled for each further one (30 s).
    #[serde(with = "secs")]
    pub install_backoff: Duration,
    /// A node whose install or preparation failed gets another chance
    /// after this long; `None` leaves it Failed until an operator recovers
    /// it (6 h; `"off"` in a configuration file).
    #[serde(with = "opt_secs")]
    pub failed_retry_after: Option<Duration>,
    /// Deadline for preparing one node for a project, e.g. pushing SSH
    /// keys (2 min).
    #[serde(with = "secs")]
    pub prepare_timeout: Duration,
    /// Default per-project cap on nodes held by its live sessions; a
    /// project's own quota overrides it (`None`: unlimited).
    #[serde(with = "off_or")]
    pub default_quota: Option<u32>,
    /// Per-key limit on new sessions (legacy: 5 in 5 minutes; `None`, or
    /// `"off"` in a configuration file: no limit).
    #[serde(with = "off_or")]
    pub rate_limit: Option<RateLimit>,
    /// Per-project cap on nodes held in Fail after `/Node/fail` (`None`,
    /// or `"off"`: unlimited; default 5).
    #[serde(with = "off_or")]
    pub fail_cap: Option<u32>,
    /// Most nodes one request may ask for, whatever the pool's size (100).
    pub max_count: u32,
    /// The reconciler re-plans at least this often (10 s).
    #[serde(with = "secs")]
    pub tick: Duration,
    /// ...and at most this often, however many changes wake it (50 ms;
    /// milliseconds in a configuration file).
    #[serde(with = "millis")]
    pub min_pass_interval: Duration,
    /// How many times an engine operation retries after losing a
    /// compare-and-set race before giving up (16).
    pub cas_retries: u32,
    /// How often the reconciler asks each BMC for the machine's power state
    /// and records a mismatch with the store's belief as an event (1 h;
    /// `"off"`: never).
    #[serde(with = "opt_secs")]
    pub power_check_interval: Option<Duration>,
    /// The longest a request may wait in the queue for nodes (1 h).
    #[serde(with = "secs")]
    pub max_wait: Duration,
    /// Most requests waiting in the queue at once, over the whole service
    /// (1000); more are refused at once.
    pub queue_capacity: usize,
    /// Most requests one project may have waiting at once (100), so that
    /// one project cannot fill the queue.
    pub queue_per_project: usize,
    /// A waiting request whose owner has not asked about it for this long
    /// is dropped: its client is gone, and serving it would hand nodes to
    /// nobody (2 min; `"off"`: never dropped).
    #[serde(with = "opt_secs")]
    pub queue_poll_timeout: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lease: Duration::from_secs(60 * 60),
            max_lifetime: Some(Duration::from_secs(6 * 60 * 60)),
            fail_hold: Duration::from_secs(12 * 60 * 60),
            reinstall_age: Duration::from_secs(24 * 60 * 60),
            max_concurrent_installs: 8,
            install_timeout: Duration::from_secs(45 * 60),
            install_attempts: 3,
            install_backoff: Duration::from_secs(30),
            failed_retry_after: Some(Duration::from_secs(6 * 60 * 60)),
            prepare_timeout: Duration::from_secs(120),
            default_quota: None,
            rate_limit: Some(RateLimit { max: 5, window: Duration::from_secs(300) }),
            fail_cap: Some(5),
            max_count: 100,
            tick: Duration::from_secs(10),
            min_pass_interval: Duration::from_millis(50),
            cas_retries: 16,
            power_check_interval: Some(Duration::from_secs(3600)),
            max_wait: Duration::from_secs(60 * 60),
            queue_capacity: 1000,
            queue_per_project: 100,
            queue_poll_timeout: Some(Duration::from_secs(120)),
        }
    }
}

impl Policy {
    /// How long an allocation may stay half-done before the reconciler
    /// decides its process died and aborts it: every node's preparation
    /// runs concurrently, so twice the prepare deadline is generous.
    pub fn stale_allocation_after(&self) -> Duration {
        self.prepare_timeout * 2 + Duration::from_secs(60)
    }

    /// The wait before retry number `attempt` (0-based), doubling from
    /// [`Policy::install_backoff`], capped at one hour.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.install_backoff.saturating_mul(factor).min(Duration::from_secs(3600))
    }

    /// Checks that the numbers make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_installs == 0 {
            return Err("max_concurrent_installs must be at least 1".into());
        }
        if self.install_attempts == 0 {
            return Err("install_attempts must be at least 1".into());
        }
        if self.max_count == 0 {
            return Err("max_count must be at least 1".into());
        }
        if self.tick.is_zero() {
            return Err("tick must be longer than zero".into());
        }
        if self.lease.is_zero() {
            return Err("lease must be longer than zero".into());
        }
        if let Some(max) = self.max_lifetime {
            if max < self.lease {
                return Err(format!(
                    "max_lifetime ({} s) must be at least the lease ({} s), or \"off\"",
                    max.as_secs(),
                    self.lease.as_secs()
                ));
            }
        }
        if self.queue_capacity == 0 || self.queue_per_project == 0 {
            return Err("queue_capacity and queue_per_project must be at least 1".into());
        }
        if self.queue_poll_timeout.is_some_and(|t| t.is_zero()) {
            return Err("queue_poll_timeout must be longer than zero, or \"off\"".into());
        }
        if let Some(r) = self.rate_limit {
            if r.max == 0 || r.window.is_zero() {
                return Err("rate_limit needs max >= 1 and a window longer than zero".into());
            }
        }
        Ok(())
    }
}

/// Durations as whole seconds in configuration files.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// Durations as whole milliseconds in configuration files.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// An optional setting that a configuration file can switch off with the
/// string `"off"` (TOML has no null).
#[derive(Deserialize)]
#[serde(untagged)]
enum OffOr<T> {
    Value(T),
    Word(String),
}

impl<T> OffOr<T> {
    fn into_option<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        match self {
            OffOr::Value(v) => Ok(Some(v)),
            OffOr::Word(w) if w == "off" => Ok(None),
            OffOr::Word(w) => Err(E::custom(format!("expected a value or \"off\", got {w:?}"))),
        }
    }
}

mod off_or {
    use super::OffOr;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_str("off"),
        }
    }
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        OffOr::<T>::deserialize(d)?.into_option()
    }
}

mod opt_secs {
    use super::OffOr;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_secs()),
            None => s.serialize_str("off"),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(OffOr::<u64>::deserialize(d)?.into_option()?.map(Duration::from_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let p = Policy::default();
        assert_eq!(p.lease, Duration::from_secs(3600));
        assert_eq!(p.fail_hold, Duration::from_secs(43_200));
        assert_eq!(p.reinstall_age, Duration::from_secs(86_400));
        assert_eq!(p.max_lifetime, Some(Duration::from_secs(6 * 3600)));
        assert_eq!((p.max_wait, p.queue_poll_timeout), (Duration::from_secs(3600), Some(Duration::from_secs(120))));
        assert!(p.validate().is_ok());
        assert_eq!(p.backoff(0), Duration::from_secs(30));
        assert_eq!(p.backoff(2), Duration::from_secs(120));
        assert_eq!(p.backoff(40), Duration::from_secs(3600));
    }

    #[test]
    fn optional_limits_can_be_switched_off() {
        let p: Policy =
            serde_json::from_str(r#"{"rate_limit": "off", "fail_cap": "off", "failed_retry_after": "off"}"#).unwrap();
        assert_eq!((p.rate_limit, p.fail_cap, p.failed_retry_after), (None, None, None));
        let p: Policy = serde_json::from_str(
            r#"{"rate_limit": {"max": 2, "window": 60}, "fail_cap": 3, "failed_retry_after": 10}"#,
        )
        .unwrap();
        assert_eq!(p.rate_limit, Some(RateLimit { max: 2, window: Duration::from_secs(60) }));
        assert_eq!((p.fail_cap, p.failed_retry_after), (Some(3), Some(Duration::from_secs(10))));
        assert!(serde_json::from_str::<Policy>(r#"{"fail_cap": "none"}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"lease_time": 5}"#).is_err(), "unknown keys are refused");
        let round: Policy = serde_json::from_str(&serde_json::to_string(&Policy::default()).unwrap()).unwrap();
        assert_eq!(round, Policy::default());
    }

    #[test]
    fn nonsense_is_refused() {
        let p = Policy { max_concurrent_installs: 0, ..Policy::default() };
        assert!(p.validate().is_err());
        let p = Policy { rate_limit: Some(RateLimit { max: 0, window: Duration::from_secs(1) }), ..Policy::default() };
        assert!(p.validate().is_err());
        let p = Policy { max_lifetime: Some(Duration::from_secs(60)), ..Policy::default() };
        assert!(p.validate().unwrap_err().contains("max_lifetime (60 s) must be at least the lease (3600 s)"));
        let p = Policy { lease: Duration::ZERO, ..Policy::default() };
        assert!(p.validate().is_err());
        let p: Policy = serde_json::from_str(r#"{"max_lifetime": "off", "lease": 90000}"#).unwrap();
        assert_eq!(p.max_lifetime, None);
        assert!(p.validate().is_ok(), "no maximum: any lease");
    }
}

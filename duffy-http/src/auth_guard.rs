//! What a stranger sending made-up API keys can cost: failed key lookups
//! are limited per client address.
//!
//! The engine answers keys it has seen (valid, revoked, or unknown) from
//! memory, so only a key it has never seen reaches the store. Keys are
//! random 122-bit values: a client sending fresh random keys misses that
//! memory every time. Each address (IPv4 address, or IPv6 /64, the unit a
//! single host usually gets) may make [`FAILED_LOOKUP_BURST`] lookups that
//! find nothing, then one per [`FAILED_LOOKUP_REFILL`]; beyond that, keys
//! that would need a store read are refused with 429 without one. Keys the
//! engine remembers are still answered, so a job sharing an address with a
//! misbehaving one keeps working.
//!
//! Only failures are counted, after the fact: many jobs behind one address
//! (a CI farm behind NAT) starting at once with keys the service has not
//! seen yet are all looked up. The price is that lookups already under way
//! when an address runs out are not stopped; they leave the address in
//! debt, refused for as long as it takes to pay it back, so over time an
//! address gets the burst plus one lookup per refill period, plus at most
//! one round of whatever it had in flight.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use duffy_core::{EngineError, Principal};

use crate::api::AppState;

/// Store lookups for unknown keys an address may make at once.
pub const FAILED_LOOKUP_BURST: u32 = 30;

/// After the burst, an address gets one more such lookup per this long.
pub const FAILED_LOOKUP_REFILL: Duration = Duration::from_secs(2);

/// Most addresses tracked. When full, addresses whose budget has refilled
/// (they carry no information) are dropped; if that is not enough the
/// table starts over. Only an attacker with this many addresses gets a
/// fresh burst from that, and per-address limits cannot stop one anyway.
pub const TRACKED_ADDRESSES_MAX: usize = 65_536;

/// Why a request's key was not accepted.
#[derive(Debug)]
pub enum AuthRefusal {
    /// Missing, unknown, revoked or expired.
    Invalid,
    /// The client's address made too many failed lookups recently; the
    /// store was not asked.
    Limited,
    /// The lookup failed (store error).
    Failed(EngineError),
}

/// The source a budget belongs to: an IPv4 address, or an IPv6 /64
/// (IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => Source(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())),
            },
        }
    }
}

/// A token bucket: `tokens` failed lookups left as of `at` (negative: in
/// debt).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: i64,
    at: Instant,
}

const FULL: i64 = FAILED_LOOKUP_BURST as i64;

impl Bucket {
    /// The bucket refilled up to `now`.
    fn refilled(self, now: Instant) -> Bucket {
        let periods = now.saturating_duration_since(self.at).as_millis() / FAILED_LOOKUP_REFILL.as_millis().max(1);
        let gained = i64::try_from(periods).unwrap_or(i64::MAX);
        if gained == 0 {
            return self;
        }
        let tokens = self.tokens.saturating_add(gained).min(FULL);
        // Keep the remainder of a partial refill period.
        let at = if tokens == FULL {
            now
        } else {
            self.at + FAILED_LOOKUP_REFILL * u32::try_from(gained).unwrap_or(u32::MAX)
        };
        Bucket { tokens, at }
    }
}

/// The per-address budgets of failed key lookups. One per service.
#[derive(Debug, Default)]
pub struct AuthGuard {
    buckets: Mutex<HashMap<Source, Bucket>>,
}

impl AuthGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ip` may have a key looked up in the store: it has failed
    /// lookups left in its budget.
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        let mut b = self.lock();
        match b.get_mut(&Source::of(ip)) {
            None => true,
            Some(bucket) => {
                *bucket = bucket.refilled(now);
                bucket.tokens > 0
            }
        }
    }

    /// Counts a lookup from `ip` that found no usable key.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut b = self.lock();
        let source = Source::of(ip);
        if !b.contains_key(&source) && b.len() >= TRACKED_ADDRESSES_MAX {
            b.retain(|_, v| v.refilled(now).tokens < FULL);
            if b.len() >= TRACKED_ADDRESSES_MAX {
                b.clear();
            }
        }
        let bucket = b.entry(source).or_insert(Bucket { tokens: FULL, at: now });
        let mut refilled = bucket.refilled(now);
        refilled.tokens = refilled.tokens.saturating_sub(1);
        *bucket = refilled;
    }
}

/// Authenticates `key` for a request from `peer`: from the engine's memory
/// when it can, otherwise through the store within `peer`'s budget of
/// failed lookups.
pub async fn authenticate(st: &AppState, peer: SocketAddr, key: &str) -> Result<Principal, AuthRefusal> {
    let answer = match st.engine.authenticate_cached(key) {
        Some(answer) => answer,
        None => {
            if !st.auth_guard.allows(peer.ip(), Instant::now()) {
                return Err(AuthRefusal::Limited);
            }
            let answer = st.engine.authenticate(key).await;
            if matches!(answer, Err(EngineError::InvalidKey)) {
                st.auth_guard.failed(peer.ip(), Instant::now());
            }
            answer
        }
    };
    answer.map_err(|e| match e {
        EngineError::InvalidKey => AuthRefusal::Invalid,
        e => AuthRefusal::Failed(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails `n` lookups from `ip` at `now`.
    fn fail(g: &AuthGuard, ip: IpAddr, now: Instant, n: u32) {
        for _ in 0..n {
            g.failed(ip, now);
        }
    }

    #[test]
    fn an_address_gets_a_burst_then_one_lookup_per_refill_period() {
        let g = AuthGuard::default();
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let t0 = Instant::now();
        assert!(g.allows(ip, t0), "a new address");
        fail(&g, ip, t0, FAILED_LOOKUP_BURST - 1);
        assert!(g.allows(ip, t0));
        fail(&g, ip, t0, 1);
        assert!(!g.allows(ip, t0), "burst spent");
        assert!(g.allows("192.0.2.8".parse().expect("ip"), t0), "another address has its own budget");
        assert!(!g.allows(ip, t0 + FAILED_LOOKUP_REFILL / 2));
        let one = t0 + FAILED_LOOKUP_REFILL;
        assert!(g.allows(ip, one), "one refilled");
        fail(&g, ip, one, 1);
        assert!(!g.allows(ip, one));
        // Long idle: back to a full burst, never more.
        let later = one + FAILED_LOOKUP_REFILL * 1000;
        fail(&g, ip, later, FAILED_LOOKUP_BURST - 1);
        assert!(g.allows(ip, later));
        fail(&g, ip, later, 1);
        assert!(!g.allows(ip, later));
    }

    #[test]
    fn lookups_that_were_in_flight_leave_a_debt() {
        let g = AuthGuard::default();
        let ip: IpAddr = "192.0.2.9".parse().expect("ip");
        let t0 = Instant::now();
        // Ten more failures than the burst, all let through at once.
        fail(&g, ip, t0, FAILED_LOOKUP_BURST + 10);
        assert!(!g.allows(ip, t0 + FAILED_LOOKUP_REFILL * 10), "still paying back");
        assert!(g.allows(ip, t0 + FAILED_LOOKUP_REFILL * 11));
    }

    #[test]
    fn an_ipv6_host_is_one_source_per_64() {
        let g = AuthGuard::default();
        let t0 = Instant::now();
        for i in 0..FAILED_LOOKUP_BURST {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().expect("ip");
            g.failed(ip, t0);
        }
        assert!(!g.allows("2001:db8:1:2:ffff::1".parse().expect("ip"), t0), "same /64");
        assert!(g.allows("2001:db8:1:3::1".parse().expect("ip"), t0), "another /64");
        // IPv4-mapped is the IPv4 address.
        fail(&g, "::ffff:198.51.100.1".parse().expect("ip"), t0, FAILED_LOOKUP_BURST);
        assert!(!g.allows("198.51.100.1".parse().expect("ip"), t0));
    }

    #[test]
    fn the_table_of_addresses_is_bounded() {
        let g = AuthGuard::default();
        let t0 = Instant::now();
        for i in 0..(TRACKED_ADDRESSES_MAX as u32 + 10) {
            g.failed(IpAddr::V4(i.into()), t0);
        }
        assert!(g.lock().len() <= TRACKED_ADDRESSES_MAX);
    }
}

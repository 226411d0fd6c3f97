//! API keys in the engine: authentication through a cache that never
//! answers differently from the store for longer than it must, and the key
//! management calls (create, revoke, list) that keep that cache right.
//!
//! Rules:
//!
//! - **Known keys** are remembered after a lookup, for at most
//!   [`KEY_CACHE_TTL`]; revocation and expiry are checked on every request
//!   against the remembered row, so an expired key is refused the moment
//!   it expires.
//! - **Unknown keys** are remembered too (at most [`UNKNOWN_KEYS_MAX`]
//!   hashes, cleared when full, each for at most [`KEY_CACHE_TTL`]): a job
//!   that keeps sending a wrong or revoked key costs no store read after
//!   the first. Keys are random 122-bit values, so a stranger trying many
//!   keys gets nothing from this cache; bounding what that costs is the
//!   HTTP layer's per-address limit on failed lookups.
//! - **Key changes through the engine** ([`Engine::add_api_key`],
//!   [`Engine::revoke_api_key`]) write the store first and then forget both
//!   caches, under a generation counter: a lookup that read the store
//!   before the change cannot put what it read back into the cache. A
//!   revoked key is therefore refused by the very next request. A change
//!   made by another process on the same store (another engine) is seen
//!   within [`KEY_CACHE_TTL`] — or at once, on a store that reports such
//!   changes: whenever [`Store::key_generation`](crate::Store::key_generation)
//!   moves, both caches are forgotten before anything is answered from them.
//! - **Last use** is kept in memory ([`Engine::flush_key_usage`] writes
//!   what accumulated, one store write for all keys), so authentication
//!   adds no store write to a request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tracing::debug;

use crate::auth::{hash_api_key, verify_api_key};
use crate::engine::{Engine, EngineError, Principal};
use crate::model::{ApiKeyHash, ApiKeyRecord, KeyId};
use crate::time::Timestamp;

/// How long a looked-up key (known or unknown) is answered from memory
/// before the store is asked again. Bounds how long a key change made by
/// another process on the same store goes unseen; changes through this
/// engine are seen at once.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(60);

/// Most known keys remembered; past it the cache starts over (a farm has
/// far fewer keys than this).
pub const KNOWN_KEYS_MAX: usize = 100_000;

/// Most unknown key hashes remembered; past it that cache starts over, so a
/// flood of random keys costs it at most this much memory.
pub const UNKNOWN_KEYS_MAX: usize = 10_000;

/// What the caches say about a key hash.
enum Cached {
    /// A remembered row (possibly revoked or expired).
    Known(ApiKeyRecord),
    /// Remembered as unknown to the store.
    Unknown,
    /// Not remembered (or too old): ask the store, then pass this
    /// generation to [`KeyCache::remember`].
    Miss(u64),
}

#[derive(Debug, Default)]
struct CacheState {
    /// Bumped by every key change made through the engine (and whenever
    /// the store's key generation moves).
    generation: u64,
    /// The store's [`key_generation`](crate::Store::key_generation) when
    /// the caches were last checked against it.
    store_generation: u64,
    /// Rows by hash, with when they were read.
    known: HashMap<ApiKeyHash, (ApiKeyRecord, Timestamp)>,
    /// Hashes the store did not know, with when it said so.
    unknown: HashMap<ApiKeyHash, Timestamp>,
    /// Last successful authentication per key, not yet written to the store.
    unrecorded_use: HashMap<KeyId, Timestamp>,
}

impl CacheState {
    fn note_use(&mut self, rec: &ApiKeyRecord, now: Timestamp) {
        if rec.usable_at(now) {
            let t = self.unrecorded_use.entry(rec.id).or_insert(now);
            *t = (*t).max(now);
        }
    }
}

/// The engine's memory of API keys (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    state: Mutex<CacheState>,
}

impl KeyCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What memory says about `hash` at `now`, given the store's key
    /// generation now; a usable known key's use is noted.
    fn get(&self, hash: &ApiKeyHash, now: Timestamp, store_generation: u64) -> Cached {
        let mut s = self.lock();
        if s.store_generation != store_generation {
            // Keys changed elsewhere: nothing remembered can be trusted,
            // and no lookup that began before this may store its answer.
            s.store_generation = store_generation;
            s.generation += 1;
            s.known.clear();
            s.unknown.clear();
        }
        let fresh = |read: Timestamp| now.since(read) < KEY_CACHE_TTL && read <= now;
        if let Some((rec, read)) = s.known.get(hash) {
            if fresh(*read) {
                let rec = rec.clone();
                s.note_use(&rec, now);
                return Cached::Known(rec);
            }
        }
        if let Some(read) = s.unknown.get(hash) {
            if fresh(*read) {
                return Cached::Unknown;
            }
        }
        Cached::Miss(s.generation)
    }

    /// Remembers what the store said about `hash` — unless a key changed
    /// through the engine since the lookup began (`generation`), in which
    /// case the answer may be stale and is not kept.
    fn remember(&self, hash: ApiKeyHash, rec: Option<&ApiKeyRecord>, generation: u64, now: Timestamp) {
        let mut s = self.lock();
        if let Some(r) = rec {
            s.note_use(r, now);
        }
        if s.generation != generation {
            return;
        }
        match rec {
            Some(r) => {
                s.unknown.remove(&hash);
                if s.known.len() >= KNOWN_KEYS_MAX {
                    s.known.clear();
                }
                s.known.insert(hash, (r.clone(), now));
            }
            None => {
                s.known.remove(&hash);
                if s.unknown.len() >= UNKNOWN_KEYS_MAX {
                    s.unknown.clear();
                }
                s.unknown.insert(hash, now);
            }
        }
    }

    /// Forgets every remembered key, known and unknown, after a change.
    fn invalidate(&self) {
        let mut s = self.lock();
        s.generation += 1;
        s.known.clear();
        s.unknown.clear();
    }

    fn take_unrecorded_use(&self) -> HashMap<KeyId, Timestamp> {
        std::mem::take(&mut self.lock().unrecorded_use)
    }

    fn restore_unrecorded_use(&self, used: HashMap<KeyId, Timestamp>) {
        let mut s = self.lock();
        for (id, t) in used {
            let e = s.unrecorded_use.entry(id).or_insert(t);
            *e = (*e).max(t);
        }
    }
}

fn admit(key: &str, rec: ApiKeyRecord, now: Timestamp) -> Result<Principal, EngineError> {
    if !verify_api_key(key, &rec.hash) {
        return Err(EngineError::InvalidKey);
    }
    if !rec.usable_at(now) {
        debug!(key = %rec.id, revoked = rec.revoked_at.is_some(), "refused a revoked or expired API key");
        return Err(EngineError::InvalidKey);
    }
    Ok(Principal { key_id: Some(rec.id), project: rec.project, admin: rec.admin })
}

fn well_formed(key: &str) -> bool {
    !key.is_empty() && key.len() <= 256
}

impl Engine {
    /// Resolves an API key to its principal. The key is hashed and compared
    /// in constant time; an empty, unknown, revoked or expired key is
    /// [`EngineError::InvalidKey`]. Answers from memory when it can (see
    /// the `keys` module for the rules) and reads the store otherwise.
    pub async fn authenticate(&self, key: &str) -> Result<Principal, EngineError> {
        if !well_formed(key) {
            return Err(EngineError::InvalidKey);
        }
        let hash = hash_api_key(key);
        let now = self.clock().now();
        let generation = match self.inner.keys.get(&hash, now, self.store().key_generation()) {
            Cached::Known(rec) => return admit(key, rec, now),
            Cached::Unknown => return Err(EngineError::InvalidKey),
            Cached::Miss(g) => g,
        };
        let rec = self.store().api_key_by_hash(&hash).await?;
        self.inner.keys.remember(hash, rec.as_ref(), generation, now);
        match rec {
            Some(rec) => admit(key, rec, now),
            None => Err(EngineError::InvalidKey),
        }
    }

    /// [`Engine::authenticate`] from memory alone: `None` when answering
    /// would need a store read. Lets a caller that limits store reads (per
    /// client address, say) still serve keys it already knows.
    pub fn authenticate_cached(&self, key: &str) -> Option<Result<Principal, EngineError>> {
        if !well_formed(key) {
            return Some(Err(EngineError::InvalidKey));
        }
        let now = self.clock().now();
        match self.inner.keys.get(&hash_api_key(key), now, self.store().key_generation()) {
            Cached::Known(rec) => Some(admit(key, rec, now)),
            Cached::Unknown => Some(Err(EngineError::InvalidKey)),
            Cached::Miss(_) => None,
        }
    }

    /// Stores a new key (its hash) for an existing project, refused from
    /// `expires_at` on, and makes every later request see it at once.
    pub async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, EngineError> {
        let now = self.clock().now();
        if let Some(t) = expires_at {
            if t <= now {
                return Err(EngineError::InvalidRequest(format!(
                    "the key would expire at {t}, which is not after now"
                )));
            }
        }
        let rec = self.store().add_api_key(project, hash, admin, now, expires_at).await;
        // Forget even after a failure: the write may have happened.
        self.inner.keys.invalidate();
        Ok(rec?)
    }

    /// Revokes a key: the very next request with it is refused. Returns the
    /// key as stored (revoking a revoked key changes nothing).
    pub async fn revoke_api_key(&self, id: KeyId) -> Result<ApiKeyRecord, EngineError> {
        let rec = self.store().revoke_api_key(id, self.clock().now()).await;
        self.inner.keys.invalidate();
        Ok(rec?)
    }

    /// Every key, or only `project`'s, ordered by id, with every use up to
    /// now recorded first (so `last_used` is current).
    pub async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, EngineError> {
        self.flush_key_usage().await?;
        Ok(self.store().api_keys(project).await?)
    }

    /// Writes the last use of every key used since the previous flush, in
    /// one store write, and returns how many keys that was. Authentication
    /// only notes uses in memory; a service calls this every few minutes
    /// (and when it stops), so a key's `last_used` lags by at most that
    /// interval and requests never wait for it. If the write fails the uses
    /// are kept for the next flush.
    pub async fn flush_key_usage(&self) -> Result<usize, EngineError> {
        let used = self.inner.keys.take_unrecorded_use();
        if used.is_empty() {
            return Ok(0);
        }
        let n = used.len();
        let mut list: Vec<(KeyId, Timestamp)> = used.iter().map(|(k, t)| (*k, *t)).collect();
        list.sort();
        match self.store().record_key_use(list).await {
            Ok(()) => Ok(n),
            Err(e) => {
                self.inner.keys.restore_unrecorded_use(used);
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_api_key;

    fn rec(id: u64) -> ApiKeyRecord {
        ApiKeyRecord {
            id: KeyId(id),
            project: "p".into(),
            hash: hash_api_key("k"),
            admin: false,
            created_at: Timestamp(0),
            expires_at: None,
            revoked_at: None,
            last_used: None,
        }
    }

    #[test]
    fn a_lookup_that_raced_a_key_change_is_not_remembered() {
        // A request misses, reads the row from the store; meanwhile an
        // operator revokes the key (store written, then memory forgotten);
        // then the request comes back with the row it read before.
        let cache = KeyCache::default();
        let h = hash_api_key("k");
        let now = Timestamp(1000);
        let Cached::Miss(generation) = cache.get(&h, now, 0) else { panic!("empty cache") };
        cache.invalidate();
        cache.remember(h, Some(&rec(1)), generation, now);
        assert!(matches!(cache.get(&h, now, 0), Cached::Miss(_)), "the stale row must not be remembered");
        // The same for an unknown key that an operator creates meanwhile.
        let Cached::Miss(generation) = cache.get(&h, now, 0) else { panic!("still empty") };
        cache.invalidate();
        cache.remember(h, None, generation, now);
        assert!(matches!(cache.get(&h, now, 0), Cached::Miss(_)), "the stale miss must not be remembered");
        // Without a change in between, both are remembered.
        let Cached::Miss(generation) = cache.get(&h, now, 0) else { panic!("still empty") };
        cache.remember(h, Some(&rec(1)), generation, now);
        assert!(matches!(cache.get(&h, now, 0), Cached::Known(_)));
    }

    #[test]
    fn a_new_store_generation_forgets_everything() {
        // Another process sharing the store changed keys: the store's key
        // generation moved, and nothing remembered may be answered.
        let cache = KeyCache::default();
        let (h, other) = (hash_api_key("k"), hash_api_key("other"));
        let now = Timestamp(1000);
        let Cached::Miss(generation) = cache.get(&h, now, 7) else { panic!("empty cache") };
        cache.remember(h, Some(&rec(1)), generation, now);
        let Cached::Miss(generation) = cache.get(&other, now, 7) else { panic!("not remembered yet") };
        cache.remember(other, None, generation, now);
        assert!(matches!(cache.get(&h, now, 7), Cached::Known(_)));
        assert!(matches!(cache.get(&other, now, 7), Cached::Unknown));
        assert!(matches!(cache.get(&h, now, 8), Cached::Miss(_)), "a known key is forgotten");
        assert!(matches!(cache.get(&other, now, 8), Cached::Miss(_)), "an unknown key is forgotten");
        // A lookup that began before the generation moved (and was seen
        // moving by another request) cannot store its stale answer.
        let Cached::Miss(generation) = cache.get(&h, now, 8) else { panic!("forgotten") };
        assert!(matches!(cache.get(&other, now, 9), Cached::Miss(_)));
        cache.remember(h, Some(&rec(1)), generation, now);
        assert!(matches!(cache.get(&h, now, 9), Cached::Miss(_)), "the stale row must not be remembered");
    }

    #[test]
    fn uses_survive_a_failed_flush_and_never_go_back() {
        let cache = KeyCache::default();
        let now = Timestamp(5000);
        cache.lock().note_use(&rec(1), now);
        let taken = cache.take_unrecorded_use();
        assert!(cache.take_unrecorded_use().is_empty());
        cache.lock().note_use(&rec(1), Timestamp(1000));
        cache.restore_unrecorded_use(taken);
        assert_eq!(cache.take_unrecorded_use().get(&KeyId(1)), Some(&now));
        // A revoked key's refused request is no use.
        cache.lock().note_use(&ApiKeyRecord { revoked_at: Some(Timestamp(1)), ..rec(2) }, now);
        assert!(cache.take_unrecorded_use().is_empty());
    }
}

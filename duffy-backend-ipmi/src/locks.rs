//! One operation at a time per BMC.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duffy_core::power::{PowerError, PowerErrorKind};
use tokio::sync::OwnedMutexGuard;

/// A set of per-BMC async mutexes keyed by `address:port`. Cloning shares
/// the set, so drivers that share it never talk to one BMC at once.
#[derive(Clone, Default)]
pub struct BmcLocks {
    inner: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl fmt::Debug for BmcLocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "BmcLocks({n} BMCs)")
    }
}

/// Held while an operation talks to a BMC; dropping it lets the next one in.
pub type BmcGuard = OwnedMutexGuard<()>;

impl BmcLocks {
    /// An empty set.
    pub fn new() -> Self {
        BmcLocks::default()
    }

    /// Waits (in arrival order) until no other operation holds `key`, at
    /// most `wait`; past it the operation fails with
    /// [`PowerErrorKind::Busy`].
    pub async fn acquire(&self, key: &str, wait: Duration) -> Result<BmcGuard, PowerError> {
        let mutex = {
            // A panic while holding this std mutex cannot leave the map
            // inconsistent (insertions only), so a poisoned lock is usable.
            let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        match tokio::time::timeout(wait, mutex.lock_owned()).await {
            Ok(guard) => Ok(guard),
            Err(_) => Err(PowerError::new(
                PowerErrorKind::Busy,
                format!("BMC {key}: another operation on it was still running after {wait:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key() {
        let locks = BmcLocks::new();
        let g = locks.acquire("a:623", Duration::from_secs(1)).await;
        assert!(g.is_ok());
        // Another key is free.
        assert!(locks.acquire("b:623", Duration::from_millis(10)).await.is_ok());
        // The same key is not, and waiting past the limit says Busy.
        let e = locks.acquire("a:623", Duration::from_millis(20)).await.err();
        assert_eq!(e.map(|e| e.kind), Some(PowerErrorKind::Busy));
        drop(g);
        assert!(locks.acquire("a:623", Duration::from_millis(10)).await.is_ok());
        assert_eq!(format!("{locks:?}"), "BmcLocks(2 BMCs)");
    }
}

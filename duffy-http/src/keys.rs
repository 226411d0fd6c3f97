//! API key issuing.

use duffy_core::{ApiKeyRecord, Engine, Project, Store, StoreError, Timestamp, hash_api_key};
use tracing::warn;

/// A new random API key: a version-4 UUID, 122 random bits from the OS,
/// in the legacy format (`9c67d9c6-b5e2-4...`), safe in a URL as is.
pub fn generate_key() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Creates the project if it does not exist, and sets its quota when one
/// is given (other settings untouched): what creating a key for it needs.
pub async fn ensure_project(store: &dyn Store, project: &str, quota: Option<u32>) -> Result<(), StoreError> {
    match store.project(project).await? {
        Some(p) if quota.is_none() || p.quota == quota => Ok(()),
        Some(p) => store.upsert_project(Project { quota, ..p }).await,
        None => store.upsert_project(Project { name: project.to_string(), quota, ssh_keys: Vec::new() }).await,
    }
}

/// Creates the project if needed (updating its quota when one is given)
/// and a new key for it, directly in the store (a running engine learns of
/// it on first use; operator commands go through `operator::execute`). Returns the key, which is stored only as its hash
/// and cannot be shown again.
pub async fn create_key(
    store: &dyn Store,
    project: &str,
    admin: bool,
    quota: Option<u32>,
    now: Timestamp,
) -> Result<(String, ApiKeyRecord), StoreError> {
    ensure_project(store, project, quota).await?;
    let key = generate_key();
    let rec = store.add_api_key(project, hash_api_key(&key), admin, now, None).await?;
    Ok((key, rec))
}

/// How often a running service writes the API keys' last use (one store
/// write for every key used since the previous one).
pub const KEY_USE_RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes the engine's noted key uses every [`KEY_USE_RECORD_INTERVAL`],
/// and once more when `stop` completes, so a clean stop loses none. A
/// failed write is logged and retried at the next interval.
pub async fn record_key_use_until(engine: Engine, stop: impl std::future::Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    loop {
        let stopping = tokio::select! {
            () = &mut stop => true,
            () = tokio::time::sleep(KEY_USE_RECORD_INTERVAL) => false,
        };
        if let Err(e) = engine.flush_key_usage().await {
            warn!(error = %e, "recording the API keys' last use failed; will retry");
        }
        if stopping {
            return;
        }
    }
}

//! API key issuing.

use duffy_core::{ApiKeyRecord, Project, Store, StoreError, Timestamp, hash_api_key};

/// A new random API key: a version-4 UUID, 122 random bits from the OS,
/// in the legacy format (`9c67d9c6-b5e2-4...`), safe in a URL as is.
pub fn generate_key() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Creates the project if needed (updating its quota when one is given)
/// and a new key for it. Returns the key, which is stored only as its hash
/// and cannot be shown again.
pub async fn create_key(
    store: &dyn Store,
    project: &str,
    admin: bool,
    quota: Option<u32>,
    now: Timestamp,
) -> Result<(String, ApiKeyRecord), StoreError> {
    let existing = store.project(project).await?;
    match existing {
        Some(p) if quota.is_none() || p.quota == quota => {}
        Some(p) => store.upsert_project(Project { quota, ..p }).await?,
        None => store.upsert_project(Project { name: project.to_string(), quota, ssh_keys: Vec::new() }).await?,
    }
    let key = generate_key();
    let rec = store.add_api_key(project, hash_api_key(&key), admin, now, None).await?;
    Ok((key, rec))
}

//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_core::Store;
use duffy_core::testkit::conformance::Fixture;

/// A fresh store in its own temporary directory (removed on drop, after
/// the store).
pub struct TempStore {
    pub store: Arc<SqliteStore>,
    pub dir: tempfile::TempDir,
}

impl TempStore {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("duffy.db")
    }
}

/// The conformance suite's store; the directory goes after the check.
impl Fixture for TempStore {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
}

/// Opens a fresh store with `options` in a new temporary directory.
pub fn fresh(options: SqliteOptions) -> TempStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir.path().join("duffy.db"), options));
    TempStore { store, dir }
}

/// Opens the store at `path`.
pub fn open(path: &Path, options: SqliteOptions) -> SqliteStore {
    SqliteStore::open(path, options).expect("open store")
}

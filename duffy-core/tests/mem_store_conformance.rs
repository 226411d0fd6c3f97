//! The in-memory store passes the Store conformance suite.

use std::sync::Arc;

use duffy_core::Store;
use duffy_core::testkit::MemStore;

duffy_core::store_conformance_tests!(|| async { Arc::new(MemStore::new()) as Arc<dyn Store> });

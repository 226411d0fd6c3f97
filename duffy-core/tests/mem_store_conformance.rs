//! The in-memory store passes the Store conformance suite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;

use duffy_core::mem::MemStore;

duffy_core::store_conformance_tests!(|| async { Arc::new(MemStore::new()) });

//! duffy-core's `Store` conformance suite, on a fresh PostgreSQL database
//! per check (the same macro as every backend).

mod common;

duffy_core::store_conformance_tests!(|| async {
    // The store first: it closes before its database is dropped.
    let (store, db) = common::fresh().await;
    (std::sync::Arc::new(store), db)
});

//! duffy-core's `Store` conformance suite, on a fresh SQLite file per check
//! (default options: `synchronous=FULL`, group commit on).

mod common;

duffy_core::store_conformance_tests!(|| async { common::fresh_dyn() });

//! duffy-core's `Store` conformance suite, on a fresh SQLite file per check
//! (default options: `synchronous=FULL`, group commit on).

mod common;

use duffy_backend_sqlite::SqliteOptions;

duffy_core::store_conformance_tests!(|| async { common::fresh(SqliteOptions::default()) });

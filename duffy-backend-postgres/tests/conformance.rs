//! duffy-core's `Store` conformance suite, on a fresh PostgreSQL database
//! per check (the same macro as every backend).

mod common;

duffy_core::store_conformance_tests!(|| async { common::fresh_dyn().await });

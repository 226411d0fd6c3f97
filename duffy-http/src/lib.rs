//! # duffy-http
//!
//! The REST service that Jenkins jobs and the `cico` client call, wired to
//! the Duffy engine: the legacy-compatible API, the admin calls,
//! Prometheus metrics and a health check, plus the `duffy` binary.
//!
//! This crate is the only one that knows HTTP and the legacy wire shapes.
//! Its time is duffy-core's system clock (`duffy_core::clock::SystemClock`,
//! feature `tokio`), the only reader of the OS clock.

pub mod api;
pub mod auth_guard;
pub mod config;
pub mod control;
pub mod keys;
pub mod listener;
pub mod log_writer;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod store_copy;
pub mod ui;

pub use api::{AppState, router};
pub use config::Config;
pub use server::{Built, Running, ServeError, build_engine, serve_until, start, start_with};

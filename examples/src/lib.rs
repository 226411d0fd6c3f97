//! Examples of embedding Duffy: `embed.rs`, a scheduler with its own
//! priority queue on the test kit's deterministic harness
//! (`cargo run --example embed`), and `production.rs`, the engine wired as
//! in production: SQLite store, system clock, reconciler on tokio, the
//! simulated farm or IPMI and an install command
//! (`cargo run --example production`).

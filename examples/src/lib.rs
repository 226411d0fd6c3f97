//! Examples of embedding Duffy; see `embed.rs` (run with `cargo run --example embed`).

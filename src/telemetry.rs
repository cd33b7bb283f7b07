//! Logging setup: `tracing` to stderr with an env filter (`RUST_LOG`, default `info`), as text
//! (coloured only on a terminal) or JSON lines. Stdout is kept for the few things a person must
//! read once (the admin token created on first start).

use std::io::IsTerminal;
use tracing_subscriber::{fmt, EnvFilter};

/// Install the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

//! Logging setup: owns the one global tracing subscriber of a `mount` process.
//!
//! Writers are synchronous on purpose (no `tracing_appender::non_blocking`): the daemon sets up
//! logging before it forks, and a background writer thread would not survive the fork.

use std::fs::File;
use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::{Result, anyhow};
use tracing_subscriber::EnvFilter;

/// Where log lines go.
pub enum Target {
    /// Foreground: the terminal.
    Stderr,
    /// Daemon: `<state>/peerfs.log`, opened for append.
    File(File),
}

/// Installs the subscriber. `level` comes from the config; a non-empty `RUST_LOG` overrides it.
pub fn init(level: &str, target: Target) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::builder()
            .parse(&env)
            .map_err(|e| anyhow!("RUST_LOG {env:?}: {e}"))?,
        _ => EnvFilter::builder()
            .parse(level)
            .map_err(|e| anyhow!("log_level {level:?}: {e}"))?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match target {
        Target::Stderr => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
        Target::File(file) => builder
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .try_init(),
    };
    result.map_err(|e| anyhow!("cannot set up logging: {e}"))
}

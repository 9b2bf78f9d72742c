//! Logging through `tracing`: human lines on stderr, filtered by `RUST_LOG`
//! (by default `info` for driftd, `warn` for libraries).

use tracing_subscriber::EnvFilter;

/// Starts logging; `default` applies when `RUST_LOG` is unset.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

//! Logging through `tracing`: human lines on stderr, filtered by `RUST_LOG`
//! (by default `info` for driftd, `warn` for libraries).

use tracing_subscriber::EnvFilter;

/// sqlx logs each connect parameter of the store URL it does not know
/// (`sslpassword`, `PASSWORD`, ...) with its value at `warn`: that module
/// is kept to errors whatever `RUST_LOG` says, so no secret reaches a log.
const QUIET_SQLX_URL_PARSER: &str = "sqlx_postgres::options=error";

/// Starts logging; `default` applies when `RUST_LOG` is unset.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let filter = match QUIET_SQLX_URL_PARSER.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

//! Logging through `tracing`: human lines on stderr, filtered by `RUST_LOG`
//! (by default `info` for driftd, `warn` for libraries).
//!
//! Colour codes go to a terminal only: logs piped into a file, `journald` or
//! a CI log stay plain text, and `NO_COLOR` (<https://no-color.org>) turns
//! them off on a terminal too.

use std::ffi::OsStr;
use std::io::IsTerminal;

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
    let ansi = colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// Whether log lines may carry ANSI colour codes: only on a terminal, and
/// not when `NO_COLOR` is set to a non-empty value (an empty one counts as
/// unset, as the convention says).
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::colour_wanted;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(false, Some(OsStr::new(""))));
    }
}

//! Rendering a [`PassReport`] for people (a small table) and the exit code
//! the CLI derives from it.

use std::fmt::Write as _;

use crate::pass::{Outcome, PassReport};

/// Exit codes of `driftd reconcile`.
pub mod exit {
    /// In sync, repaired, or a dry run.
    pub const OK: i32 = 0;
    /// An error: bad config, upstream or database failure, incomplete listing.
    pub const ERROR: i32 = 1;
    /// A guard tripped; nothing was applied.
    pub const GUARD_TRIPPED: i32 = 3;
}

pub fn exit_code(report: &PassReport) -> i32 {
    match report.outcome {
        Outcome::InSync | Outcome::Repaired | Outcome::DryRun => exit::OK,
        Outcome::GuardTripped => exit::GUARD_TRIPPED,
        Outcome::Failed | Outcome::Cancelled => exit::ERROR,
    }
}

/// A human summary of one pass.
pub fn human(r: &PassReport) -> String {
    let mut out = String::new();
    let verb = if r.dry_run || r.outcome == Outcome::GuardTripped {
        "would"
    } else {
        "done"
    };
    let _ = writeln!(
        out,
        "resource {}  mode {:?}{}  outcome {}  in {} ms",
        r.resource,
        r.mode,
        if r.dry_run { " (dry run)" } else { "" },
        r.outcome.as_str().to_uppercase(),
        r.duration_ms
    );
    let _ = writeln!(
        out,
        "  rows     local {:>9}   upstream {:>9}   pages {}",
        r.local_rows, r.upstream_rows, r.upstream_pages
    );
    let _ = writeln!(
        out,
        "  drift    missing {:>7}   stale {:>12}   extra {:>6}",
        r.found.missing, r.found.stale, r.found.extra
    );
    let _ = writeln!(
        out,
        "  {verb:<7}  insert {:>8}   update {:>11}   purge {:>6}{}",
        r.actions.insert,
        r.actions.update,
        r.actions.purge,
        if r.actions.purge_kept > 0 {
            format!("   kept (still upstream) {}", r.actions.purge_kept)
        } else {
            String::new()
        }
    );
    for (label, keys, total) in [
        ("insert", &r.keys.insert, r.actions.insert),
        ("update", &r.keys.update, r.actions.update),
        ("purge", &r.keys.purge, r.actions.purge),
    ] {
        if keys.is_empty() {
            continue;
        }
        let more = total.saturating_sub(keys.len() as u64);
        let _ = writeln!(
            out,
            "  {label} keys: {}{}",
            keys.join(", "),
            if more > 0 {
                format!(" … and {more} more")
            } else {
                String::new()
            }
        );
    }
    if let Some(g) = &r.guard {
        let _ = writeln!(out, "  guard {}: {g}", g.name());
        if r.outcome == Outcome::GuardTripped {
            let _ = writeln!(
                out,
                "  nothing was applied; rerun with --force to apply this plan"
            );
        }
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

//! Rendering a [`PassReport`] for people (a small table) and the exit code
//! the CLI derives from it.
//!
//! Whatever reaches a person uses the words the config, the JSON report and
//! the metric labels use (`full`, `purge-only`, `dry_run`, `offset`), never
//! Rust's `Debug` names: an operator should be able to grep the config, the
//! logs and `/metrics` for the same word.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::vocab::{Outcome, PassReport};

/// Exit codes of `driftd reconcile`.
pub mod exit {
    /// In sync, repaired, or a dry run.
    pub const OK: i32 = 0;
    /// An error: bad config, upstream or database failure, incomplete listing.
    pub const ERROR: i32 = 1;
    /// A guard tripped; nothing was applied.
    pub const GUARD_TRIPPED: i32 = 3;
    /// The pass applied what its mode and policy allow, but drift of other
    /// kinds is left in place (a `repair-only` pass over extra rows): the
    /// table does not equal upstream.
    pub const DRIFT_LEFT: i32 = 4;
}

/// The exit code for a report. 0 is a claim that the owned columns match
/// upstream (or that nothing was meant to change, in a dry run): promise 8,
/// "success words are earned", in `docs/DESIGN.md`.
pub fn exit_code(report: &PassReport) -> i32 {
    match report.outcome {
        Outcome::DriftLeft => exit::DRIFT_LEFT,
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
        "resource {}  mode {}{}  outcome {}  in {} ms",
        r.resource,
        r.mode.as_str(),
        if r.dry_run { " (dry run)" } else { "" },
        r.outcome.as_str(),
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
    if r.left.missing + r.left.stale + r.left.extra > 0 {
        let why = if r.dry_run {
            "a dry run applies nothing"
        } else if r.guard.is_some() && r.outcome == crate::vocab::Outcome::GuardTripped {
            "the guard stopped the pass"
        } else {
            "the mode or policy does not act on these"
        };
        let _ = writeln!(
            out,
            "  left     missing {:>7}   stale {:>12}   extra {:>6}   ({why}: not in sync)",
            r.left.missing, r.left.stale, r.left.extra
        );
    }
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
    if r.actions.yielded > 0 {
        let _ = writeln!(
            out,
            "  yielded  {} key(s) an event wrote after this pass began listing (the event is newer)",
            r.actions.yielded
        );
    }
    for (child, n) in &r.actions.cascaded {
        let _ = writeln!(
            out,
            "  cascade  {n} {child} row(s) purged with their parents"
        );
    }
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

/// A config value as the config file spells it, from its serde form: a
/// plain word for a unit variant (`full`, `text`, `delete`), the tag and its
/// fields for a tagged one (`offset (limit_param = "limit", offset_param =
/// "offset")`, `soft_delete (column = "deleted_at")`). Absent optional
/// fields are left out.
pub fn config_words<T: Serialize + ?Sized>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Json::String(word)) => word,
        Ok(Json::Object(fields)) => {
            let (head, fields) = head_and_fields(fields);
            let list = field_list(&fields);
            match (head, list.is_empty()) {
                (Some(head), true) => head,
                (Some(head), false) => format!("{head} ({list})"),
                (None, _) => list,
            }
        }
        Ok(Json::Null) => "none".into(),
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// Splits a variant's name from its fields: the `kind` tag of an internally
/// tagged enum, or the single key of an externally tagged struct variant.
fn head_and_fields(mut fields: Map<String, Json>) -> (Option<String>, Map<String, Json>) {
    if let Some(Json::String(kind)) = fields.get("kind").cloned() {
        fields.remove("kind");
        return (Some(kind), fields);
    }
    if fields.len() == 1 {
        if let Some((name, Json::Object(inner))) = fields.iter().next() {
            return (Some(name.clone()), inner.clone());
        }
    }
    (None, fields)
}

/// `a = 1, b = "x"`, in TOML's inline spelling, absent values left out.
fn field_list(fields: &Map<String, Json>) -> String {
    fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Json::Object(inner) => format!("{k} = {{ {} }}", field_list(inner)),
            other => format!("{k} = {other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::config_words;
    use crate::config::{ColumnType, Pagination, PurgeMode};
    use crate::vocab::{Mode, Outcome};

    #[derive(serde::Serialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum Tagged {
        Cursor {
            next_pointer: String,
            limit: u32,
            absent: Option<String>,
        },
        Link {},
    }

    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum External {
        SoftDelete { column: String },
        Delete,
    }

    #[test]
    fn config_values_are_spelled_as_in_the_config() {
        assert_eq!(config_words(&Mode::PurgeOnly), "purge-only");
        assert_eq!(config_words(&Outcome::DryRun), "dry_run");
        assert_eq!(config_words(&ColumnType::Boolean), "boolean");
        assert_eq!(config_words(&PurgeMode::Delete), "delete");
        assert_eq!(
            config_words(&Pagination::default()),
            r#"offset (limit_param = "limit", offset_param = "offset")"#
        );
    }

    #[test]
    fn tagged_and_external_variants_show_their_fields() {
        let cursor = Tagged::Cursor {
            next_pointer: "/next".into(),
            limit: 50,
            absent: None,
        };
        assert_eq!(
            config_words(&cursor),
            r#"cursor (limit = 50, next_pointer = "/next")"#
        );
        assert_eq!(config_words(&Tagged::Link {}), "link");
        let soft = External::SoftDelete {
            column: "deleted_at".into(),
        };
        assert_eq!(
            config_words(&soft),
            r#"soft_delete (column = "deleted_at")"#
        );
        assert_eq!(config_words(&External::Delete), "delete");
    }
}

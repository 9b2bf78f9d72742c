//! Incremental runs (`mode = "incremental"`): instead of listing the whole
//! collection, ask upstream's change feed for what changed since the
//! stored checkpoint, page by page. Each page's changes are applied in one
//! transaction together with the checkpoint the page leads to, so a run
//! killed at any moment resumes from the last page it committed: pages are
//! applied again, never skipped. The changes go through the key journal
//! like events, so a pass that began listing earlier leaves them alone. A
//! change feed never reports a row deleted while it was not listening:
//! full passes still run on their own schedule.
//!
//! A run reads the feed twice: first it only counts (the deletions, behind
//! the purge guard; a cursor that cycles), then it applies. A guard that
//! trips applies nothing, so the next run trips again: a broken feed cannot
//! delete the table a few rows per run.

use std::collections::{HashMap, HashSet};

use serde_json::Value as Json;

use super::run::{Hooks, PassError};
use crate::config::ResourceConfig;
use crate::decode::{resolve, RowDecoder};
use crate::model::{key_from_json, Key};
use crate::store::{Change, ChangeResult, Store};
use crate::upstream::{Client, UpstreamError};
use crate::vocab::{GuardTrip, Outcome, PassReport};

/// Runs the change feed from the checkpoint to its end, filling `report`.
pub(super) async fn execute<S: Store>(
    store: &S,
    name: &str,
    res: &ResourceConfig,
    dry_run: bool,
    force: bool,
    hooks: &Hooks<'_>,
    report: &mut PassReport,
) -> Result<(), PassError> {
    let Some(inc) = &res.incremental else {
        return Err(PassError::Config(format!(
            "mode incremental needs [resources.{name}.incremental] (the change feed's since_param and cursor_pointer)"
        )));
    };
    let mut client = Client::new(&res.upstream)?;
    if let Some(m) = &hooks.metrics {
        client = client.observed(name, m.clone());
    }
    let feed = Feed {
        store,
        name,
        res,
        client,
        decoder: RowDecoder::new(res),
        spec: res.table_spec(),
        path: inc.path.as_deref().unwrap_or(&res.upstream.list_path),
        items_pointer: inc
            .items_pointer
            .as_deref()
            .unwrap_or(&res.upstream.items_pointer),
        inc,
        hooks,
    };
    let shape = store.prepare(&feed.spec).await?;
    let start = store
        .checkpoint(name)
        .await?
        .unwrap_or_else(|| inc.initial.clone());
    tracing::info!(checkpoint = %start, "incremental run from the stored checkpoint");
    // First, count: nothing is applied if the run would delete too much.
    let counted = feed.walk(&shape, &start, None, report).await?;
    if counted.deletes > res.policy.max_purge_count && !force && res.policy.purge_extra {
        report.guard = Some(GuardTrip::PurgeCount {
            purge: counted.deletes,
            max: res.policy.max_purge_count,
        });
        report.outcome = Outcome::GuardTripped;
        tracing::warn!(deletes = counted.deletes, max = res.policy.max_purge_count, checkpoint = %start, "incremental run stopped before applying anything: the feed deletes more rows than policy.max_purge_count");
        return Ok(());
    }
    if dry_run {
        report.actions.update = counted.upserts;
        report.actions.purge = counted.deletes;
        report.outcome = outcome(
            counted.upserts + counted.deletes > 0,
            true,
            &counted,
            report,
        );
        return Ok(());
    }
    if counted.caught_up && counted.cursor == start {
        // Nothing new: the feed's end is where the checkpoint is.
        report.outcome = outcome(false, false, &counted, report);
        return Ok(());
    }
    let applied = feed
        .walk(&shape, &start, Some(counted.deletes.max(1)), report)
        .await?;
    report.outcome = outcome(applied.changed, false, &applied, report);
    tracing::info!(checkpoint = %applied.cursor, pages = applied.pages, "incremental run done");
    Ok(())
}

/// How a run ends: not at the end of the feed is a failure to say so;
/// deletions left by policy are drift left.
fn outcome(changed: bool, dry_run: bool, walked: &Walked, report: &mut PassReport) -> Outcome {
    if !walked.caught_up {
        report.error = Some(format!(
            "stopped after incremental.max_pages = {} pages before the end of the feed; the next run goes on from the checkpoint",
            walked.pages
        ));
        return Outcome::Failed;
    }
    match (dry_run, changed, report.left.extra > 0) {
        (true, true, _) => Outcome::DryRun,
        (false, _, true) => Outcome::DriftLeft,
        (false, true, false) => Outcome::Repaired,
        (_, false, _) => Outcome::InSync,
    }
}

/// A resource's change feed, as one run reads it.
struct Feed<'a, S> {
    store: &'a S,
    name: &'a str,
    res: &'a ResourceConfig,
    inc: &'a crate::config::IncrementalConfig,
    client: Client,
    decoder: RowDecoder,
    spec: crate::config::TableSpec,
    path: &'a str,
    items_pointer: &'a str,
    hooks: &'a Hooks<'a>,
}

/// What a read of the feed found.
#[derive(Default)]
struct Walked {
    upserts: u64,
    deletes: u64,
    pages: u64,
    changed: bool,
    caught_up: bool,
    cursor: String,
}

impl<S: Store> Feed<'_, S> {
    /// Reads the feed from `start`; applies each page (with its checkpoint)
    /// when `apply` gives the deletions the counting read allowed.
    async fn walk(
        &self,
        shape: &crate::store::Shape,
        start: &str,
        apply: Option<u64>,
        report: &mut PassReport,
    ) -> Result<Walked, PassError> {
        let (inc, res) = (self.inc, self.res);
        let mut walked = Walked {
            cursor: start.to_string(),
            ..Walked::default()
        };
        // The counting read reports what the feed holds; the applying read
        // only what it applied.
        let counting = apply.is_none();
        let mut seen: HashSet<String> = HashSet::from([start.to_string()]);
        while walked.pages < inc.max_pages {
            if self.hooks.cancel.is_cancelled() {
                return Err(PassError::Cancelled);
            }
            let cursor = walked.cursor.clone();
            let malformed = |problem: String| {
                PassError::Upstream(UpstreamError::Malformed {
                    url: format!("{}?{}={cursor}", self.path, inc.since_param),
                    problem,
                })
            };
            let mut params: Vec<(&str, &str)> = inc
                .query
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            params.push((inc.since_param.as_str(), cursor.as_str()));
            let body = match self.client.get_path(self.path, &params).await {
                Ok(body) => body,
                Err(UpstreamError::Status { status, .. })
                    if inc.expired_statuses.contains(&status) =>
                {
                    return Err(PassError::CheckpointExpired {
                        resource: self.name.to_string(),
                        checkpoint: cursor,
                        status,
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let page: Json =
                serde_json::from_slice(&body).map_err(|e| malformed(format!("not JSON: {e}")))?;
            let next = match resolve(&page, &inc.cursor_pointer) {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Number(n)) => n.to_string(),
                _ => {
                    return Err(malformed(format!(
                        "no next checkpoint (a string or number) at `{}`",
                        inc.cursor_pointer
                    )))
                }
            };
            let Some(items) = resolve(&page, self.items_pointer).and_then(Json::as_array) else {
                return Err(malformed(format!(
                    "no array of changes at `{}`",
                    self.items_pointer
                )));
            };
            walked.pages += 1;
            if counting {
                report.upstream_pages += 1;
                report.upstream_rows += items.len() as u64;
                self.hooks
                    .progress
                    .listed(report.upstream_pages, report.upstream_rows);
            }
            if items.is_empty() && next == cursor {
                walked.caught_up = true;
                break;
            }
            if !seen.insert(next.clone()) {
                return Err(malformed(format!(
                    "the next checkpoint `{next}` was already visited in this run: the feed's cursor cycles"
                )));
            }
            let mut changes = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let deleted = match inc.deleted_pointer.as_deref() {
                    None => false,
                    Some(p) => is_deleted(resolve(item, p), &inc.deleted_value)
                        .map_err(|e| malformed(format!("change {i}: `{p}`: {e}")))?,
                };
                if deleted {
                    let key = key_from_json(resolve(item, &res.key.upstream), res.key.kind)
                        .map_err(|e| malformed(format!("change {i}: key: {e}")))?;
                    if counting {
                        report.found.extra += 1;
                    }
                    if !res.policy.purge_extra {
                        if counting {
                            report.left.extra += 1;
                        }
                        continue;
                    }
                    walked.deletes += 1;
                    changes.push(Change {
                        key,
                        row: None,
                        version: None,
                    });
                } else {
                    let row = self
                        .decoder
                        .item(item)
                        .map_err(|e| malformed(format!("change {i}: {e}")))?;
                    shape
                        .check_row(&self.spec, &row)
                        .map_err(|e| PassError::DoesNotFit(e.to_string()))?;
                    if counting {
                        report.found.stale += 1;
                    }
                    walked.upserts += 1;
                    changes.push(Change {
                        key: row.key.clone(),
                        row: Some(row),
                        version: None,
                    });
                }
            }
            if let Some(allowed) = apply {
                // The feed grew since it was counted: the guard holds.
                if walked.deletes > allowed.max(self.res.policy.max_purge_count) {
                    return Err(PassError::Config(format!(
                        "the feed lists {} deletions now, more than the {allowed} counted and allowed; nothing more applied (run again)",
                        walked.deletes
                    )));
                }
                walked.changed |= self.apply(&changes, &next, report).await?;
            }
            walked.cursor = next;
            if items.is_empty() {
                walked.caught_up = true;
                break;
            }
        }
        Ok(walked)
    }

    /// Applies one page and stores its checkpoint. The children of parents
    /// the page leaves deleted are purged before the checkpoint moves: a
    /// cascade that fails is tried again by the next run.
    async fn apply(
        &self,
        changes: &[Change],
        next: &str,
        report: &mut PassReport,
    ) -> Result<bool, PassError> {
        // Each key's last change in the page decides whether it ends
        // deleted (a delete then a re-create leaves the parent alive).
        let mut last: HashMap<&str, bool> = HashMap::new();
        for c in changes {
            last.insert(c.key.as_str(), c.row.is_none());
        }
        let gone: Vec<Key> = changes
            .iter()
            .filter(|c| c.row.is_none() && last.remove(c.key.as_str()) == Some(true))
            .map(|c| c.key.clone())
            .collect();
        let cascades = !gone.is_empty() && !self.res.children.is_empty();
        let checkpoint = (!cascades).then_some(next);
        let results = self
            .store
            .apply_changes(&self.spec, self.name, changes, checkpoint)
            .await?;
        let mut changed = false;
        for (c, r) in changes.iter().zip(&results) {
            if *r != ChangeResult::Applied {
                continue;
            }
            changed = true;
            match &c.row {
                Some(_) => report.actions.update += 1,
                None => report.actions.purge += 1,
            }
            if report.keys.update.len() + report.keys.purge.len() < 10 {
                match &c.row {
                    Some(_) => report.keys.update.push(c.key.to_string()),
                    None => report.keys.purge.push(c.key.to_string()),
                }
            }
        }
        if cascades {
            for (child, n) in
                super::cascade(self.store, &self.res.children, self.name, &gone, true).await?
            {
                *report.actions.cascaded.entry(child).or_default() += n;
            }
            self.store
                .apply_changes(&self.spec, self.name, &[], Some(next))
                .await?;
        }
        Ok(changed)
    }
}

/// Whether a change's deleted marker says deleted. A boolean marker also
/// takes its usual spellings (`1`/`0`, `"true"`/`"false"`, any case);
/// another value is refused, never read as a live row. A marker of
/// another kind must equal `expected`; absent or null is not deleted.
fn is_deleted(marker: Option<&Json>, expected: &Json) -> Result<bool, String> {
    let Some(v) = marker.filter(|v| !v.is_null()) else {
        return Ok(false);
    };
    if v == expected {
        return Ok(true);
    }
    let Json::Bool(want) = expected else {
        return Ok(false);
    };
    let flag = match v {
        Json::Bool(b) => Some(*b),
        Json::Number(n) => match n.to_string().as_str() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        },
        Json::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    };
    match flag {
        Some(f) => Ok(f == *want),
        None => Err(format!(
            "deleted marker {v} is neither true nor false (1/0, \"true\"/\"false\")"
        )),
    }
}

#[cfg(test)]
mod deleted_marker_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_boolean_marker_takes_its_spellings_and_refuses_others() {
        let t = json!(true);
        for yes in [
            json!(true),
            json!(1),
            json!("true"),
            json!("TRUE"),
            json!("1"),
        ] {
            assert_eq!(is_deleted(Some(&yes), &t), Ok(true), "{yes}");
        }
        for no in [
            json!(false),
            json!(0),
            json!("false"),
            json!("0"),
            Json::Null,
        ] {
            assert_eq!(is_deleted(Some(&no), &t), Ok(false), "{no}");
        }
        assert_eq!(is_deleted(None, &t), Ok(false));
        assert!(is_deleted(Some(&json!("yes please")), &t).is_err());
        assert!(is_deleted(Some(&json!(2)), &t).is_err());
        // A marker of another kind: equality.
        let gone = json!("deleted");
        assert_eq!(is_deleted(Some(&json!("deleted")), &gone), Ok(true));
        assert_eq!(is_deleted(Some(&json!("active")), &gone), Ok(false));
    }
}

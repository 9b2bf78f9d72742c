//! Incremental runs (`mode = "incremental"`): instead of listing the whole
//! collection, ask upstream's change feed for what changed since the
//! stored checkpoint, page by page. Each page's changes are applied in one
//! transaction together with the checkpoint the page leads to, so a run
//! killed at any moment resumes from the last page it committed: pages are
//! applied again, never skipped. The changes go through the key journal
//! like events, so a pass that began listing earlier leaves them alone. A
//! change feed never reports a row deleted while it was not listening:
//! full passes still run on their own schedule.

use serde_json::Value as Json;

use super::pass::{Hooks, PassError};
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
    let spec = res.table_spec();
    let shape = store.prepare(&spec).await?;
    let mut client = Client::new(&res.upstream)?;
    if let Some(m) = &hooks.metrics {
        client = client.observed(name, m.clone());
    }
    let decoder = RowDecoder::new(res);
    let path = inc.path.as_deref().unwrap_or(&res.upstream.list_path);
    let items_pointer = inc
        .items_pointer
        .as_deref()
        .unwrap_or(&res.upstream.items_pointer);
    let mut cursor = store
        .checkpoint(name)
        .await?
        .unwrap_or_else(|| inc.initial.clone());
    tracing::info!(checkpoint = %cursor, "incremental run from the stored checkpoint");
    let malformed = |cursor: &str, problem: String| {
        PassError::Upstream(UpstreamError::Malformed {
            url: format!("{path}?{}={cursor}", inc.since_param),
            problem,
        })
    };
    let mut deletes_seen = 0u64;
    let mut changed = false;
    for _ in 0..inc.max_pages {
        if hooks.cancel.is_cancelled() {
            return Err(PassError::Cancelled);
        }
        let mut params: Vec<(&str, &str)> = inc
            .query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        params.push((inc.since_param.as_str(), cursor.as_str()));
        let body = client.get_path(path, &params).await?;
        let page: Json = serde_json::from_slice(&body)
            .map_err(|e| malformed(&cursor, format!("not JSON: {e}")))?;
        let next = match resolve(&page, &inc.cursor_pointer) {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(n)) => n.to_string(),
            _ => {
                return Err(malformed(
                    &cursor,
                    format!(
                        "no next checkpoint (a string or number) at `{}`",
                        inc.cursor_pointer
                    ),
                ))
            }
        };
        let Some(items) = resolve(&page, items_pointer).and_then(Json::as_array) else {
            return Err(malformed(
                &cursor,
                format!("no array of changes at `{items_pointer}`"),
            ));
        };
        report.upstream_pages += 1;
        report.upstream_rows += items.len() as u64;
        hooks
            .progress
            .listed(report.upstream_pages, report.upstream_rows);
        if items.is_empty() && next == cursor {
            break; // caught up
        }
        if !items.is_empty() && next == cursor {
            return Err(malformed(
                &cursor,
                "the next checkpoint is the one asked for: the feed does not advance".into(),
            ));
        }
        let mut changes = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let deleted = inc
                .deleted_pointer
                .as_deref()
                .is_some_and(|p| resolve(item, p) == Some(&inc.deleted_value));
            if deleted {
                let key = key_from_json(resolve(item, &res.key.upstream), res.key.kind)
                    .map_err(|e| malformed(&cursor, format!("change {i}: key: {e}")))?;
                report.found.extra += 1;
                if !res.policy.purge_extra {
                    report.left.extra += 1;
                    continue;
                }
                deletes_seen += 1;
                changes.push(Change {
                    key,
                    row: None,
                    version: None,
                });
            } else {
                let row = decoder
                    .item(item)
                    .map_err(|e| malformed(&cursor, format!("change {i}: {e}")))?;
                shape
                    .check_row(&spec, &row)
                    .map_err(|e| PassError::DoesNotFit(e.to_string()))?;
                report.found.stale += 1;
                changes.push(Change {
                    key: row.key.clone(),
                    row: Some(row),
                    version: None,
                });
            }
        }
        // Deletions a feed lists are explicit, but a broken feed can list
        // everything as deleted: the run stops before the page that takes
        // it over the purge count (the pages before it stay applied).
        if deletes_seen > res.policy.max_purge_count && !force && res.policy.purge_extra {
            report.guard = Some(GuardTrip::PurgeCount {
                purge: deletes_seen,
                max: res.policy.max_purge_count,
            });
            report.outcome = Outcome::GuardTripped;
            tracing::warn!(deletes = deletes_seen, max = res.policy.max_purge_count, checkpoint = %cursor, "incremental run stopped: the feed deletes more rows than policy.max_purge_count");
            return Ok(());
        }
        if dry_run {
            report.actions.update += changes.iter().filter(|c| c.row.is_some()).count() as u64;
            report.actions.purge += changes.iter().filter(|c| c.row.is_none()).count() as u64;
            changed |= !changes.is_empty();
        } else {
            let results = store
                .apply_changes(&spec, name, &changes, Some(&next))
                .await?;
            let mut purged: Vec<Key> = Vec::new();
            for (c, r) in changes.iter().zip(&results) {
                if *r != ChangeResult::Applied {
                    continue;
                }
                changed = true;
                match &c.row {
                    Some(_) => report.actions.update += 1,
                    None => {
                        report.actions.purge += 1;
                        purged.push(c.key.clone());
                    }
                }
                if report.keys.update.len() + report.keys.purge.len() < 10 {
                    match &c.row {
                        Some(_) => report.keys.update.push(c.key.to_string()),
                        None => report.keys.purge.push(c.key.to_string()),
                    }
                }
            }
            for (child, n) in super::cascade(store, &res.children, name, &purged).await? {
                *report.actions.cascaded.entry(child).or_default() += n;
            }
        }
        cursor = next;
        if items.is_empty() {
            break;
        }
    }
    report.outcome = match (dry_run, changed) {
        (true, true) => Outcome::DryRun,
        (false, true) => Outcome::Repaired,
        (_, false) => Outcome::InSync,
    };
    tracing::info!(checkpoint = %cursor, pages = report.upstream_pages, changes = report.upstream_rows, "incremental run reached the end of the feed");
    Ok(())
}

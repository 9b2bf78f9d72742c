//! The engine: one pass ([`pass`]: the [`upstream`] pager, the [`decode`]r,
//! the [`diff`]er and the [`guard`]s) and the events engine ([`events`]),
//! the two writers of a mirrored table. Both go through
//! the store's fenced writes ([`crate::store::Mirror`]), so an event
//! applied after a pass began listing is never undone by that pass, on any
//! replica; both purge children when they purge parents ([`cascade`]).

pub mod decode;
pub mod diff;
pub mod events;
pub mod guard;
pub mod incremental;
pub mod markers;
pub mod pass;
pub mod reprovision;
pub mod rows;
pub mod run;
pub mod upstream;

use crate::config::ChildLink;
use crate::model::Key;
use crate::store::{Store, StoreError};

/// Why purging `parents` would cascade past a child's own purge guard
/// (more rows than its `max_purge_count`, or a larger share of its live
/// rows than its `max_purge_fraction`), if it would: such a cascade is
/// held, and its parents are kept too, so no child is left orphaned.
pub async fn cascade_hold<S: Store>(
    store: &S,
    children: &[ChildLink],
    parent: &str,
    parents: &[Key],
) -> Result<Option<String>, StoreError> {
    for child in children.iter().filter(|c| c.purge_extra) {
        store.prepare(&child.spec).await?;
        let count = store
            .count_children(&child.spec, &child.column, parents)
            .await?;
        if let Some(why) = child_guard(store, child, count).await? {
            return Ok(Some(format!(
                "purging {} `{parent}` row(s) would purge {count} `{}` row(s): {why}",
                parents.len(),
                child.resource
            )));
        }
    }
    Ok(None)
}

/// The child's purge guard on purging `count` of its rows.
async fn child_guard<S: Store>(
    store: &S,
    child: &ChildLink,
    count: u64,
) -> Result<Option<String>, StoreError> {
    if count == 0 {
        return Ok(None);
    }
    if count > child.max_purge_count {
        return Ok(Some(format!(
            "more than the child's policy.max_purge_count ({})",
            child.max_purge_count
        )));
    }
    let live = store.count_live(&child.spec).await?;
    let fraction = count as f64 / live.max(1) as f64;
    if fraction > child.max_purge_fraction {
        return Ok(Some(format!(
            "{:.1}% of its {live} rows, more than the child's policy.max_purge_fraction ({:.1}%)",
            fraction * 100.0,
            child.max_purge_fraction * 100.0
        )));
    }
    Ok(None)
}

/// Purges the children of purged parents, resource by resource. A child
/// resource that does not purge (`purge_extra = false`) keeps them (its
/// next pass finds them extra). `guarded`: a child that would lose more
/// rows than its `max_purge_count` or `max_purge_fraction` keeps them too;
/// callers that judged the whole purge with [`cascade_hold`] before
/// deleting any parent pass `false`, so that a purge applied in batches is
/// not judged again against a table its earlier batches shrank (which
/// would keep children of parents already deleted). Returns the rows
/// purged per child resource.
pub async fn cascade<S: Store>(
    store: &S,
    children: &[ChildLink],
    parent: &str,
    purged: &[Key],
    guarded: bool,
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut done = Vec::new();
    if purged.is_empty() {
        return Ok(done);
    }
    for child in children {
        if !child.purge_extra {
            tracing::info!(parent, child = %child.resource, "children of purged parents kept: the child resource does not purge (policy.purge_extra = false)");
            continue;
        }
        // Also checks the child table can be mirrored, and lets the store
        // learn its column types.
        store.prepare(&child.spec).await?;
        let count = store
            .count_children(&child.spec, &child.column, purged)
            .await?;
        if count == 0 {
            continue;
        }
        let why = match guarded {
            true => child_guard(store, child, count).await?,
            false => None,
        };
        if let Some(why) = why {
            tracing::warn!(
                parent,
                child = %child.resource,
                rows = count,
                why,
                "children of purged parents kept; its next pass judges them"
            );
            continue;
        }
        let keys = store
            .purge_children(&child.spec, &child.resource, &child.column, purged)
            .await?;
        tracing::info!(parent, child = %child.resource, rows = keys.len(), "purged children of purged parents");
        done.push((child.resource.clone(), keys.len() as u64));
    }
    Ok(done)
}

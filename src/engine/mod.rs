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
pub mod pass;
pub mod reprovision;
pub mod rows;
pub mod upstream;

use crate::config::ChildLink;
use crate::model::Key;
use crate::store::{Store, StoreError};

/// Purges the children of purged parents, resource by resource, each
/// behind its own purge guard: a child resource that does not purge
/// (`purge_extra = false`), or would lose more rows than its
/// `max_purge_count`, keeps them (its next pass finds them extra, behind
/// the same guards). Returns the rows purged per child resource.
pub async fn cascade<S: Store>(
    store: &S,
    children: &[ChildLink],
    parent: &str,
    purged: &[Key],
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
        if count > child.max_purge_count {
            tracing::warn!(
                parent,
                child = %child.resource,
                rows = count,
                max = child.max_purge_count,
                "children of purged parents kept: more than the child's policy.max_purge_count; its next pass judges them"
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

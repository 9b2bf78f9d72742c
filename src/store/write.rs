//! The fenced writes both backends share: what a pass batch, an event
//! batch and a cascade do inside one transaction, over the few statements
//! each backend words its own way ([`WriteTx`]).

use std::collections::HashMap;
use std::future::Future;

use super::{
    judge_versions, unfenced, Change, ChangeBatch, ChangeResult, Owned, PassWrite, StoreError,
    Written,
};
use crate::config::{Ident, TableSpec};
use crate::model::{Key, Row};

/// A backend's open write transaction.
pub(crate) trait WriteTx: Send {
    /// Locks the resource's write fence; with `next`, takes a new mark.
    fn fence(
        &mut self,
        resource: &str,
        next: bool,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Those of `keys` journaled after mark `since`.
    fn journaled_since(
        &mut self,
        resource: &str,
        since: i64,
        keys: &[&str],
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// The journaled versions of `keys` (those that have one).
    fn versions(
        &mut self,
        resource: &str,
        keys: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, String>, StoreError>> + Send;
    /// Records that `entries` (key, version) were written at mark `seq`.
    fn journal(
        &mut self,
        resource: &str,
        seq: i64,
        entries: &[(&str, Option<&str>)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn insert_rows(
        &mut self,
        spec: &TableSpec,
        rows: &[Row],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn update_rows(
        &mut self,
        spec: &TableSpec,
        rows: &[Row],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn purge_keys(
        &mut self,
        spec: &TableSpec,
        keys: &[Key],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The live rows whose `column` holds one of `parents`.
    fn children(
        &mut self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> impl Future<Output = Result<Vec<Key>, StoreError>> + Send;
    /// Stores the resource's checkpoint (`driftd_checkpoints`).
    fn save_checkpoint(
        &mut self,
        resource: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn commit(self, what: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// [`super::Mirror::write_pass`] in `tx`.
pub(crate) async fn pass<T: WriteTx>(
    mut tx: T,
    spec: &TableSpec,
    resource: &str,
    since: i64,
    write: PassWrite<'_>,
) -> Result<Written, StoreError> {
    tx.fence(resource, false).await?;
    let keys: Vec<&str> = match write {
        PassWrite::Insert(rows) | PassWrite::Update(rows) => {
            rows.iter().map(|r| r.key.as_str()).collect()
        }
        PassWrite::Purge(keys) => keys.iter().map(Key::as_str).collect(),
    };
    let touched = tx.journaled_since(resource, since, &keys).await?;
    let (write, yielded) = unfenced(write, &touched);
    let done = match &write {
        Owned::Insert(rows) => {
            // A soft-deleted row with the key is revived, not duplicated.
            let revived = if spec.soft_delete.is_some() {
                tx.update_rows(spec, rows).await?
            } else {
                0
            };
            revived + tx.insert_rows(spec, rows).await?
        }
        Owned::Update(rows) => tx.update_rows(spec, rows).await?,
        Owned::Purge(keys) => tx.purge_keys(spec, keys).await?,
    };
    tx.commit("commit pass write").await?;
    Ok(Written { done, yielded })
}

/// [`super::Mirror::apply_changes`] in `tx`: in order. Changes to distinct
/// keys go together; a key met again starts a new round, which sees what
/// the rounds before it wrote (rows and journaled versions), so a batch
/// ends as the same changes applied one by one would leave it.
pub(crate) async fn changes<T: WriteTx>(
    mut tx: T,
    spec: &TableSpec,
    resource: &str,
    changes: &[Change],
    checkpoint: Option<&str>,
) -> Result<Vec<ChangeResult>, StoreError> {
    let seq = tx.fence(resource, true).await?;
    let mut results = vec![ChangeResult::Applied; changes.len()];
    let rounds = rounds(changes);
    for round in &rounds {
        // Usually one round of every change: no copy then.
        let copied: Vec<Change>;
        let these: &[Change] = if rounds.len() == 1 {
            changes
        } else {
            copied = round.iter().map(|&i| changes[i].clone()).collect();
            &copied
        };
        let versioned: Vec<&str> = these
            .iter()
            .filter(|c| c.version.is_some())
            .map(|c| c.key.as_str())
            .collect();
        let stored = if versioned.is_empty() {
            HashMap::new()
        } else {
            tx.versions(resource, &versioned).await?
        };
        let judged = judge_versions(these, &stored);
        let batch = ChangeBatch::new(these, &judged);
        if !batch.upserts.is_empty() {
            // Revives soft-deleted rows, updates live ones, inserts the rest.
            let updated = tx.update_rows(spec, &batch.upserts).await?;
            let inserted = tx.insert_rows(spec, &batch.upserts).await?;
            // Each key is updated or inserted, once: fewer rows means the
            // database dropped some (a trigger returning NULL, RAISE(IGNORE)).
            // A table of the key alone has nothing to update.
            let written = batch.upserts.len() as u64;
            let updates = !spec.columns.is_empty() || spec.soft_delete.is_some();
            if updates && updated + inserted < written {
                return Err(StoreError::NotKept {
                    table: spec.table.to_string(),
                    kept: updated + inserted,
                    written,
                });
            }
        }
        if !batch.deletes.is_empty() {
            tx.purge_keys(spec, &batch.deletes).await?;
        }
        tx.journal(resource, seq, &batch.journal).await?;
        for (&i, r) in round.iter().zip(judged) {
            results[i] = r;
        }
    }
    if let Some(value) = checkpoint {
        tx.save_checkpoint(resource, value).await?;
    }
    tx.commit("commit events").await?;
    Ok(results)
}

/// Splits changes into rounds of distinct keys, in order: a change goes in
/// the round after the last one holding its key.
fn rounds(changes: &[Change]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        let r = last.get(c.key.as_str()).map_or(0, |r| r + 1);
        if rounds.len() <= r {
            rounds.push(Vec::new());
        }
        rounds[r].push(i);
        last.insert(c.key.as_str(), r);
    }
    rounds
}

/// [`super::Mirror::purge_children`] in `tx`.
pub(crate) async fn children<T: WriteTx>(
    mut tx: T,
    spec: &TableSpec,
    resource: &str,
    column: &Ident,
    parents: &[Key],
) -> Result<Vec<Key>, StoreError> {
    let seq = tx.fence(resource, true).await?;
    let keys = tx.children(spec, column, parents).await?;
    if !keys.is_empty() {
        tx.purge_keys(spec, &keys).await?;
    }
    let entries: Vec<(&str, Option<&str>)> = keys.iter().map(|k| (k.as_str(), None)).collect();
    tx.journal(resource, seq, &entries).await?;
    tx.commit("commit cascade").await?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str) -> Change {
        Change {
            key: Key(key.into()),
            row: None,
            version: None,
        }
    }

    #[test]
    fn a_key_met_again_waits_for_the_next_round() {
        let cs: Vec<Change> = ["a", "b", "a", "c", "a", "b"].map(change).into();
        assert_eq!(rounds(&cs), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
    }
}

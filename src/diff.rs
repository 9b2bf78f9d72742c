//! The diff: a pure computation from the local table and the upstream listing
//! to a [`Plan`] `{insert, update, purge}`. No I/O here.
//!
//! Memory: the local side is reduced to an index of key → 64-bit fingerprint
//! (about 100 bytes a row with a 36-byte key). Upstream rows stream through
//! [`Differ::observe`] page by page; only rows that need a write (missing or
//! stale) are kept, with their values, so memory grows with the table's key
//! count and with the drift, never with the size of the upstream documents.
//! The limit: a table with tens of millions of rows, or a pass whose drift is
//! most of the table, holds correspondingly more.
//!
//! The differ also checks what makes a listing incomplete and can only be
//! seen row by row: a key listed twice, and keys breaking the promised order.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use crate::config::{KeyOrder, KeyType};
use crate::model::{fingerprint, Key, Row};

/// Index bit marking a local row as seen in the upstream listing.
pub const SEEN: u64 = 1 << 63;

/// A reason the listing cannot be trusted, found while diffing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    #[error("key `{0}` was listed twice (repeated page or shifting offsets)")]
    DuplicateKey(Key),
    #[error("key `{key}` came after `{previous}`, breaking the promised ascending order")]
    OutOfOrder { previous: Key, key: Key },
}

/// A problem in the local table that makes a pass impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("local table has key `{0}` twice; driftd needs a unique key column")]
pub struct DuplicateLocalKey(pub Key);

/// Local rows reduced to key → fingerprint.
#[derive(Debug, Default)]
pub struct LocalIndex {
    rows: HashMap<Key, u64>,
}

impl LocalIndex {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            rows: HashMap::with_capacity(n),
        }
    }

    /// Adds a local row by its fingerprint (see [`fingerprint`]).
    pub fn insert(&mut self, key: Key, fp: u64) -> Result<(), DuplicateLocalKey> {
        match self.rows.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => {
                Err(DuplicateLocalKey(e.key().clone()))
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(fp & !SEEN);
                Ok(())
            }
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// What a pass would change.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Upstream rows with no local row.
    pub insert: Vec<Row>,
    /// Upstream rows whose local row differs in an owned column.
    pub update: Vec<Row>,
    /// Local keys absent from the complete upstream listing.
    pub purge: Vec<Key>,
    /// Rows in the local table when scanned.
    pub local_rows: u64,
    /// Rows in the upstream listing.
    pub upstream_rows: u64,
    /// A key the listing had, to check that the get-by-key endpoint finds
    /// it before trusting its 404s.
    pub canary: Option<Key>,
}

/// Streams upstream rows against a [`LocalIndex`].
pub struct Differ {
    index: LocalIndex,
    order: KeyOrder,
    key_type: KeyType,
    previous: Option<Key>,
    /// Keys of `insert`, to catch a missing row listed twice.
    new_keys: HashSet<Key>,
    plan: Plan,
}

impl Differ {
    pub fn new(index: LocalIndex, order: KeyOrder, key_type: KeyType) -> Self {
        let local_rows = index.len() as u64;
        Self {
            index,
            order,
            key_type,
            previous: None,
            new_keys: HashSet::new(),
            plan: Plan {
                local_rows,
                ..Plan::default()
            },
        }
    }

    /// Takes one upstream row, in listing order.
    pub fn observe(&mut self, row: Row) -> Result<(), ListingError> {
        self.check_order(&row.key)?;
        self.plan.upstream_rows += 1;
        if self.plan.canary.is_none() {
            self.plan.canary = Some(row.key.clone());
        }
        match self.index.rows.get_mut(&row.key) {
            Some(slot) => {
                if *slot & SEEN != 0 {
                    return Err(ListingError::DuplicateKey(row.key));
                }
                let differs = *slot != fingerprint(&row.values);
                *slot |= SEEN;
                if differs {
                    self.plan.update.push(row);
                }
            }
            None => {
                if !self.new_keys.insert(row.key.clone()) {
                    return Err(ListingError::DuplicateKey(row.key));
                }
                self.plan.insert.push(row);
            }
        }
        Ok(())
    }

    fn check_order(&mut self, key: &Key) -> Result<(), ListingError> {
        if self.order == KeyOrder::None {
            return Ok(());
        }
        if let Some(prev) = &self.previous {
            if compare_keys(prev, key, self.key_type) != Ordering::Less {
                if prev == key {
                    return Err(ListingError::DuplicateKey(key.clone()));
                }
                return Err(ListingError::OutOfOrder {
                    previous: prev.clone(),
                    key: key.clone(),
                });
            }
        }
        self.previous = Some(key.clone());
        Ok(())
    }

    /// Ends the listing: every local row not seen becomes a purge candidate.
    /// Call only after the listing is known complete.
    pub fn finish(mut self) -> Plan {
        let mut purge: Vec<Key> = self
            .index
            .rows
            .into_iter()
            .filter(|(_, fp)| fp & SEEN == 0)
            .map(|(k, _)| k)
            .collect();
        purge.sort_unstable();
        self.plan.purge = purge;
        self.plan
    }
}

fn compare_keys(a: &Key, b: &Key, kind: KeyType) -> Ordering {
    match kind {
        KeyType::Text => a.as_str().as_bytes().cmp(b.as_str().as_bytes()),
        KeyType::Integer => match (a.as_str().parse::<i64>(), b.as_str().parse::<i64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Value;

    fn key(s: &str) -> Key {
        Key(s.into())
    }
    fn row(k: &str, v: &str) -> Row {
        Row {
            key: key(k),
            values: vec![Value::Text(v.into())],
        }
    }
    fn index(rows: &[(&str, &str)]) -> LocalIndex {
        let mut idx = LocalIndex::default();
        for (k, v) in rows {
            idx.insert(key(k), fingerprint(&[Value::Text((*v).into())]))
                .unwrap();
        }
        idx
    }

    #[test]
    fn classifies_missing_extra_stale_and_equal() {
        let mut d = Differ::new(
            index(&[("a", "1"), ("b", "2"), ("c", "3")]),
            KeyOrder::None,
            KeyType::Text,
        );
        d.observe(row("a", "1")).unwrap();
        d.observe(row("b", "changed")).unwrap();
        d.observe(row("d", "4")).unwrap();
        let plan = d.finish();
        assert_eq!(plan.insert, vec![row("d", "4")]);
        assert_eq!(plan.update, vec![row("b", "changed")]);
        assert_eq!(plan.purge, vec![key("c")]);
        assert_eq!((plan.local_rows, plan.upstream_rows), (3, 3));
    }

    #[test]
    fn duplicate_keys_are_listing_errors() {
        let mut d = Differ::new(index(&[("a", "1")]), KeyOrder::None, KeyType::Text);
        d.observe(row("a", "1")).unwrap();
        assert_eq!(
            d.observe(row("a", "1")),
            Err(ListingError::DuplicateKey(key("a")))
        );
        let mut d = Differ::new(index(&[]), KeyOrder::None, KeyType::Text);
        d.observe(row("z", "1")).unwrap();
        assert_eq!(
            d.observe(row("z", "1")),
            Err(ListingError::DuplicateKey(key("z")))
        );
    }

    #[test]
    fn order_is_checked_when_promised() {
        let mut d = Differ::new(index(&[]), KeyOrder::Asc, KeyType::Text);
        d.observe(row("a", "1")).unwrap();
        d.observe(row("c", "1")).unwrap();
        assert!(matches!(
            d.observe(row("b", "1")),
            Err(ListingError::OutOfOrder { .. })
        ));
        let mut d = Differ::new(index(&[]), KeyOrder::Asc, KeyType::Integer);
        d.observe(row("9", "1")).unwrap();
        d.observe(row("10", "1")).unwrap();
        let mut d = Differ::new(index(&[]), KeyOrder::None, KeyType::Text);
        d.observe(row("b", "1")).unwrap();
        d.observe(row("a", "1")).unwrap();
    }

    #[test]
    fn local_duplicates_are_refused() {
        let mut idx = LocalIndex::default();
        idx.insert(key("a"), 1).unwrap();
        assert_eq!(idx.insert(key("a"), 2), Err(DuplicateLocalKey(key("a"))));
    }
}

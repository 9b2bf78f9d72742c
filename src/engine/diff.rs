//! The diff: a pure computation from the local table and the upstream listing
//! to a [`Plan`] `{insert, update, purge}`. No I/O here.
//!
//! Memory: the local side is reduced to an index of key → 64-bit fingerprint
//! (about 70 bytes a row with a 36-byte key, see [`LocalIndex`]). Upstream rows stream through
//! [`Differ::observe`] page by page; only rows that need a write (missing or
//! stale) are kept, with their values, so memory grows with the table's key
//! count and with the drift, never with the size of the upstream documents.
//! The limit: a table with tens of millions of rows, or a pass whose drift is
//! most of the table, holds correspondingly more.
//!
//! The differ also checks what makes a listing incomplete and can only be
//! seen row by row: a key listed twice, and keys breaking the promised order.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

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

/// A problem building the local index that makes a pass impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("local table has key `{0}` twice; driftd needs a unique key column")]
    DuplicateKey(Key),
    #[error("local keys exceed 4 GiB in total; the index cannot hold them")]
    Full,
}

/// Where one local row's key sits in the arena, and its fingerprint (with
/// the [`SEEN`] bit). 16 bytes a row.
#[derive(Debug, Clone, Copy)]
struct Slot {
    start: u32,
    len: u32,
    fp: u64,
}

/// Local rows reduced to key → fingerprint: the keys' text in one arena
/// string, a hash table of 16-byte slots pointing into it. About 2 × 17
/// bytes of table plus the key's length per row: some 70 MB for a million
/// 36-character keys, a third less than a map of boxed strings, and one
/// allocation instead of a million.
pub struct LocalIndex {
    arena: String,
    table: HashTable<Slot>,
    hasher: DefaultHashBuilder,
}

impl Default for LocalIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl std::fmt::Debug for LocalIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIndex")
            .field("rows", &self.table.len())
            .finish()
    }
}

impl LocalIndex {
    /// An index sized for `n` rows. The arena reserve is generous: pages
    /// never written do not count in the resident set.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            arena: String::with_capacity(n.saturating_mul(48)),
            table: HashTable::with_capacity(n),
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn key_of<'a>(arena: &'a str, slot: &Slot) -> &'a str {
        &arena[slot.start as usize..(slot.start + slot.len) as usize]
    }

    /// Adds a local row by its fingerprint (see [`crate::model::fingerprint`]).
    pub fn insert(&mut self, key: &str, fp: u64) -> Result<(), IndexError> {
        let hash = self.hasher.hash_one(key);
        let arena = &self.arena;
        if self
            .table
            .find(hash, |s| Self::key_of(arena, s) == key)
            .is_some()
        {
            return Err(IndexError::DuplicateKey(Key(key.into())));
        }
        let start = u32::try_from(self.arena.len()).map_err(|_| IndexError::Full)?;
        let len = u32::try_from(key.len()).map_err(|_| IndexError::Full)?;
        if start.checked_add(len).is_none() {
            return Err(IndexError::Full);
        }
        self.arena.push_str(key);
        let slot = Slot {
            start,
            len,
            fp: fp & !SEEN,
        };
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.table
            .insert_unique(hash, slot, |s| hasher.hash_one(Self::key_of(arena, s)));
        Ok(())
    }

    /// The slot's fingerprint (with the SEEN bit) for `key`.
    fn get_mut(&mut self, key: &str) -> Option<&mut u64> {
        let hash = self.hasher.hash_one(key);
        let arena = &self.arena;
        self.table
            .find_mut(hash, |s| Self::key_of(arena, s) == key)
            .map(|s| &mut s.fp)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Every key, in no order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.table.iter().map(|s| Self::key_of(&self.arena, s))
    }

    /// Forgets which rows were seen.
    fn clear_seen(&mut self) {
        for slot in self.table.iter_mut() {
            slot.fp &= !SEEN;
        }
    }

    /// Keys never marked seen.
    fn unseen(self) -> Vec<Key> {
        self.table
            .iter()
            .filter(|s| s.fp & SEEN == 0)
            .map(|s| Key(Self::key_of(&self.arena, s).into()))
            .collect()
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
        // The row's key becomes the previous one; moved, not copied, when
        // the row itself is dropped (a row already in sync, most of them).
        let previous = match self.index.get_mut(row.key.as_str()) {
            Some(slot) => {
                if *slot & SEEN != 0 {
                    return Err(ListingError::DuplicateKey(row.key));
                }
                let differs = *slot != fingerprint(&row.values);
                *slot |= SEEN;
                if differs {
                    let key = row.key.clone();
                    self.plan.update.push(row);
                    key
                } else {
                    row.key
                }
            }
            None => {
                if !self.new_keys.insert(row.key.clone()) {
                    return Err(ListingError::DuplicateKey(row.key));
                }
                let key = row.key.clone();
                self.plan.insert.push(row);
                key
            }
        };
        if self.order != KeyOrder::None {
            self.previous = Some(previous);
        }
        Ok(())
    }

    /// Whether `key` comes after the previous key, when upstream promises
    /// an order.
    fn check_order(&self, key: &Key) -> Result<(), ListingError> {
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
        Ok(())
    }

    /// Forgets the listing so far: a new one starts from its first row.
    pub fn restart(&mut self) {
        self.index.clear_seen();
        self.previous = None;
        self.new_keys.clear();
        self.plan = Plan {
            local_rows: self.plan.local_rows,
            ..Plan::default()
        };
    }

    /// Ends the listing: every local row not seen becomes a purge candidate.
    /// Call only after the listing is known complete.
    pub fn finish(mut self) -> Plan {
        let mut purge = self.index.unseen();
        purge.sort_unstable();
        self.plan.purge = purge;
        self.plan
    }
}

fn compare_keys(a: &Key, b: &Key, kind: KeyType) -> Ordering {
    match kind {
        KeyType::Text | KeyType::Uuid => a.as_str().as_bytes().cmp(b.as_str().as_bytes()),
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
    use std::collections::BTreeMap;

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
            idx.insert(k, fingerprint(&[Value::Text((*v).into())]))
                .unwrap();
        }
        idx
    }

    /// A random row set: keys from a small space (so local and upstream
    /// overlap), values of every kind, some equal across kinds as text.
    fn random_rows(rng: &mut fastrand::Rng, n: usize, space: u64) -> BTreeMap<Key, Vec<Value>> {
        let mut rows = BTreeMap::new();
        for _ in 0..n {
            let k = Key(format!("k{:04}", rng.u64(..space)).into());
            let values = (0..rng.usize(0..4))
                .map(|_| match rng.u8(..5) {
                    0 => Value::Null,
                    1 => Value::Bool(rng.bool()),
                    2 => Value::Int(rng.i64(-3..3)),
                    3 => Value::Text(["", "1", "N;", "T1:a;", "a"][rng.usize(..5)].into()),
                    _ => Value::Text(format!("{}", rng.i64(-3..3))),
                })
                .collect();
            rows.insert(k, values);
        }
        rows
    }

    /// For any local and upstream rows (any width of row, any order the
    /// upstream promises, restarted listings), the plan applied to the
    /// local rows gives exactly the upstream rows; and a key listed twice
    /// is an error, never a plan.
    #[test]
    fn any_plan_applied_to_local_gives_upstream() {
        for seed in 0..3000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let space = rng.u64(1..60);
            let (n_local, n_upstream) = (rng.usize(0..50), rng.usize(0..50));
            let local = random_rows(&mut rng, n_local, space);
            let upstream = random_rows(&mut rng, n_upstream, space);
            let mut index = LocalIndex::default();
            for (k, v) in &local {
                index.insert(k.as_str(), fingerprint(v)).unwrap();
            }
            let order = if rng.bool() {
                KeyOrder::Asc
            } else {
                KeyOrder::None
            };
            let mut listed: Vec<Row> = upstream
                .iter()
                .map(|(k, v)| Row {
                    key: k.clone(),
                    values: v.clone(),
                })
                .collect();
            if order == KeyOrder::None {
                rng.shuffle(&mut listed);
            }
            let mut d = Differ::new(index, order, KeyType::Text);
            // Sometimes a listing that moved: part of it, then a restart.
            if rng.u8(..4) == 0 {
                for row in listed.iter().take(rng.usize(0..=listed.len())) {
                    d.observe(row.clone()).unwrap();
                }
                d.restart();
            }
            // Sometimes a repeated row: the listing must fail.
            let repeat =
                (!listed.is_empty() && rng.u8(..5) == 0).then(|| rng.usize(..listed.len()));
            let mut failed = false;
            for (i, row) in listed.iter().enumerate() {
                d.observe(row.clone()).unwrap();
                if repeat == Some(i) {
                    failed = d.observe(row.clone()).is_err();
                    assert!(failed, "seed {seed}: a repeated key passed");
                    break;
                }
            }
            if failed {
                continue;
            }
            let plan = d.finish();
            let mut applied = local.clone();
            for k in &plan.purge {
                assert!(
                    applied.remove(k).is_some(),
                    "seed {seed}: purge of an unknown key"
                );
            }
            for r in &plan.update {
                let old = applied.insert(r.key.clone(), r.values.clone());
                assert!(
                    old.is_some_and(|o| o != r.values),
                    "seed {seed}: needless update"
                );
            }
            for r in &plan.insert {
                assert!(
                    applied.insert(r.key.clone(), r.values.clone()).is_none(),
                    "seed {seed}"
                );
            }
            assert_eq!(applied, upstream, "seed {seed}");
            assert_eq!(plan.upstream_rows, upstream.len() as u64, "seed {seed}");
        }
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
        idx.insert("a", 1).unwrap();
        idx.insert("b", 1).unwrap();
        assert_eq!(idx.insert("a", 2), Err(IndexError::DuplicateKey(key("a"))));
        assert_eq!(idx.len(), 2);
    }
}

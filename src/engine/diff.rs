//! The diff: a pure computation from the local table and the upstream listing
//! to a [`Plan`] `{insert, update, purge}`. No I/O here.
//!
//! Memory, two ways. When upstream promises ascending keys, the local rows
//! arrive in the same order ([`LocalBatch`]es read with an `ORDER BY` the
//! key type defines) and the differ merges the two ordered streams, holding
//! a window of a few thousand local rows: memory does not grow with the
//! table. Otherwise the local side is reduced to an index of key → 64-bit
//! fingerprint (about 70 bytes a row with a 36-byte key, see
//! [`LocalIndex`]): some 700 MB for ten million rows. Either way, upstream
//! rows stream through [`Differ::observe`] page by page, and only rows
//! that need a write (missing or stale) are kept, with their values, and
//! the keys to purge: memory grows with the drift, never with the size of
//! the upstream documents.
//!
//! The differ also checks what makes a listing incomplete and can only be
//! seen row by row: a key listed twice, and keys breaking the promised order.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::config::{KeyOrder, KeyType};
use crate::model::{fingerprint, Key, Row};
use crate::rows::Rows;

pub use crate::model::SEEN;

/// A reason the listing cannot be trusted, found while diffing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    #[error("key `{0}` was listed twice (repeated page or shifting offsets)")]
    DuplicateKey(Key),
    #[error("key `{key}` came after `{previous}`, breaking the promised ascending order")]
    OutOfOrder { previous: Key, key: Key },
    #[error("internal: upstream key `{0}` was compared before the local rows up to it were read")]
    LocalBehind(Key),
}

/// A problem building the local index that makes a pass impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("local table has key `{0}` twice; driftd needs a unique key column")]
    DuplicateKey(Key),
    #[error("local keys exceed 4 GiB in total; the index cannot hold them")]
    Full,
    #[error("local key `{key}` was read after `{previous}`: the database sorts the key column otherwise than bytewise (for text) or numerically (for integers), so the table and the listing cannot be merged; nothing was written (please report the column's type, collation and the database's encoding)")]
    Unordered { previous: Key, key: Key },
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
#[derive(Debug, Default)]
pub struct Plan {
    /// Upstream rows with no local row.
    pub insert: Rows,
    /// Upstream rows whose local row differs in an owned column.
    pub update: Rows,
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

/// Local rows in key order, one batch of a merged scan: the keys' text
/// back to back, and each row's key end and fingerprint.
#[derive(Debug, Default)]
pub struct LocalBatch {
    keys: String,
    rows: Vec<(u32, u64)>,
}

impl LocalBatch {
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            keys: String::with_capacity(rows * 40),
            rows: Vec::with_capacity(rows),
        }
    }

    /// Adds the next local row by its fingerprint.
    pub fn push(&mut self, key: &str, fp: u64) -> Result<(), IndexError> {
        let end = u32::try_from(self.keys.len() + key.len()).map_err(|_| IndexError::Full)?;
        self.keys.push_str(key);
        self.rows.push((end, fp & !SEEN));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The key of the last row.
    pub fn last_key(&self) -> Option<&str> {
        (!self.rows.is_empty()).then(|| self.key(self.rows.len() - 1))
    }

    fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.rows[i - 1].0 };
        &self.keys[start as usize..self.rows[i].0 as usize]
    }
}

/// The local side of a merge: the batches read and not yet passed by the
/// upstream listing.
#[derive(Debug, Default)]
struct Window {
    batches: std::collections::VecDeque<LocalBatch>,
    /// The next row of the front batch.
    pos: usize,
    /// The last key read, to check the local order and to know whether
    /// the window reaches a key.
    last: Option<Key>,
    /// The scan ended: no batch follows.
    done: bool,
    /// Local rows read.
    rows: u64,
}

impl Window {
    fn head(&self) -> Option<(&str, u64)> {
        let b = self.batches.front()?;
        Some((b.key(self.pos), b.rows[self.pos].1))
    }

    fn advance(&mut self) {
        self.pos += 1;
        if self.batches.front().is_some_and(|b| self.pos >= b.len()) {
            self.batches.pop_front();
            self.pos = 0;
        }
    }
}

/// The local side of the diff.
enum Local {
    /// Every local row, looked up by key.
    Index(LocalIndex),
    /// Local rows merged in key order with the ordered listing.
    Merge(Window),
}

/// Streams upstream rows against the local rows: a [`LocalIndex`], or
/// [`LocalBatch`]es in key order merged with an ordered listing.
pub struct Differ {
    local: Local,
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
            local: Local::Index(index),
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

    /// A differ that merges the ascending listing with local rows read in
    /// the same order, fed with [`Differ::feed`] as
    /// [`Differ::needs_local`] asks.
    pub fn merging(key_type: KeyType) -> Self {
        Self {
            local: Local::Merge(Window::default()),
            order: KeyOrder::Asc,
            key_type,
            previous: None,
            new_keys: HashSet::new(),
            plan: Plan::default(),
        }
    }

    /// Whether the local rows read so far stop short of `key`, so the
    /// next batch must be fed before `key` is observed.
    pub fn needs_local(&self, key: &Key) -> bool {
        match &self.local {
            Local::Index(_) => false,
            Local::Merge(w) => {
                !w.done
                    && w.last.as_ref().is_none_or(|last| {
                        compare_keys(last.as_str(), key.as_str(), self.key_type) == Ordering::Less
                    })
            }
        }
    }

    /// Takes the next batch of local rows of a merge, `None` once the scan
    /// ended. Refuses a key that does not come after the one before.
    pub fn feed(&mut self, batch: Option<LocalBatch>) -> Result<(), IndexError> {
        let Local::Merge(w) = &mut self.local else {
            return Ok(());
        };
        let Some(batch) = batch else {
            w.done = true;
            return Ok(());
        };
        if batch.is_empty() {
            return Ok(());
        }
        for i in 0..batch.len() {
            let key = batch.key(i);
            let previous = if i == 0 {
                w.last.as_ref().map(Key::as_str)
            } else {
                Some(batch.key(i - 1))
            };
            if let Some(previous) = previous {
                match compare_keys(previous, key, self.key_type) {
                    Ordering::Less => {}
                    Ordering::Equal => return Err(IndexError::DuplicateKey(Key(key.into()))),
                    Ordering::Greater => {
                        return Err(IndexError::Unordered {
                            previous: Key(previous.into()),
                            key: Key(key.into()),
                        })
                    }
                }
            }
        }
        w.last = Some(Key(batch.key(batch.len() - 1).into()));
        w.rows += batch.len() as u64;
        w.batches.push_back(batch);
        Ok(())
    }

    /// Takes one upstream row, in listing order.
    pub fn observe(&mut self, row: Row) -> Result<(), ListingError> {
        self.check_order(&row.key)?;
        self.plan.upstream_rows += 1;
        if self.plan.canary.is_none() {
            self.plan.canary = Some(row.key.clone());
        }
        let index = match &mut self.local {
            Local::Index(index) => index,
            Local::Merge(w) => {
                let previous = merge(w, &mut self.plan, self.key_type, row)?;
                self.previous = Some(previous);
                return Ok(());
            }
        };
        // The row's key becomes the previous one; moved, not copied, when
        // the row itself is dropped (a row already in sync, most of them).
        let previous = match index.get_mut(row.key.as_str()) {
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
            if compare_keys(prev.as_str(), key.as_str(), self.key_type) != Ordering::Less {
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
        match &mut self.local {
            Local::Index(index) => index.clear_seen(),
            // The caller reads the local rows again from the first.
            Local::Merge(w) => *w = Window::default(),
        }
        self.previous = None;
        self.new_keys.clear();
        let plan = &mut self.plan;
        plan.insert.clear();
        plan.update.clear();
        plan.purge.clear();
        plan.upstream_rows = 0;
        plan.canary = None;
    }

    /// Keeps at most `limit` rows of each kind to write in memory, the
    /// rest in a temporary file (see [`Rows`]).
    #[cfg(test)]
    pub fn rows_in_memory(mut self, limit: usize) -> Self {
        self.plan.insert = Rows::with_limit(limit);
        self.plan.update = Rows::with_limit(limit);
        self
    }

    /// Ends the listing: every local row not seen becomes a purge candidate.
    /// Call only after the listing is known complete and, in a merge, the
    /// local rows were fed to their end.
    pub fn finish(mut self) -> Result<Plan, ListingError> {
        match self.local {
            Local::Index(index) => {
                let mut purge = index.unseen();
                purge.sort_unstable();
                self.plan.purge = purge;
            }
            Local::Merge(mut w) => {
                if !w.done {
                    return Err(ListingError::LocalBehind(
                        Key("(end of the listing)".into()),
                    ));
                }
                while let Some((key, _)) = w.head() {
                    self.plan.purge.push(Key(key.into()));
                    w.advance();
                }
                self.plan.local_rows = w.rows;
            }
        }
        Ok(self.plan)
    }

    /// Whether a merge still waits for local rows.
    pub fn local_pending(&self) -> bool {
        matches!(&self.local, Local::Merge(w) if !w.done)
    }
}

/// One upstream row of a merge: local rows before it are listed by no one
/// (purge candidates), a local row with its key is compared, and no local
/// row means it is missing. Gives back the row's key.
fn merge(
    w: &mut Window,
    plan: &mut Plan,
    key_type: KeyType,
    row: Row,
) -> Result<Key, ListingError> {
    let mut write = None;
    loop {
        let Some((key, fp)) = w.head() else {
            if !w.done {
                return Err(ListingError::LocalBehind(row.key));
            }
            write = Some(&mut plan.insert);
            break;
        };
        match compare_keys(key, row.key.as_str(), key_type) {
            Ordering::Less => {
                plan.purge.push(Key(key.into()));
                w.advance();
            }
            Ordering::Equal => {
                if fp != fingerprint(&row.values) {
                    write = Some(&mut plan.update);
                }
                w.advance();
                break;
            }
            Ordering::Greater => {
                write = Some(&mut plan.insert);
                break;
            }
        }
    }
    Ok(match write {
        None => row.key,
        Some(rows) => {
            let key = row.key.clone();
            rows.push(row);
            key
        }
    })
}

fn compare_keys(a: &str, b: &str, kind: KeyType) -> Ordering {
    match kind {
        KeyType::Text | KeyType::Uuid => a.as_bytes().cmp(b.as_bytes()),
        KeyType::Integer => match (a.parse::<i64>(), b.parse::<i64>()) {
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

    /// Hands a merging differ the local rows in batches as it asks.
    struct Feeder {
        batches: std::vec::IntoIter<LocalBatch>,
    }

    impl Feeder {
        fn new(local: &BTreeMap<Key, Vec<Value>>, size: usize) -> Self {
            let rows: Vec<_> = local.iter().collect();
            let batches: Vec<LocalBatch> = rows
                .chunks(size)
                .map(|chunk| {
                    let mut b = LocalBatch::default();
                    for (k, v) in chunk {
                        b.push(k.as_str(), fingerprint(v)).unwrap();
                    }
                    b
                })
                .collect();
            Self {
                batches: batches.into_iter(),
            }
        }

        fn feed(&mut self, d: &mut Differ) {
            d.feed(self.batches.next()).unwrap();
        }

        fn observe(&mut self, d: &mut Differ, row: Row) -> Result<(), ListingError> {
            while d.needs_local(&row.key) {
                self.feed(d);
            }
            d.observe(row)
        }
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
            // An ordered listing is merged with the local rows in batches
            // of any size, or looked up in an index.
            let merging = order == KeyOrder::Asc && rng.bool();
            let batch = rng.usize(1..8);
            let d = if merging {
                Differ::merging(KeyType::Text)
            } else {
                let mut index = LocalIndex::default();
                for (k, v) in &local {
                    index.insert(k.as_str(), fingerprint(v)).unwrap();
                }
                Differ::new(index, order, KeyType::Text)
            };
            // Rows to write past a few go to a file, whose rows must come
            // back as they went in.
            let mut d = d.rows_in_memory(rng.usize(0..6));
            let mut feeder = Feeder::new(&local, batch);
            // Sometimes a listing that moved: part of it, then a restart.
            if rng.u8(..4) == 0 {
                for row in listed.iter().take(rng.usize(0..=listed.len())) {
                    feeder.observe(&mut d, row.clone()).unwrap();
                }
                d.restart();
                feeder = Feeder::new(&local, batch);
            }
            // Sometimes a repeated row: the listing must fail.
            let repeat =
                (!listed.is_empty() && rng.u8(..5) == 0).then(|| rng.usize(..listed.len()));
            let mut failed = false;
            for (i, row) in listed.iter().enumerate() {
                feeder.observe(&mut d, row.clone()).unwrap();
                if repeat == Some(i) {
                    failed = feeder.observe(&mut d, row.clone()).is_err();
                    assert!(failed, "seed {seed}: a repeated key passed");
                    break;
                }
            }
            if failed {
                continue;
            }
            while d.local_pending() {
                feeder.feed(&mut d);
            }
            let mut plan = d.finish().unwrap();
            if merging {
                assert_eq!(plan.local_rows, local.len() as u64, "seed {seed}");
            }
            let mut applied = local.clone();
            for k in &plan.purge {
                assert!(
                    applied.remove(k).is_some(),
                    "seed {seed}: purge of an unknown key"
                );
            }
            for r in plan.update.to_vec().unwrap() {
                let old = applied.insert(r.key.clone(), r.values.clone());
                assert!(
                    old.is_some_and(|o| o != r.values),
                    "seed {seed}: needless update"
                );
            }
            for r in plan.insert.to_vec().unwrap() {
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
        let plan = d.finish().unwrap();
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

    fn batch(keys: &[&str]) -> LocalBatch {
        let mut b = LocalBatch::default();
        for k in keys {
            b.push(k, fingerprint(&[Value::Text("1".into())])).unwrap();
        }
        b
    }

    /// A merge trusts the local order only as far as it checks it: a key
    /// read out of order or twice (a collation that is not bytewise, a
    /// table without a unique key) stops it, and so does a scan that has
    /// not said it ended, or integer keys compared as text.
    #[test]
    fn a_merge_refuses_local_rows_out_of_order_or_unfinished() {
        let mut d = Differ::merging(KeyType::Text);
        d.feed(Some(batch(&["a", "b"]))).unwrap();
        assert_eq!(
            d.feed(Some(batch(&["B"]))),
            Err(IndexError::Unordered {
                previous: key("b"),
                key: key("B")
            })
        );
        let mut d = Differ::merging(KeyType::Text);
        assert_eq!(
            d.feed(Some(batch(&["a", "c", "c"]))),
            Err(IndexError::DuplicateKey(key("c")))
        );
        let mut d = Differ::merging(KeyType::Integer);
        d.feed(Some(batch(&["9", "10"]))).unwrap();
        assert!(d.feed(Some(batch(&["100", "11"]))).is_err());

        let mut d = Differ::merging(KeyType::Text);
        assert!(d.needs_local(&key("a")));
        assert_eq!(
            d.observe(row("a", "1")),
            Err(ListingError::LocalBehind(key("a")))
        );
        let mut d = Differ::merging(KeyType::Text);
        d.feed(Some(batch(&["a", "b"]))).unwrap();
        assert!(!d.needs_local(&key("b")));
        assert!(d.needs_local(&key("c")));
        d.observe(row("b", "1")).unwrap();
        assert!(d.finish().is_err(), "a scan that did not end");

        let mut d = Differ::merging(KeyType::Text);
        d.feed(Some(batch(&["a", "b", "d"]))).unwrap();
        d.observe(row("b", "2")).unwrap();
        d.observe(row("c", "1")).unwrap();
        d.feed(None).unwrap();
        let plan = d.finish().unwrap();
        assert_eq!(plan.purge, vec![key("a"), key("d")]);
        assert_eq!(plan.update, vec![row("b", "2")]);
        assert_eq!(plan.insert, vec![row("c", "1")]);
        assert_eq!((plan.local_rows, plan.upstream_rows), (3, 2));
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

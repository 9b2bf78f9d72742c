//! Decoding upstream pages into typed rows.
//!
//! The fast path reads a page in one pass with serde, descending only into
//! the fields the mapping's pointers name (`/emails/0/address` walks into
//! `emails`, its first element, its `address`) and skipping the rest
//! unparsed: no document is built for an item. It applies when the items,
//! total and next-cursor pointers are top-level fields (`/items`, `/total`,
//! `/next`, or the body itself is the array), and pointers name each array
//! element one way only. Any other shape goes through a `serde_json::Value`
//! document. Both paths give the same rows from the same page, and fail on
//! the same bad rows. The fast path does not read what it skips: a page
//! whose skipped parts are not well-formed JSON text (a lone surrogate
//! escape, nesting past serde_json's depth limit, a field named as
//! serde_json's private name for a number) decodes there and fails on the
//! document path; the rows it takes are the same either way.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::config::{ColumnType, KeyType, ResourceConfig};
use crate::model::{key_from_json_owned, Row, Value};

/// What a decoder found in one page.
#[derive(Debug)]
pub struct Decoded<T> {
    pub items: Vec<T>,
    /// The value at the total pointer, if configured and present.
    pub total: Option<Json>,
    /// The value at the next-cursor pointer, if configured and present.
    pub next: Option<Json>,
}

/// Turns a page body into items; errors are messages for a "malformed
/// page" error naming the URL.
pub trait PageDecoder: Send + Sync {
    type Item: Send;
    fn decode(&self, body: &[u8]) -> Result<Decoded<Self::Item>, String>;
    /// The item's key, to check the row that offset pages overlap on.
    fn key_of(item: &Self::Item) -> &str;
}

/// A JSON pointer split into its first token and the rest (`""` if none).
#[derive(Debug, Clone)]
struct Split {
    first: String,
    rest: String,
}

fn split_pointer(pointer: &str) -> Option<Split> {
    let body = pointer.strip_prefix('/')?;
    let (first, rest) = match body.find('/') {
        Some(i) => (&body[..i], &body[i..]),
        None => (body, ""),
    };
    Some(Split {
        first: first.replace("~1", "/").replace("~0", "~"),
        rest: rest.to_string(),
    })
}

/// One owned column's mapping.
struct Mapped {
    name: String,
    pointer: String,
    kind: ColumnType,
    /// An absent field is NULL rather than an error.
    optional: bool,
}

/// Follows `pointer` (a JSON pointer, `""` for `root` itself) into `root`.
/// `None` when a field or index is absent; a `null` met on the way is the
/// value (`/address/city` of `{"address": null}` is null, not absent).
pub(crate) fn resolve<'a>(root: &'a Json, pointer: &str) -> Option<&'a Json> {
    if pointer.is_empty() {
        return Some(root);
    }
    let mut at = root;
    for token in pointer.strip_prefix('/')?.split('/') {
        if at.is_null() {
            return Some(at);
        }
        let token = token.replace("~1", "/").replace("~0", "~");
        at = match at {
            Json::Object(map) => map.get(&token)?,
            Json::Array(items) => items.get(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Decodes pages of one resource into [`Row`]s by its mapping.
pub struct RowDecoder {
    items_pointer: String,
    total_pointer: Option<String>,
    next_pointer: Option<String>,
    key_pointer: String,
    key_type: KeyType,
    /// The owned columns, in table-spec order.
    columns: Vec<Mapped>,
    fast: Option<FastPlan>,
}

/// The top-level field names the fast path looks for.
struct FastPlan {
    /// `None`: the body is the items array.
    items: Option<String>,
    total: Option<String>,
    next: Option<String>,
    /// The key's and the columns' pointers as one tree over an item.
    item: Node,
    /// Pointers: the key's, then each column's.
    picks: usize,
}

/// The pointers that pass through one value of an item: those ending here
/// (`ends`, indexes into the picks), and those going on, by next token.
#[derive(Debug, Default)]
struct Node {
    ends: Vec<usize>,
    children: Vec<Child>,
}

/// A pointer token under a [`Node`], and the node it leads to.
#[derive(Debug)]
struct Child {
    token: String,
    /// The array index the token names, read as [`resolve`] reads it.
    index: Option<usize>,
    node: Node,
}

impl AsRef<str> for Child {
    fn as_ref(&self) -> &str {
        &self.token
    }
}

impl Node {
    /// Whether some pointers go where the descent cannot follow them as
    /// [`resolve`] does: two tokens naming one array index (`0` and `00`,
    /// `1` and `+1`: the descent takes one child per element), or serde_json's
    /// private name for a number (under `arbitrary_precision` a number comes
    /// to a visitor as a map holding that one key). Such a mapping uses the
    /// document path.
    fn ambiguous(&self) -> bool {
        let mut indexes = std::collections::HashSet::new();
        self.children.iter().any(|child| {
            child.token.starts_with("$serde_json")
                || child.index.is_some_and(|i| !indexes.insert(i))
                || child.node.ambiguous()
        })
    }

    fn add(&mut self, tokens: &[String], pick: usize) {
        match tokens.split_first() {
            None => self.ends.push(pick),
            Some((first, rest)) => {
                let at = match self.children.iter().position(|c| &c.token == first) {
                    Some(at) => at,
                    None => {
                        self.children.push(Child {
                            token: first.clone(),
                            index: first.parse().ok(),
                            node: Node::default(),
                        });
                        self.children.len() - 1
                    }
                };
                self.children[at].node.add(rest, pick);
            }
        }
    }

    /// Sets every pick at or below this node to `value` (a `null` met on
    /// the way is the value of the pointers that go through it).
    fn fill_all(&self, slots: &mut [Option<Json>], value: &Json) {
        for &p in &self.ends {
            slots[p] = Some(value.clone());
        }
        for child in &self.children {
            child.node.fill_all(slots, value);
        }
    }

    /// Sets the picks at or below this node from a whole value, as
    /// [`resolve`] would find them.
    fn fill_from(&self, slots: &mut [Option<Json>], value: &Json) {
        for &p in &self.ends {
            slots[p] = Some(value.clone());
        }
        if value.is_null() {
            for child in &self.children {
                child.node.fill_all(slots, value);
            }
            return;
        }
        for child in &self.children {
            let found = match value {
                Json::Object(map) => map.get(&child.token),
                Json::Array(items) => child.index.and_then(|i| items.get(i)),
                _ => None,
            };
            if let Some(v) = found {
                child.node.fill_from(slots, v);
            }
        }
    }
}

impl RowDecoder {
    pub fn new(res: &ResourceConfig) -> Self {
        let next_pointer = match &res.upstream.pagination {
            crate::config::Pagination::Cursor { next_pointer, .. } => Some(next_pointer.clone()),
            _ => None,
        };
        let mut decoder = Self {
            items_pointer: res.upstream.items_pointer.clone(),
            total_pointer: res.upstream.total_pointer.clone(),
            next_pointer,
            key_pointer: res.key.upstream.clone(),
            key_type: res.key.kind,
            columns: res
                .columns
                .iter()
                .map(|(name, c)| Mapped {
                    name: name.clone(),
                    pointer: c.from.clone(),
                    kind: c.kind,
                    optional: c.optional,
                })
                .collect(),
            fast: None,
        };
        decoder.fast = decoder.fast_plan();
        decoder
    }

    fn fast_plan(&self) -> Option<FastPlan> {
        let top = |p: &str| {
            split_pointer(p)
                .filter(|s| s.rest.is_empty())
                .map(|s| s.first)
        };
        let items = if self.items_pointer.is_empty() {
            None
        } else {
            Some(top(&self.items_pointer)?)
        };
        let total = match &self.total_pointer {
            Some(p) => Some(top(p)?),
            None => None,
        };
        let next = match &self.next_pointer {
            Some(p) => Some(top(p)?),
            None => None,
        };
        let mut item = Node::default();
        let pointers =
            std::iter::once(&self.key_pointer).chain(self.columns.iter().map(|c| &c.pointer));
        let mut picks = 0;
        for pointer in pointers {
            // An empty pointer (the whole item) needs the document.
            let body = pointer.strip_prefix('/')?;
            let tokens: Vec<String> = body
                .split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect();
            item.add(&tokens, picks);
            picks += 1;
        }
        if item.ambiguous() {
            return None;
        }
        Some(FastPlan {
            items,
            total,
            next,
            item,
            picks,
        })
    }

    /// Builds a row from an item's values for the key and each column, in
    /// order; `None` for absent.
    fn row(
        &self,
        index: usize,
        mut values: impl FnMut(usize) -> Option<Json>,
    ) -> Result<Row, String> {
        let key_json = values(0);
        let key = key_from_json_owned(key_json, self.key_type)
            .map_err(|p| format!("item {index}: `{}`: {p}", self.key_pointer))?;
        let mut row = Row {
            key,
            values: Vec::with_capacity(self.columns.len()),
        };
        for (i, column) in self.columns.iter().enumerate() {
            let found = values(i + 1);
            let problem = |p: &str| {
                format!(
                    "item {index} (key {}): column `{}` from `{}`: {p}",
                    row.key, column.name, column.pointer
                )
            };
            if found.is_none() && !column.optional {
                return Err(problem(
                    "the field is absent (renamed upstream? declare the column `optional = true` if upstream may leave it out)",
                ));
            }
            let v = Value::from_json_owned(found, column.kind).map_err(|p| problem(&p))?;
            row.values.push(v);
        }
        Ok(row)
    }

    /// One item (an event's payload, a get-by-key answer) as a row.
    pub fn item(&self, item: &Json) -> Result<Row, String> {
        self.row(0, |i| {
            let pointer = if i == 0 {
                &self.key_pointer
            } else {
                &self.columns[i - 1].pointer
            };
            resolve(item, pointer).cloned()
        })
        .map_err(|e| e.trim_start_matches("item 0").trim_start().to_string())
    }

    fn decode_document(&self, body: &[u8]) -> Result<Decoded<Row>, String> {
        let mut doc: Json =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
        // A document keeps the last of two equal keys silently: the items
        // met twice on their path fail the page, as on the fast path.
        if !self.items_pointer.is_empty() {
            let segs: Vec<String> = self
                .items_pointer
                .split('/')
                .skip(1)
                .map(|s| s.replace("~1", "/").replace("~0", "~"))
                .collect();
            let mut de = serde_json::Deserializer::from_slice(body);
            if let Ok(Some(name)) = (PathTwice { segs: &segs }).deserialize(&mut de) {
                return Err(format!(
                    "the page has `{name}` twice: which listing it means cannot be told"
                ));
            }
        }
        let total = self
            .total_pointer
            .as_ref()
            .and_then(|p| doc.pointer(p).cloned());
        let next = self
            .next_pointer
            .as_ref()
            .and_then(|p| doc.pointer(p).cloned());
        let items = match doc.pointer_mut(&self.items_pointer).map(Json::take) {
            Some(Json::Array(items)) => items,
            Some(_) => return Err(format!("`{}` is not an array", self.items_pointer)),
            None => return Err(format!("no items at `{}`", self.items_pointer)),
        };
        let mut rows = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let row = self.row(index, |i| {
                let pointer = match i {
                    0 => &self.key_pointer,
                    _ => &self.columns[i - 1].pointer,
                };
                resolve(&item, pointer).cloned()
            })?;
            rows.push(row);
        }
        Ok(Decoded {
            items: rows,
            total,
            next,
        })
    }
}

impl PageDecoder for RowDecoder {
    type Item = Row;

    fn key_of(item: &Row) -> &str {
        item.key.as_str()
    }

    fn decode(&self, body: &[u8]) -> Result<Decoded<Row>, String> {
        let Some(plan) = &self.fast else {
            return self.decode_document(body);
        };
        // The body is checked to be UTF-8 once, whole, so that the strings
        // read from it need no check of their own (the fast half of reading
        // one). A body that is not UTF-8 fails here, as in a document.
        let text = std::str::from_utf8(body)
            .map_err(|e| format!("invalid JSON: the body is not UTF-8 text ({e})"))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let page = PageSeed {
            decoder: self,
            plan,
        }
        .deserialize(&mut de)
        .and_then(|page| de.end().map(|()| page));
        match page {
            Ok(Some(page)) => Ok(page),
            Ok(None) => Err(format!("no items at `{}`", self.items_pointer)),
            Err(e) if e.is_data() => Err(e.to_string()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        }
    }
}

/// Finds an object key met twice along a pointer's path (`segs`), the
/// items' field among them: `Some(key)` when one is.
struct PathTwice<'a> {
    segs: &'a [String],
}

impl<'de> DeserializeSeed<'de> for PathTwice<'_> {
    type Value = Option<String>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PathTwice<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some((first, rest)) = self.segs.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(None);
        };
        let (mut seen, mut twice) = (0, None);
        while let Some(hit) = map.next_key_seed(KeySeed(std::slice::from_ref(first)))? {
            if hit.is_some() {
                seen += 1;
                let below = map.next_value_seed(PathTwice { segs: rest })?;
                twice = twice.or(below);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(if seen > 1 { Some(first.clone()) } else { twice })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Matches an object key against a list of names without allocating.
struct KeySeed<'a, S>(&'a [S]);

impl<'de, S: AsRef<str>> DeserializeSeed<'de> for KeySeed<'_, S> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, S: AsRef<str>> Visitor<'de> for KeySeed<'_, S> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|name| name.as_ref() == v))
    }
}

struct PageSeed<'a> {
    decoder: &'a RowDecoder,
    plan: &'a FastPlan,
}

impl<'de> DeserializeSeed<'de> for PageSeed<'_> {
    /// `None` when the items field is missing.
    type Value = Option<Decoded<Row>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PageSeed<'_> {
    type Value = Option<Decoded<Row>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.plan.items.is_some() {
            "a JSON object holding the items"
        } else {
            "a JSON array of items"
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        if self.plan.items.is_some() {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        let items = ItemsSeed(self.decoder, self.plan).visit_seq(seq)?;
        Ok(Some(Decoded {
            items,
            total: None,
            next: None,
        }))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some(items_name) = &self.plan.items else {
            return Err(de::Error::invalid_type(de::Unexpected::Map, &self));
        };
        let names = [
            items_name.as_str(),
            self.plan.total.as_deref().unwrap_or("\u{0}"),
            self.plan.next.as_deref().unwrap_or("\u{0}"),
        ];
        let mut page = Decoded {
            items: Vec::new(),
            total: None,
            next: None,
        };
        let mut found = false;
        while let Some(hit) = map.next_key_seed(KeySeed(&names))? {
            match hit {
                Some(0) if found => {
                    return Err(de::Error::custom(format!(
                        "the page has `{items_name}` twice: which listing it means cannot be told"
                    )));
                }
                Some(0) => {
                    page.items = map.next_value_seed(ItemsSeed(self.decoder, self.plan))?;
                    found = true;
                }
                Some(1) => page.total = Some(map.next_value()?),
                Some(2) => page.next = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found.then_some(page))
    }
}

struct ItemsSeed<'a>(&'a RowDecoder, &'a FastPlan);

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<Row>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<Row>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of items")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut rows = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        // One set of slots for every item (each row takes its values out).
        let mut slots: Vec<Option<Json>> = vec![None; self.1.picks];
        while let Some(row) = seq.next_element_seed(ItemSeed {
            decoder: self.0,
            plan: self.1,
            index: rows.len(),
            slots: &mut slots,
        })? {
            rows.push(row);
        }
        Ok(rows)
    }
}

struct ItemSeed<'a> {
    decoder: &'a RowDecoder,
    plan: &'a FastPlan,
    index: usize,
    slots: &'a mut Vec<Option<Json>>,
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = Row;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl ItemSeed<'_> {
    /// The item's row, from its values `read` puts in the slots.
    fn row<E: de::Error>(self, read: impl FnOnce(NodeSeed) -> Result<(), E>) -> Result<Row, E> {
        let slots = self.slots;
        slots.iter_mut().for_each(|s| *s = None);
        read(NodeSeed {
            node: &self.plan.item,
            slots,
        })?;
        self.decoder
            .row(self.index, |i| slots[i].take())
            .map_err(de::Error::custom)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = Row;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "item {} to be an object or an array", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Row, A::Error> {
        self.row(|node| node.visit_map(map))
    }
    /// An item that is an array, its fields named by index (`/0`), as a
    /// document reads it.
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Row, A::Error> {
        self.row(|node| node.visit_seq(seq))
    }
}

/// Reads one value of an item for the pointers through `node` into
/// `slots`, descending only where a pointer goes.
struct NodeSeed<'a> {
    node: &'a Node,
    slots: &'a mut [Option<Json>],
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.node.children.is_empty() {
            // Only pointers ending here: the value itself.
            let v = Json::deserialize(d)?;
            if let Some((&last, rest)) = self.node.ends.split_last() {
                for &p in rest {
                    self.slots[p] = Some(v.clone());
                }
                self.slots[last] = Some(v);
            }
            Ok(())
        } else if !self.node.ends.is_empty() {
            // The value and some of its insides (`/a` and `/a/b`).
            let v = Json::deserialize(d)?;
            self.node.fill_from(self.slots, &v);
            Ok(())
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(hit) = map.next_key_seed(KeySeed(&self.node.children))? {
            match hit {
                Some(at) => {
                    let node = &self.node.children[at].node;
                    // A key met twice: the last one counts, as in a document
                    // (a leaf's value is replaced whole, its slots set anew).
                    if !node.children.is_empty() {
                        node.clear(self.slots);
                    }
                    map.next_value_seed(NodeSeed {
                        node,
                        slots: self.slots,
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let child = self.node.children.iter().find(|c| c.index == Some(index));
            let more = match child {
                Some(child) => seq
                    .next_element_seed(NodeSeed {
                        node: &child.node,
                        slots: self.slots,
                    })?
                    .is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.node.fill_all(self.slots, &Json::Null);
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }
    // Any other scalar has no fields: the pointers through it are absent.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

impl Node {
    /// Forgets what the picks at or below this node were set to.
    fn clear(&self, slots: &mut [Option<Json>]) {
        for &p in &self.ends {
            slots[p] = None;
        }
        for child in &self.children {
            child.node.clear(slots);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn decoder(extra: &str) -> RowDecoder {
        let text = format!(
            r#"
[resources.u]
upstream = {{ base_url = "http://h", list_path = "/u", total_pointer = "/total", key_order = "asc" {extra} }}
key = {{ upstream = "/id", column = "id", type = "integer" }}
local = {{ table = "u" }}
[resources.u.columns]
name = {{ from = "/name" }}
on = {{ from = "/flags/on", type = "boolean", optional = true }}
city = {{ from = "/address/city" }}
"#
        );
        let s = Settings::from_toml_str(&text, "t.toml").unwrap();
        RowDecoder::new(&s.resources["u"])
    }

    const PAGE: &str = r#"{"total": 2, "extra": {"deep": [1,2,3]}, "items": [
        {"id": 1, "name": "a", "flags": {"on": true}, "address": {"city": "X"}, "junk": [1]},
        {"name": null, "id": "2", "flags": {}, "address": null}
    ]}"#;

    #[test]
    fn fast_and_document_paths_agree() {
        let d = decoder("");
        assert!(d.fast.is_some());
        let fast = d.decode(PAGE.as_bytes()).unwrap();
        let doc = d.decode_document(PAGE.as_bytes()).unwrap();
        assert_eq!(fast.items, doc.items);
        assert_eq!(fast.total, Some(serde_json::json!(2)));
        assert_eq!(fast.total, doc.total);
        // columns in table-spec (name) order: city, name, on
        assert_eq!(
            fast.items[0].values,
            vec![
                Value::Text("X".into()),
                Value::Text("a".into()),
                Value::Bool(true)
            ]
        );
        assert_eq!(fast.items[1].key.as_str(), "2");
        assert_eq!(
            fast.items[1].values,
            vec![Value::Null, Value::Null, Value::Null]
        );
    }

    #[test]
    fn nested_pointers_descend_without_a_document_and_agree_with_it() {
        let text = r#"
[resources.u]
upstream = { base_url = "http://h", list_path = "/u", key_order = "asc" }
key = { upstream = "/id", column = "id", type = "integer" }
local = { table = "u" }
[resources.u.columns]
email = { from = "/emails/0/address", optional = true }
second = { from = "/emails/1/address", optional = true }
emails = { from = "/emails", type = "json", optional = true }
tag = { from = "/a~1b/~0c", optional = true }
"#;
        let s = Settings::from_toml_str(text, "t.toml").unwrap();
        let d = RowDecoder::new(&s.resources["u"]);
        assert!(d.fast.is_some());
        let items = [
            r#"{"id": 1, "emails": [{"uuid": "x", "address": "a@x", "main": true}, {"address": 7}], "a/b": {"~c": "t"}}"#,
            r#"{"id": 2, "emails": []}"#,
            r#"{"id": 3, "emails": null}"#,
            r#"{"id": 4, "emails": [null, {"address": null}]}"#,
            r#"{"id": 5, "emails": "none", "a/b": 3}"#,
            r#"{"id": 6, "emails": [{"address": "old"}], "emails": [{"address": "new"}]}"#,
            r#"{"id": 7, "emails": [[1], {"address": "z", "deep": {"x": [1, 2]}}], "a/b": null}"#,
            r#"{"id": 8, "emails": [5, 6], "a/b": {"~c": 1.5e3}}"#,
        ];
        let page = format!(r#"{{"items": [{}]}}"#, items.join(","));
        let fast = d.decode(page.as_bytes()).unwrap();
        let doc = d.decode_document(page.as_bytes()).unwrap();
        assert_eq!(fast.items, doc.items);
        assert_eq!(fast.items.len(), items.len());
        // columns in name order: email, emails, second, tag
        assert_eq!(fast.items[0].values[0], Value::Text("a@x".into()));
        assert_eq!(fast.items[0].values[2], Value::Text("7".into()));
        assert_eq!(fast.items[0].values[3], Value::Text("t".into()));
        assert_eq!(fast.items[1].values[0], Value::Null);
        assert_eq!(fast.items[2].values[0], Value::Null);
        assert_eq!(fast.items[5].values[0], Value::Text("new".into()));
        // a required nested field that is absent is named
        let strict = text.replace(
            r#"email = { from = "/emails/0/address", optional = true }"#,
            r#"email = { from = "/emails/0/address" }"#,
        );
        let s = Settings::from_toml_str(&strict, "t.toml").unwrap();
        let d = RowDecoder::new(&s.resources["u"]);
        for page in [
            r#"{"items": [{"id": 1, "emails": []}]}"#,
            r#"{"items": [{"id": 1, "emails": [{"addr": "x"}]}]}"#,
        ] {
            for err in [
                d.decode(page.as_bytes()).unwrap_err(),
                d.decode_document(page.as_bytes()).unwrap_err(),
            ] {
                assert!(
                    err.contains("column `email` from `/emails/0/address`: the field is absent"),
                    "{err}"
                );
            }
        }
    }

    /// Random JSON made of the names and shapes the mapping's pointers look
    /// for, so that most items come close to matching.
    fn random_json(rng: &mut fastrand::Rng, depth: u32) -> String {
        let names = [
            "id",
            "name",
            "flags",
            "on",
            "address",
            "city",
            "0",
            "1",
            "a/b",
            "~c",
            "",
            // Escaped spellings of names the mapping matches.
            "i\\u0064",
            "\\u0061ddress",
        ];
        match rng.u8(..if depth > 3 { 6 } else { 9 }) {
            0 => "null".into(),
            1 => ["true", "false"][rng.usize(..2)].into(),
            2 => [
                "0",
                "-1",
                "7",
                "1e2",
                "1.5",
                "123456789012345678901234567890",
            ][rng.usize(..6)]
            .into(),
            3 => format!(
                "\"{}\"",
                ["", "x", "2", "\\u0041", "\\u0000", "é"][rng.usize(..6)]
            ),
            4 | 5 => format!("\"{}\"", names[rng.usize(..names.len())]),
            6 | 7 => {
                let fields: Vec<String> = (0..rng.usize(0..5))
                    .map(|_| {
                        let n = names[rng.usize(..names.len())];
                        format!("\"{n}\": {}", random_json(rng, depth + 1))
                    })
                    .collect();
                format!("{{{}}}", fields.join(", "))
            }
            _ => {
                let items: Vec<String> = (0..rng.usize(0..4))
                    .map(|_| random_json(rng, depth + 1))
                    .collect();
                format!("[{}]", items.join(", "))
            }
        }
    }

    /// The fast path and the document path agree on any page: the same
    /// rows, or both an error.
    #[test]
    fn fast_and_document_paths_agree_on_random_pages() {
        let d = decoder("");
        let nested = dec(r#"
a = { from = "/address/city" }
b = { from = "/flags/0", type = "json" }
c = { from = "/flags", optional = true, type = "json" }
e = { from = "/a~1b/~0c", optional = true }
f = { from = "/name/1/on", optional = true, type = "boolean" }
"#);
        // Items read by index, when an item is an array.
        let by_index = keyed(
            "/0",
            r#"
a = { from = "/1", optional = true, type = "json" }
b = { from = "/2/city", optional = true }
"#,
        );
        let mut agreed = 0;
        for seed in 0..20_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let items: Vec<String> = (0..rng.usize(1..4))
                .map(|_| {
                    if rng.u8(..4) == 0 {
                        return random_json(&mut rng, 1);
                    }
                    // An item close to the mapping: the key, then some of
                    // the fields the pointers name, with random values.
                    let mut fields = vec![format!("\"id\": \"k{}\"", rng.u8(..9))];
                    for name in ["name", "flags", "address", "a/b", "id"] {
                        let value = match (name, rng.u8(..4)) {
                            (_, 0) => continue,
                            ("address", 1 | 2) => {
                                format!("{{\"city\": {}}}", random_json(&mut rng, 4))
                            }
                            ("flags", 1 | 2) => format!("[{}]", random_json(&mut rng, 2)),
                            _ => random_json(&mut rng, 1),
                        };
                        fields.push(format!("\"{name}\": {value}"));
                    }
                    rng.shuffle(&mut fields);
                    format!("{{{}}}", fields.join(", "))
                })
                .collect();
            let page = format!(r#"{{"total": 1, "items": [{}]}}"#, items.join(", "));
            for dec in [&d, &nested, &by_index] {
                let fast = dec.decode(page.as_bytes());
                let doc = dec.decode_document(page.as_bytes());
                match (&fast, &doc) {
                    (Ok(f), Ok(o)) => {
                        assert_eq!(f.items, o.items, "seed {seed}: {page}");
                        agreed += 1;
                    }
                    (Err(_), Err(_)) => {}
                    _ => panic!("seed {seed}: {page}\nfast {fast:?}\ndocument {doc:?}"),
                }
            }
        }
        // Enough pages decode for the agreement to mean something.
        assert!(agreed > 1000, "only {agreed} pages decoded");
    }

    #[test]
    fn items_that_are_arrays_read_by_index_on_both_paths() {
        let d = keyed("/0", r#"name = { from = "/1" }"#);
        assert!(d.fast.is_some());
        let page = br#"{"items": [["a", "b"], ["c", null, "x"]]}"#;
        let fast = d.decode(page).unwrap();
        assert_eq!(fast.items, d.decode_document(page).unwrap().items);
        assert_eq!(fast.items[0].key.as_str(), "a");
        assert_eq!(fast.items[1].values, vec![Value::Null]);
        // An item that is neither fails on both.
        for page in [
            &br#"{"items": ["a"]}"#[..],
            br#"{"items": [null]}"#,
            br#"{"items": [7]}"#,
        ] {
            assert!(d.decode(page).is_err());
            assert!(d.decode_document(page).is_err());
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_fails_on_both_paths() {
        let d = decoder("");
        // The bad byte is in a field the fast path skips.
        let page = b"{\"items\": [{\"id\": 1, \"name\": \"a\", \"junk\": \"\xff\", \"address\": {\"city\": \"X\"}}]}";
        let fast = d.decode(page).unwrap_err();
        assert!(fast.contains("not UTF-8 text"), "{fast}");
        assert!(d.decode_document(page).is_err());
    }

    #[test]
    fn a_page_with_items_twice_fails_on_both_paths() {
        let d = decoder("");
        let page = br#"{"items": [{"id": 1, "name": "a", "address": {"city": "X"}}], "items": []}"#;
        for err in [
            d.decode(page).unwrap_err(),
            d.decode_document(page).unwrap_err(),
        ] {
            assert!(err.contains("`items` twice"), "{err}");
        }
        let nested = decoder(r#", items_pointer = "/data/items""#);
        let page = br#"{"data": {"items": [], "items": []}}"#;
        for err in [
            nested.decode(page).unwrap_err(),
            nested.decode_document(page).unwrap_err(),
        ] {
            assert!(err.contains("`items` twice"), "{err}");
        }
        // Once is fine, and other keys twice are none of the listing's.
        let page = br#"{"items": [], "total": 0, "total": 0}"#;
        assert!(d.decode_document(page).is_ok());
    }

    #[test]
    fn keys_match_by_their_unescaped_text() {
        let d = decoder("");
        let page = br#"{"items": [{"i\u0064": 1, "\u006eame": "a", "address": {"city": "X"}}]}"#;
        let fast = d.decode(page).unwrap();
        assert_eq!(fast.items, d.decode_document(page).unwrap().items);
        assert_eq!(fast.items[0].key.as_str(), "1");
        assert_eq!(fast.items[0].values[1], Value::Text("a".into()));
    }

    #[test]
    fn an_absent_field_is_an_error_unless_optional() {
        let d = decoder("");
        // `name` renamed upstream: absent, not null
        let page = br#"{"items": [{"id": 1, "full_name": "a", "address": {"city": "X"}}]}"#;
        for err in [
            d.decode(page).unwrap_err(),
            d.decode_document(page).unwrap_err(),
        ] {
            assert!(
                err.contains("item 0 (key 1): column `name` from `/name`: the field is absent"),
                "{err}"
            );
        }
        // `on` is optional, `city` under a null parent is null
        let page = br#"{"items": [{"id": 1, "name": "a", "address": null}]}"#;
        let row = &d.decode(page).unwrap().items[0];
        assert_eq!(
            row.values,
            vec![Value::Null, Value::Text("a".into()), Value::Null]
        );
        // an absent parent is absent
        let page = br#"{"items": [{"id": 1, "name": "a"}]}"#;
        assert!(d.decode(page).unwrap_err().contains("column `city`"));
    }

    #[test]
    fn numbers_keep_their_digits_and_nul_is_refused() {
        let d = decoder("");
        let page = br#"{"items": [{"id": 1, "name": 123456789012345678901234567890, "address": {"city": 1e2}}]}"#;
        let row = &d.decode(page).unwrap().items[0];
        assert_eq!(row.values[0], Value::Text("1e+2".into()));
        assert_eq!(
            row.values[1],
            Value::Text("123456789012345678901234567890".into())
        );
        let page = br#"{"items": [{"id": 1, "name": "a\u0000b", "address": null}]}"#;
        let err = d.decode(page).unwrap_err();
        assert!(
            err.contains("column `name`") && err.contains("NUL"),
            "{err}"
        );
        let page = br#"{"items": [{"id": 1e2, "name": "a", "address": null}]}"#;
        assert!(d.decode(page).unwrap_err().contains("not a 64-bit integer"));
    }

    #[test]
    fn nested_items_use_the_document_path() {
        let d = decoder(r#", items_pointer = "/data/items""#);
        assert!(d.fast.is_none());
        let page = r#"{"total": 1, "data": {"items": [{"id": 5, "name": "n", "address": null}]}}"#;
        let got = d.decode(page.as_bytes()).unwrap();
        assert_eq!(got.items.len(), 1);
    }

    #[test]
    fn errors_name_the_problem() {
        let d = decoder("");
        let err = d.decode(b"{\"items\": [").unwrap_err();
        assert!(err.contains("invalid JSON"), "{err}");
        let err = d.decode(b"{\"total\": 1}").unwrap_err();
        assert!(err.contains("no items at `/items`"), "{err}");
        let err = d
            .decode(br#"{"items": [{"id": 1, "name": {"x": 1}, "address": null}]}"#)
            .unwrap_err();
        assert!(err.contains("item 0 (key 1): column `name`"), "{err}");
        let err = d.decode(br#"{"items": [{"name": "x"}]}"#).unwrap_err();
        assert!(err.contains("item 0: `/id`: the key is missing"), "{err}");
        let err = d.decode(br#"{"items": {"id": 1}}"#).unwrap_err();
        assert!(err.contains("array"), "{err}");
        for e in [
            d.decode_document(br#"{"items": [{"id": 1, "name": {"x": 1}, "address": null}]}"#)
                .unwrap_err(),
            d.decode_document(b"{\"total\": 1}").unwrap_err(),
        ] {
            assert!(e.contains("column `name`") || e.contains("no items"), "{e}");
        }
    }

    fn dec(columns: &str) -> RowDecoder {
        keyed("/id", columns)
    }

    /// A decoder of a text key at pointer `key` and `columns`.
    fn keyed(key: &str, columns: &str) -> RowDecoder {
        let text = format!(
            r#"
[resources.u]
upstream = {{ base_url = "http://h", list_path = "/u", key_order = "asc" }}
key = {{ upstream = "{key}", column = "id", type = "text" }}
local = {{ table = "u" }}
[resources.u.columns]
{columns}
"#
        );
        let s = Settings::from_toml_str(&text, "t.toml").unwrap();
        RowDecoder::new(&s.resources["u"])
    }

    /// Both paths: rows equal, or both errors.
    fn same(d: &RowDecoder, page: &[u8]) {
        let fast = d.decode(page).map(|p| (p.items, p.total, p.next));
        let doc = d.decode_document(page).map(|p| (p.items, p.total, p.next));
        match (&fast, &doc) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "rows differ for {}", String::from_utf8_lossy(page)),
            (Err(_), Err(_)) => {}
            _ => panic!(
                "paths disagree on {}\n fast: {fast:?}\n  doc: {doc:?}",
                String::from_utf8_lossy(page)
            ),
        }
    }

    /// Two pointers naming one array element two ways (`0` and `00`, `1`
    /// and `+1`), which [`resolve`] reads alike, or one through a number's
    /// private serde_json name: the document path reads them, and both
    /// columns hold the value.
    #[test]
    fn index_aliases_and_private_names_use_the_document_path() {
        let d = dec(r#"
a = { from = "/emails/0/address", optional = true }
b = { from = "/emails/00/address", optional = true }
"#);
        assert!(d.fast.is_none());
        let rows = d
            .decode(br#"{"items": [{"id": "1", "emails": [{"address": "x@y"}]}]}"#)
            .unwrap()
            .items;
        assert_eq!(
            rows[0].values,
            vec![Value::Text("x@y".into()), Value::Text("x@y".into())]
        );
        let d = dec(r#"
a = { from = "/l/1", type = "json", optional = true }
b = { from = "/l/+1/x", optional = true }
"#);
        assert!(d.fast.is_none());
        same(&d, br#"{"items": [{"id": "1", "l": [0, {"x": "v"}]}]}"#);
        let d = dec(r#"n = { from = "/n/$serde_json::private::Number", optional = true }"#);
        assert!(d.fast.is_none());
        let rows = d
            .decode(br#"{"items": [{"id": "1", "n": 1.5}]}"#)
            .unwrap()
            .items;
        assert_eq!(rows[0].values, vec![Value::Null]);
        // Distinct indexes keep the fast path.
        assert!(dec(r#"a = { from = "/e/0/x" }
b = { from = "/e/1/x" }"#)
        .fast
        .is_some());
    }

    // Random pointers over random pages (written by the hostile review of
    // the descending decoder, which found index aliases with it).

    const TOKENS: &[&str] = &["a", "0", "1", "", "~/"];
    const NUMERIC_ALIASES: &[&str] = &["00", "01", "+0", "+1"];

    fn esc(t: &str) -> String {
        t.replace('~', "~0").replace('/', "~1")
    }

    fn json_str(t: &str) -> String {
        serde_json::to_string(t).unwrap()
    }

    /// Raw JSON text (so keys may repeat) of a random value.
    fn value(rng: &mut fastrand::Rng, depth: u32, out: &mut String) {
        let pick = if depth == 0 {
            rng.u8(0..5)
        } else {
            rng.u8(0..8)
        };
        match pick {
            0 => out.push_str("null"),
            1 => out.push_str(["true", "false"][rng.usize(..2)]),
            2 => out.push_str(
                [
                    "0",
                    "1",
                    "-1",
                    "1.5",
                    "-0",
                    "1e2",
                    "12345678901234567890123",
                    "2.0",
                    "-7",
                ][rng.usize(..9)],
            ),
            3 | 4 => out.push_str(&json_str(
                [
                    "",
                    "x",
                    "a@b",
                    "0",
                    "true",
                    "é",
                    "\u{1F600}",
                    "t\"q",
                    "~1",
                    "\u{7f}",
                ][rng.usize(..10)],
            )),
            5 => {
                out.push('[');
                for i in 0..rng.usize(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    value(rng, depth - 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..rng.usize(0..5) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&json_str(TOKENS[rng.usize(..TOKENS.len())]));
                    out.push(':');
                    value(rng, depth - 1, out);
                }
                out.push('}');
            }
        }
    }

    fn random_case(rng: &mut fastrand::Rng, aliases: bool) -> (String, String) {
        let mut cols = String::new();
        for c in 0..rng.usize(1..5) {
            let mut p = String::new();
            for _ in 0..rng.usize(1..4) {
                let t = if aliases && rng.u8(..6) == 0 {
                    NUMERIC_ALIASES[rng.usize(..NUMERIC_ALIASES.len())]
                } else {
                    TOKENS[rng.usize(..TOKENS.len())]
                };
                p.push('/');
                p.push_str(&esc(t));
            }
            let kind = ["json", "json", "json", "text", "integer"][rng.usize(..5)];
            let optional = rng.u8(..5) != 0;
            cols.push_str(&format!(
                "c{c} = {{ from = {}, type = \"{kind}\", optional = {optional} }}\n",
                json_str(&p)
            ));
        }
        let mut page = String::from(r#"{"items": ["#);
        for i in 0..rng.usize(1..4) {
            if i > 0 {
                page.push(',');
            }
            page.push_str(&format!(r#"{{"id": "k{i}""#));
            for _ in 0..rng.usize(0..6) {
                page.push(',');
                page.push_str(&json_str(TOKENS[rng.usize(..TOKENS.len())]));
                page.push(':');
                value(rng, 4, &mut page);
            }
            page.push('}');
        }
        page.push_str("]}");
        (cols, page)
    }

    fn run_random(aliases: bool) {
        let mut failures = Vec::new();
        let mut both_ok = 0;
        for seed in 0..20000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (cols, page) = random_case(&mut rng, aliases);
            let d = dec(&cols);
            if d.decode_document(page.as_bytes()).is_ok() {
                both_ok += 1;
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                same(&d, page.as_bytes())
            }));
            if r.is_err() {
                failures.push(format!("seed {seed}:\n{cols}{page}"));
            }
        }
        eprintln!("document path accepted {both_ok} of 20000 pages");
        assert!(
            failures.is_empty(),
            "{} of 20000 random pages decode differently; first ones:\n{}",
            failures.len(),
            failures
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n\n")
        );
    }

    /// 20,000 random pointer sets over random pages (repeated keys, empty
    /// tokens, escapes, nulls on the path, arrays for objects, numbers of
    /// every shape), with and without index aliases: the same rows on both
    /// paths, or both an error.
    #[test]
    fn random_pointers_over_random_pages_agree() {
        run_random(false);
        run_random(true);
    }
}

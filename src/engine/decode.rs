//! Decoding upstream pages into typed rows.
//!
//! The fast path reads a page in one pass with serde, keeping only the
//! fields the mapping needs and skipping the rest unparsed into a document;
//! it applies when the items, total and next-cursor pointers are top-level
//! fields (`/items`, `/total`, `/next`, or the body itself is the array).
//! Any other shape goes through a `serde_json::Value` document. Both paths
//! give the same rows and the same errors.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use crate::config::{ColumnType, KeyType, ResourceConfig};
use crate::model::{key_from_json, Row, Value};

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
    /// Distinct first tokens of the key and column pointers.
    fields: Vec<String>,
    /// For the key then each column: (index into `fields`, rest of pointer).
    picks: Vec<(usize, String)>,
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
        let mut fields: Vec<String> = Vec::new();
        let mut picks = Vec::new();
        let pointers =
            std::iter::once(&self.key_pointer).chain(self.columns.iter().map(|c| &c.pointer));
        for pointer in pointers {
            // An empty pointer (the whole item) needs the document.
            let s = split_pointer(pointer)?;
            let at = match fields.iter().position(|f| *f == s.first) {
                Some(at) => at,
                None => {
                    fields.push(s.first);
                    fields.len() - 1
                }
            };
            picks.push((at, s.rest));
        }
        Some(FastPlan {
            items,
            total,
            next,
            fields,
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
        let key = key_from_json(key_json.as_ref(), self.key_type)
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
        let mut de = serde_json::Deserializer::from_slice(body);
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
        while let Some(row) = seq.next_element_seed(ItemSeed {
            decoder: self.0,
            plan: self.1,
            index: rows.len(),
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
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = Row;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = Row;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "item {} to be an object", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let names = &self.plan.fields;
        let mut slots: Vec<Option<Json>> = vec![None; names.len()];
        while let Some(hit) = map.next_key_seed(KeySeed(names))? {
            match hit {
                Some(at) => slots[at] = Some(map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        self.decoder
            .row(self.index, |i| {
                let (at, rest) = &self.plan.picks[i];
                // Each field is taken once unless two pointers share it.
                let shared = self.plan.picks.iter().filter(|(a, _)| a == at).count() > 1;
                let slot = &mut slots[*at];
                match (rest.is_empty(), shared) {
                    (true, false) => slot.take(),
                    (true, true) => slot.clone(),
                    (false, _) => slot.as_ref().and_then(|v| resolve(v, rest)).cloned(),
                }
            })
            .map_err(de::Error::custom)
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
}

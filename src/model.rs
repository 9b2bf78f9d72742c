//! The values a pass compares: keys, typed column values, and rows.
//!
//! Both sides are brought to one typed form before comparing, so an upstream
//! `true` equals a SQLite `1` in a boolean column, and an upstream `42`
//! equals a local `'42'` in a text column. A row's owned columns are reduced
//! to a 64-bit fingerprint for the local index, so the diff keeps a key and a
//! hash per row, never the parsed document.

use std::hash::{DefaultHasher, Hasher};

use serde_json::Value as Json;

use crate::canonical;
use crate::config::{ColumnType, KeyType};

/// Index bit marking a local row as seen in the upstream listing: a row's
/// fingerprint never has it.
pub const SEEN: u64 = 1 << 63;

/// A row's key, in canonical text form (integers in decimal), so a text key
/// and an integer key share one representation in the index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub Box<str>);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A typed column value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Text(String),
}

impl Value {
    /// Converts an upstream JSON value (or its absence) to `kind`.
    pub fn from_json(json: Option<&Json>, kind: ColumnType) -> Result<Value, String> {
        let json = match json {
            None | Some(Json::Null) => return Ok(Value::Null),
            Some(j) => j,
        };
        match (kind, json) {
            (_, Json::String(s)) if s.contains('\0') => Err(NUL.into()),
            (ColumnType::Text, Json::String(s)) => Ok(Value::Text(s.clone())),
            (ColumnType::Text, Json::Number(n)) => Ok(Value::Text(n.to_string())),
            (ColumnType::Text, Json::Bool(b)) => Ok(Value::Text(b.to_string())),
            (ColumnType::Integer, Json::Number(n)) => n
                .as_i64()
                .map(Value::Int)
                .ok_or_else(|| format!("{n} is not a 64-bit integer")),
            (ColumnType::Integer, Json::String(s)) => s
                .parse()
                .map(Value::Int)
                .map_err(|_| format!("\"{s}\" is not an integer")),
            (ColumnType::Boolean, Json::Bool(b)) => Ok(Value::Bool(*b)),
            (ColumnType::Boolean, Json::Number(n)) => match n.as_i64() {
                Some(0) => Ok(Value::Bool(false)),
                Some(1) => Ok(Value::Bool(true)),
                _ => Err(format!("{n} is not a boolean")),
            },
            (ColumnType::Uuid, Json::String(s)) => canonical::uuid(s).map(Value::Text),
            (ColumnType::Timestamp, Json::String(s)) => canonical::timestamp(s).map(Value::Text),
            (ColumnType::Numeric, Json::Number(n)) => {
                canonical::numeric(&n.to_string(), None).map(Value::Text)
            }
            (ColumnType::Numeric, Json::String(s)) => canonical::numeric(s, None).map(Value::Text),
            (ColumnType::Json, json) => canonical::json(json).map(Value::Text),
            (kind, other) => Err(format!(
                "{} is not a valid {} value",
                kind_of(other),
                kind.as_str()
            )),
        }
    }
}

impl Value {
    /// [`Value::from_json`], taking the JSON value to reuse its string.
    pub fn from_json_owned(json: Option<Json>, kind: ColumnType) -> Result<Value, String> {
        match (kind, json) {
            (ColumnType::Text, Some(Json::String(s))) if !s.contains('\0') => Ok(Value::Text(s)),
            (ColumnType::Uuid, Some(Json::String(s))) if canonical::is_canonical_uuid(&s) => {
                Ok(Value::Text(s))
            }
            (kind, json) => Value::from_json(json.as_ref(), kind),
        }
    }
}

/// Why a text holding NUL is refused: PostgreSQL cannot store it, and
/// SQLite stores it but cuts it short when reading back.
const NUL: &str =
    "the text holds a NUL character, which the database cannot store and compare faithfully";

fn kind_of(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Whether `key`, as read from the local table, is in the canonical form
/// upstream keys are brought to. A local key that is not (`01` in an
/// integer key, an upper-case uuid) would never pair with its upstream row.
pub fn is_canonical_key(key: &str, kind: KeyType) -> bool {
    match kind {
        KeyType::Text => !key.is_empty(),
        KeyType::Integer => key.parse::<i64>().is_ok_and(|i| i.to_string() == key),
        KeyType::Uuid => canonical::is_canonical_uuid(key),
    }
}

/// [`key_from_json`] of a value it may keep: a string already in its
/// canonical form becomes the key without a copy.
pub fn key_from_json_owned(json: Option<Json>, kind: KeyType) -> Result<Key, String> {
    match (kind, json) {
        (KeyType::Text, Some(Json::String(s))) if !s.is_empty() && !s.contains('\0') => {
            Ok(Key(s.into()))
        }
        (KeyType::Uuid, Some(Json::String(s))) if canonical::is_canonical_uuid(&s) => {
            Ok(Key(s.into()))
        }
        (kind, json) => key_from_json(json.as_ref(), kind),
    }
}

/// Reads a key from an upstream item.
pub fn key_from_json(json: Option<&Json>, kind: KeyType) -> Result<Key, String> {
    match (kind, json) {
        (_, None | Some(Json::Null)) => Err("the key is missing".into()),
        (_, Some(Json::String(s))) if s.contains('\0') => Err(format!("key: {NUL}")),
        (KeyType::Text, Some(Json::String(s))) if !s.is_empty() => Ok(Key(s.as_str().into())),
        (KeyType::Text, Some(Json::Number(n))) => Ok(Key(n.to_string().into())),
        (KeyType::Integer, Some(Json::Number(n))) => n
            .as_i64()
            .map(|i| Key(i.to_string().into()))
            .ok_or_else(|| format!("key {n} is not a 64-bit integer")),
        (KeyType::Integer, Some(Json::String(s))) => s
            .parse::<i64>()
            .map(|i| Key(i.to_string().into()))
            .map_err(|_| format!("key \"{s}\" is not an integer")),
        (KeyType::Uuid, Some(Json::String(s))) => canonical::uuid(s).map(|u| Key(u.into())),
        (_, Some(other)) => Err(format!("the key is {}", kind_of(other))),
    }
}

/// One row as driftd owns it: the key and the owned columns, in the
/// [`crate::config::TableSpec`] column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: Key,
    pub values: Vec<Value>,
}

/// Appends the canonical signature of `values` to `out`: per value `N;`
/// (null), `B1;`/`B0;`, `I<decimal>;` or `T<byte length>:<text>;`. The
/// length prefix makes the concatenation unambiguous. The stores build the
/// same bytes from what they read back ([`push_part`]).
pub fn signature(values: &[Value], out: &mut String) {
    let mut sig = Vec::new();
    push_values(&mut sig, values);
    // Text parts are whole UTF-8 strings, the rest ASCII: nothing is lost.
    out.push_str(&String::from_utf8_lossy(&sig));
}

fn push_values(sig: &mut Vec<u8>, values: &[Value]) {
    for v in values {
        push_part(sig, Part::from(v));
    }
}

/// `n`'s decimal digits (as `{n}` formats it, without the formatter),
/// written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// Appends `n` in decimal.
pub(crate) fn push_decimal(out: &mut String, n: u64) {
    for &d in decimal(n, &mut [0; 20]) {
        out.push(char::from(d));
    }
}

/// One owned column's value as a store reads it back, for its part of the
/// row's [`signature`].
pub(crate) enum Part<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Text(&'a [u8]),
    /// Anything no upstream value gives (a REAL, a BLOB, a boolean 2):
    /// `X;`, so the row shows as stale and is written back.
    Foreign,
}

impl<'a> From<&'a Value> for Part<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Null => Part::Null,
            Value::Bool(b) => Part::Bool(*b),
            Value::Int(i) => Part::Int(*i),
            Value::Text(t) => Part::Text(t.as_bytes()),
        }
    }
}

/// Appends `part`'s piece of a [`signature`]: a value read back spells
/// what the equal [`Value`] spells.
pub(crate) fn push_part(sig: &mut Vec<u8>, part: Part<'_>) {
    match part {
        Part::Null => sig.extend_from_slice(b"N;"),
        Part::Bool(b) => sig.extend_from_slice(if b { b"B1;" } else { b"B0;" }),
        Part::Int(i) => {
            sig.push(b'I');
            if i < 0 {
                sig.push(b'-');
            }
            sig.extend_from_slice(decimal(i.unsigned_abs(), &mut [0; 20]));
            sig.push(b';');
        }
        Part::Text(t) => {
            sig.push(b'T');
            sig.extend_from_slice(decimal(t.len() as u64, &mut [0; 20]));
            sig.push(b':');
            sig.extend_from_slice(t);
            sig.push(b';');
        }
        Part::Foreign => sig.extend_from_slice(b"X;"),
    }
}

/// The fingerprint of a row's owned columns: a hash of its [`signature`].
pub fn fingerprint(values: &[Value]) -> u64 {
    let mut sig = Vec::with_capacity(64);
    push_values(&mut sig, values);
    fingerprint_bytes(&sig)
}

/// The fingerprint of a signature's bytes. The top bit is reserved by the
/// diff index (it marks a row as seen upstream), so it is always clear
/// here. `DefaultHasher::new()` has fixed keys: equal signatures hash equal
/// within a process, which is all one pass needs.
pub fn fingerprint_bytes(sig: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(sig);
    h.finish() & !SEEN
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the stores read back spells a value exactly as the upstream
    /// side's signature does.
    #[test]
    fn parts_spell_values_as_the_signature_does() {
        let text = "é;\u{10FFFF}:x".to_string();
        for (value, part) in [
            (Value::Null, Part::Null),
            (Value::Bool(true), Part::Bool(true)),
            (Value::Bool(false), Part::Bool(false)),
            (Value::Int(0), Part::Int(0)),
            (Value::Int(i64::MIN), Part::Int(i64::MIN)),
            (Value::Int(i64::MAX), Part::Int(i64::MAX)),
            (Value::Text(String::new()), Part::Text(b"")),
            (Value::Text(text.clone()), Part::Text(text.as_bytes())),
        ] {
            let mut want = String::new();
            signature(std::slice::from_ref(&value), &mut want);
            let mut got = Vec::new();
            push_part(&mut got, part);
            assert_eq!(got, want.as_bytes(), "{value:?}");
        }
    }
    use serde_json::json;

    #[test]
    fn signatures_spell_values_as_formatting_would() {
        let values = [
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(0),
            Value::Int(-7),
            Value::Int(i64::MIN),
            Value::Int(i64::MAX),
            Value::Text("é;x".into()),
            Value::Text(String::new()),
        ];
        let mut got = String::new();
        signature(&values, &mut got);
        assert_eq!(
            got,
            format!("N;B1;B0;I0;I-7;I{};I{};T4:é;x;T0:;", i64::MIN, i64::MAX)
        );
    }

    #[test]
    fn json_converts_by_column_type() {
        assert_eq!(
            Value::from_json(Some(&json!(true)), ColumnType::Boolean),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            Value::from_json(Some(&json!(1)), ColumnType::Boolean),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            Value::from_json(Some(&json!("7")), ColumnType::Integer),
            Ok(Value::Int(7))
        );
        assert_eq!(
            Value::from_json(Some(&json!(42)), ColumnType::Text),
            Ok(Value::Text("42".into()))
        );
        assert_eq!(Value::from_json(None, ColumnType::Text), Ok(Value::Null));
        assert!(Value::from_json(Some(&json!({"a": 1})), ColumnType::Text).is_err());
        assert!(Value::from_json(Some(&json!(2)), ColumnType::Boolean).is_err());
    }

    #[test]
    fn keys_are_canonical() {
        assert_eq!(
            key_from_json(Some(&json!("0042")), KeyType::Integer).unwrap(),
            key_from_json(Some(&json!(42)), KeyType::Integer).unwrap()
        );
        assert!(key_from_json(None, KeyType::Text).is_err());
        assert!(key_from_json(Some(&json!("")), KeyType::Text).is_err());
    }

    #[test]
    fn fingerprint_distinguishes_null_from_empty_and_types() {
        let a = fingerprint(&[Value::Null]);
        let b = fingerprint(&[Value::Text(String::new())]);
        let c = fingerprint(&[Value::Int(1)]);
        let d = fingerprint(&[Value::Bool(true)]);
        assert_ne!(a, b);
        assert_ne!(c, d);
        assert_eq!(a, fingerprint(&[Value::Null]));
        assert_eq!(a & SEEN, 0);
    }

    #[test]
    fn signature_is_unambiguous() {
        let mut one = String::new();
        signature(&[Value::Text("a;T1:b".into())], &mut one);
        let mut two = String::new();
        signature(
            &[Value::Text("a".into()), Value::Text("b".into())],
            &mut two,
        );
        assert_ne!(one, two);
        let mut s = String::new();
        signature(
            &[
                Value::Null,
                Value::Bool(true),
                Value::Int(-4),
                Value::Text("é'x".into()),
            ],
            &mut s,
        );
        assert_eq!(s, "N;B1;I-4;T4:é'x;");
    }
}

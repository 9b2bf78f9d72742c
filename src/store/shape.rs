//! What a store learns about a mirrored table before a pass: whether each
//! configured key and column type can be mirrored faithfully by the real
//! column (driftd's equality must be the database's), and the limits the
//! column puts on values (`varchar(n)`, `numeric(p,s)`, `int4`).
//!
//! A column that would store, compare or sort values differently from
//! driftd is refused by [`crate::store::Mirror::prepare`] with an error
//! naming it; a value that would not fit is refused by [`Shape::check_row`]
//! before anything is written, naming the row and the column.

use crate::canonical;
use crate::config::{ColumnType, KeyType, TableSpec};
use crate::model::{Row, Value};

/// A limit a column puts on the values it holds unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Limit {
    #[default]
    None,
    /// At most this many characters (`varchar(n)`).
    Chars(u32),
    /// An integer in this range (`int2`, `int4`).
    IntRange(i64, i64),
    /// `numeric(precision, scale)`.
    Numeric(i64, i64),
}

impl Limit {
    /// Checks one value; the error says what does not fit.
    fn check(self, value: &Value) -> Result<(), String> {
        match (self, value) {
            (Limit::Chars(n), Value::Text(t)) => {
                let len = t.chars().count();
                if len > n as usize {
                    return Err(format!(
                        "`{}` is {len} characters, more than the column's {n}",
                        preview(t)
                    ));
                }
            }
            (Limit::IntRange(lo, hi), Value::Int(i)) if !(lo..=hi).contains(i) => {
                return Err(format!("{i} is outside the column's range {lo}..={hi}"));
            }
            (Limit::Numeric(p, s), Value::Text(t)) => {
                canonical::numeric(t, Some((p, s)))?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// A long value, shortened for an error message.
fn preview(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// The limits of a table's key and owned columns (spec order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub key: Limit,
    pub columns: Vec<Limit>,
}

impl Shape {
    /// No limits: every value fits (SQLite, which stores what it is given).
    pub fn unlimited(spec: &TableSpec) -> Shape {
        Shape {
            key: Limit::None,
            columns: vec![Limit::None; spec.columns.len()],
        }
    }

    /// Checks that `row` fits the table unchanged; the error names the
    /// row's key and the column.
    pub fn check_row(&self, spec: &TableSpec, row: &Row) -> Result<(), String> {
        let key_value = match spec.key_type {
            KeyType::Integer => row
                .key
                .as_str()
                .parse()
                .map(Value::Int)
                .unwrap_or(Value::Null),
            KeyType::Text | KeyType::Uuid => Value::Text(row.key.to_string()),
        };
        self.key
            .check(&key_value)
            .map_err(|p| format!("key column `{}`: {p}", spec.key_column))?;
        for ((limit, (column, _)), value) in self.columns.iter().zip(&spec.columns).zip(&row.values)
        {
            limit
                .check(value)
                .map_err(|p| format!("row `{}`: column `{column}`: {p}", row.key))?;
        }
        Ok(())
    }
}

/// What the database's column is, in the terms the compatibility rules use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text compared bytewise (`text`, `varchar`; SQLite TEXT affinity,
    /// BINARY collation).
    Text,
    /// Text the database compares in its own way (case-insensitive or
    /// non-deterministic collations, SQLite NOCASE or RTRIM).
    FoldedText,
    /// A column with no type of its own (SQLite BLOB affinity).
    Untyped,
    Integer,
    /// SQLite NUMERIC affinity (e.g. `BOOLEAN`, `DECIMAL`): integers stay
    /// integers, numeric-looking text is converted.
    Numeric,
    Boolean,
    Uuid,
    Timestamp,
    /// PostgreSQL `numeric`.
    Decimal,
    Json,
    /// Anything else, with the database's name for it.
    Other,
}

impl Kind {
    /// SQLite's name for the affinity this kind stands for.
    pub fn affinity_name(self) -> &'static str {
        match self {
            Kind::Integer => "INTEGER",
            Kind::Text => "TEXT",
            Kind::FoldedText => "TEXT, with a non-binary collation,",
            Kind::Untyped => "BLOB (none)",
            Kind::Numeric => "NUMERIC",
            _ => "REAL",
        }
    }

    /// The config type that mirrors this column, for hints.
    fn suggestion(self) -> Option<&'static str> {
        Some(match self {
            Kind::Text | Kind::Untyped => "text",
            Kind::Integer => "integer",
            Kind::Boolean => "boolean",
            Kind::Uuid => "uuid",
            Kind::Timestamp => "timestamp",
            Kind::Decimal => "numeric",
            Kind::Json => "json",
            Kind::FoldedText | Kind::Numeric | Kind::Other => return None,
        })
    }
}

/// Whether a key of `key` type can live in a column of `kind`.
pub fn key_fits(key: KeyType, kind: Kind) -> bool {
    matches!(
        (key, kind),
        (KeyType::Text, Kind::Text)
            | (KeyType::Integer, Kind::Integer)
            | (KeyType::Uuid, Kind::Uuid | Kind::Text)
    )
}

/// Whether values of `column` type can live in a column of `kind` and read
/// back equal.
pub fn column_fits(column: ColumnType, kind: Kind) -> bool {
    use ColumnType as C;
    let text_like = matches!(kind, Kind::Text | Kind::FoldedText | Kind::Untyped);
    match column {
        C::Text => text_like,
        C::Integer => matches!(kind, Kind::Integer | Kind::Numeric),
        C::Boolean => matches!(kind, Kind::Boolean | Kind::Integer | Kind::Numeric),
        C::Uuid => text_like || kind == Kind::Uuid,
        C::Timestamp => text_like || kind == Kind::Timestamp,
        C::Numeric => text_like || kind == Kind::Decimal,
        C::Json => text_like || kind == Kind::Json,
    }
}

/// Why a key column cannot be mirrored, with a hint.
pub fn key_refusal(key: KeyType, column: &str, declared: &str, kind: Kind) -> String {
    let why = match kind {
        Kind::FoldedText => format!(
            "the key column `{column}` ({declared}) compares text in its own way (case-insensitive, trailing-space or non-deterministic collation): two keys upstream tells apart could be one row here; use a binary (\"C\" / BINARY) collation"
        ),
        _ => format!(
            "the key column `{column}` is {declared}, which cannot hold `{}` keys unchanged",
            key.as_str()
        ),
    };
    match kind.suggestion() {
        Some(s) if s != key.as_str() && key_fits_name(s) => {
            format!("{why}; set key.type = \"{s}\"")
        }
        _ => why,
    }
}

fn key_fits_name(s: &str) -> bool {
    matches!(s, "text" | "integer" | "uuid")
}

/// Why a key column that is not unique cannot be mirrored.
pub fn not_unique(key: &str) -> String {
    format!(
        "the key column `{key}` has no unique constraint or index of its own (a partial one, e.g. unique among live rows, does not count): driftd pairs one row per key and its writes address rows by key; add a unique index on `{key}`"
    )
}

/// Why an owned column cannot be mirrored, with a hint.
pub fn column_refusal(column: ColumnType, name: &str, declared: &str, kind: Kind) -> String {
    let why = format!(
        "column `{name}` is {declared}, which does not store `{}` values unchanged",
        column.as_str()
    );
    match kind.suggestion() {
        Some(s) if s != column.as_str() => format!("{why}; map it with type = \"{s}\""),
        _ => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ident;
    use crate::model::Key;

    fn spec() -> TableSpec {
        TableSpec {
            table: Ident::parse("t").unwrap(),
            key_column: Ident::parse("k").unwrap(),
            key_type: KeyType::Text,
            columns: vec![
                (Ident::parse("name").unwrap(), ColumnType::Text),
                (Ident::parse("n").unwrap(), ColumnType::Integer),
                (Ident::parse("amount").unwrap(), ColumnType::Numeric),
            ],
            soft_delete: None,
        }
    }

    #[test]
    fn values_that_do_not_fit_are_named() {
        let shape = Shape {
            key: Limit::Chars(8),
            columns: vec![
                Limit::Chars(5),
                Limit::IntRange(-32768, 32767),
                Limit::Numeric(5, 2),
            ],
        };
        let row = |k: &str, name: &str, n: i64, amount: &str| Row {
            key: Key(k.into()),
            values: vec![
                Value::Text(name.into()),
                Value::Int(n),
                Value::Text(amount.into()),
            ],
        };
        assert!(shape
            .check_row(&spec(), &row("a", "Barth", 1, "1.5"))
            .is_ok());
        let err = shape
            .check_row(&spec(), &row("a", "Bartholomew", 1, "1.5"))
            .unwrap_err();
        assert!(
            err.contains("row `a`: column `name`") && err.contains("11 characters"),
            "{err}"
        );
        let err = shape
            .check_row(&spec(), &row("abcdefghi", "x", 1, "1"))
            .unwrap_err();
        assert!(err.contains("key column `k`"), "{err}");
        assert!(shape
            .check_row(&spec(), &row("a", "x", 70000, "1"))
            .is_err());
        assert!(shape
            .check_row(&spec(), &row("a", "x", 1, "1.234"))
            .is_err());
        assert!(shape.check_row(&spec(), &row("a", "x", 1, "1234")).is_err());
    }

    #[test]
    fn compatibility_rules() {
        assert!(key_fits(KeyType::Uuid, Kind::Uuid));
        assert!(key_fits(KeyType::Uuid, Kind::Text));
        assert!(!key_fits(KeyType::Text, Kind::Uuid));
        assert!(!key_fits(KeyType::Text, Kind::FoldedText));
        assert!(!key_fits(KeyType::Integer, Kind::Text));
        assert!(column_fits(ColumnType::Json, Kind::Json));
        assert!(!column_fits(ColumnType::Text, Kind::Timestamp));
        assert!(!column_fits(ColumnType::Integer, Kind::Text));
        let hint = key_refusal(KeyType::Text, "uuid", "uuid", Kind::Uuid);
        assert!(hint.contains("set key.type = \"uuid\""), "{hint}");
        let hint = column_refusal(
            ColumnType::Text,
            "at",
            "timestamp with time zone",
            Kind::Timestamp,
        );
        assert!(hint.contains("type = \"timestamp\""), "{hint}");
    }
}

//! Reading a PostgreSQL table's columns from the catalog: each column's
//! base type (what driftd casts to, so assignment applies the column's own
//! checks instead of a silent truncating cast), its modifier (`varchar(n)`,
//! `numeric(p,s)`) and whether its collation is deterministic; and the SQL
//! that prints a column's value in driftd's canonical form for the scan.

use super::shape::{Kind, Limit};
use crate::config::{ColumnType, Ident};

/// One column as the catalog describes it.
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: String,
    /// `format_type(atttypid, NULL)`: `character varying`, `numeric`, ...
    pub base: String,
    /// `format_type(atttypid, atttypmod)`: `character varying(5)`, ...
    pub full: String,
    pub typmod: i32,
    /// False for case-insensitive (non-deterministic) ICU collations.
    pub deterministic: bool,
}

/// The key column's collation (name, provider, locale) and the database's
/// default collation, its provider (NULL before PostgreSQL 15) and its
/// encoding; `$1` is the quoted table name, `$2` the column.
pub const KEY_COLLATION: &str =
    "SELECT co.collname::text, co.collprovider::text, co.collcollate::text, \
     d.datcollate::text, to_jsonb(d) ->> 'datlocprovider', pg_encoding_to_char(d.encoding)::text \
     FROM pg_attribute a JOIN pg_collation co ON co.oid = a.attcollation \
     JOIN pg_database d ON d.datname = current_database() \
     WHERE a.attrelid = to_regclass($1) AND a.attname = $2";

/// The catalog query behind [`PgColumn`]; `$1` is the quoted table name.
pub const COLUMNS: &str = "SELECT a.attname::text AS name, \
     format_type(a.atttypid, NULL) AS base, \
     format_type(a.atttypid, a.atttypmod) AS full, \
     a.atttypmod AS typmod, \
     COALESCE((SELECT c.collisdeterministic FROM pg_collation c WHERE c.oid = a.attcollation), true) AS deterministic \
     FROM pg_attribute a \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

impl From<(String, String, String, i32, bool)> for PgColumn {
    fn from(
        (name, base, full, typmod, deterministic): (String, String, String, i32, bool),
    ) -> Self {
        PgColumn {
            name,
            base,
            full,
            typmod,
            deterministic,
        }
    }
}

/// Whether `$2` (a column name) of table `$1` has a unique, non-partial
/// index (or constraint) on exactly that column.
pub const KEY_IS_UNIQUE: &str = "SELECT EXISTS (SELECT 1 FROM pg_index i \
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL \
     AND i.indexprs IS NULL AND i.indnkeyatts = 1 AND a.attname = $2)";

/// Whether a unique index on `$2` (a column name) of table `$1` compares
/// it under a non-deterministic (case-insensitive) collation: the database
/// then takes keys driftd tells apart for one (upstream's `Alice` and the
/// table's `alice`), whatever the column's own collation.
pub const KEY_INDEX_IS_NONDETERMINISTIC: &str = "SELECT EXISTS (SELECT 1 FROM pg_index i \
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
     JOIN pg_collation c ON c.oid = ANY(i.indcollation) \
     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND a.attname = $2 \
     AND NOT c.collisdeterministic)";

/// Whether row-level security filters what driftd's role sees of table
/// `$1`: enabled on it, applying to the table's owner only when forced,
/// and the role neither a superuser nor `BYPASSRLS`.
pub const ROWS_HIDDEN_BY_RLS: &str = "SELECT COALESCE((SELECT c.relrowsecurity \
     AND (c.relforcerowsecurity OR NOT pg_has_role(current_user, c.relowner, 'MEMBER')) \
     AND NOT (r.rolsuper OR r.rolbypassrls) \
     FROM pg_class c, pg_roles r WHERE c.oid = to_regclass($1) AND r.rolname = current_user), false)";

/// The 4-byte header PostgreSQL adds to type modifiers.
const VARHDRSZ: i32 = 4;

impl PgColumn {
    pub fn kind(&self) -> Kind {
        match self.base.as_str() {
            "text" | "character varying" if self.deterministic => Kind::Text,
            "text" | "character varying" | "citext" => Kind::FoldedText,
            "smallint" | "integer" | "bigint" => Kind::Integer,
            "boolean" => Kind::Boolean,
            "uuid" => Kind::Uuid,
            "timestamp with time zone" => Kind::Timestamp,
            "numeric" => Kind::Decimal,
            "json" | "jsonb" => Kind::Json,
            _ => Kind::Other,
        }
    }

    /// What the column holds unchanged.
    pub fn limit(&self) -> Limit {
        match self.base.as_str() {
            "character varying" if self.typmod >= VARHDRSZ => {
                Limit::Chars((self.typmod - VARHDRSZ) as u32)
            }
            "smallint" => Limit::IntRange(i16::MIN.into(), i16::MAX.into()),
            "integer" => Limit::IntRange(i32::MIN.into(), i32::MAX.into()),
            "numeric" if self.typmod >= VARHDRSZ => {
                let m = self.typmod - VARHDRSZ;
                let precision = (m >> 16) & 0xffff;
                // an 11-bit signed scale (negative scales since PostgreSQL 15)
                let scale = ((m & 0x7ff) ^ 1024) - 1024;
                Limit::Numeric(precision.into(), scale.into())
            }
            _ => Limit::None,
        }
    }

    /// SQL printing the column's value as driftd's canonical text.
    fn canonical_text(&self, c: &str) -> String {
        match self.base.as_str() {
            // to_char prints NULL for ±infinity: print those as they are
            "timestamp with time zone" => format!(
                "CASE WHEN isfinite({c}) THEN to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') ELSE {c}::text END"
            ),
            "numeric" => format!("trim_scale({c})::text"),
            _ => format!("{c}::text"),
        }
    }
}

/// How a scanned owned column reads back, to build its part of the row's
/// signature (see [`crate::model::signature`]) in Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanCell {
    /// `int8`: `I<n>;`.
    Int,
    /// `boolean`: `B1;` or `B0;`.
    Bool,
    /// `int8` of a boolean mirrored in another type: 1 and 0 are `B1;`
    /// and `B0;`, anything else `X;` (no upstream boolean gives it).
    IntBool,
    /// Canonical text: `T<bytes>:<text>;`.
    Text,
}

/// One owned column as the scan selects it, and how it reads back.
pub fn scan_cell(c: &Ident, kind: ColumnType, column: Option<&PgColumn>) -> (String, ScanCell) {
    let q = c.quoted();
    let native_bool = column.is_none_or(|col| col.base == "boolean");
    match kind {
        ColumnType::Integer => (format!("CAST({q} AS int8)"), ScanCell::Int),
        ColumnType::Boolean if native_bool => (q, ScanCell::Bool),
        ColumnType::Boolean => (format!("CAST({q} AS int8)"), ScanCell::IntBool),
        ColumnType::Text
        | ColumnType::Uuid
        | ColumnType::Timestamp
        | ColumnType::Numeric
        | ColumnType::Json => (
            match column {
                Some(col) => col.canonical_text(&q),
                None => format!("{q}::text"),
            },
            ScanCell::Text,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(base: &str, typmod: i32) -> PgColumn {
        PgColumn {
            name: "c".into(),
            base: base.into(),
            full: base.into(),
            typmod,
            deterministic: true,
        }
    }

    #[test]
    fn limits_come_from_type_modifiers() {
        assert_eq!(col("character varying", 5 + 4).limit(), Limit::Chars(5));
        assert_eq!(col("character varying", -1).limit(), Limit::None);
        // numeric(10,2): ((10 << 16) | 2) + 4
        assert_eq!(
            col("numeric", ((10 << 16) | 2) + 4).limit(),
            Limit::Numeric(10, 2)
        );
        assert_eq!(col("numeric", -1).limit(), Limit::None);
        assert_eq!(col("smallint", -1).limit(), Limit::IntRange(-32768, 32767));
        let mut folded = col("text", -1);
        folded.deterministic = false;
        assert_eq!(folded.kind(), Kind::FoldedText);
        assert_eq!(col("character", 9).kind(), Kind::Other);
    }
}

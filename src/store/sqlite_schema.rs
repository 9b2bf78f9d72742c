//! Reading a SQLite table's column types the way SQLite itself applies
//! them: a declared type maps to an affinity by SQLite's rules (so
//! `VARCHAR(5)` is plain TEXT and `BOOLEAN` is NUMERIC). A column's
//! collation is SQLite's own answer (`sqlite_scan::declared_collation`).

use super::shape::Kind;

/// The kind of a column declared as `declared`, by SQLite's affinity rules
/// (section "Determination Of Column Affinity" of its documentation).
pub fn affinity(declared: &str) -> Kind {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        Kind::Integer
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        Kind::Text
    } else if t.contains("BLOB") || t.trim().is_empty() {
        Kind::Untyped
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        Kind::Other
    } else {
        Kind::Numeric
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(affinity("INTEGER"), Kind::Integer);
        assert_eq!(affinity("BIGINT"), Kind::Integer);
        assert_eq!(affinity("VARCHAR(5)"), Kind::Text);
        assert_eq!(affinity("text"), Kind::Text);
        assert_eq!(affinity(""), Kind::Untyped);
        assert_eq!(affinity("BLOB"), Kind::Untyped);
        assert_eq!(affinity("DOUBLE PRECISION"), Kind::Other);
        assert_eq!(affinity("BOOLEAN"), Kind::Numeric);
        assert_eq!(affinity("DECIMAL(10,2)"), Kind::Numeric);
    }
}

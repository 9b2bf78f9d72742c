//! The SQLite scan: `SELECT key, columns... FROM table` (the whole table
//! for an index, or a batch at a time in key order for a merge) stepped
//! through SQLite's C API on a pooled connection's own handle, each row's
//! signature built in Rust from the cells' storage classes and bytes.
//! Building the signature in SQL (string functions per cell) and carrying
//! rows through sqlx's channel cost five times what the `sqlite3` CLI
//! takes to read the same columns; this reads at about the CLI's speed.
//!
//! The signature is the one [`crate::model::signature`] gives the same
//! values, per owned column by its type: an INTEGER cell of an integer
//! column `I<n>;`, 0 or 1 of a boolean `B<n>;`, a TEXT cell of a text-like
//! column `T<bytes>:<text>;`, NULL `N;`, and any other storage class `X;`
//! (which no upstream value produces, so the row shows as stale and is
//! written back in the column's type).

use std::ffi::{c_int, CStr, CString};
use std::future::Future;
use std::ptr::{null_mut, NonNull};

use libsqlite3_sys as ffi;
use sqlx::SqlitePool;

use super::{
    batch_row, index_row_fp, query_err, spawn_sorted, SortedScan, StoreError, SORTED_BATCH,
};
use crate::config::{ColumnType, KeyType, TableSpec};
use crate::diff::{LocalBatch, LocalIndex};
use crate::model::{fingerprint_bytes, push_decimal, push_part, Part};

/// Reads the live rows of `spec`'s table into an index sized for `count`.
pub(super) async fn scan(
    pool: &SqlitePool,
    spec: &TableSpec,
    count: usize,
) -> Result<LocalIndex, StoreError> {
    let sql = select(spec, None);
    let spec = spec.clone();
    blocking(pool.clone(), &spec.clone(), move |db, context| {
        let mut index = LocalIndex::with_capacity(count);
        read(db, &sql, None, &spec, context, |key, fp| {
            index_row_fp(&mut index, &spec, key, fp)
        })?;
        Ok(index)
    })
    .await
}

/// Reads the live rows in key order, bytewise (`COLLATE BINARY`: the key
/// column's collation, which `prepare` checked) for text keys, a batch at
/// a time: each batch one `SELECT ... WHERE key > last ORDER BY key LIMIT`
/// on a pooled connection taken for it alone. `None` for a database whose
/// text is not UTF-8 (UTF-16 bytes sort otherwise).
pub(super) async fn scan_sorted(
    pool: &SqlitePool,
    spec: &TableSpec,
) -> Result<Option<SortedScan>, StoreError> {
    let encoding: String = sqlx::query_scalar("PRAGMA encoding")
        .fetch_one(pool)
        .await
        .map_err(query_err(format!("scan {}", spec.table)))?;
    if encoding != "UTF-8" {
        return Ok(None);
    }
    let (first, next) = (select(spec, Some(false)), select(spec, Some(true)));
    let (pool, spec) = (pool.clone(), spec.clone());
    Ok(Some(spawn_sorted(
        move |after: Option<String>| {
            let sql = if after.is_some() { &next } else { &first }.clone();
            let bound = after.map(|k| match k.parse() {
                Ok(i) if spec.key_type == KeyType::Integer => After::Int(i),
                _ => After::Text(k),
            });
            let for_batch = spec.clone();
            blocking(pool.clone(), &spec, move |db, context| {
                let spec = for_batch;
                let mut batch = LocalBatch::with_capacity(SORTED_BATCH);
                read(db, &sql, bound.as_ref(), &spec, context, |key, fp| {
                    batch_row(&mut batch, &spec, key, fp)
                })?;
                Ok(batch)
            })
        },
        Ok,
    )))
}

/// The last key of a sorted scan's batch, bound as `?1` of the next.
enum After {
    Int(i64),
    Text(String),
}

/// `SELECT key, columns... FROM table [WHERE live]`; `sorted`: in key
/// order, a batch at a time, with `true` after the key bound as `?1`.
fn select(spec: &TableSpec, sorted: Option<bool>) -> String {
    let key = spec.key_column.quoted();
    let mut sql = format!("SELECT {key}");
    for (c, _) in &spec.columns {
        sql.push_str(", ");
        sql.push_str(&c.quoted());
    }
    sql.push_str(&format!(" FROM {}", spec.table.quoted()));
    let mut conditions = Vec::new();
    if let Some(soft) = &spec.soft_delete {
        conditions.push(format!("{} IS NULL", soft.quoted()));
    }
    if sorted == Some(true) {
        // Bytewise, as the ORDER BY, whatever the column says.
        conditions.push(if spec.key_type == KeyType::Integer {
            format!("{key} > ?1")
        } else {
            format!("{key} COLLATE BINARY > ?1")
        });
    }
    if !conditions.is_empty() {
        sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
    }
    if sorted.is_some() {
        sql.push_str(&format!(" ORDER BY {key}"));
        if spec.key_type != KeyType::Integer {
            sql.push_str(" COLLATE BINARY");
        }
        sql.push_str(&format!(" LIMIT {SORTED_BATCH}"));
    }
    sql
}

/// The collation SQLite applies to `column` of `schema.table`, as SQLite
/// itself reports it (`sqlite3_table_column_metadata`), upper-cased.
pub(super) async fn declared_collation(
    pool: &SqlitePool,
    schema: &str,
    table: &str,
    column: &str,
) -> Result<Option<String>, StoreError> {
    let context = format!("inspect the key of {table}");
    let name = |s: &str| {
        CString::new(s).map_err(|_| StoreError::Schema {
            table: table.to_string(),
            problem: "a name holds a NUL character".into(),
        })
    };
    let (schema, table, column) = (name(schema)?, name(table)?, name(column)?);
    on_handle(pool.clone(), context, move |db, context| {
        let db = db.as_ptr();
        // The metadata call answers from the schema this connection last
        // loaded: a statement first makes SQLite see a change another
        // connection made since (a table renamed away and back).
        // SAFETY: `db` is open and held; the SQL is NUL-terminated; no
        // callback. Its result is of no interest: the call below reports.
        unsafe {
            ffi::sqlite3_exec(
                db,
                c"SELECT 1 FROM sqlite_master LIMIT 1".as_ptr(),
                None,
                null_mut(),
                null_mut(),
            );
        }
        let mut collation: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: `db` is open and held; the names are NUL-terminated and
        // outlive the call; the collation name SQLite hands back is valid
        // until the next call on this connection, and is copied at once.
        let rc = unsafe {
            ffi::sqlite3_table_column_metadata(
                db,
                schema.as_ptr(),
                table.as_ptr(),
                column.as_ptr(),
                null_mut(),
                &mut collation,
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            // SAFETY: as in `read`.
            let msg = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) };
            return Err(StoreError::Unavailable(format!(
                "{context}: {}",
                msg.to_string_lossy()
            )));
        }
        Ok((!collation.is_null()).then(|| {
            // SAFETY: non-null, NUL-terminated, owned by SQLite until the
            // next call.
            unsafe { CStr::from_ptr(collation) }
                .to_string_lossy()
                .to_ascii_uppercase()
        }))
    })
    .await
}

/// Runs `work` on a pooled connection's raw handle, off the async workers
/// (stepping a million rows takes a second).
fn blocking<T: Send + 'static>(
    pool: SqlitePool,
    spec: &TableSpec,
    work: impl FnOnce(NonNull<ffi::sqlite3>, &str) -> Result<T, StoreError> + Send + 'static,
) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
    on_handle(pool, format!("scan {}", spec.table), work)
}

/// [`blocking`] with its own context for errors.
async fn on_handle<T: Send + 'static>(
    pool: SqlitePool,
    context: String,
    work: impl FnOnce(NonNull<ffi::sqlite3>, &str) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let mut conn = pool.acquire().await.map_err(query_err(context.clone()))?;
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut handle = runtime
            .block_on(conn.lock_handle())
            .map_err(query_err(context.clone()))?;
        work(handle.as_raw_handle(), &context)
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("the scan task stopped: {e}")))?
}

/// A prepared statement, finalized when dropped.
struct Statement(*mut ffi::sqlite3_stmt);

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: the pointer came from sqlite3_prepare_v2 and is finalized
        // once, here; finalizing NULL is a no-op.
        unsafe {
            ffi::sqlite3_finalize(self.0);
        }
    }
}

/// One cell as SQLite stores it.
enum Cell<'a> {
    Null,
    Integer(i64),
    Text(&'a [u8]),
    /// REAL or BLOB.
    Other,
}

/// Reads cell `i` of the current row of `stmt`.
///
/// # Safety
/// `stmt` must be a live statement whose last step returned SQLITE_ROW,
/// with more than `i` columns; the bytes borrowed are valid until the next
/// step or any other call on the same cell.
unsafe fn cell<'a>(stmt: *mut ffi::sqlite3_stmt, i: c_int) -> Cell<'a> {
    match ffi::sqlite3_column_type(stmt, i) {
        ffi::SQLITE_NULL => Cell::Null,
        ffi::SQLITE_INTEGER => Cell::Integer(ffi::sqlite3_column_int64(stmt, i)),
        ffi::SQLITE_TEXT => {
            // Text first, then its length, as SQLite documents.
            let p = ffi::sqlite3_column_text(stmt, i);
            let n = ffi::sqlite3_column_bytes(stmt, i);
            if p.is_null() {
                // Out of memory (an empty text is a pointer to ""): not a
                // value that could equal anything upstream sends.
                Cell::Other
            } else if n <= 0 {
                Cell::Text(&[])
            } else {
                Cell::Text(std::slice::from_raw_parts(p, n as usize))
            }
        }
        _ => Cell::Other,
    }
}

/// Steps `sql` (key, then the owned columns) and hands each row's key and
/// fingerprint to `row`; the first error stops it.
fn read(
    db: NonNull<ffi::sqlite3>,
    sql: &str,
    after: Option<&After>,
    spec: &TableSpec,
    context: &str,
    mut row: impl FnMut(Option<&str>, u64) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let db = db.as_ptr();
    let failed = |what: &str| {
        // SAFETY: `db` is the open handle this call holds the lock of;
        // sqlite3_errmsg returns a NUL-terminated string it owns.
        let msg = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) };
        StoreError::Unavailable(format!("{context}: {what}: {}", msg.to_string_lossy()))
    };
    let text = CString::new(sql).map_err(|_| StoreError::Schema {
        table: spec.table.to_string(),
        problem: "a name holds a NUL character".into(),
    })?;
    let mut raw = null_mut();
    // SAFETY: `db` is open and held exclusively (the connection's lock);
    // `text` is NUL-terminated and outlives the call.
    let rc = unsafe { ffi::sqlite3_prepare_v2(db, text.as_ptr(), -1, &mut raw, null_mut()) };
    let stmt = Statement(raw);
    if rc != ffi::SQLITE_OK {
        return Err(failed("prepare"));
    }
    // SAFETY: a prepared statement with parameter 1 when `after` is given;
    // SQLITE_TRANSIENT has SQLite copy the text before the call returns.
    let rc = match after {
        None => ffi::SQLITE_OK,
        Some(After::Int(i)) => unsafe { ffi::sqlite3_bind_int64(stmt.0, 1, *i) },
        Some(After::Text(t)) => unsafe {
            ffi::sqlite3_bind_text(
                stmt.0,
                1,
                t.as_ptr().cast(),
                c_int::try_from(t.len()).unwrap_or(c_int::MAX),
                ffi::SQLITE_TRANSIENT(),
            )
        },
    };
    if rc != ffi::SQLITE_OK {
        return Err(failed("bind the last key"));
    }
    let mut sig: Vec<u8> = Vec::with_capacity(256);
    let mut integer_key = String::with_capacity(24);
    loop {
        // SAFETY: a prepared statement on the held connection.
        match unsafe { ffi::sqlite3_step(stmt.0) } {
            ffi::SQLITE_ROW => {}
            ffi::SQLITE_DONE => return Ok(()),
            _ => return Err(failed("read a row")),
        }
        // SAFETY (every `cell` call below): the last step gave a row of
        // 1 + columns cells, each read once before the next step.
        let key: Option<&str> = match (unsafe { cell(stmt.0, 0) }, spec.key_type) {
            (Cell::Integer(i), KeyType::Integer) => {
                integer_key.clear();
                if i < 0 {
                    integer_key.push('-');
                }
                push_decimal(&mut integer_key, i.unsigned_abs());
                Some(integer_key.as_str())
            }
            (Cell::Text(b), KeyType::Text | KeyType::Uuid) => match std::str::from_utf8(b) {
                Ok(k) => Some(k),
                Err(_) => {
                    return Err(StoreError::BadRow {
                        table: spec.table.to_string(),
                        problem: format!(
                            "a key in `{}` is not valid UTF-8 text, which no upstream key can pair with",
                            spec.key_column
                        ),
                    })
                }
            },
            _ => None,
        };
        sig.clear();
        for (i, (_, kind)) in spec.columns.iter().enumerate() {
            let c = unsafe { cell(stmt.0, i as c_int + 1) };
            part(&mut sig, *kind, c);
        }
        row(key, fingerprint_bytes(&sig))?;
    }
}

/// Appends one cell's part of the signature.
fn part(sig: &mut Vec<u8>, kind: ColumnType, cell: Cell<'_>) {
    push_part(
        sig,
        match (kind, cell) {
            (_, Cell::Null) => Part::Null,
            (ColumnType::Integer, Cell::Integer(i)) => Part::Int(i),
            (ColumnType::Boolean, Cell::Integer(i @ (0 | 1))) => Part::Bool(i == 1),
            (
                ColumnType::Text
                | ColumnType::Uuid
                | ColumnType::Timestamp
                | ColumnType::Numeric
                | ColumnType::Json,
                Cell::Text(b),
            ) => Part::Text(b),
            _ => Part::Foreign,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The collation SQLite applies to each column, whatever the DDL's
    /// spelling (case, quoting, comments, commas in defaults); a column
    /// that does not exist is an error.
    #[tokio::test]
    async fn sqlite_reports_each_columns_collation() {
        let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
        sqlx::raw_sql(
            r#"CREATE TABLE "users" (
                "uuid" TEXT COLLATE NOCASE PRIMARY KEY, -- a comment, with a comma
                name VARCHAR(10, 2) collate rtrim,
                [odd name] TEXT,
                note TEXT DEFAULT 'a, COLLATE x',
                CHECK (length(name) > 0)
            );
            CREATE TABLE t (id TEXT COLLATE /* folded */ NOCASE, a /* x, y */ TEXT COLLATE RTRIM, b TEXT) /* open"#,
        )
        .execute(&pool)
        .await
        .unwrap();
        let of = |table: &'static str, column: &'static str| {
            let pool = pool.clone();
            async move { declared_collation(&pool, "main", table, column).await }
        };
        assert_eq!(
            of("users", "uuid").await.unwrap().as_deref(),
            Some("NOCASE")
        );
        assert_eq!(of("users", "NAME").await.unwrap().as_deref(), Some("RTRIM"));
        assert_eq!(
            of("users", "odd name").await.unwrap().as_deref(),
            Some("BINARY")
        );
        assert_eq!(
            of("users", "note").await.unwrap().as_deref(),
            Some("BINARY")
        );
        assert!(of("users", "missing").await.is_err());
        assert_eq!(of("t", "id").await.unwrap().as_deref(), Some("NOCASE"));
        assert_eq!(of("t", "a").await.unwrap().as_deref(), Some("RTRIM"));
        assert_eq!(of("t", "b").await.unwrap().as_deref(), Some("BINARY"));
    }
    use crate::model::{signature, Value};

    #[test]
    fn parts_match_the_signature_of_the_same_values() {
        let cases: Vec<(ColumnType, Cell<'static>, Value)> = vec![
            (ColumnType::Integer, Cell::Integer(-42), Value::Int(-42)),
            (ColumnType::Boolean, Cell::Integer(1), Value::Bool(true)),
            (ColumnType::Boolean, Cell::Integer(0), Value::Bool(false)),
            (
                ColumnType::Text,
                Cell::Text("é;x".as_bytes()),
                Value::Text("é;x".into()),
            ),
            (ColumnType::Uuid, Cell::Null, Value::Null),
            (
                ColumnType::Json,
                Cell::Text(b""),
                Value::Text(String::new()),
            ),
        ];
        for (kind, cell, value) in cases {
            let mut got = Vec::new();
            part(&mut got, kind, cell);
            let mut want = String::new();
            signature(std::slice::from_ref(&value), &mut want);
            assert_eq!(got, want.as_bytes(), "{kind:?} {value:?}");
        }
        // What no upstream value gives: a boolean 2, text in an integer
        // column, a REAL or a BLOB.
        for (kind, cell) in [
            (ColumnType::Boolean, Cell::Integer(2)),
            (ColumnType::Integer, Cell::Text(b"5")),
            (ColumnType::Text, Cell::Integer(5)),
            (ColumnType::Text, Cell::Other),
        ] {
            let mut got = Vec::new();
            part(&mut got, kind, cell);
            assert_eq!(got, b"X;");
        }
    }
}

//! PostgreSQL backend: bulk writes with `UNNEST` over typed arrays (one
//! statement per batch, a handful of parameters whatever its size), values
//! cast to each column's real type as the catalog reports it (so `uuid` or
//! `varchar` columns work with text values).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Row as _};

use super::pg_schema::{self, PgColumn};
use super::shape::{self, Shape};
use super::write::{self, WriteTx};
use super::{
    batch_row, check_columns, index_row_fp, jobs, lock_key, query_err, spawn_sorted, Change,
    ChangeResult, Ledger, Mirror, PassWrite, ReadBatch, ResourceLock, ScanQuery, SortedScan,
    StoreError, Written, SORTED_BATCH,
};
use crate::config::{ColumnType, Ident, KeyType, TableSpec};
use crate::diff::{LocalBatch, LocalIndex};
use crate::jobs::{Job, JobFilter, JobId};
use crate::model::{fingerprint_bytes, push_part, Key, Part, Row, Value};

/// Serializes concurrent migrations from several driftd processes.
const MIGRATION_LOCK: i64 = 0x6472_6966_7464; // "driftd"

pub struct PgStore {
    pool: PgPool,
    /// For the resource locks' own connections (never logged).
    url: String,
    /// Column → catalog description, per table, filled by `prepare`.
    types: Mutex<HashMap<String, HashMap<String, PgColumn>>>,
}

impl PgStore {
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        // One direct connection first: its error names the cause
        // (connection refused, authentication) where the pool would only
        // say it timed out.
        {
            use sqlx::Connection as _;
            let probe =
                tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(url))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable("the database did not answer within 10 s".into())
                    })?
                    .map_err(StoreError::Connect)?;
            let _ = probe.close().await;
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(StoreError::Connect)?;
        Ok(Self {
            pool,
            url: url.to_string(),
            types: Mutex::new(HashMap::new()),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the key column's text sorts bytewise as UTF-8: a libc
    /// collation of locale `C`, `POSIX` or `C.UTF-8` (the column's, or the
    /// database's default; pg_catalog's `ucs_basic` is one), in a UTF-8,
    /// SQL_ASCII or LATIN1 database.
    async fn bytewise(&self, spec: &TableSpec) -> Result<bool, StoreError> {
        let found: Option<KeyCollation> = sqlx::query_as(pg_schema::KEY_COLLATION)
            .bind(spec.table.quoted())
            .bind(spec.key_column.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err(format!("inspect table {}", spec.table)))?;
        let Some((name, provider, collate, db_collate, db_provider, encoding)) = found else {
            return Ok(false);
        };
        let c_like = |c: &str| matches!(c, "C" | "POSIX" | "C.UTF-8" | "C.utf8");
        // By provider and locale, never by name: anyone can create an ICU
        // collation called "C" (pg_catalog's C, POSIX and ucs_basic are
        // libc collations of locale C or POSIX).
        let collation = if name == "default" && provider == "d" {
            db_provider.as_deref().unwrap_or("c") == "c" && c_like(&db_collate)
        } else {
            provider == "c" && collate.as_deref().is_some_and(c_like)
        };
        Ok(collation && matches!(encoding.as_str(), "UTF8" | "SQL_ASCII" | "LATIN1"))
    }

    /// The scan's `SELECT key as text, cells...` of `spec`'s live rows, and
    /// how each owned column's cell reads back.
    fn scan_query(&self, spec: &TableSpec) -> (ScanQuery, Vec<pg_schema::ScanCell>) {
        let (exprs, cells): (Vec<String>, Vec<_>) = spec
            .columns
            .iter()
            .map(|(c, kind)| pg_schema::scan_cell(c, *kind, self.column(spec, c.as_str()).as_ref()))
            .unzip();
        let query = ScanQuery::new(
            spec,
            format!("CAST({} AS text)", spec.key_column.quoted()),
            exprs,
        );
        (query, cells)
    }

    /// The catalog description of `column`, once `prepare` ran.
    fn column(&self, spec: &TableSpec, column: &str) -> Option<PgColumn> {
        let types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        types
            .get(spec.table.as_str())
            .and_then(|t| t.get(column))
            .cloned()
    }

    /// The base type of `column`, for casts (without its modifier, so that
    /// assignment applies the column's own checks instead of an explicit,
    /// truncating cast); `text` if unknown.
    fn type_of(&self, spec: &TableSpec, column: &str) -> String {
        self.column(spec, column)
            .map(|c| c.base)
            .unwrap_or_else(|| "text".into())
    }

    /// The type a value array is cast to before assignment to `column`:
    /// its base type, except booleans into an integer column, which go
    /// through `integer` (the only integer type PostgreSQL casts a boolean
    /// to; assignment then widens or narrows it).
    fn cast_of(&self, spec: &TableSpec, column: &str, kind: ColumnType) -> String {
        let base = self.type_of(spec, column);
        if kind == ColumnType::Boolean && base != "boolean" {
            "integer".into()
        } else {
            base
        }
    }

    /// Parameter arrays for `rows`: keys, then one array per owned column.
    fn arrays<'a>(spec: &TableSpec, rows: &'a [Row]) -> (Vec<&'a str>, Vec<ColumnArray>) {
        let keys = rows.iter().map(|r| r.key.as_str()).collect();
        let cols = spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, kind))| ColumnArray::collect(*kind, rows.iter().map(|r| &r.values[i])))
            .collect();
        (keys, cols)
    }
}

/// One column's values as a typed PostgreSQL array parameter.
enum ColumnArray {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<Option<bool>>),
}

impl ColumnArray {
    fn collect<'a>(kind: ColumnType, values: impl Iterator<Item = &'a Value>) -> Self {
        match kind {
            ColumnType::Text
            | ColumnType::Uuid
            | ColumnType::Timestamp
            | ColumnType::Numeric
            | ColumnType::Json => ColumnArray::Text(
                values
                    .map(|v| match v {
                        Value::Text(s) => Some(s.clone()),
                        Value::Int(i) => Some(i.to_string()),
                        Value::Bool(b) => Some(b.to_string()),
                        Value::Null => None,
                    })
                    .collect(),
            ),
            ColumnType::Integer => ColumnArray::Int(
                values
                    .map(|v| match v {
                        Value::Int(i) => Some(*i),
                        Value::Bool(b) => Some(i64::from(*b)),
                        _ => None,
                    })
                    .collect(),
            ),
            ColumnType::Boolean => ColumnArray::Bool(
                values
                    .map(|v| match v {
                        Value::Bool(b) => Some(*b),
                        Value::Int(i) => Some(*i != 0),
                        _ => None,
                    })
                    .collect(),
            ),
        }
    }

    fn sql_type(&self) -> &'static str {
        match self {
            ColumnArray::Text(_) => "text[]",
            ColumnArray::Int(_) => "int8[]",
            ColumnArray::Bool(_) => "bool[]",
        }
    }

    fn bind<'q>(
        self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        match self {
            ColumnArray::Text(v) => q.bind(v),
            ColumnArray::Int(v) => q.bind(v),
            ColumnArray::Bool(v) => q.bind(v),
        }
    }
}

impl PgStore {
    async fn insert_rows(
        &self,
        tx: &mut PgConnection,
        spec: &TableSpec,
        rows: &[Row],
    ) -> Result<u64, StoreError> {
        let (keys, cols) = Self::arrays(spec, rows);
        let kt = self.type_of(spec, spec.key_column.as_str());
        let mut names = vec![spec.key_column.quoted()];
        let mut unnest = vec!["$1::text[]".to_string()];
        let mut aliases = vec!["k".to_string()];
        let mut picks = vec![format!("u.k::{kt}")];
        for (i, ((col, kind), arr)) in spec.columns.iter().zip(&cols).enumerate() {
            names.push(col.quoted());
            unnest.push(format!("${}::{}", i + 2, arr.sql_type()));
            aliases.push(format!("c{i}"));
            picks.push(format!(
                "u.c{i}::{}",
                self.cast_of(spec, col.as_str(), *kind)
            ));
        }
        let sql = format!(
            "INSERT INTO {t} ({names}) SELECT {picks} FROM UNNEST({unnest}) AS u({aliases}) \
             WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {t}.{k} = u.k::{kt})",
            t = spec.table.quoted(),
            names = names.join(", "),
            picks = picks.join(", "),
            unnest = unnest.join(", "),
            aliases = aliases.join(", "),
            k = spec.key_column.quoted(),
        );
        let mut q = sqlx::query(&sql).bind(keys);
        for arr in cols {
            q = arr.bind(q);
        }
        let done = q
            .execute(&mut *tx)
            .await
            .map_err(query_err(format!("insert into {}", spec.table)))?
            .rows_affected();
        Ok(done)
    }

    async fn update_rows(
        &self,
        tx: &mut PgConnection,
        spec: &TableSpec,
        rows: &[Row],
    ) -> Result<u64, StoreError> {
        let (keys, cols) = Self::arrays(spec, rows);
        let kt = self.type_of(spec, spec.key_column.as_str());
        let mut unnest = vec!["$1::text[]".to_string()];
        let mut aliases = vec!["k".to_string()];
        let mut sets = Vec::new();
        for (i, ((col, kind), arr)) in spec.columns.iter().zip(&cols).enumerate() {
            unnest.push(format!("${}::{}", i + 2, arr.sql_type()));
            aliases.push(format!("c{i}"));
            sets.push(format!(
                "{} = u.c{i}::{}",
                col.quoted(),
                self.cast_of(spec, col.as_str(), *kind)
            ));
        }
        if let Some(soft) = &spec.soft_delete {
            sets.push(format!("{} = NULL", soft.quoted()));
        }
        if sets.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE {t} SET {sets} FROM UNNEST({unnest}) AS u({aliases}) WHERE {t}.{k} = u.k::{kt}",
            t = spec.table.quoted(),
            sets = sets.join(", "),
            unnest = unnest.join(", "),
            aliases = aliases.join(", "),
            k = spec.key_column.quoted(),
        );
        let mut q = sqlx::query(&sql).bind(keys);
        for arr in cols {
            q = arr.bind(q);
        }
        let done = q
            .execute(&mut *tx)
            .await
            .map_err(query_err(format!("update {}", spec.table)))?
            .rows_affected();
        Ok(done)
    }

    async fn purge_keys(
        &self,
        tx: &mut PgConnection,
        spec: &TableSpec,
        keys: &[Key],
    ) -> Result<u64, StoreError> {
        let kt = self.type_of(spec, spec.key_column.as_str());
        let keys: Vec<&str> = keys.iter().map(Key::as_str).collect();
        let sql = match &spec.soft_delete {
            None => format!(
                "DELETE FROM {} WHERE {} = ANY($1::text[]::{kt}[])",
                spec.table.quoted(),
                spec.key_column.quoted()
            ),
            Some(soft) => format!(
                "UPDATE {} SET {s} = now() WHERE {} = ANY($1::text[]::{kt}[]) AND {s} IS NULL",
                spec.table.quoted(),
                spec.key_column.quoted(),
                s = soft.quoted()
            ),
        };
        let done = sqlx::query(&sql)
            .bind(keys)
            .execute(&mut *tx)
            .await
            .map_err(query_err(format!("purge from {}", spec.table)))?
            .rows_affected();
        Ok(done)
    }
}

/// Shared `$n` SQL is PostgreSQL's own.
fn pg_sql(sql: &str) -> &str {
    sql
}

/// A PostgreSQL write transaction, with the store for the column types.
struct PgWrite<'c> {
    store: &'c PgStore,
    tx: sqlx::Transaction<'c, sqlx::Postgres>,
}

impl PgStore {
    /// driftd's own tables can always be tried: there is no file to lose.
    fn writable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write_tx(&self) -> Result<PgWrite<'_>, StoreError> {
        Ok(PgWrite {
            store: self,
            tx: self.pool.begin().await.map_err(query_err("begin write"))?,
        })
    }
}

impl WriteTx for PgWrite<'_> {
    async fn fence(&mut self, resource: &str, next: bool) -> Result<i64, StoreError> {
        let sql = if next {
            jobs::FENCE_NEXT
        } else {
            jobs::FENCE_LOCK
        };
        sqlx::query_scalar(sql)
            .bind(resource)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(query_err("lock the write fence"))
    }

    async fn journaled_since(
        &mut self,
        resource: &str,
        since: i64,
        keys: &[&str],
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT key FROM driftd_key_journal WHERE resource = $1 AND seq > $2 \
             AND key = ANY($3::text[])",
        )
        .bind(resource)
        .bind(since)
        .bind(keys)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(query_err("read the key journal"))
    }

    async fn versions(
        &mut self,
        resource: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, String>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT key, version FROM driftd_key_journal WHERE resource = $1 AND version IS NOT NULL \
             AND key = ANY($2::text[])",
        )
        .bind(resource)
        .bind(keys)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(query_err("read journaled versions"))?;
        Ok(rows.into_iter().collect())
    }

    async fn journal(
        &mut self,
        resource: &str,
        seq: i64,
        entries: &[(&str, Option<&str>)],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = entries.iter().map(|e| e.0).collect();
        let versions: Vec<Option<&str>> = entries.iter().map(|e| e.1).collect();
        sqlx::query(
            "INSERT INTO driftd_key_journal (resource, key, seq, version, touched_at) \
             SELECT $1, u.k, $2, u.v, $3 FROM UNNEST($4::text[], $5::text[]) AS u(k, v) \
             ON CONFLICT (resource, key) DO UPDATE SET seq = excluded.seq, \
             version = COALESCE(excluded.version, driftd_key_journal.version), touched_at = excluded.touched_at",
        )
        .bind(resource)
        .bind(seq)
        .bind(super::now_rfc3339())
        .bind(keys)
        .bind(versions)
        .execute(&mut *self.tx)
        .await
        .map_err(query_err("write the key journal"))?;
        Ok(())
    }

    async fn insert_rows(&mut self, spec: &TableSpec, rows: &[Row]) -> Result<u64, StoreError> {
        self.store.insert_rows(&mut self.tx, spec, rows).await
    }

    async fn update_rows(&mut self, spec: &TableSpec, rows: &[Row]) -> Result<u64, StoreError> {
        self.store.update_rows(&mut self.tx, spec, rows).await
    }

    async fn purge_keys(&mut self, spec: &TableSpec, keys: &[Key]) -> Result<u64, StoreError> {
        self.store.purge_keys(&mut self.tx, spec, keys).await
    }

    async fn children(
        &mut self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> Result<Vec<Key>, StoreError> {
        let sql = children_query(spec, column, "CAST({k} AS text)");
        let parents: Vec<&str> = parents.iter().map(Key::as_str).collect();
        let keys: Vec<String> = sqlx::query_scalar(&sql)
            .bind(parents)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(query_err(format!("find children in {}", spec.table)))?;
        Ok(keys.into_iter().map(|k| Key(k.into())).collect())
    }

    async fn save_checkpoint(&mut self, resource: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(jobs::CHECKPOINT_SAVE)
            .bind(resource)
            .bind(value)
            .bind(super::now_rfc3339())
            .execute(&mut *self.tx)
            .await
            .map_err(query_err("store the checkpoint"))?;
        Ok(())
    }

    async fn commit(self, what: &str) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(query_err(what))
    }
}

/// `SELECT what FROM child WHERE column::text = ANY($1) [AND live]`; `{k}`
/// in `what` stands for the key column.
fn children_query(spec: &TableSpec, column: &Ident, what: &str) -> String {
    let mut sql = format!(
        "SELECT {} FROM {} WHERE CAST({} AS text) = ANY($1::text[])",
        what.replace("{k}", &spec.key_column.quoted()),
        spec.table.quoted(),
        column.quoted()
    );
    if let Some(soft) = &spec.soft_delete {
        sql.push_str(&format!(" AND {} IS NULL", soft.quoted()));
    }
    sql
}

impl Mirror for PgStore {
    async fn prepare(&self, spec: &TableSpec) -> Result<Shape, StoreError> {
        let rows: Vec<(String, String, String, i32, bool)> = sqlx::query_as(pg_schema::COLUMNS)
            .bind(spec.table.quoted())
            .fetch_all(&self.pool)
            .await
            .map_err(query_err(format!("inspect table {}", spec.table)))?;
        let rows: Vec<PgColumn> = rows.into_iter().map(PgColumn::from).collect();
        let names: Vec<String> = rows.iter().map(|c| c.name.clone()).collect();
        check_columns(spec, &names)?;
        let find = |name: &str| rows.iter().find(|c| c.name == name);
        let refuse = |problem: String| StoreError::Schema {
            table: spec.table.to_string(),
            problem,
        };
        let unique: bool = sqlx::query_scalar(pg_schema::KEY_IS_UNIQUE)
            .bind(spec.table.quoted())
            .bind(spec.key_column.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(query_err(format!("inspect the key of {}", spec.table)))?;
        if !unique {
            return Err(refuse(shape::not_unique(spec.key_column.as_str())));
        }
        let hidden: bool = sqlx::query_scalar(pg_schema::ROWS_HIDDEN_BY_RLS)
            .bind(spec.table.quoted())
            .fetch_one(&self.pool)
            .await
            .map_err(query_err(format!("inspect the policies of {}", spec.table)))?;
        if hidden {
            return Err(refuse(
                "row-level security filters the rows driftd's role sees: a pass would take the rows it may not see for missing, and be in_sync or purge over them; give the role BYPASSRLS, or disable row-level security on the table".into(),
            ));
        }
        let folded: bool = sqlx::query_scalar(pg_schema::KEY_INDEX_IS_NONDETERMINISTIC)
            .bind(spec.table.quoted())
            .bind(spec.key_column.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(query_err(format!("inspect the key of {}", spec.table)))?;
        if folded {
            return Err(refuse(format!(
                "a unique index on key column `{}` uses a non-deterministic (case-insensitive) collation: the database takes keys that differ only in case for one, so a pass would purge a row upstream has under another spelling; index the key under a deterministic collation",
                spec.key_column.as_str()
            )));
        }
        let mut shape = Shape::unlimited(spec);
        if let Some(key) = find(spec.key_column.as_str()) {
            if !shape::key_fits(spec.key_type, key.kind()) {
                return Err(refuse(shape::key_refusal(
                    spec.key_type,
                    &key.name,
                    &key.full,
                    key.kind(),
                )));
            }
            shape.key = key.limit();
        }
        for (i, (column, kind)) in spec.columns.iter().enumerate() {
            if let Some(col) = find(column.as_str()) {
                if !shape::column_fits(*kind, col.kind()) {
                    return Err(refuse(shape::column_refusal(
                        *kind,
                        &col.name,
                        &col.full,
                        col.kind(),
                    )));
                }
                shape.columns[i] = col.limit();
            }
        }
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        types.insert(
            spec.table.to_string(),
            rows.into_iter().map(|c| (c.name.clone(), c)).collect(),
        );
        Ok(shape)
    }

    async fn scan(&self, spec: &TableSpec) -> Result<LocalIndex, StoreError> {
        let (query, cells) = self.scan_query(spec);
        let sql = query.plain();
        let estimate: i64 = sqlx::query_scalar(
            "SELECT GREATEST(reltuples, 0)::int8 FROM pg_class WHERE oid = to_regclass($1)",
        )
        .bind(spec.table.quoted())
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err(format!("estimate {}", spec.table)))?
        .unwrap_or(0);
        let mut index = LocalIndex::with_capacity(estimate.clamp(0, 50_000_000) as usize);
        let mut rows = sqlx::query(&sql).fetch(&self.pool);
        let mut sig = Vec::with_capacity(256);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(query_err(format!("scan {}", spec.table)))?
        {
            let (key, fp) = scanned(&row, spec, &cells, &mut sig)?;
            index_row_fp(&mut index, spec, key, fp)?;
        }
        Ok(index)
    }

    async fn scan_sorted(&self, spec: &TableSpec) -> Result<Option<SortedScan>, StoreError> {
        let base = self.type_of(spec, spec.key_column.as_str());
        // uuid and integer columns sort as the key type does; text sorts
        // bytewise only under a bytewise collation, in an encoding whose
        // bytes sort as UTF-8's do.
        if !(spec.key_type == KeyType::Integer || base == "uuid" || self.bytewise(spec).await?) {
            return Ok(None);
        }
        // Qualified: unqualified, `id` would name the output column, the
        // key cast to text.
        let key = format!("{}.{}", spec.table.quoted(), spec.key_column.quoted());
        let (query, cells) = self.scan_query(spec);
        let null_key = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {key} IS NULL{})",
            query.table,
            query
                .live
                .as_ref()
                .map(|l| format!(" AND {l}"))
                .unwrap_or_default()
        );
        let has_null: bool = sqlx::query_scalar(&null_key)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err(format!("scan {}", spec.table)))?;
        if has_null {
            // The keyset below never reaches a NULL key: refuse it here.
            super::checked_key(spec, None)?;
        }
        let plain = query.plain();
        let and = if query.live.is_some() { "AND" } else { "WHERE" };
        let order = format!("ORDER BY {key} LIMIT {SORTED_BATCH}");
        let first = format!("{plain} {order}");
        let next = format!("{plain} {and} {key} > CAST($1 AS {base}) {order}");
        let (pool, table) = (self.pool.clone(), spec.table.to_string());
        let spec = spec.clone();
        let fetch = move |after: Option<String>| {
            let (pool, table, first, next) =
                (pool.clone(), table.clone(), first.clone(), next.clone());
            async move {
                let query = match &after {
                    None => sqlx::query(&first),
                    Some(last) => sqlx::query(&next).bind(last),
                };
                let rows = query
                    .fetch_all(&pool)
                    .await
                    .map_err(query_err(format!("scan {table}")))?;
                Ok(ScanRows(rows))
            }
        };
        let check = move |ScanRows(rows): ScanRows| {
            let mut batch = LocalBatch::with_capacity(rows.len());
            let mut sig = Vec::with_capacity(256);
            for row in &rows {
                let (key, fp) = scanned(row, &spec, &cells, &mut sig)?;
                batch_row(&mut batch, &spec, key, fp)?;
            }
            Ok(batch)
        };
        Ok(Some(spawn_sorted(fetch, check)))
    }

    async fn journal_mark(&self, resource: &str) -> Result<i64, StoreError> {
        sqlx::query_scalar(jobs::FENCE_MARK)
            .bind(resource)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err("read the journal mark"))
    }

    async fn write_pass(
        &self,
        spec: &TableSpec,
        resource: &str,
        since: i64,
        write: PassWrite<'_>,
    ) -> Result<Written, StoreError> {
        write::pass(self.write_tx().await?, spec, resource, since, write).await
    }

    async fn apply_changes(
        &self,
        spec: &TableSpec,
        resource: &str,
        changes: &[Change],
        checkpoint: Option<&str>,
    ) -> Result<Vec<ChangeResult>, StoreError> {
        write::changes(self.write_tx().await?, spec, resource, changes, checkpoint).await
    }

    async fn purge_children(
        &self,
        spec: &TableSpec,
        resource: &str,
        column: &Ident,
        parents: &[Key],
    ) -> Result<Vec<Key>, StoreError> {
        write::children(self.write_tx().await?, spec, resource, column, parents).await
    }

    async fn count_children(
        &self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> Result<u64, StoreError> {
        let sql = children_query(spec, column, "COUNT(*)");
        let parents: Vec<&str> = parents.iter().map(Key::as_str).collect();
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(parents)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err(format!("count children in {}", spec.table)))?;
        Ok(n.max(0) as u64)
    }

    async fn count_live(&self, spec: &TableSpec) -> Result<u64, StoreError> {
        let mut sql = format!("SELECT COUNT(*) FROM {}", spec.table.quoted());
        if let Some(soft) = &spec.soft_delete {
            sql.push_str(&format!(" WHERE {} IS NULL", soft.quoted()));
        }
        let n: i64 = sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err(format!("count rows of {}", spec.table)))?;
        Ok(n.max(0) as u64)
    }
}

impl Ledger for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_err("begin migrations"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(query_err("lock migrations"))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS driftd_schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .execute(&mut *tx)
        .await
        .map_err(query_err("create driftd_schema_migrations"))?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM driftd_schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(query_err("read driftd_schema_migrations"))?;
        for (version, statements) in jobs::MIGRATIONS {
            if done.is_some_and(|d| d >= *version) {
                continue;
            }
            for sql in *statements {
                sqlx::query(sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err(format!("migration {version}")))?;
            }
            sqlx::query("INSERT INTO driftd_schema_migrations (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(query_err("record migration"))?;
        }
        tx.commit().await.map_err(query_err("commit migrations"))
    }

    async fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        jobs::bind(sqlx::query(jobs::UPSERT), jobs::to_row(job))
            .execute(&self.pool)
            .await
            .map_err(query_err("save job"))?;
        Ok(())
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row: Option<jobs::JobRow> = sqlx::query_as(jobs::GET)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("read job"))?;
        row.map(jobs::from_row).transpose()
    }

    async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<jobs::JobRow> = sqlx::query_as(jobs::LIST)
            .bind(f.resource.as_deref())
            .bind(f.status.map(|s| s.as_str()))
            .bind(i64::from(f.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list jobs"))?;
        rows.into_iter().map(jobs::from_row).collect()
    }

    async fn abandon_job(&self, job: &Job) -> Result<bool, StoreError> {
        let sql = jobs::ABANDON.to_string();
        Ok(sqlx::query(&sql)
            .bind(job.id.to_string())
            .bind(job.status.as_str())
            .bind(job.reason.as_deref())
            .bind(job.finished_at.as_deref())
            .execute(&self.pool)
            .await
            .map_err(query_err("abandon job"))?
            .rows_affected()
            == 1)
    }

    async fn prune_jobs(&self, before: &str) -> Result<u64, StoreError> {
        sqlx::query(jobs::PRUNE_JOURNAL)
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(query_err("prune the key journal"))?;
        Ok(sqlx::query(jobs::PRUNE)
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(query_err("prune jobs"))?
            .rows_affected())
    }

    jobs::dead_letter_methods!(pg_sql);
    jobs::reprovision_methods!(pg_sql);

    async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<jobs::JobRow> = sqlx::query_as(jobs::UNFINISHED)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list unfinished jobs"))?;
        rows.into_iter().map(jobs::from_row).collect()
    }

    async fn try_lock(&self, resource: &str) -> Result<Option<ResourceLock>, StoreError> {
        use sqlx::Connection as _;
        let key = lock_key(resource);
        let mut conn = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect(&self.url),
        )
        .await
        .map_err(|_| StoreError::Unavailable("lock connection: no answer within 10 s".into()))?
        .map_err(query_err("lock connection"))?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(query_err(format!("lock resource {resource}")))?;
        if got {
            Ok(Some(ResourceLock::Advisory { conn, key }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(query_err("ping"))?;
        Ok(())
    }
}

/// [`pg_schema::KEY_COLLATION`]'s row: the column's collation name,
/// provider and locale, the database's locale, provider and encoding.
type KeyCollation = (
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
);

/// A sorted scan's batch as PostgreSQL sent it.
struct ScanRows(Vec<PgRow>);

impl ReadBatch for ScanRows {
    fn rows(&self) -> usize {
        self.0.len()
    }
    /// The key as the batch reads it: the next batch is bound after the
    /// very text [`scanned`] takes for this one's last key.
    fn last_key(&self) -> Option<String> {
        self.0
            .last()?
            .try_get::<Option<String>, _>(0)
            .ok()
            .flatten()
    }
}

/// Cell `at` of a scanned row as its part of the signature. The scan's
/// casts select int8, boolean or text, which come in binary form: read
/// here from their bytes, as sqlx's decoding would read them but without
/// its checks per value, which a million rows feel. A value in another
/// form or of another size goes through that decoding.
fn cell_part(row: &PgRow, at: usize, cell: pg_schema::ScanCell) -> Result<Part<'_>, sqlx::Error> {
    use pg_schema::ScanCell;
    use sqlx::postgres::PgValueFormat;
    let value = row.try_get_raw(at)?;
    // `as_bytes` fails only on NULL.
    let Ok(bytes) = value.as_bytes() else {
        return Ok(Part::Null);
    };
    if value.format() == PgValueFormat::Binary {
        match (cell, bytes) {
            (ScanCell::Text, text) => return Ok(Part::Text(text)),
            (ScanCell::Bool, [b @ (0 | 1)]) => return Ok(Part::Bool(*b == 1)),
            (ScanCell::Int | ScanCell::IntBool, b) => {
                if let Ok(be) = <[u8; 8]>::try_from(b) {
                    return Ok(int_part(cell, i64::from_be_bytes(be)));
                }
            }
            _ => {}
        }
    }
    Ok(match cell {
        ScanCell::Int | ScanCell::IntBool => match row.try_get::<Option<i64>, _>(at)? {
            None => Part::Null,
            Some(n) => int_part(cell, n),
        },
        ScanCell::Bool => match row.try_get::<Option<bool>, _>(at)? {
            None => Part::Null,
            Some(b) => Part::Bool(b),
        },
        ScanCell::Text => match row.try_get::<Option<&str>, _>(at)? {
            None => Part::Null,
            Some(t) => Part::Text(t.as_bytes()),
        },
    })
}

/// An int8 cell's part: a number, or for a boolean stored in an integer
/// column, 0 or 1 as false or true (any other number no upstream boolean
/// gives).
fn int_part(cell: pg_schema::ScanCell, n: i64) -> Part<'static> {
    match (cell, n) {
        (pg_schema::ScanCell::IntBool, 0 | 1) => Part::Bool(n == 1),
        (pg_schema::ScanCell::IntBool, _) => Part::Foreign,
        _ => Part::Int(n),
    }
}

/// A scanned row's key (as text) and the fingerprint of its signature,
/// built in `sig` from its `cells` (the signature
/// [`crate::model::signature`] gives the same values).
fn scanned<'r>(
    row: &'r PgRow,
    spec: &TableSpec,
    cells: &[pg_schema::ScanCell],
    sig: &mut Vec<u8>,
) -> Result<(Option<&'r str>, u64), StoreError> {
    let failed = |e| query_err(format!("scan {}", spec.table))(e);
    let key: Option<&str> = row.try_get(0).map_err(failed)?;
    sig.clear();
    for (i, cell) in cells.iter().enumerate() {
        push_part(sig, cell_part(row, i + 1, *cell).map_err(failed)?);
    }
    Ok((key, fingerprint_bytes(sig)))
}

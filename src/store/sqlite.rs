//! SQLite backend, the embedded default: WAL journal, writes in
//! `BEGIN IMMEDIATE` transactions (one writer at a time, no upgrade
//! deadlocks), multi-row `VALUES` statements.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{SqliteConnection, SqlitePool};

use super::shape::{self, Kind, Shape};
use super::sqlite_schema::affinity;
use super::write::{self, WriteTx};
use super::{
    check_columns, jobs, query_err, rows_per_statement, Change, ChangeResult, Ledger, Mirror,
    PassWrite, ResourceLock, SortedScan, StoreError, Written,
};
use crate::config::{Ident, KeyType, TableSpec};
use crate::diff::LocalIndex;
use crate::jobs::{Job, JobFilter, JobId};
use crate::model::{Key, Row, Value};

/// SQLite's default limit on bound parameters is 32766; stay well below.
const MAX_PARAMS: usize = 30_000;

pub struct SqliteStore {
    pool: SqlitePool,
    /// The database file (`None` in memory), for the lock files beside it.
    path: Option<std::path::PathBuf>,
    /// The file's device and inode when opened: a file deleted, moved or
    /// replaced under driftd is noticed before the next write or pass.
    file_id: Option<(u64, u64)>,
}

/// The schema (`main` unless the config says `schema.table`) and table
/// name, for SQLite's pragma functions.
fn schema_and_table(spec: &TableSpec) -> (&str, &str) {
    spec.table
        .as_str()
        .split_once('.')
        .unwrap_or(("main", spec.table.as_str()))
}

/// A file's identity on disk.
fn file_id(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl SqliteStore {
    /// Opens `url`, creating the file if it is missing: for the quickstart,
    /// which seeds its own database. Everything else uses
    /// [`SqliteStore::open_with`] without creation.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, true).await
    }

    /// Fails if the database file is gone or is not the one opened (a
    /// connection would silently write into the unlinked file, or a new
    /// one would create an empty database).
    fn check_file(&self) -> Result<(), StoreError> {
        let (Some(path), Some(opened)) = (&self.path, self.file_id) else {
            return Ok(());
        };
        let gone = |what: &str| {
            StoreError::Unavailable(format!("database file {} {what}", path.display()))
        };
        match file_id(path) {
            Ok(now) if now == opened => Ok(()),
            Ok(_) => Err(gone("was replaced by another file since driftd opened it")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(gone("is gone (deleted or moved) since driftd opened it"))
            }
            Err(e) => Err(gone(&format!("cannot be checked: {e}"))),
        }
    }

    /// The rows of `spec`'s table, soft-deleted ones included.
    async fn count(&self, spec: &TableSpec) -> Result<usize, StoreError> {
        let count: i64 =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", spec.table.quoted()))
                .fetch_one(&self.pool)
                .await
                .map_err(query_err(format!("count {}", spec.table)))?;
        Ok(count.max(0) as usize)
    }

    /// Opens `url`; a missing file is created only when `create` is set.
    pub async fn open_with(url: &str, create: bool) -> Result<Self, StoreError> {
        let in_memory = url.contains(":memory:");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Connect)?
            .create_if_missing(create)
            .journal_mode(if in_memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            .busy_timeout(Duration::from_secs(10));
        let path = (!in_memory).then(|| options.get_filename().to_path_buf());
        if let Some(path) = path.as_ref().filter(|p| !create && !p.exists()) {
            return Err(StoreError::Unavailable(format!(
                "database file {} does not exist; driftd never creates one (only `driftd quickstart` does): create it with the mirrored tables first",
                path.display()
            )));
        }
        // An in-memory database exists once per connection: keep exactly one.
        let pool = SqlitePoolOptions::new()
            .max_connections(if in_memory { 1 } else { 4 })
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(if in_memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if in_memory {
                None
            } else {
                Some(Duration::from_secs(1800))
            })
            .connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        // One name per file, however the config spells it (symlinks,
        // `..`): the lock files beside it must be the same for everyone.
        let path = path.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        let file_id = match &path {
            Some(p) => Some(file_id(p).map_err(|e| {
                StoreError::Unavailable(format!("database file {}: {e}", p.display()))
            })?),
            None => None,
        };
        Ok(Self {
            pool,
            path,
            file_id,
        })
    }

    /// The pool, for tests and the quickstart that seed tables.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Whether driftd's own tables can be written: the file is still the
    /// one opened.
    fn writable(&self) -> Result<(), StoreError> {
        self.check_file()
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, StoreError> {
        self.check_file()?;
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err("begin write transaction"))
    }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_value<'q>(q: SqliteQuery<'q>, v: &'q Value) -> SqliteQuery<'q> {
    match v {
        Value::Null => q.bind(None::<String>),
        Value::Bool(b) => q.bind(*b),
        Value::Int(i) => q.bind(*i),
        Value::Text(s) => q.bind(s.as_str()),
    }
}

fn bind_key<'q>(q: SqliteQuery<'q>, key: &'q Key, kind: KeyType) -> SqliteQuery<'q> {
    match (kind, key.as_str().parse::<i64>()) {
        (KeyType::Integer, Ok(i)) => q.bind(i),
        _ => q.bind(key.as_str()),
    }
}

/// Binds each row's key then its values, in order.
fn bind_rows<'q>(mut q: SqliteQuery<'q>, rows: &'q [Row], kind: KeyType) -> SqliteQuery<'q> {
    for row in rows {
        q = bind_key(q, &row.key, kind);
        for v in &row.values {
            q = bind_value(q, v);
        }
    }
    q
}

/// `(?,?,?),(?,?,?)` for `rows` rows of `width` values.
fn values_list(rows: usize, width: usize) -> String {
    let one = format!("({})", vec!["?"; width].join(","));
    vec![one; rows].join(",")
}

impl SqliteStore {
    /// What decides equality of `key` values: the collation in its column
    /// definition or of a unique index on it alone (`None`: BINARY), and
    /// whether the key is unique at all (`INTEGER PRIMARY KEY`, or a unique,
    /// non-partial index on exactly that column).
    async fn key_facts(
        &self,
        schema: &str,
        table: &str,
        key: &str,
    ) -> Result<(Option<String>, bool), StoreError> {
        let context = format!("inspect the key of {table}");
        // SQLite's own answer: reading the DDL by hand was once fooled by
        // a comment (`COLLATE /* ... */ NOCASE`).
        let mut collation = super::sqlite_scan::declared_collation(&self.pool, schema, table, key)
            .await?
            .filter(|c| c != "BINARY");
        let rowid_alias: bool = sqlx::query_scalar(
            "SELECT COUNT(*) = 1 AND SUM(name = ?3 AND upper(type) = 'INTEGER') = 1 \
             FROM pragma_table_info(?1, ?2) WHERE pk > 0",
        )
        .bind(table)
        .bind(schema)
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err(context.clone()))?;
        let mut unique = rowid_alias;
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM pragma_index_list(?1, ?2) WHERE \"unique\" = 1 AND partial = 0",
        )
        .bind(table)
        .bind(schema)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err(context.clone()))?;
        for index in indexes {
            let cols: Vec<(Option<String>, Option<String>)> =
                sqlx::query_as("SELECT name, coll FROM pragma_index_xinfo(?1, ?2) WHERE key = 1")
                    .bind(&index)
                    .bind(schema)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_err(context.clone()))?;
            if let [(Some(name), Some(coll))] = cols.as_slice() {
                if name == key {
                    unique = true;
                    if !coll.eq_ignore_ascii_case("BINARY") {
                        collation = Some(coll.to_ascii_uppercase());
                    }
                }
            }
        }
        Ok((collation, unique))
    }
}

async fn insert_rows(
    tx: &mut SqliteConnection,
    spec: &TableSpec,
    rows: &[Row],
) -> Result<u64, StoreError> {
    let width = spec.columns.len() + 1;
    let mut names = vec![spec.key_column.quoted()];
    names.extend(spec.columns.iter().map(|(c, _)| c.quoted()));
    let picks: Vec<String> = (1..=width).map(|i| format!("column{i}")).collect();
    let mut done = 0;
    for chunk in rows.chunks(rows_per_statement(width, MAX_PARAMS, rows.len())) {
        let sql = format!(
            "INSERT INTO {t} ({names}) SELECT {picks} FROM (VALUES {values}) AS v \
             WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {t}.{k} = v.column1)",
            t = spec.table.quoted(),
            names = names.join(", "),
            picks = picks.join(", "),
            values = values_list(chunk.len(), width),
            k = spec.key_column.quoted(),
        );
        let q = bind_rows(sqlx::query(&sql), chunk, spec.key_type);
        done += q
            .execute(&mut *tx)
            .await
            .map_err(query_err(format!("insert into {}", spec.table)))?
            .rows_affected();
    }
    Ok(done)
}

async fn update_rows(
    tx: &mut SqliteConnection,
    spec: &TableSpec,
    rows: &[Row],
) -> Result<u64, StoreError> {
    let width = spec.columns.len() + 1;
    let mut sets: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        .map(|(i, (c, _))| format!("{} = v.column{}", c.quoted(), i + 2))
        .collect();
    if let Some(soft) = &spec.soft_delete {
        sets.push(format!("{} = NULL", soft.quoted()));
    }
    if sets.is_empty() {
        return Ok(0);
    }
    let mut done = 0;
    for chunk in rows.chunks(rows_per_statement(width, MAX_PARAMS, rows.len())) {
        let sql = format!(
            "UPDATE {t} SET {sets} FROM (VALUES {values}) AS v WHERE {t}.{k} = v.column1",
            t = spec.table.quoted(),
            sets = sets.join(", "),
            values = values_list(chunk.len(), width),
            k = spec.key_column.quoted(),
        );
        let q = bind_rows(sqlx::query(&sql), chunk, spec.key_type);
        done += q
            .execute(&mut *tx)
            .await
            .map_err(query_err(format!("update {}", spec.table)))?
            .rows_affected();
    }
    Ok(done)
}

async fn purge_keys(
    tx: &mut SqliteConnection,
    spec: &TableSpec,
    keys: &[Key],
) -> Result<u64, StoreError> {
    let mut done = 0;
    for chunk in keys.chunks(MAX_PARAMS) {
        let marks = vec!["?"; chunk.len()].join(",");
        let sql = match &spec.soft_delete {
            None => format!(
                "DELETE FROM {} WHERE {} IN ({marks})",
                spec.table.quoted(),
                spec.key_column.quoted()
            ),
            Some(soft) => format!(
                "UPDATE {} SET {s} = CURRENT_TIMESTAMP WHERE {} IN ({marks}) AND {s} IS NULL",
                spec.table.quoted(),
                spec.key_column.quoted(),
                s = soft.quoted()
            ),
        };
        let mut q = sqlx::query(&sql);
        for key in chunk {
            q = bind_key(q, key, spec.key_type);
        }
        done += q
            .execute(&mut *tx)
            .await
            .map_err(query_err(format!("purge from {}", spec.table)))?
            .rows_affected();
    }
    Ok(done)
}

impl Mirror for SqliteStore {
    async fn prepare(&self, spec: &TableSpec) -> Result<Shape, StoreError> {
        self.check_file()?;
        let (schema, table) = schema_and_table(spec);
        let context = format!("inspect table {}", spec.table);
        let columns: Vec<(String, String)> =
            sqlx::query_as("SELECT name, type FROM pragma_table_info(?1, ?2)")
                .bind(table)
                .bind(schema)
                .fetch_all(&self.pool)
                .await
                .map_err(query_err(context.clone()))?;
        let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        check_columns(spec, &names)?;
        let declared = |name: &str| {
            columns
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .unwrap_or_default()
        };
        let refuse = |problem: String| StoreError::Schema {
            table: spec.table.to_string(),
            problem,
        };
        let key = spec.key_column.as_str();
        let key_declared = declared(key);
        let mut key_kind = affinity(&key_declared);
        let (collation, unique) = self.key_facts(schema, table, key).await?;
        if !unique {
            return Err(refuse(shape::not_unique(key)));
        }
        if key_kind == Kind::Text && collation.is_some_and(|c| c != "BINARY") {
            key_kind = Kind::FoldedText;
        }
        if !shape::key_fits(spec.key_type, key_kind) {
            let what = format!(
                "`{key_declared}` (SQLite {} affinity)",
                key_kind.affinity_name()
            );
            return Err(refuse(shape::key_refusal(
                spec.key_type,
                key,
                &what,
                key_kind,
            )));
        }
        for (column, kind) in &spec.columns {
            let text = declared(column.as_str());
            let found = affinity(&text);
            if !shape::column_fits(*kind, found) {
                let what = format!("`{text}` (SQLite {} affinity)", found.affinity_name());
                return Err(refuse(shape::column_refusal(
                    *kind,
                    column.as_str(),
                    &what,
                    found,
                )));
            }
        }
        Ok(Shape::unlimited(spec))
    }

    async fn scan(&self, spec: &TableSpec) -> Result<LocalIndex, StoreError> {
        super::sqlite_scan::scan(&self.pool, spec, self.count(spec).await?).await
    }

    async fn scan_sorted(&self, spec: &TableSpec) -> Result<Option<SortedScan>, StoreError> {
        super::sqlite_scan::scan_sorted(&self.pool, spec).await
    }

    async fn journal_mark(&self, resource: &str) -> Result<i64, StoreError> {
        self.check_file()?;
        sqlx::query_scalar(&jobs::FENCE_MARK.replace('$', "?"))
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
        write::pass(
            SqliteWrite(self.begin().await?),
            spec,
            resource,
            since,
            write,
        )
        .await
    }

    async fn apply_changes(
        &self,
        spec: &TableSpec,
        resource: &str,
        changes: &[Change],
        checkpoint: Option<&str>,
    ) -> Result<Vec<ChangeResult>, StoreError> {
        write::changes(
            SqliteWrite(self.begin().await?),
            spec,
            resource,
            changes,
            checkpoint,
        )
        .await
    }

    async fn purge_children(
        &self,
        spec: &TableSpec,
        resource: &str,
        column: &Ident,
        parents: &[Key],
    ) -> Result<Vec<Key>, StoreError> {
        let tx = SqliteWrite(self.begin().await?);
        write::children(tx, spec, resource, column, parents).await
    }

    async fn count_children(
        &self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> Result<u64, StoreError> {
        let sql = children_query(spec, column, "COUNT(*)");
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(json_list(parents.iter().map(Key::as_str)))
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

/// Shared `$n` SQL as SQLite takes it (`?n`).
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

/// A JSON array of strings, for `json_each`.
fn json_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    serde_json::Value::Array(
        items
            .into_iter()
            .map(|s| serde_json::Value::String(s.to_string()))
            .collect(),
    )
    .to_string()
}

/// `SELECT what FROM child WHERE column IN (?1 as a JSON list) [AND live]`;
/// `{k}` in `what` stands for the key column.
fn children_query(spec: &TableSpec, column: &Ident, what: &str) -> String {
    let mut sql = format!(
        "SELECT {} FROM {} WHERE CAST({} AS TEXT) IN (SELECT value FROM json_each(?1))",
        what.replace("{k}", &spec.key_column.quoted()),
        spec.table.quoted(),
        column.quoted()
    );
    if let Some(soft) = &spec.soft_delete {
        sql.push_str(&format!(" AND {} IS NULL", soft.quoted()));
    }
    sql
}

/// A SQLite write transaction (`BEGIN IMMEDIATE`).
struct SqliteWrite<'c>(sqlx::Transaction<'c, sqlx::Sqlite>);

impl WriteTx for SqliteWrite<'_> {
    async fn fence(&mut self, resource: &str, next: bool) -> Result<i64, StoreError> {
        let sql = if next {
            jobs::FENCE_NEXT
        } else {
            jobs::FENCE_LOCK
        };
        sqlx::query_scalar(&sql.replace('$', "?"))
            .bind(resource)
            .fetch_one(&mut *self.0)
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
            "SELECT key FROM driftd_key_journal WHERE resource = ?1 AND seq > ?2 \
             AND key IN (SELECT value FROM json_each(?3))",
        )
        .bind(resource)
        .bind(since)
        .bind(json_list(keys.iter().copied()))
        .fetch_all(&mut *self.0)
        .await
        .map_err(query_err("read the key journal"))
    }

    async fn versions(
        &mut self,
        resource: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, String>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT key, version FROM driftd_key_journal WHERE resource = ?1 AND version IS NOT NULL \
             AND key IN (SELECT value FROM json_each(?2))",
        )
        .bind(resource)
        .bind(json_list(keys.iter().copied()))
        .fetch_all(&mut *self.0)
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
        let list = serde_json::Value::Array(
            entries
                .iter()
                .map(|(k, v)| serde_json::json!([k, v]))
                .collect(),
        )
        .to_string();
        sqlx::query(
            "INSERT INTO driftd_key_journal (resource, key, seq, version, touched_at) \
             SELECT ?1, json_extract(value, '$[0]'), ?2, json_extract(value, '$[1]'), ?3 FROM json_each(?4) WHERE true \
             ON CONFLICT (resource, key) DO UPDATE SET seq = excluded.seq, \
             version = COALESCE(excluded.version, driftd_key_journal.version), touched_at = excluded.touched_at",
        )
        .bind(resource)
        .bind(seq)
        .bind(super::now_rfc3339())
        .bind(list)
        .execute(&mut *self.0)
        .await
        .map_err(query_err("write the key journal"))?;
        Ok(())
    }

    async fn insert_rows(&mut self, spec: &TableSpec, rows: &[Row]) -> Result<u64, StoreError> {
        insert_rows(&mut self.0, spec, rows).await
    }

    async fn update_rows(&mut self, spec: &TableSpec, rows: &[Row]) -> Result<u64, StoreError> {
        update_rows(&mut self.0, spec, rows).await
    }

    async fn purge_keys(&mut self, spec: &TableSpec, keys: &[Key]) -> Result<u64, StoreError> {
        purge_keys(&mut self.0, spec, keys).await
    }

    async fn children(
        &mut self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> Result<Vec<Key>, StoreError> {
        let sql = children_query(spec, column, "CAST({k} AS TEXT)");
        let keys: Vec<String> = sqlx::query_scalar(&sql)
            .bind(json_list(parents.iter().map(Key::as_str)))
            .fetch_all(&mut *self.0)
            .await
            .map_err(query_err(format!("find children in {}", spec.table)))?;
        Ok(keys.into_iter().map(|k| Key(k.into())).collect())
    }

    async fn save_checkpoint(&mut self, resource: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(&jobs::CHECKPOINT_SAVE.replace('$', "?"))
            .bind(resource)
            .bind(value)
            .bind(super::now_rfc3339())
            .execute(&mut *self.0)
            .await
            .map_err(query_err("store the checkpoint"))?;
        Ok(())
    }

    async fn commit(self, what: &str) -> Result<(), StoreError> {
        self.0.commit().await.map_err(query_err(what))
    }
}

impl Ledger for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS driftd_schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
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
            sqlx::query("INSERT INTO driftd_schema_migrations (version) VALUES (?)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(query_err("record migration"))?;
        }
        tx.commit().await.map_err(query_err("commit migrations"))
    }

    async fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        self.check_file()?;
        let sql = jobs::UPSERT.replace('$', "?");
        jobs::bind(sqlx::query(&sql), jobs::to_row(job))
            .execute(&self.pool)
            .await
            .map_err(query_err("save job"))?;
        Ok(())
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row: Option<jobs::JobRow> = sqlx::query_as(&jobs::GET.replace('$', "?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("read job"))?;
        row.map(jobs::from_row).transpose()
    }

    async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<jobs::JobRow> = sqlx::query_as(&jobs::LIST.replace('$', "?"))
            .bind(f.resource.as_deref())
            .bind(f.status.map(|s| s.as_str()))
            .bind(i64::from(f.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list jobs"))?;
        rows.into_iter().map(jobs::from_row).collect()
    }

    async fn abandon_job(&self, job: &Job) -> Result<bool, StoreError> {
        let sql = jobs::ABANDON.replace('$', "?");
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
        sqlx::query(&jobs::PRUNE_JOURNAL.replace('$', "?"))
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(query_err("prune the key journal"))?;
        let sql = jobs::PRUNE.replace('$', "?");
        Ok(sqlx::query(&sql)
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(query_err("prune jobs"))?
            .rows_affected())
    }

    jobs::dead_letter_methods!(sqlite_sql);
    jobs::reprovision_methods!(sqlite_sql);

    async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<jobs::JobRow> = sqlx::query_as(jobs::UNFINISHED)
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list unfinished jobs"))?;
        rows.into_iter().map(jobs::from_row).collect()
    }

    async fn try_lock(&self, resource: &str) -> Result<Option<ResourceLock>, StoreError> {
        let Some(db) = &self.path else {
            return Ok(Some(ResourceLock::Local));
        };
        let mut name = db.as_os_str().to_owned();
        name.push(format!(".driftd-{resource}.lock"));
        let path = std::path::PathBuf::from(name);
        let lock_err = |e: std::io::Error| {
            StoreError::Unavailable(format!(
                "resource `{resource}`: cannot take the lock file {}: {e}",
                path.display()
            ))
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ResourceLock::File(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(lock_err(e)),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check_file()?;
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(query_err("ping"))?;
        Ok(())
    }
}

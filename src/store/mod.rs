//! Storage behind one small trait, with a SQLite and a PostgreSQL
//! implementation (sqlx's `Any` driver cannot carry the types we need).
//!
//! Invariants:
//! - the mirrored tables belong to the user: driftd reads and writes rows in
//!   them, never creates, alters or drops them;
//! - every identifier reaching SQL is a validated [`crate::config::Ident`],
//!   quoted; every value is a bound parameter;
//! - each write call is one transaction, so a crash leaves whole batches.
//!
//! driftd's own state (pass history) lives in tables it creates by
//! migrations, prefixed `driftd_`.

mod jobs;
mod pg_schema;
mod postgres;
pub mod shape;
mod sqlite;
mod sqlite_schema;

use std::future::Future;

use secrecy::{ExposeSecret, SecretString};

pub use postgres::PgStore;
pub use shape::Shape;
pub use sqlite::SqliteStore;

use crate::config::{ColumnType, Ident, TableSpec};
use crate::diff::{IndexError, LocalIndex};
use crate::jobs::{Job, JobFilter, JobId};
use crate::model::{fingerprint_signature, is_canonical_key, Key, Row};

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// The database cannot be used right now: the SQLite file is missing
    /// or not the one opened, a lock file cannot be taken, or no answer
    /// came in time.
    #[error("{0}")]
    Unavailable(String),
    #[error("table `{table}`: {problem}")]
    Schema { table: String, problem: String },
    #[error("table `{table}`: {source}")]
    Index {
        table: String,
        #[source]
        source: IndexError,
    },
    #[error("table `{table}`: {problem}")]
    BadRow { table: String, problem: String },
    #[error("{context}: {source}")]
    Query {
        context: String,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// Whether trying again later may succeed (busy database, lost
    /// connection), as opposed to a schema or data problem.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect(_) => true,
            StoreError::Query { source, .. } => matches!(
                source,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ),
            _ => false,
        }
    }
}

pub(crate) fn query_err(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Query { context, source }
}

/// A per-resource lock held while a pass runs, so that several driftd
/// processes on one database never run the same resource at once: a
/// PostgreSQL advisory lock, or on SQLite an exclusive `flock` on a file
/// beside the database (`<db>.driftd-<resource>.lock`), which every driftd
/// process (worker or CLI) respects. An in-memory database serves one
/// process, whose runner already allows one pass per resource.
pub enum ResourceLock {
    Local,
    /// Held while the file stays open; closing it releases the lock, also
    /// when the process dies.
    File(std::fs::File),
    /// A session-level advisory lock, held by a connection of its own
    /// outside the pool: passes holding locks never starve each other of
    /// pooled connections, and a dropped lock closes its session.
    Advisory {
        conn: sqlx::PgConnection,
        key: i64,
    },
}

impl ResourceLock {
    /// Releases the lock. Dropping without releasing returns the
    /// connection with the lock still held, so always call this.
    pub async fn release(self) {
        if let ResourceLock::Advisory { mut conn, key } = self {
            if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut conn)
                .await
            {
                tracing::warn!(error = %e, "could not release a resource lock; closing its connection");
            }
            // Closing the session releases the lock in any case.
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// The advisory-lock key of a resource: a stable 64-bit FNV-1a hash, the
/// same in every driftd build.
pub fn lock_key(resource: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"driftd:".iter().chain(resource.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// The storage contract a pass needs.
pub trait Store: Send + Sync {
    /// Creates or upgrades driftd's own tables.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks that the mirrored table and every column in `spec` exist and
    /// can mirror the configured types faithfully; returns the limits the
    /// columns put on values.
    fn prepare(&self, spec: &TableSpec) -> impl Future<Output = Result<Shape, StoreError>> + Send;

    /// Reads the live (not soft-deleted) rows into a key → fingerprint index.
    fn scan(&self, spec: &TableSpec)
        -> impl Future<Output = Result<LocalIndex, StoreError>> + Send;

    /// Inserts rows whose key is not present yet; returns rows inserted.
    fn insert(
        &self,
        spec: &TableSpec,
        rows: &[Row],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Overwrites the owned columns of existing rows (and clears the
    /// soft-delete column); returns rows updated.
    fn update(
        &self,
        spec: &TableSpec,
        rows: &[Row],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes (or soft-deletes) rows by key; returns rows purged.
    fn purge(
        &self,
        spec: &TableSpec,
        keys: &[Key],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Inserts or updates a job.
    fn save_job(&self, job: &Job) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn get_job(&self, id: JobId) -> impl Future<Output = Result<Option<Job>, StoreError>> + Send;

    /// Jobs, newest first.
    fn list_jobs(
        &self,
        filter: &JobFilter,
    ) -> impl Future<Output = Result<Vec<Job>, StoreError>> + Send;

    /// Jobs still `queued` or `running`.
    fn unfinished_jobs(&self) -> impl Future<Output = Result<Vec<Job>, StoreError>> + Send;

    /// Ends `job` (already `finish`ed as abandoned in memory) in the
    /// database only if its record has not ended; returns whether it did.
    fn abandon_job(&self, job: &Job) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes jobs that ended before `before` (RFC 3339), keeping each
    /// resource's latest success; returns how many.
    fn prune_jobs(&self, before: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Takes the resource's lock if free; `None` if another process holds it.
    fn try_lock(
        &self,
        resource: &str,
    ) -> impl Future<Output = Result<Option<ResourceLock>, StoreError>> + Send;

    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The backend chosen by the store URL.
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl AnyStore {
    /// Opens the database named by `url` and runs migrations.
    pub async fn open(url: &SecretString, max_connections: u32) -> Result<AnyStore, StoreError> {
        let raw = url.expose_secret();
        let store = if raw.starts_with("sqlite:") {
            AnyStore::Sqlite(SqliteStore::open_with(raw, false).await?)
        } else {
            AnyStore::Postgres(PgStore::open(raw, max_connections).await?)
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Opens an existing database without creating or migrating anything,
    /// to inspect the mirrored tables (`driftd check`).
    pub async fn open_existing(url: &SecretString) -> Result<AnyStore, StoreError> {
        let raw = url.expose_secret();
        Ok(if raw.starts_with("sqlite:") {
            AnyStore::Sqlite(SqliteStore::open_with(raw, false).await?)
        } else {
            AnyStore::Postgres(PgStore::open(raw, 1).await?)
        })
    }

    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

/// The parts of the scan: the key and the signature (see
/// [`crate::model::signature`]) computed in SQL, over the live rows.
pub(crate) struct ScanQuery {
    pub key: String,
    pub signature: String,
    pub table: String,
    /// `"soft" IS NULL` when purges are soft.
    pub live: Option<String>,
}

impl ScanQuery {
    /// `key` is the key column as text; `part` gives one owned column's
    /// part of the signature, in the backend's SQL.
    pub fn new(spec: &TableSpec, key: String, part: impl Fn(&Ident, ColumnType) -> String) -> Self {
        let parts: Vec<String> = spec
            .columns
            .iter()
            .map(|(c, kind)| part(c, *kind))
            .collect();
        ScanQuery {
            key,
            signature: if parts.is_empty() {
                "''".to_string()
            } else {
                parts.join(" || ")
            },
            table: spec.table.quoted(),
            live: spec
                .soft_delete
                .as_ref()
                .map(|soft| format!("{} IS NULL", soft.quoted())),
        }
    }

    /// `SELECT key, signature FROM table [WHERE live]`.
    pub fn plain(&self) -> String {
        let mut sql = format!(
            "SELECT {}, {} FROM {}",
            self.key, self.signature, self.table
        );
        if let Some(live) = &self.live {
            sql.push_str(&format!(" WHERE {live}"));
        }
        sql
    }
}

/// Adds one scanned row to the index, refusing NULL and repeated keys.
pub(crate) fn index_row(
    index: &mut LocalIndex,
    spec: &TableSpec,
    key: Option<&str>,
    signature: Option<&str>,
) -> Result<(), StoreError> {
    let Some(key) = key else {
        return Err(StoreError::BadRow {
            table: spec.table.to_string(),
            problem: format!(
                "a row has a NULL key in `{}`, or one stored as another type than {} (e.g. a BLOB), which driftd cannot address",
                spec.key_column,
                spec.key_type.as_str()
            ),
        });
    };
    if !is_canonical_key(key, spec.key_type) {
        return Err(StoreError::BadRow {
            table: spec.table.to_string(),
            problem: format!(
                "local key `{key}` in `{}` is not in canonical {} form, so no upstream key can pair with it; fix the row (driftd will not guess which upstream row it is)",
                spec.key_column,
                spec.key_type.as_str()
            ),
        });
    }
    index
        .insert(key, fingerprint_signature(signature.unwrap_or("")))
        .map_err(|source| StoreError::Index {
            table: spec.table.to_string(),
            source,
        })
}

/// Forwards a trait method to the backend.
macro_rules! delegate {
    ($self:ident, $method:ident ( $($arg:expr),* )) => {
        match $self {
            AnyStore::Sqlite(s) => s.$method($($arg),*).await,
            AnyStore::Postgres(s) => s.$method($($arg),*).await,
        }
    };
}

impl Store for AnyStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        delegate!(self, migrate())
    }
    async fn prepare(&self, spec: &TableSpec) -> Result<Shape, StoreError> {
        delegate!(self, prepare(spec))
    }
    async fn scan(&self, spec: &TableSpec) -> Result<LocalIndex, StoreError> {
        delegate!(self, scan(spec))
    }
    async fn insert(&self, spec: &TableSpec, rows: &[Row]) -> Result<u64, StoreError> {
        delegate!(self, insert(spec, rows))
    }
    async fn update(&self, spec: &TableSpec, rows: &[Row]) -> Result<u64, StoreError> {
        delegate!(self, update(spec, rows))
    }
    async fn purge(&self, spec: &TableSpec, keys: &[Key]) -> Result<u64, StoreError> {
        delegate!(self, purge(spec, keys))
    }
    async fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        delegate!(self, save_job(job))
    }
    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        delegate!(self, get_job(id))
    }
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        delegate!(self, list_jobs(filter))
    }
    async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        delegate!(self, unfinished_jobs())
    }
    async fn prune_jobs(&self, before: &str) -> Result<u64, StoreError> {
        delegate!(self, prune_jobs(before))
    }
    async fn abandon_job(&self, job: &Job) -> Result<bool, StoreError> {
        delegate!(self, abandon_job(job))
    }
    async fn try_lock(&self, resource: &str) -> Result<Option<ResourceLock>, StoreError> {
        delegate!(self, try_lock(resource))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, ping())
    }
}

/// Fails naming the first configured column the table lacks.
pub(crate) fn check_columns(spec: &TableSpec, names: &[String]) -> Result<(), StoreError> {
    if names.is_empty() {
        return Err(StoreError::Schema {
            table: spec.table.to_string(),
            problem: "table not found".into(),
        });
    }
    let wanted = std::iter::once(&spec.key_column)
        .chain(spec.columns.iter().map(|(c, _)| c))
        .chain(spec.soft_delete.iter());
    for col in wanted {
        if !names.iter().any(|n| n == col.as_str()) {
            return Err(StoreError::Schema {
                table: spec.table.to_string(),
                problem: format!("column `{col}` not found"),
            });
        }
    }
    Ok(())
}

/// Splits `rows` so that one statement binds at most `max_params` values.
pub(crate) fn rows_per_statement(columns: usize, max_params: usize, batch: usize) -> usize {
    (max_params / (columns + 1)).clamp(1, batch.max(1))
}

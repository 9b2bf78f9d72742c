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
mod sqlite_scan;
mod sqlite_schema;
mod write;

use std::borrow::Cow;
use std::future::Future;

use secrecy::{ExposeSecret, SecretString};

pub use postgres::PgStore;
pub use shape::Shape;
pub use sqlite::SqliteStore;

use crate::config::{Ident, TableSpec};
use crate::diff::{IndexError, LocalBatch, LocalIndex};
use crate::jobs::{Job, JobFilter, JobId};
use crate::model::{is_canonical_key, Key, Row};

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
    /// The database took the statement but kept fewer rows than were
    /// written (a trigger that skips rows, a rule): nothing of the batch is
    /// applied, and applied one by one, the row it drops is refused.
    #[error("table `{table}`: the database kept {kept} of the {written} row(s) written (a trigger or rule that skips rows?); nothing of them applied")]
    NotKept {
        table: String,
        kept: u64,
        written: u64,
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

impl StoreError {
    /// Whether the database refused the data itself, as opposed to being
    /// unusable: only a refusal is one message's fault. The server answered
    /// and named a problem with this statement (a constraint, a check, a
    /// trigger that raised, a value the column rejects, a row-level
    /// security check) is a refusal; a lost connection, a pool timeout, a
    /// missing table or column, a permission on the whole table, a
    /// read-only or shutting-down server, a lock or serialization failure
    /// is not (trying the same message again later may succeed, and every
    /// other message would fail the same way).
    pub fn is_refusal(&self) -> bool {
        match self {
            StoreError::Query {
                source: sqlx::Error::Database(db),
                ..
            } => refused(db.as_ref()),
            StoreError::NotKept { .. } => true,
            _ => false,
        }
    }

    /// The refusal's text with the server's detail (PostgreSQL's `DETAIL`
    /// names the row, as in `Key (uuid)=(...) is still referenced`).
    pub fn refusal_text(&self) -> String {
        let mut text = crate::vocab::error_chain(self);
        if let StoreError::Query {
            source: sqlx::Error::Database(db),
            ..
        } = self
        {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                if let Some(detail) = pg.detail() {
                    text.push_str(" (");
                    text.push_str(detail);
                    text.push(')');
                }
                if let Some(c) = pg.constraint() {
                    if !text.contains(c) {
                        text.push_str(&format!(" [constraint {c}]"));
                    }
                }
            }
        }
        text
    }
}

/// Whether the server's error `db` refuses this statement's data rather
/// than saying the database cannot be used.
fn refused(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else {
        return false;
    };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLite's extended result code: the primary code is its low byte.
        let primary = code.parse::<i32>().map_or(0, |c| c & 0xff);
        // CONSTRAINT (any: unique, check, foreign key, a trigger's RAISE),
        // TOOBIG, MISMATCH, RANGE; and a plain ERROR about a value (a
        // trigger's function refusing its input) unless it names a missing
        // table, column or function (the schema, not the row).
        return match primary {
            19 | 18 | 20 | 25 => true,
            1 => {
                let m = db.message();
                ![
                    "no such table",
                    "no such column",
                    "has no column named",
                    "no such function",
                    "no such collation",
                ]
                .iter()
                .any(|s| m.contains(s))
            }
            _ => false,
        };
    }
    sqlstate_refuses(&code, db.message())
}

/// PostgreSQL: which SQLSTATEs refuse the data. Unusable: connection (08),
/// resources (53), operator intervention (57: shutdown, cancel, statement
/// timeout), system and internal errors (58, XX), transaction rollback (40:
/// serialization, deadlock), object state (55: lock not available), the
/// transaction's state (25: read-only standby), authorization and catalog
/// (28, 3D, 3F), unsupported features (0A), and the schema (42: a missing
/// table or column, no privilege on the table) but for a row-level
/// security check on the row itself.
fn sqlstate_refuses(code: &str, message: &str) -> bool {
    // A statement timeout on one message's statement: that message is too
    // slow for the database (the others of its batch apply one by one).
    if code == "57014" && message.contains("statement timeout") {
        return true;
    }
    let class = code.get(..2).unwrap_or("");
    match class {
        "08" | "53" | "57" | "58" | "XX" | "40" | "55" | "25" | "28" | "3D" | "3F" | "0A" => false,
        "42" => code == "42501" && message.contains("row-level security"),
        _ => true,
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

/// One batch of a pass's writes to the mirrored table.
#[derive(Clone, Copy)]
pub enum PassWrite<'a> {
    /// Rows missing locally: revives a soft-deleted row with the key, else
    /// inserts.
    Insert(&'a [Row]),
    /// Stale rows: overwrites the owned columns (and clears the
    /// soft-delete column).
    Update(&'a [Row]),
    /// Rows gone upstream: deletes or soft-deletes them.
    Purge(&'a [Key]),
}

/// What a fenced pass write did.
#[derive(Debug, Default)]
pub struct Written {
    /// Rows inserted, updated or purged.
    pub done: u64,
    /// Keys left alone because an event wrote them after the pass's mark:
    /// the event is newer than the pass's listing.
    pub yielded: Vec<Key>,
}

/// One change an event makes to one key.
#[derive(Debug, Clone)]
pub struct Change {
    pub key: Key,
    /// The row upstream has now; `None`: upstream deleted the key.
    pub row: Option<Row>,
    /// The event's version of the key, in a form that sorts as text (see
    /// [`crate::config::VersionKind::sortable`]); an event older than the
    /// last one applied to the key is stale.
    pub version: Option<String>,
}

/// What became of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeResult {
    Applied,
    /// An event with a newer version of the key was applied before.
    Stale,
}

/// The mirrored table: the user's rows that driftd reads and writes. Every
/// write goes through the key journal in driftd's own tables, in the same
/// transaction, behind a per-resource write fence (a row in
/// `driftd_write_fence`, locked by every writer of the resource, on every
/// replica): events record the keys they touch with a new mark; a pass
/// that listed upstream from mark `since` leaves alone every key recorded
/// after it (design rule 3).
pub trait Mirror: Send + Sync {
    /// Checks that the mirrored table and every column in `spec` exist and
    /// can mirror the configured types faithfully; returns the limits the
    /// columns put on values.
    fn prepare(&self, spec: &TableSpec) -> impl Future<Output = Result<Shape, StoreError>> + Send;

    /// Reads the live (not soft-deleted) rows into a key → fingerprint index.
    fn scan(&self, spec: &TableSpec)
        -> impl Future<Output = Result<LocalIndex, StoreError>> + Send;

    /// Reads the live rows in key order (bytewise for text and uuid keys,
    /// numeric for integers), a batch at a time, each batch its own short
    /// statement after the last key of the one before (so no connection,
    /// snapshot or statement stays open for the length of a listing), sent
    /// by a task of its own, which stops when the receiver is dropped.
    /// `None` when the database cannot give that order from an index: a
    /// collation or an encoding that sorts otherwise (the pass reads the
    /// table into an index instead).
    fn scan_sorted(
        &self,
        spec: &TableSpec,
    ) -> impl Future<Output = Result<Option<SortedScan>, StoreError>> + Send;

    /// The resource's current journal mark: take it before listing
    /// upstream, hand it to [`Mirror::write_pass`].
    fn journal_mark(&self, resource: &str) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Applies one batch of a pass in one transaction, except for the keys
    /// an event journaled after `since`.
    fn write_pass(
        &self,
        spec: &TableSpec,
        resource: &str,
        since: i64,
        write: PassWrite<'_>,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;

    /// Applies events' changes (one per key) in one transaction and
    /// journals their keys; a change older than the key's journaled version
    /// is skipped as stale. With `checkpoint`, stores it as the resource's
    /// checkpoint in the same transaction.
    fn apply_changes(
        &self,
        spec: &TableSpec,
        resource: &str,
        changes: &[Change],
        checkpoint: Option<&str>,
    ) -> impl Future<Output = Result<Vec<ChangeResult>, StoreError>> + Send;

    /// Purges (or soft-deletes) the rows whose `column` holds one of
    /// `parents`, journaling their keys like events do; returns the purged
    /// keys.
    fn purge_children(
        &self,
        spec: &TableSpec,
        resource: &str,
        column: &Ident,
        parents: &[Key],
    ) -> impl Future<Output = Result<Vec<Key>, StoreError>> + Send;

    /// Counts the live rows whose `column` holds one of `parents`.
    fn count_children(
        &self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Counts the live (not soft-deleted) rows of the table.
    fn count_live(&self, spec: &TableSpec) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// driftd's own ledger: migrations, jobs, dead letters, journal upkeep,
/// locks.
pub trait Ledger: Send + Sync {
    /// Creates or upgrades driftd's own tables.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

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
    /// resource's latest success, and journal entries older than `before`;
    /// returns how many jobs.
    fn prune_jobs(&self, before: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Stores a dead letter.
    fn add_dead_letter(
        &self,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Dead letters, oldest first, at most `limit`.
    fn list_dead_letters(
        &self,
        source: Option<&str>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    fn get_dead_letter(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<DeadLetter>, StoreError>> + Send;

    /// Records that a dead letter failed again (its replay): the new
    /// error and time.
    fn refail_dead_letter(
        &self,
        id: &str,
        error: &str,
        failed_at: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes a dead letter; returns whether it existed.
    fn delete_dead_letter(&self, id: &str)
        -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// How many dead letters wait, by source.
    fn count_dead_letters(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, i64)>, StoreError>> + Send;

    /// Creates or updates a reprovision; once it is no longer open, its
    /// re-sent keys are forgotten.
    fn save_reprovision(
        &self,
        r: &Reprovision,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A source's reprovisions, newest first, at most `limit`.
    fn reprovisions(
        &self,
        source: &str,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Reprovision>, StoreError>> + Send;

    /// Records that `keys` of `resource` were re-sent during `reprovision`.
    fn mark_resent(
        &self,
        reprovision: &str,
        resource: &str,
        keys: &[&str],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The resource's checkpoint in upstream's change feed, if stored.
    fn checkpoint(
        &self,
        resource: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// The id of a dead letter keeping the same message as `d` (source,
    /// body and headers), if one is stored.
    fn same_dead_letter(
        &self,
        d: &DeadLetter,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// When an event last wrote `key` of `resource` (RFC 3339), if the
    /// journal still has it.
    fn journal_touched(
        &self,
        resource: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Stores `value` as the resource's checkpoint, or forgets it (`None`:
    /// the next incremental run starts from `incremental.initial`).
    fn set_checkpoint(
        &self,
        resource: &str,
        value: Option<&str>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// How many entries of a stream source's group are known lost (0 when
    /// none was recorded).
    fn stream_losses(&self, source: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Records how many entries of a stream source's group are known lost.
    fn save_stream_losses(
        &self,
        source: &str,
        lost: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The keys of `resource` re-sent during `reprovision`.
    fn resent_keys(
        &self,
        reprovision: &str,
        resource: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Takes the resource's lock if free; `None` if another process holds it.
    fn try_lock(
        &self,
        resource: &str,
    ) -> impl Future<Output = Result<Option<ResourceLock>, StoreError>> + Send;

    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Both halves, which every backend provides.
pub trait Store: Mirror + Ledger {}

impl<T: Mirror + Ledger> Store for T {}

/// An event that could not be applied, kept with its raw message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub source: String,
    /// The event name, when it could be read.
    pub event: Option<String>,
    pub error: String,
    /// The message's headers, as a JSON object of strings.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The raw body as text (bytes that are not UTF-8 read as U+FFFD;
    /// replay uses the stored bytes).
    pub body: String,
    #[serde(skip)]
    pub raw: Vec<u8>,
    pub received_at: String,
    pub failed_at: String,
    /// The order its message arrived in this process, after others of the
    /// same millisecond (stored, not read back).
    #[serde(skip)]
    pub arrival: u64,
}

impl DeadLetter {
    pub(crate) fn from_parts(
        (id, source, event, error, headers, raw, received_at, failed_at): DeadLetterRow,
    ) -> DeadLetter {
        DeadLetter {
            id,
            source,
            event,
            error,
            headers: serde_json::from_str(&headers).unwrap_or_default(),
            body: String::from_utf8_lossy(&raw).into_owned(),
            raw,
            received_at,
            failed_at,
            arrival: 0,
        }
    }
}

pub(crate) type DeadLetterRow = (
    String,
    String,
    Option<String>,
    String,
    String,
    Vec<u8>,
    String,
    String,
);

/// A reprovision: a producer re-sending everything, from its start event
/// to its completion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reprovision {
    pub id: String,
    pub source: String,
    /// The producer's id for it, when the start event carries one.
    pub event_id: Option<String>,
    /// The stream id of the start event.
    pub position: Option<String>,
    /// Each resource's journal mark when it started.
    pub marks: std::collections::BTreeMap<String, i64>,
    /// `open`, `completed`, `abandoned`, or `incomplete` (a purge job did
    /// not succeed: a guard tripped, or re-sent messages could not be read).
    pub state: String,
    pub reason: Option<String>,
    /// The purge jobs of its completion.
    pub jobs: Vec<String>,
    pub started_at: String,
    pub ended_at: Option<String>,
}

pub(crate) type ReprovisionRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

impl Reprovision {
    pub(crate) fn from_row(
        (id, source, event_id, position, marks, state, reason, jobs, started_at, ended_at): ReprovisionRow,
    ) -> Reprovision {
        Reprovision {
            id,
            source,
            event_id,
            position,
            marks: serde_json::from_str(&marks).unwrap_or_default(),
            state,
            reason,
            jobs: jobs
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or_default(),
            started_at,
            ended_at,
        }
    }
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

/// The parts of the scan: the key, and each owned column as the backend
/// selects it to build the row's signature (see
/// [`crate::model::signature`]), over the live rows.
pub(crate) struct ScanQuery {
    pub key: String,
    /// The owned columns' select expressions, comma-separated (`NULL` when
    /// there are none, so the list is never empty).
    pub cells: String,
    pub table: String,
    /// `"soft" IS NULL` when purges are soft.
    pub live: Option<String>,
}

impl ScanQuery {
    /// `key` is the key column as text; `cells` the owned columns' select
    /// expressions, in the backend's SQL, in `spec`'s order.
    pub fn new(spec: &TableSpec, key: String, cells: Vec<String>) -> Self {
        ScanQuery {
            key,
            cells: if cells.is_empty() {
                "NULL".to_string()
            } else {
                cells.join(", ")
            },
            table: spec.table.quoted(),
            live: spec
                .soft_delete
                .as_ref()
                .map(|soft| format!("{} IS NULL", soft.quoted())),
        }
    }

    /// `SELECT key, cells FROM table [WHERE live]`.
    pub fn plain(&self) -> String {
        let mut sql = format!("SELECT {}, {} FROM {}", self.key, self.cells, self.table);
        if let Some(live) = &self.live {
            sql.push_str(&format!(" WHERE {live}"));
        }
        sql
    }
}

/// What a sorted scan sends: batches of rows in key order, then `Ok(None)`.
/// A channel that closes without `Ok(None)` is a scan that stopped short.
pub type SortedScan = tokio::sync::mpsc::Receiver<Result<Option<LocalBatch>, StoreError>>;

/// Rows in a sorted scan's batch.
pub(crate) const SORTED_BATCH: usize = 4096;

/// A batch of a sorted scan as read from the database, before it is
/// checked and made a [`LocalBatch`].
pub(crate) trait ReadBatch: Send + 'static {
    fn rows(&self) -> usize;
    /// The last row's key as the next batch is bound after, if it has one.
    fn last_key(&self) -> Option<String>;
}

impl ReadBatch for LocalBatch {
    fn rows(&self) -> usize {
        self.len()
    }
    fn last_key(&self) -> Option<String> {
        LocalBatch::last_key(self).map(str::to_string)
    }
}

/// Runs a sorted scan in a task of its own: `fetch(after)` reads the live
/// rows after key `after` in key order (from the first with `None`), at
/// most [`SORTED_BATCH`], and `check` makes them a batch; each batch is
/// sent, then `Ok(None)` after a short one. The next batch is fetched, in
/// a task of its own, while `check` works on this one (the database
/// answers while driftd reads). Stops at the first error (sent) or when
/// the receiver is dropped; a read in flight is never cancelled.
pub(crate) fn spawn_sorted<F, Fut, R, C>(mut fetch: F, check: C) -> SortedScan
where
    F: FnMut(Option<String>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, StoreError>> + Send + 'static,
    R: ReadBatch,
    C: Fn(R) -> Result<LocalBatch, StoreError> + Send + 'static,
{
    use tracing::Instrument;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let scan = async move {
        // Dropped unread, a read fetched ahead runs to its end: cancelled
        // inside the pool's acquire, a read closes the pooled connection
        // (an in-memory SQLite database is lost with it).
        let mut ahead: Option<tokio::task::JoinHandle<Result<R, StoreError>>> = None;
        let mut after = None;
        loop {
            let read = match ahead.take() {
                Some(task) => task.await.unwrap_or_else(|e| {
                    Err(StoreError::Unavailable(format!(
                        "the scan's read stopped: {e}"
                    )))
                }),
                None => fetch(after.take()).await,
            };
            let read = match read {
                Ok(read) => read,
                Err(e) => {
                    drop(tx.send(Err(e)).await);
                    return;
                }
            };
            let last = read.rows() < SORTED_BATCH;
            if !last {
                if let Some(key) = read.last_key() {
                    let next = fetch(Some(key)).in_current_span();
                    ahead = Some(tokio::spawn(next));
                }
            }
            let batch = match check(read) {
                Ok(batch) => batch,
                Err(e) => {
                    drop(tx.send(Err(e)).await);
                    return;
                }
            };
            if ahead.is_none() {
                after = batch.last_key().map(str::to_string);
            }
            // A send fails only when the pass stopped reading.
            if tx.send(Ok(Some(batch))).await.is_err() {
                return;
            }
            if last {
                drop(tx.send(Ok(None)).await);
                return;
            }
        }
    };
    tokio::spawn(scan.in_current_span());
    rx
}

/// Adds one row of a sorted scan to its batch, refusing what
/// [`index_row_fp`] refuses (the order is the differ's to check).
pub(crate) fn batch_row(
    batch: &mut LocalBatch,
    spec: &TableSpec,
    key: Option<&str>,
    fp: u64,
) -> Result<(), StoreError> {
    let key = checked_key(spec, key)?;
    batch.push(key, fp).map_err(|source| StoreError::Index {
        table: spec.table.to_string(),
        source,
    })
}

/// Adds one scanned row to the index by its fingerprint, refusing NULL
/// and repeated keys.
pub(crate) fn index_row_fp(
    index: &mut LocalIndex,
    spec: &TableSpec,
    key: Option<&str>,
    fp: u64,
) -> Result<(), StoreError> {
    let key = checked_key(spec, key)?;
    index.insert(key, fp).map_err(|source| StoreError::Index {
        table: spec.table.to_string(),
        source,
    })
}

/// A scanned key that is there, of the key's type, in canonical form.
fn checked_key<'a>(spec: &TableSpec, key: Option<&'a str>) -> Result<&'a str, StoreError> {
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
    Ok(key)
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

impl Mirror for AnyStore {
    async fn prepare(&self, spec: &TableSpec) -> Result<Shape, StoreError> {
        delegate!(self, prepare(spec))
    }
    async fn scan(&self, spec: &TableSpec) -> Result<LocalIndex, StoreError> {
        delegate!(self, scan(spec))
    }
    async fn scan_sorted(&self, spec: &TableSpec) -> Result<Option<SortedScan>, StoreError> {
        delegate!(self, scan_sorted(spec))
    }
    async fn journal_mark(&self, resource: &str) -> Result<i64, StoreError> {
        delegate!(self, journal_mark(resource))
    }
    async fn write_pass(
        &self,
        spec: &TableSpec,
        resource: &str,
        since: i64,
        write: PassWrite<'_>,
    ) -> Result<Written, StoreError> {
        delegate!(self, write_pass(spec, resource, since, write))
    }
    async fn apply_changes(
        &self,
        spec: &TableSpec,
        resource: &str,
        changes: &[Change],
        checkpoint: Option<&str>,
    ) -> Result<Vec<ChangeResult>, StoreError> {
        delegate!(self, apply_changes(spec, resource, changes, checkpoint))
    }
    async fn purge_children(
        &self,
        spec: &TableSpec,
        resource: &str,
        column: &Ident,
        parents: &[Key],
    ) -> Result<Vec<Key>, StoreError> {
        delegate!(self, purge_children(spec, resource, column, parents))
    }
    async fn count_children(
        &self,
        spec: &TableSpec,
        column: &Ident,
        parents: &[Key],
    ) -> Result<u64, StoreError> {
        delegate!(self, count_children(spec, column, parents))
    }
    async fn count_live(&self, spec: &TableSpec) -> Result<u64, StoreError> {
        delegate!(self, count_live(spec))
    }
}

impl Ledger for AnyStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        delegate!(self, migrate())
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
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        delegate!(self, add_dead_letter(letter))
    }
    async fn list_dead_letters(
        &self,
        source: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        delegate!(self, list_dead_letters(source, limit))
    }
    async fn get_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        delegate!(self, get_dead_letter(id))
    }
    async fn refail_dead_letter(
        &self,
        id: &str,
        error: &str,
        failed_at: &str,
    ) -> Result<(), StoreError> {
        delegate!(self, refail_dead_letter(id, error, failed_at))
    }
    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        delegate!(self, delete_dead_letter(id))
    }
    async fn count_dead_letters(&self) -> Result<Vec<(String, i64)>, StoreError> {
        delegate!(self, count_dead_letters())
    }
    async fn save_reprovision(&self, r: &Reprovision) -> Result<(), StoreError> {
        delegate!(self, save_reprovision(r))
    }
    async fn reprovisions(&self, source: &str, limit: i64) -> Result<Vec<Reprovision>, StoreError> {
        delegate!(self, reprovisions(source, limit))
    }
    async fn mark_resent(
        &self,
        reprovision: &str,
        resource: &str,
        keys: &[&str],
    ) -> Result<(), StoreError> {
        delegate!(self, mark_resent(reprovision, resource, keys))
    }
    async fn same_dead_letter(&self, d: &DeadLetter) -> Result<Option<String>, StoreError> {
        delegate!(self, same_dead_letter(d))
    }
    async fn journal_touched(
        &self,
        resource: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        delegate!(self, journal_touched(resource, key))
    }
    async fn set_checkpoint(&self, resource: &str, value: Option<&str>) -> Result<(), StoreError> {
        delegate!(self, set_checkpoint(resource, value))
    }
    async fn stream_losses(&self, source: &str) -> Result<u64, StoreError> {
        delegate!(self, stream_losses(source))
    }
    async fn save_stream_losses(&self, source: &str, lost: u64) -> Result<(), StoreError> {
        delegate!(self, save_stream_losses(source, lost))
    }
    async fn checkpoint(&self, resource: &str) -> Result<Option<String>, StoreError> {
        delegate!(self, checkpoint(resource))
    }
    async fn resent_keys(
        &self,
        reprovision: &str,
        resource: &str,
    ) -> Result<Vec<String>, StoreError> {
        delegate!(self, resent_keys(reprovision, resource))
    }
    async fn try_lock(&self, resource: &str) -> Result<Option<ResourceLock>, StoreError> {
        delegate!(self, try_lock(resource))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, ping())
    }
}

/// Keeps the changes an event batch may apply: those whose version is
/// newer than the key's journaled one (an event not newer than what was
/// applied, such as the same event delivered again, is stale: it must not
/// undo a newer state a pass may have repaired meanwhile). `stored` maps
/// keys to versions.
pub(crate) fn judge_versions(
    changes: &[Change],
    stored: &std::collections::HashMap<String, String>,
) -> Vec<ChangeResult> {
    changes
        .iter()
        .map(|c| match (&c.version, stored.get(c.key.as_str())) {
            (Some(new), Some(old)) if !newer(new, old) => ChangeResult::Stale,
            _ => ChangeResult::Applied,
        })
        .collect()
}

/// Whether sortable version `new` is newer than the journaled `old`. A
/// timestamp journaled to the microsecond (before versions kept
/// nanoseconds) compares as its nanoseconds. Versions of another kind
/// than the journaled one (the resource's `version_kind` changed since)
/// cannot be compared: the new one applies, and is journaled in its place.
fn newer(new: &str, old: &str) -> bool {
    /// An integer version is 20 digits; a timestamp has a date.
    fn is_integer(v: &str) -> bool {
        v.len() == 20 && v.bytes().all(|b| b.is_ascii_digit())
    }
    if is_integer(new) != is_integer(old) {
        return true;
    }
    /// `...ss.ffffffZ` as `...ss.ffffff000Z`.
    fn nanos(v: &str) -> std::borrow::Cow<'_, str> {
        match v.strip_suffix('Z').and_then(|s| s.rsplit_once('.')) {
            Some((_, frac)) if frac.len() == 6 => format!("{}000Z", &v[..v.len() - 1]).into(),
            _ => v.into(),
        }
    }
    nanos(new) > nanos(old)
}

/// A pass batch without the keys journaled since its mark.
pub(crate) enum Owned<'a> {
    Insert(Cow<'a, [Row]>),
    Update(Cow<'a, [Row]>),
    Purge(Cow<'a, [Key]>),
}

/// Splits `write` into what the pass may still write and the keys it
/// yields to events (`touched`: keys journaled after the pass's mark).
pub(crate) fn unfenced<'a>(write: PassWrite<'a>, touched: &[String]) -> (Owned<'a>, Vec<Key>) {
    if touched.is_empty() {
        let owned = match write {
            PassWrite::Insert(r) => Owned::Insert(Cow::Borrowed(r)),
            PassWrite::Update(r) => Owned::Update(Cow::Borrowed(r)),
            PassWrite::Purge(k) => Owned::Purge(Cow::Borrowed(k)),
        };
        return (owned, Vec::new());
    }
    let touched: std::collections::HashSet<&str> = touched.iter().map(String::as_str).collect();
    let mut yielded = Vec::new();
    let mut keep_row = |r: &Row| {
        if touched.contains(r.key.as_str()) {
            yielded.push(r.key.clone());
            false
        } else {
            true
        }
    };
    let owned = match write {
        PassWrite::Insert(r) => Owned::Insert(Cow::Owned(
            r.iter().filter(|x| keep_row(x)).cloned().collect(),
        )),
        PassWrite::Update(r) => Owned::Update(Cow::Owned(
            r.iter().filter(|x| keep_row(x)).cloned().collect(),
        )),
        PassWrite::Purge(keys) => {
            let mut kept = Vec::with_capacity(keys.len());
            for k in keys {
                if touched.contains(k.as_str()) {
                    yielded.push(k.clone());
                } else {
                    kept.push(k.clone());
                }
            }
            Owned::Purge(Cow::Owned(kept))
        }
    };
    if !yielded.is_empty() {
        tracing::info!(
            keys = yielded.len(),
            "pass leaves keys an event wrote after its listing began"
        );
    }
    (owned, yielded)
}

/// The applicable changes of an event batch, split by kind, and what the
/// journal records for them.
pub(crate) struct ChangeBatch<'a> {
    pub upserts: Vec<Row>,
    pub deletes: Vec<Key>,
    pub journal: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> ChangeBatch<'a> {
    pub(crate) fn new(changes: &'a [Change], results: &[ChangeResult]) -> Self {
        let mut batch = ChangeBatch {
            upserts: Vec::new(),
            deletes: Vec::new(),
            journal: Vec::new(),
        };
        for (c, r) in changes.iter().zip(results) {
            if *r != ChangeResult::Applied {
                continue;
            }
            match &c.row {
                Some(row) => batch.upserts.push(row.clone()),
                None => batch.deletes.push(c.key.clone()),
            }
            batch.journal.push((c.key.as_str(), c.version.as_deref()));
        }
        batch
    }
}

/// Now, RFC 3339 UTC with milliseconds, as driftd's tables store times.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_across_formats_and_kinds() {
        // A microsecond timestamp journaled before versions kept nanoseconds.
        assert!(newer(
            "2026-01-01T09:00:00.500000400Z",
            "2026-01-01T09:00:00.500000Z"
        ));
        assert!(!newer(
            "2026-01-01T09:00:00.500000000Z",
            "2026-01-01T09:00:00.500000Z"
        ));
        assert!(!newer(
            "2026-01-01T09:00:00.499999999Z",
            "2026-01-01T09:00:00.500000Z"
        ));
        assert!(newer(
            "2026-01-01T09:00:00.000000002Z",
            "2026-01-01T09:00:00.000000001Z"
        ));
        // Integers as integers.
        assert!(newer("09223372036854775815", "09223372036854775814"));
        assert!(!newer("09223372036854775814", "09223372036854775814"));
        // The kind changed: the new version applies.
        assert!(newer(
            "09223372036854775815",
            "2026-01-01T09:00:00.000000000Z"
        ));
        assert!(newer(
            "2026-01-01T09:00:00.000000000Z",
            "09223372036854775815"
        ));
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn sqlstates_that_refuse_a_row_and_those_that_mean_the_database() {
        for code in [
            "23505", "23503", "23514", "22001", "P0001", "44000", "27000", "2F005",
        ] {
            assert!(sqlstate_refuses(code, "x"), "{code}");
        }
        assert!(sqlstate_refuses(
            "57014",
            "canceling statement due to statement timeout"
        ));
        for code in [
            "08006", "57P01", "57014", "53300", "40001", "40P01", "55P03", "25006", "42P01",
            "42703", "XX000", "3D000",
        ] {
            assert!(!sqlstate_refuses(code, "x"), "{code}");
        }
        assert!(sqlstate_refuses(
            "42501",
            "new row violates row-level security policy for table \"users\""
        ));
        assert!(!sqlstate_refuses(
            "42501",
            "permission denied for table users"
        ));
    }

    /// A scan whose reader goes away while reads are in flight lets every
    /// read it started run to its end (a read cancelled inside the pool's
    /// acquire closes the connection, and an in-memory SQLite database
    /// with it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_nobody_reads_lets_its_reads_finish() {
        let (started, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, f) = (started.clone(), finished.clone());
        let mut scan = spawn_sorted(
            move |_after: Option<String>| {
                let first = s.fetch_add(1, Ordering::SeqCst) == 0;
                let f = f.clone();
                async move {
                    if !first {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    }
                    let mut batch = LocalBatch::with_capacity(SORTED_BATCH);
                    for i in 0..SORTED_BATCH {
                        batch.push(&format!("k{i:06}"), 0).unwrap();
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok(batch)
                }
            },
            Ok,
        );
        assert!(matches!(scan.recv().await, Some(Ok(Some(_)))));
        drop(scan);
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let started = started.load(Ordering::SeqCst);
        assert!(started >= 2, "the second read was fetched ahead");
        assert_eq!(
            finished.load(Ordering::SeqCst),
            started,
            "a read was cancelled"
        );
    }
}

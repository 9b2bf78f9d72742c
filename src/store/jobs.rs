//! driftd's own tables, shared by both backends: migrations, and the
//! `driftd_jobs` queries: the same SQL (with
//! `$n` parameters, which SQLite takes as `?n`) and the same row type.

use super::StoreError;
use crate::jobs::{Job, JobId, JobStatus, Trigger};
use crate::vocab::Mode;

/// driftd's own tables, by version; the same DDL works on both backends.
pub(crate) const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE driftd_jobs (
            id TEXT PRIMARY KEY,
            resource TEXT NOT NULL,
            trigger TEXT NOT NULL,
            mode TEXT NOT NULL,
            dry_run BOOLEAN NOT NULL,
            force BOOLEAN NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            report TEXT
        )",
            "CREATE INDEX driftd_jobs_resource ON driftd_jobs (resource, created_at)",
            "CREATE INDEX driftd_jobs_status ON driftd_jobs (status)",
        ],
    ),
    (
        2,
        &[
            // One row per resource, locked by every writer of the resource
            // (its `seq` is the journal's last mark).
            "CREATE TABLE driftd_write_fence (
            resource TEXT PRIMARY KEY,
            seq BIGINT NOT NULL
        )",
            // The keys events wrote, with the mark of the batch that wrote
            // them last and the newest version applied.
            "CREATE TABLE driftd_key_journal (
            resource TEXT NOT NULL,
            key TEXT NOT NULL,
            seq BIGINT NOT NULL,
            version TEXT,
            touched_at TEXT NOT NULL,
            PRIMARY KEY (resource, key)
        )",
            "CREATE INDEX driftd_key_journal_seq ON driftd_key_journal (resource, seq)",
            "CREATE TABLE driftd_dead_letters (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            event TEXT,
            error TEXT NOT NULL,
            headers TEXT NOT NULL,
            body BYTEA NOT NULL,
            received_at TEXT NOT NULL,
            failed_at TEXT NOT NULL
        )",
            "CREATE INDEX driftd_dead_letters_source ON driftd_dead_letters (source, failed_at)",
        ],
    ),
    (
        3,
        &[
            // Reprovisions (a producer re-sending everything): `marks` holds
            // each resource's journal mark when it started, `position` the
            // stream id of its start event.
            "CREATE TABLE driftd_reprovisions (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            event_id TEXT,
            position TEXT,
            marks TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            jobs TEXT,
            started_at TEXT NOT NULL,
            ended_at TEXT
        )",
            "CREATE INDEX driftd_reprovisions_source ON driftd_reprovisions (source, started_at)",
            // The keys a reprovision re-sent.
            "CREATE TABLE driftd_reprovision_keys (
            reprovision TEXT NOT NULL,
            resource TEXT NOT NULL,
            key TEXT NOT NULL,
            PRIMARY KEY (reprovision, resource, key)
        )",
        ],
    ),
    (
        4,
        &[
            // Where each resource's incremental runs got to in upstream's
            // change feed, written with the changes it covers.
            "CREATE TABLE driftd_checkpoints (
            resource TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )",
        ],
    ),
    (
        5,
        &[
            // Dead letters in arrival order: letters of one batch share a
            // receive time (to the millisecond), so each carries the order
            // its message arrived in, and a replay in listed order applies
            // the newer edit last.
            "ALTER TABLE driftd_dead_letters ADD COLUMN seq BIGINT NOT NULL DEFAULT 0",
            // What each stream source has found lost so far (entries its
            // group will never read), so a restart neither forgets a loss
            // found while it was stopped nor reports an old one again.
            "CREATE TABLE driftd_stream_losses (
            source TEXT PRIMARY KEY,
            lost BIGINT NOT NULL,
            updated_at TEXT NOT NULL
        )",
        ],
    ),
];

/// Stores a checkpoint: `$1` resource, `$2` value, `$3` time.
pub(crate) const CHECKPOINT_SAVE: &str =
    "INSERT INTO driftd_checkpoints (resource, value, updated_at) VALUES ($1, $2, $3) \
     ON CONFLICT (resource) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at";

pub(crate) const CHECKPOINT_GET: &str = "SELECT value FROM driftd_checkpoints WHERE resource = $1";

/// Locks the resource's write fence without moving its mark: `$1` resource.
pub(crate) const FENCE_LOCK: &str =
    "INSERT INTO driftd_write_fence (resource, seq) VALUES ($1, 0) \
     ON CONFLICT (resource) DO UPDATE SET seq = driftd_write_fence.seq RETURNING seq";

/// Locks the resource's write fence and takes the next mark: `$1` resource.
pub(crate) const FENCE_NEXT: &str =
    "INSERT INTO driftd_write_fence (resource, seq) VALUES ($1, 1) \
     ON CONFLICT (resource) DO UPDATE SET seq = driftd_write_fence.seq + 1 RETURNING seq";

/// The resource's last mark (no row: 0).
pub(crate) const FENCE_MARK: &str =
    "SELECT COALESCE(MAX(seq), 0) FROM driftd_write_fence WHERE resource = $1";

/// Forgets journal entries older than `$1` that carry no version (they
/// only fence passes, none of which runs that long); versioned entries
/// stay, one per key, so that an old event (a late redelivery, a replayed
/// dead letter) is still known to be old.
pub(crate) const PRUNE_JOURNAL: &str =
    "DELETE FROM driftd_key_journal WHERE touched_at < $1 AND version IS NULL";

/// A dead letter that failed again: `$1` id, `$2` error, `$3` time.
pub(crate) const DEAD_LETTER_REFAIL: &str =
    "UPDATE driftd_dead_letters SET error = $2, failed_at = $3 WHERE id = $1";

pub(crate) const DEAD_LETTER_INSERT: &str = "INSERT INTO driftd_dead_letters \
     (id, source, event, error, headers, body, received_at, failed_at, seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

pub(crate) const DEAD_LETTER_COLUMNS: &str =
    "SELECT id, source, event, error, headers, body, received_at, failed_at FROM driftd_dead_letters";

pub(crate) const DEAD_LETTER_COUNT: &str =
    "SELECT source, COUNT(*) FROM driftd_dead_letters GROUP BY source";

/// The columns of a job row, in table order.
pub(crate) type JobRow = (
    String,
    String,
    String,
    String,
    bool,
    bool,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

pub(crate) const UPSERT: &str = "INSERT INTO driftd_jobs (id, resource, trigger, mode, dry_run, force, status, reason, created_at, started_at, finished_at, report) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
     ON CONFLICT (id) DO UPDATE SET status = excluded.status, reason = excluded.reason, \
     started_at = excluded.started_at, finished_at = excluded.finished_at, report = excluded.report";

/// `SELECT ... WHERE` for a filter; parameters `$1` resource, `$2` status
/// (both nullable), `$3` limit.
pub(crate) const LIST: &str = "SELECT id, resource, trigger, mode, dry_run, force, status, reason, created_at, started_at, finished_at, report \
     FROM driftd_jobs WHERE (CAST($1 AS TEXT) IS NULL OR resource = $1) AND (CAST($2 AS TEXT) IS NULL OR status = $2) \
     ORDER BY created_at DESC, id LIMIT $3";

/// Deletes jobs that ended before `$1`, except each resource's latest
/// success (the last-success metric is seeded from it).
pub(crate) const PRUNE: &str =
    "DELETE FROM driftd_jobs WHERE finished_at IS NOT NULL AND finished_at < $1 \
     AND NOT (status = 'succeeded' AND finished_at = (SELECT MAX(j.finished_at) FROM driftd_jobs j \
     WHERE j.resource = driftd_jobs.resource AND j.status = 'succeeded')) \
     AND NOT (status = 'succeeded' AND finished_at = (SELECT MAX(j.finished_at) FROM driftd_jobs j \
     WHERE j.resource = driftd_jobs.resource AND j.status = 'succeeded' AND NOT j.dry_run))";

/// Ends a job as abandoned only while it has not ended: `$1` id, `$2`
/// status, `$3` reason, `$4` finished_at. A job that recorded its own end
/// meanwhile keeps it.
pub(crate) const ABANDON: &str =
    "UPDATE driftd_jobs SET status = $2, reason = $3, finished_at = $4 \
     WHERE id = $1 AND status IN ('queued', 'running')";

pub(crate) const GET: &str = "SELECT id, resource, trigger, mode, dry_run, force, status, reason, created_at, started_at, finished_at, report \
     FROM driftd_jobs WHERE id = $1";

pub(crate) const UNFINISHED: &str = "SELECT id, resource, trigger, mode, dry_run, force, status, reason, created_at, started_at, finished_at, report \
     FROM driftd_jobs WHERE status IN ('queued', 'running')";

/// The values of a job row, for binding in table order.
pub(crate) fn to_row(job: &Job) -> JobRow {
    (
        job.id.to_string(),
        job.resource.clone(),
        job.trigger.as_str().to_string(),
        job.mode.as_str().to_string(),
        job.dry_run,
        job.force,
        job.status.as_str().to_string(),
        job.reason.clone(),
        job.created_at.clone(),
        job.started_at.clone(),
        job.finished_at.clone(),
        job.report.as_ref().map(|r| r.to_string()),
    )
}

/// Binds a job row's values to `q` in table order (the [`UPSERT`] shape).
pub(crate) fn bind<'q, DB>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    r: JobRow,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(r.0)
        .bind(r.1)
        .bind(r.2)
        .bind(r.3)
        .bind(r.4)
        .bind(r.5)
        .bind(r.6)
        .bind(r.7)
        .bind(r.8)
        .bind(r.9)
        .bind(r.10)
        .bind(r.11)
}

pub(crate) fn from_row(row: JobRow) -> Result<Job, StoreError> {
    let bad = |what: &str, value: &str| StoreError::BadRow {
        table: "driftd_jobs".into(),
        problem: format!("bad {what} `{value}`"),
    };
    let trigger = match row.2.as_str() {
        "schedule" => Trigger::Schedule,
        "http" => Trigger::Http,
        "cli" => Trigger::Cli,
        "startup" => Trigger::Startup,
        "reprovision" => Trigger::Reprovision,
        other => return Err(bad("trigger", other)),
    };
    Ok(Job {
        id: row.0.parse::<JobId>().map_err(|_| bad("id", &row.0))?,
        resource: row.1,
        trigger,
        mode: Mode::parse(&row.3).ok_or_else(|| bad("mode", &row.3))?,
        dry_run: row.4,
        force: row.5,
        status: JobStatus::parse(&row.6).ok_or_else(|| bad("status", &row.6))?,
        reason: row.7,
        created_at: row.8,
        started_at: row.9,
        finished_at: row.10,
        report: row.11.and_then(|r| serde_json::from_str(&r).ok()),
    })
}

/// The dead-letter half of [`super::Ledger`], the same on both backends
/// (written out once here, expanded in each backend's `impl Ledger`):
/// `$sql` turns this module's `$n` SQL into the backend's; each write first
/// asks the store's `writable()`.
/// The [`super::Ledger`] methods of reprovisions, the same SQL on both
/// backends (`$sql` rewrites parameters).
macro_rules! reprovision_methods {
    ($sql:path) => {
        async fn save_reprovision(
            &self,
            r: &$crate::store::Reprovision,
        ) -> Result<(), $crate::store::StoreError> {
            self.writable()?;
            sqlx::query(&$sql(
                "INSERT INTO driftd_reprovisions (id, source, event_id, position, marks, state, reason, jobs, started_at, ended_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO UPDATE SET \
                 state = excluded.state, reason = excluded.reason, jobs = excluded.jobs, ended_at = excluded.ended_at",
            ))
            .bind(&r.id)
            .bind(&r.source)
            .bind(&r.event_id)
            .bind(&r.position)
            .bind(serde_json::to_string(&r.marks).unwrap_or_default())
            .bind(&r.state)
            .bind(&r.reason)
            .bind(serde_json::to_string(&r.jobs).unwrap_or_default())
            .bind(&r.started_at)
            .bind(&r.ended_at)
            .execute(&self.pool)
            .await
            .map_err($crate::store::query_err("save a reprovision"))?;
            if r.state != "open" {
                sqlx::query(&$sql("DELETE FROM driftd_reprovision_keys WHERE reprovision = $1"))
                    .bind(&r.id)
                    .execute(&self.pool)
                    .await
                    .map_err($crate::store::query_err("forget a reprovision's keys"))?;
            }
            Ok(())
        }

        async fn reprovisions(
            &self,
            source: &str,
            limit: i64,
        ) -> Result<Vec<$crate::store::Reprovision>, $crate::store::StoreError> {
            let rows: Vec<$crate::store::ReprovisionRow> = sqlx::query_as(&$sql(
                "SELECT id, source, event_id, position, marks, state, reason, jobs, started_at, ended_at \
                 FROM driftd_reprovisions WHERE source = $1 ORDER BY started_at DESC, id LIMIT $2",
            ))
            .bind(source)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err($crate::store::query_err("read reprovisions"))?;
            Ok(rows
                .into_iter()
                .map($crate::store::Reprovision::from_row)
                .collect())
        }

        async fn mark_resent(
            &self,
            reprovision: &str,
            resource: &str,
            keys: &[&str],
        ) -> Result<(), $crate::store::StoreError> {
            self.writable()?;
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err($crate::store::query_err("begin marking re-sent keys"))?;
            for key in keys {
                sqlx::query(&$sql(
                    "INSERT INTO driftd_reprovision_keys (reprovision, resource, key) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                ))
                .bind(reprovision)
                .bind(resource)
                .bind(*key)
                .execute(&mut *tx)
                .await
                .map_err($crate::store::query_err("mark a re-sent key"))?;
            }
            tx.commit()
                .await
                .map_err($crate::store::query_err("commit re-sent keys"))
        }

        async fn same_dead_letter(
            &self,
            d: &$crate::store::DeadLetter,
        ) -> Result<Option<String>, $crate::store::StoreError> {
            sqlx::query_scalar(&$sql(
                "SELECT id FROM driftd_dead_letters WHERE source = $1 AND body = $2 AND headers = $3 LIMIT 1",
            ))
            .bind(&d.source)
            .bind(&d.raw)
            .bind(serde_json::to_string(&d.headers).unwrap_or_default())
            .fetch_optional(&self.pool)
            .await
            .map_err($crate::store::query_err("look for the same dead letter"))
        }

        async fn journal_touched(
            &self,
            resource: &str,
            key: &str,
        ) -> Result<Option<String>, $crate::store::StoreError> {
            sqlx::query_scalar(&$sql(
                "SELECT touched_at FROM driftd_key_journal WHERE resource = $1 AND key = $2",
            ))
            .bind(resource)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err($crate::store::query_err("read the key journal"))
        }

        async fn set_checkpoint(
            &self,
            resource: &str,
            value: Option<&str>,
        ) -> Result<(), $crate::store::StoreError> {
            self.writable()?;
            match value {
                Some(v) => sqlx::query(&$sql($crate::store::jobs::CHECKPOINT_SAVE))
                    .bind(resource)
                    .bind(v)
                    .bind($crate::store::now_rfc3339())
                    .execute(&self.pool)
                    .await,
                None => sqlx::query(&$sql("DELETE FROM driftd_checkpoints WHERE resource = $1"))
                    .bind(resource)
                    .execute(&self.pool)
                    .await,
            }
            .map_err($crate::store::query_err("store a checkpoint"))?;
            Ok(())
        }

        async fn stream_losses(&self, source: &str) -> Result<u64, $crate::store::StoreError> {
            let n: Option<i64> = sqlx::query_scalar(&$sql(
                "SELECT lost FROM driftd_stream_losses WHERE source = $1",
            ))
            .bind(source)
            .fetch_optional(&self.pool)
            .await
            .map_err($crate::store::query_err("read a stream's losses"))?;
            Ok(n.unwrap_or(0).max(0) as u64)
        }

        async fn save_stream_losses(
            &self,
            source: &str,
            lost: u64,
        ) -> Result<(), $crate::store::StoreError> {
            self.writable()?;
            sqlx::query(&$sql(
                "INSERT INTO driftd_stream_losses (source, lost, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (source) DO UPDATE SET lost = excluded.lost, updated_at = excluded.updated_at",
            ))
            .bind(source)
            .bind(lost as i64)
            .bind($crate::store::now_rfc3339())
            .execute(&self.pool)
            .await
            .map_err($crate::store::query_err("record a stream's losses"))?;
            Ok(())
        }

        async fn checkpoint(
            &self,
            resource: &str,
        ) -> Result<Option<String>, $crate::store::StoreError> {
            sqlx::query_scalar(&$sql($crate::store::jobs::CHECKPOINT_GET))
                .bind(resource)
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::store::query_err("read a checkpoint"))
        }

        async fn resent_keys(
            &self,
            reprovision: &str,
            resource: &str,
        ) -> Result<Vec<String>, $crate::store::StoreError> {
            sqlx::query_scalar(&$sql(
                "SELECT key FROM driftd_reprovision_keys WHERE reprovision = $1 AND resource = $2",
            ))
            .bind(reprovision)
            .bind(resource)
            .fetch_all(&self.pool)
            .await
            .map_err($crate::store::query_err("read re-sent keys"))
        }
    };
}
pub(crate) use reprovision_methods;

macro_rules! dead_letter_methods {
    ($sql:path) => {
        async fn add_dead_letter(
            &self,
            d: &$crate::store::DeadLetter,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::jobs::DEAD_LETTER_INSERT;
            self.writable()?;
            sqlx::query(&$sql(DEAD_LETTER_INSERT))
                .bind(&d.id)
                .bind(&d.source)
                .bind(&d.event)
                .bind(&d.error)
                .bind(serde_json::to_string(&d.headers).unwrap_or_default())
                .bind(&d.raw)
                .bind(&d.received_at)
                .bind(&d.failed_at)
                .bind(d.arrival as i64)
                .execute(&self.pool)
                .await
                .map_err($crate::store::query_err("store a dead letter"))?;
            Ok(())
        }

        async fn list_dead_letters(
            &self,
            source: Option<&str>,
            limit: i64,
        ) -> Result<Vec<$crate::store::DeadLetter>, $crate::store::StoreError> {
            let sql = format!(
                "{} WHERE (CAST($1 AS TEXT) IS NULL OR source = $1) ORDER BY received_at, seq, id LIMIT $2",
                $crate::store::jobs::DEAD_LETTER_COLUMNS
            );
            let rows: Vec<$crate::store::DeadLetterRow> = sqlx::query_as(&$sql(&sql))
                .bind(source)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err($crate::store::query_err("list dead letters"))?;
            Ok(rows
                .into_iter()
                .map($crate::store::DeadLetter::from_parts)
                .collect())
        }

        async fn get_dead_letter(
            &self,
            id: &str,
        ) -> Result<Option<$crate::store::DeadLetter>, $crate::store::StoreError> {
            let sql = format!("{} WHERE id = $1", $crate::store::jobs::DEAD_LETTER_COLUMNS);
            let row: Option<$crate::store::DeadLetterRow> = sqlx::query_as(&$sql(&sql))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::store::query_err("read a dead letter"))?;
            Ok(row.map($crate::store::DeadLetter::from_parts))
        }

        async fn refail_dead_letter(
            &self,
            id: &str,
            error: &str,
            failed_at: &str,
        ) -> Result<(), $crate::store::StoreError> {
            self.writable()?;
            sqlx::query(&$sql($crate::store::jobs::DEAD_LETTER_REFAIL))
                .bind(id)
                .bind(error)
                .bind(failed_at)
                .execute(&self.pool)
                .await
                .map_err($crate::store::query_err("record a failed replay"))?;
            Ok(())
        }

        async fn delete_dead_letter(&self, id: &str) -> Result<bool, $crate::store::StoreError> {
            self.writable()?;
            Ok(sqlx::query(&$sql("DELETE FROM driftd_dead_letters WHERE id = $1"))
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err($crate::store::query_err("delete a dead letter"))?
                .rows_affected()
                > 0)
        }

        async fn count_dead_letters(
            &self,
        ) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
            sqlx::query_as(&$sql($crate::store::jobs::DEAD_LETTER_COUNT))
                .fetch_all(&self.pool)
                .await
                .map_err($crate::store::query_err("count dead letters"))
        }
    };
}
pub(crate) use dead_letter_methods;

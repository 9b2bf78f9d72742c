//! Jobs: one run of a pass, with an id, what triggered it, a status and a
//! report, kept in driftd's own `driftd_jobs` table so they survive restarts.
//!
//! Status machine (each arrow is one write of the job row):
//!
//! ```text
//! queued ─► running ─► succeeded | drift_found | failed | guard_tripped | cancelled
//!   │          └─────► skipped (another replica holds the resource)
//!   ├────────────────► cancelled (before it started)
//!   └────────────────► skipped (a pass of the resource was already running)
//! ```
//!
//! A job found `queued` or `running` at start-up whose resource nobody holds
//! was interrupted by a crash: it becomes `failed` with reason `abandoned`.
//!
//! `succeeded` means the table equalled upstream when the job ended (DESIGN
//! rule 8): a pass found it in sync or repaired it. A dry run that found
//! drift changed nothing, so it ends `drift_found`, and only `succeeded`
//! jobs count as a success (`last_success_at`, the last-success metric).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::vocab::{Mode, Outcome, PassReport};

/// A job's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::new_v4())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// What started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Http,
    Cli,
    Startup,
    /// The purge that completes a reprovision.
    Reprovision,
}

impl Trigger {
    /// Every trigger, for metric series that exist from the start.
    pub const ALL: [Trigger; 5] = [
        Trigger::Schedule,
        Trigger::Http,
        Trigger::Cli,
        Trigger::Startup,
        Trigger::Reprovision,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Http => "http",
            Trigger::Cli => "cli",
            Trigger::Startup => "startup",
            Trigger::Reprovision => "reprovision",
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    /// The table equals upstream: in sync, or repaired.
    Succeeded,
    /// A dry run found drift and, as asked, applied nothing.
    DriftFound,
    Failed,
    GuardTripped,
    Cancelled,
    Skipped,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::DriftFound => "drift_found",
            JobStatus::Failed => "failed",
            JobStatus::GuardTripped => "guard_tripped",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// Every status, for listings and error messages.
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::DriftFound,
        JobStatus::Failed,
        JobStatus::GuardTripped,
        JobStatus::Cancelled,
        JobStatus::Skipped,
    ];

    /// The status a pass report ends a job with. A dry run is `succeeded`
    /// only if it found no drift of any kind, including kinds its mode
    /// does not act on (a purge-only dry run that finds missing rows says
    /// `drift_found`, though its restricted plan is empty).
    /// A real pass whose mode or policy left drift in place (a repair-only
    /// pass over extra rows) is `drift_found` too: `succeeded` means the
    /// owned columns equal upstream.
    pub fn of_report(report: &PassReport) -> JobStatus {
        let found = &report.found;
        let drift = found.missing + found.stale + found.extra > 0;
        match report.outcome {
            Outcome::DryRun => JobStatus::DriftFound,
            Outcome::InSync if report.dry_run && drift => JobStatus::DriftFound,
            Outcome::DriftLeft => JobStatus::DriftFound,
            Outcome::InSync | Outcome::Repaired => JobStatus::Succeeded,
            Outcome::GuardTripped => JobStatus::GuardTripped,
            Outcome::Failed => JobStatus::Failed,
            Outcome::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// One job as stored and as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: JobId,
    pub resource: String,
    pub trigger: Trigger,
    pub mode: Mode,
    pub dry_run: bool,
    pub force: bool,
    pub status: JobStatus,
    /// Why it was skipped, failed or cancelled.
    pub reason: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The pass report (a [`PassReport`]), once the pass ended.
    pub report: Option<serde_json::Value>,
}

impl Job {
    /// A new queued job.
    pub fn queued(resource: &str, trigger: Trigger, mode: Mode, dry_run: bool, force: bool) -> Job {
        Job {
            id: JobId::new(),
            resource: resource.to_string(),
            trigger,
            mode,
            dry_run,
            force,
            status: JobStatus::Queued,
            reason: None,
            created_at: now(),
            started_at: None,
            finished_at: None,
            report: None,
        }
    }

    /// Ends the job with `status`.
    pub fn finish(&mut self, status: JobStatus, reason: Option<String>) {
        self.status = status;
        self.reason = reason;
        self.finished_at = Some(now());
    }

    /// Ends the job with a pass report.
    pub fn finish_with(&mut self, report: &PassReport) {
        let reason = match report.outcome {
            Outcome::GuardTripped => report.guard.as_ref().map(|g| g.to_string()),
            _ => report.error.clone(),
        };
        self.report = serde_json::to_value(report).ok();
        self.finish(JobStatus::of_report(report), reason);
    }

    /// Whether this job shows the table equalled upstream when it ended.
    /// Jobs recorded before `drift_found` existed ended `succeeded` after a
    /// dry run with drift too; their report tells them apart.
    pub fn is_success(&self) -> bool {
        // An incremental run applies what the change feed said; it cannot
        // see what the feed never reported.
        if self.status != JobStatus::Succeeded || self.mode == Mode::Incremental {
            return false;
        }
        if !self.dry_run {
            return true;
        }
        let Some(report) = &self.report else {
            return false;
        };
        let found = &report["found"];
        report["outcome"] == "in_sync"
            && ["missing", "stale", "extra"]
                .iter()
                .all(|kind| found[kind].as_u64() == Some(0))
    }
}

/// RFC 3339 now, with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Filters for listing jobs.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub resource: Option<String>,
    pub status: Option<JobStatus>,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: &str, dry_run: bool, missing: u64) -> PassReport {
        serde_json::from_value(serde_json::json!({
            "resource": "users", "mode": "purge-only", "dry_run": dry_run, "forced": false,
            "started_at": "2024-01-01T00:00:00Z", "duration_ms": 1, "outcome": outcome,
            "local_rows": 1, "upstream_rows": 1, "upstream_pages": 1,
            "found": {"missing": missing, "stale": 0, "extra": 0},
            "actions": {"insert": 0, "update": 0, "purge": 0, "purge_kept": 0},
            "keys": {"insert": [], "update": [], "purge": []},
            "guard": null, "error": null,
            "timings": {"scan_ms": 0, "list_ms": 0, "apply_ms": 0},
        }))
        .expect("a report")
    }

    #[test]
    fn only_a_table_equal_to_upstream_is_a_success() {
        for (outcome, dry_run, missing, want) in [
            ("in_sync", false, 0, JobStatus::Succeeded),
            ("repaired", false, 3, JobStatus::Succeeded),
            ("in_sync", true, 0, JobStatus::Succeeded),
            ("dry_run", true, 3, JobStatus::DriftFound),
            // a purge-only dry run: nothing to purge, but rows are missing
            ("in_sync", true, 3, JobStatus::DriftFound),
            ("guard_tripped", false, 3, JobStatus::GuardTripped),
            ("failed", false, 0, JobStatus::Failed),
        ] {
            let r = report(outcome, dry_run, missing);
            assert_eq!(
                JobStatus::of_report(&r),
                want,
                "{outcome} {dry_run} {missing}"
            );
            let mut job = Job::queued("users", Trigger::Http, Mode::PurgeOnly, dry_run, false);
            job.finish_with(&r);
            assert_eq!(job.status, want);
            assert_eq!(job.is_success(), want == JobStatus::Succeeded);
        }
    }

    #[test]
    fn legacy_dry_runs_recorded_succeeded_are_not_successes() {
        let mut job = Job::queued("users", Trigger::Http, Mode::Full, true, false);
        job.finish_with(&report("dry_run", true, 3));
        job.status = JobStatus::Succeeded;
        assert!(!job.is_success());
    }

    #[test]
    fn incremental_runs_are_not_successes() {
        // It applied what the feed listed; a full pass proves the table.
        let mut job = Job::queued("users", Trigger::Schedule, Mode::Incremental, false, false);
        job.finish_with(&report("repaired", false, 0));
        assert_eq!(job.status, JobStatus::Succeeded);
        assert!(!job.is_success());
    }

    #[test]
    fn statuses_round_trip() {
        for st in JobStatus::ALL {
            assert_eq!(JobStatus::parse(st.as_str()), Some(st));
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
    }
}

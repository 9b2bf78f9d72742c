//! Jobs: one run of a pass, with an id, what triggered it, a status and a
//! report, kept in driftd's own `driftd_jobs` table so they survive restarts.
//!
//! Status machine (each arrow is one write of the job row):
//!
//! ```text
//! queued ─► running ─► succeeded | failed | guard_tripped | cancelled
//!   │          └─────► skipped (another replica holds the resource)
//!   ├────────────────► cancelled (before it started)
//!   └────────────────► skipped (a pass of the resource was already running)
//! ```
//!
//! A job found `queued` or `running` at start-up whose resource nobody holds
//! was interrupted by a crash: it becomes `failed` with reason `abandoned`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pass::{Mode, Outcome, PassReport};

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
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Http => "http",
            Trigger::Cli => "cli",
            Trigger::Startup => "startup",
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
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
            JobStatus::Failed => "failed",
            JobStatus::GuardTripped => "guard_tripped",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::GuardTripped,
            JobStatus::Cancelled,
            JobStatus::Skipped,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// The status a pass outcome ends a job with.
    pub fn from_outcome(outcome: Outcome) -> JobStatus {
        match outcome {
            Outcome::InSync | Outcome::Repaired | Outcome::DryRun => JobStatus::Succeeded,
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
        self.finish(JobStatus::from_outcome(report.outcome), reason);
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

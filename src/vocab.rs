//! driftd's shared vocabulary: the words every layer speaks — how a pass
//! is run and how it ended, what it found and did, why a guard stopped it.
//! Plain data, no I/O, importing nothing of driftd's, so that the engine,
//! the job ledger, the stores and the metrics can all use these types
//! without importing one another.

use serde::Serialize;

/// How a source's messages were lost before driftd read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// Entries deleted from a stream (trimmed by `MAXLEN`/`MINID`, or
    /// `XDEL`) before the group read them.
    Trimmed,
    /// Entries deleted while pending: read, not yet settled.
    DeletedPending,
    /// The consumer group was created anew (the broker restarted without
    /// persistence, or the group or stream was deleted): what was added
    /// meanwhile was never read.
    GroupRecreated,
    /// The stream went back in time (the broker restarted from an older
    /// snapshot): what was added after it is gone.
    RolledBack,
}

impl LossReason {
    pub const ALL: [LossReason; 4] = [
        LossReason::Trimmed,
        LossReason::DeletedPending,
        LossReason::GroupRecreated,
        LossReason::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Trimmed => "trimmed",
            LossReason::DeletedPending => "deleted_pending",
            LossReason::GroupRecreated => "group_recreated",
            LossReason::RolledBack => "rolled_back",
        }
    }
}

/// Which actions a pass may take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Insert, repair and purge (each as the policy allows).
    #[default]
    Full,
    /// Only purge extra rows.
    PurgeOnly,
    /// Only insert missing and repair stale rows.
    RepairOnly,
    /// Apply what upstream's change feed lists since the stored checkpoint
    /// (`[resources.<name>.incremental]`).
    Incremental,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::PurgeOnly => "purge-only",
            Mode::RepairOnly => "repair-only",
            Mode::Incremental => "incremental",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        [
            Mode::Full,
            Mode::PurgeOnly,
            Mode::RepairOnly,
            Mode::Incremental,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// No drift found.
    InSync,
    /// Drift found and applied: the owned columns now equal upstream.
    Repaired,
    /// Drift found; what the mode and policy allow was applied, but drift
    /// of other kinds is left in place (a `repair-only` pass over extra
    /// rows): the table does not equal upstream.
    DriftLeft,
    /// Drift found, nothing applied (dry-run).
    DryRun,
    /// A guard stopped the pass before any write.
    GuardTripped,
    /// An error stopped the pass; see `error`.
    Failed,
    /// Cancelled at a safe point (between pages or between write batches).
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InSync => "in_sync",
            Outcome::Repaired => "repaired",
            Outcome::DriftLeft => "drift_left",
            Outcome::DryRun => "dry_run",
            Outcome::GuardTripped => "guard_tripped",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Rows found per kind of drift.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Counts {
    pub missing: u64,
    pub stale: u64,
    pub extra: u64,
}

/// Rows changed (or that would be, in dry-run) per action.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Actions {
    pub insert: u64,
    pub update: u64,
    pub purge: u64,
    /// Purge candidates the get-by-key check found still present upstream.
    pub purge_kept: u64,
    /// Keys the pass left alone because an event wrote them after its
    /// listing began (the event is newer than what the pass listed).
    #[serde(default)]
    pub yielded: u64,
    /// Children purged with parents the pass purged (cascade), by child
    /// resource.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cascaded: std::collections::BTreeMap<String, u64>,
}

/// Keys affected, per kind.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Samples {
    pub insert: Vec<String>,
    pub update: Vec<String>,
    pub purge: Vec<String>,
}

/// What one pass found and did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PassReport {
    pub resource: String,
    pub mode: Mode,
    pub dry_run: bool,
    pub forced: bool,
    pub started_at: String,
    pub duration_ms: u64,
    pub outcome: Outcome,
    pub local_rows: u64,
    pub upstream_rows: u64,
    pub upstream_pages: u64,
    /// Times the listing started over because the list moved while paged.
    #[serde(default)]
    pub upstream_relists: u32,
    pub found: Counts,
    /// Drift the pass left in place: kinds its mode or policy does not act
    /// on (a repair-only pass leaves extra rows). Zero everywhere means the
    /// owned columns now equal upstream.
    #[serde(default)]
    pub left: Counts,
    /// Applied actions (planned ones, in dry-run or when a guard tripped).
    pub actions: Actions,
    /// Keys per action; every key in dry-run, a sample otherwise.
    pub keys: Samples,
    pub guard: Option<GuardTrip>,
    pub error: Option<String>,
    /// Where the time went.
    pub timings: Timings,
}

/// Milliseconds per phase of a pass.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Timings {
    /// Reading the local table into the index.
    pub scan_ms: u64,
    /// From the start until the listing was complete and diffed.
    pub list_ms: u64,
    /// Confirming candidates and writing.
    pub apply_ms: u64,
}

/// Why a plan was stopped.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, thiserror::Error)]
#[serde(tag = "guard", rename_all = "snake_case")]
pub enum GuardTrip {
    #[error(
        "upstream listed no rows while the local table has {local}; refusing to purge everything"
    )]
    EmptyUpstream { local: u64 },
    #[error("purge of {purge} rows is {percent:.1}% of {local} local rows, above the {max_percent:.1}% limit")]
    PurgeFraction {
        purge: u64,
        local: u64,
        percent: f64,
        max_percent: f64,
    },
    #[error("purge of {purge} rows is above the limit of {max}")]
    PurgeCount { purge: u64, max: u64 },
    #[error("update of {update} rows is {percent:.1}% of {local} local rows, above the {max_percent:.1}% limit (did upstream rename or drop a mapped field?)")]
    UpdateFraction {
        update: u64,
        local: u64,
        percent: f64,
        max_percent: f64,
    },
    #[error("update of {update} rows is above the limit of {max} (did upstream rename or drop a mapped field?)")]
    UpdateCount { update: u64, max: u64 },
    /// The purge would cascade past a child resource's own purge guard:
    /// parents and children are kept alike (no orphans).
    #[error("{detail}")]
    Cascade { detail: String },
}

/// Every guard's name, for metric series that exist from the start.
pub const GUARD_NAMES: [&str; 6] = [
    "purge_fraction",
    "purge_count",
    "empty_upstream",
    "update_fraction",
    "update_count",
    "cascade",
];

impl GuardTrip {
    /// A closed-set name for reports and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            GuardTrip::EmptyUpstream { .. } => "empty_upstream",
            GuardTrip::PurgeFraction { .. } => "purge_fraction",
            GuardTrip::PurgeCount { .. } => "purge_count",
            GuardTrip::UpdateFraction { .. } => "update_fraction",
            GuardTrip::UpdateCount { .. } => "update_count",
            GuardTrip::Cascade { .. } => "cascade",
        }
    }
}

/// The error and its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

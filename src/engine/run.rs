//! What one run of a resource (a pass, or an incremental run) is handed
//! and how it fails: its [`Hooks`] (progress, cancellation, metrics) and
//! its [`PassError`]. Below both kinds of run, so neither imports the
//! other's module for them.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::diff::ListingError;
use crate::metrics::Metrics;
use crate::model::Key;
use crate::store::StoreError;
use crate::upstream::UpstreamError;

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("incomplete listing: {0}")]
    Listing(#[from] ListingError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("confirm_purge canary: the get-by-key endpoint answers 404 for `{0}`, which the listing has; its 404s cannot be trusted (check upstream.get_path)")]
    Canary(Key),
    #[error("a value does not fit its column unchanged, nothing was written: {0}")]
    DoesNotFit(String),
    #[error("{0}")]
    Rows(String),
    #[error("cancelled")]
    Cancelled,
    #[error("upstream task ended unexpectedly: {0}")]
    Task(String),
    #[error("{0}")]
    Config(String),
    #[error("the change feed no longer serves checkpoint `{checkpoint}` (HTTP {status}): run a full pass (`driftd reconcile {resource}`), then `driftd checkpoint set {resource} REVISION` with the feed's current revision, or `driftd checkpoint reset {resource}` to read the feed from incremental.initial")]
    CheckpointExpired {
        resource: String,
        checkpoint: String,
        status: u16,
    },
}

impl PassError {
    /// Whether running the pass again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PassError::Upstream(e) => e.is_transient(),
            PassError::Store(e) => e.is_transient(),
            PassError::Listing(_) | PassError::Rows(_) => true,
            PassError::Canary(_)
            | PassError::DoesNotFit(_)
            | PassError::Task(_)
            | PassError::Config(_)
            | PassError::CheckpointExpired { .. }
            | PassError::Cancelled => false,
        }
    }
}

/// Progress of the listing, for a terminal progress line.
pub trait Progress: Send + Sync {
    fn listed(&self, pages: u64, rows: u64);
}

impl Progress for () {
    fn listed(&self, _: u64, _: u64) {}
}

/// What a pass reports to, and listens to, while it runs.
pub struct Hooks<'a> {
    /// Listing progress, for a terminal line.
    pub progress: &'a dyn Progress,
    /// Cancelled: stop at the next safe point (between pages, between
    /// write batches); the table stays consistent.
    pub cancel: CancellationToken,
    /// Upstream request metrics.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Hooks {
            progress: &(),
            cancel: CancellationToken::new(),
            metrics: None,
        }
    }
}

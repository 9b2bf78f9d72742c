//! The one owner of execution. Cron ticks, HTTP and CLI triggers and
//! start-up passes all become [`JobRequest`]s to the [`Runner`], which:
//!
//! - runs at most one pass per resource at a time in this process; a
//!   request for a resource whose pass is running is coalesced: recorded as
//!   a `skipped` job (reason `overlap`), never run twice at once;
//! - takes the resource's store lock, so replicas sharing a PostgreSQL
//!   database never run the same resource at once (the loser records
//!   `skipped`, reason `locked`);
//! - gives each job a cancellation token and records it in `driftd_jobs`;
//! - on shutdown stops taking work, cancels running passes (they stop at the
//!   next safe point) and waits for them up to a deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Settings;
use crate::jobs::{Job, JobFilter, JobId, JobStatus, Trigger};
use crate::metrics::Metrics;
use crate::pass::{error_chain, run_pass, Hooks, Mode, PassOptions, PassReport, Progress};
use crate::store::{AnyStore, Ledger, StoreError};

/// `succeeded` jobs searched for the last success; see [`Runner::last_success`].
const SUCCESS_LOOKBACK: u32 = 100;

/// A request to run one pass.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub resource: String,
    pub trigger: Trigger,
    pub mode: Mode,
    pub dry_run: bool,
    pub force: bool,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// A new job started.
    Started(JobId),
    /// A pass of the resource was running; this request was recorded as the
    /// skipped job `skipped` and `running` goes on.
    Coalesced { running: JobId, skipped: JobId },
}

impl Submitted {
    /// The job whose outcome answers the request.
    pub fn job_id(self) -> JobId {
        match self {
            Submitted::Started(id) => id,
            Submitted::Coalesced { running, .. } => running,
        }
    }
}

/// How long the record of a job's end is retried while the database is
/// unreachable.
const FINAL_SAVE_FOR: Duration = Duration::from_secs(30);

/// Why a request or a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("unknown resource `{0}`")]
    UnknownResource(String),
    #[error("driftd is shutting down")]
    ShuttingDown,
    #[error("no job {0}")]
    NoSuchJob(JobId),
    #[error("job {0} has already ended")]
    AlreadyEnded(JobId),
    #[error("job {0} runs in another driftd replica; cancel it there")]
    ElsewhereRunning(JobId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job of this process that has not ended.
struct Active {
    job: JobId,
    cancel: CancellationToken,
}

struct Inner {
    settings: Arc<Settings>,
    store: Arc<AnyStore>,
    metrics: Arc<Metrics>,
    /// Active job per resource: the one-pass-per-resource rule.
    active: Mutex<HashMap<String, Active>>,
    tasks: TaskTracker,
    /// Set once shutdown began: no new work.
    closed: CancellationToken,
}

/// See the module documentation.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

impl Runner {
    pub fn new(settings: Arc<Settings>, store: Arc<AnyStore>, metrics: Arc<Metrics>) -> Self {
        for name in settings.resources.keys() {
            metrics.register_resource(name);
        }
        Runner {
            inner: Arc::new(Inner {
                settings,
                store,
                metrics,
                active: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                closed: CancellationToken::new(),
            }),
        }
    }

    pub fn settings(&self) -> &Arc<Settings> {
        &self.inner.settings
    }

    pub fn store(&self) -> &Arc<AnyStore> {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The running job of `resource` in this process, if any.
    pub fn running(&self, resource: &str) -> Option<JobId> {
        self.lock_active().get(resource).map(|a| a.job)
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.inner.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest job of `resource` that left the table equal to upstream
    /// (see [`Job::is_success`]). Looks through the last
    /// [`SUCCESS_LOOKBACK`] `succeeded` jobs, which only jobs recorded before
    /// `drift_found` existed can fail to qualify.
    pub async fn last_success(&self, resource: &str) -> Result<Option<Job>, StoreError> {
        let filter = JobFilter {
            resource: Some(resource.to_string()),
            status: Some(JobStatus::Succeeded),
            limit: SUCCESS_LOOKBACK,
        };
        let jobs = self.inner.store.list_jobs(&filter).await?;
        Ok(jobs.into_iter().find(Job::is_success))
    }

    /// Seeds each resource's last-success metric from the job history: the
    /// end of its last success, or `0` if it has none on record.
    pub async fn seed_last_success(&self) -> Result<(), StoreError> {
        for resource in self.inner.settings.resources.keys() {
            let finished = self
                .last_success(resource)
                .await?
                .and_then(|j| j.finished_at);
            let secs = match finished.as_deref().map(humantime::parse_rfc3339_weak) {
                Some(Ok(at)) => at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                Some(Err(e)) => {
                    tracing::warn!(%resource, error = %e, "last success has a bad finished_at; counting none");
                    0.0
                }
                None => 0.0,
            };
            self.inner.metrics.seed_last_success(resource, secs);
            // The drift and row gauges show the last pass's figures from the
            // start, not nothing until the next pass.
            let recent = self
                .inner
                .store
                .list_jobs(&JobFilter {
                    resource: Some(resource.clone()),
                    status: None,
                    limit: SUCCESS_LOOKBACK,
                })
                .await?;
            let last = recent.iter().find_map(|j| {
                let report: crate::vocab::PassReport =
                    serde_json::from_value(j.report.clone()?).ok()?;
                let counts = report.mode != crate::vocab::Mode::Incremental
                    && !matches!(
                        report.outcome,
                        crate::vocab::Outcome::Failed | crate::vocab::Outcome::Cancelled
                    )
                    && j.trigger != crate::jobs::Trigger::Reprovision;
                counts.then_some(report)
            });
            if let Some(report) = last {
                self.inner.metrics.seed_gauges(&report);
            }
        }
        Ok(())
    }

    /// Deletes jobs older than `daemon.job_retention_days` (keeping each
    /// resource's latest success); returns how many.
    pub async fn prune_jobs(&self, now: std::time::SystemTime) -> Result<u64, StoreError> {
        let days = self.inner.settings.daemon.job_retention_days;
        if days == 0 {
            return Ok(0);
        }
        let cutoff = now - Duration::from_secs(u64::from(days) * 86_400);
        let before = humantime::format_rfc3339_millis(cutoff).to_string();
        let pruned = self.inner.store.prune_jobs(&before).await?;
        if pruned > 0 {
            tracing::info!(pruned, days, "old jobs pruned");
        }
        Ok(pruned)
    }

    /// Marks jobs a crash left `queued` or `running` as failed, when nobody
    /// holds their resource (another replica may be running them).
    pub async fn recover(&self) -> Result<u64, StoreError> {
        let store = &self.inner.store;
        let mut fixed = 0;
        for mut job in store.unfinished_jobs().await? {
            let Some(lock) = store.try_lock(&job.resource).await? else {
                continue;
            };
            job.finish(
                JobStatus::Failed,
                Some("abandoned: driftd stopped while this job ran".into()),
            );
            let saved = store.abandon_job(&job).await;
            lock.release().await;
            if saved? {
                tracing::warn!(job = %job.id, resource = %job.resource, "marked an abandoned job failed");
                fixed += 1;
            }
        }
        Ok(fixed)
    }

    /// Claims the resource for a new job, or records a coalesced one.
    async fn claim(
        &self,
        req: &JobRequest,
    ) -> Result<Result<(Job, CancellationToken), Submitted>, RunnerError> {
        if !self.inner.settings.resources.contains_key(&req.resource) {
            return Err(RunnerError::UnknownResource(req.resource.clone()));
        }
        let job = Job::queued(&req.resource, req.trigger, req.mode, req.dry_run, req.force);
        let claimed = {
            let mut active = self.lock_active();
            if self.inner.closed.is_cancelled() {
                return Err(RunnerError::ShuttingDown);
            }
            match active.get(&req.resource) {
                Some(a) => Err(a.job),
                None => {
                    let cancel = CancellationToken::new();
                    active.insert(
                        req.resource.clone(),
                        Active {
                            job: job.id,
                            cancel: cancel.clone(),
                        },
                    );
                    Ok(cancel)
                }
            }
        };
        match claimed {
            Ok(cancel) => {
                if let Err(e) = self.inner.store.save_job(&job).await {
                    self.release(&req.resource, job.id);
                    // The pass could not even start: a failed pass, so the
                    // failing-pass alert sees a database outage.
                    self.inner
                        .metrics
                        .pass_not_started(&req.resource, req.trigger);
                    return Err(e.into());
                }
                Ok(Ok((job, cancel)))
            }
            Err(running) => {
                let mut skipped = job;
                skipped.finish(
                    JobStatus::Skipped,
                    Some(format!(
                        "overlap: job {running} of this resource is running"
                    )),
                );
                if let Err(e) = self.inner.store.save_job(&skipped).await {
                    // Not even the skip can be recorded (the database is
                    // gone while a pass waits to record its end): a
                    // trigger that did not become a pass is a failed one.
                    self.inner
                        .metrics
                        .pass_not_started(&req.resource, req.trigger);
                    return Err(e.into());
                }
                self.inner.metrics.skipped(&req.resource, "overlap");
                tracing::info!(resource = %req.resource, running = %running, "trigger coalesced with the running pass");
                Ok(Err(Submitted::Coalesced {
                    running,
                    skipped: skipped.id,
                }))
            }
        }
    }

    fn release(&self, resource: &str, id: JobId) {
        let mut active = self.lock_active();
        if active.get(resource).is_some_and(|a| a.job == id) {
            active.remove(resource);
        }
    }

    /// Starts a job in the background.
    pub async fn submit(&self, req: JobRequest) -> Result<Submitted, RunnerError> {
        let (job, cancel) = match self.claim(&req).await? {
            Ok(claimed) => claimed,
            Err(coalesced) => return Ok(coalesced),
        };
        let id = job.id;
        let me = self.clone();
        self.inner.tasks.spawn(async move {
            me.execute(job, cancel, &()).await;
        });
        Ok(Submitted::Started(id))
    }

    /// Runs a job in the foreground (the CLI) and returns it ended, with
    /// its pass report unless it was skipped or cancelled before starting.
    pub async fn run(
        &self,
        req: JobRequest,
        progress: &dyn Progress,
    ) -> Result<(Job, Option<PassReport>), RunnerError> {
        match self.claim(&req).await? {
            Ok((job, cancel)) => Ok(self.execute(job, cancel, progress).await),
            Err(coalesced) => {
                let id = match coalesced {
                    Submitted::Coalesced { skipped, .. } => skipped,
                    Submitted::Started(id) => id,
                };
                let job = self.inner.store.get_job(id).await?;
                Ok((job.ok_or(RunnerError::NoSuchJob(id))?, None))
            }
        }
    }

    /// Cancels a job of this process that has not ended.
    pub async fn cancel(&self, id: JobId) -> Result<Job, RunnerError> {
        let token = self
            .lock_active()
            .values()
            .find(|a| a.job == id)
            .map(|a| a.cancel.clone());
        let job = self.inner.store.get_job(id).await?;
        match (token, job) {
            (Some(token), Some(job)) => {
                token.cancel();
                Ok(job)
            }
            (None, Some(job)) if job.status.is_final() => Err(RunnerError::AlreadyEnded(id)),
            // Not ended and not ours: another replica runs it if it holds
            // the resource's lock; if the lock is free, nobody does.
            (None, Some(mut job)) => match self.inner.store.try_lock(&job.resource).await? {
                None => Err(RunnerError::ElsewhereRunning(id)),
                Some(lock) => {
                    job.finish(
                        JobStatus::Failed,
                        Some("abandoned: its driftd stopped before recording the end".into()),
                    );
                    let saved = self.inner.store.abandon_job(&job).await;
                    lock.release().await;
                    saved?;
                    Err(RunnerError::AlreadyEnded(id))
                }
            },
            (_, None) => Err(RunnerError::NoSuchJob(id)),
        }
    }

    async fn execute(
        &self,
        mut job: Job,
        cancel: CancellationToken,
        progress: &dyn Progress,
    ) -> (Job, Option<PassReport>) {
        let span = tracing::info_span!("job", job = %job.id, resource = %job.resource, trigger = job.trigger.as_str());
        async {
            let metrics = &self.inner.metrics;
            let mut report = None;
            if cancel.is_cancelled() {
                job.finish(
                    JobStatus::Cancelled,
                    Some("cancelled before it started".into()),
                );
            } else {
                job.status = JobStatus::Running;
                job.started_at = Some(crate::jobs::now());
                self.save(&job).await;
                metrics.job_started(&job.resource);
                report = self.run_locked(&mut job, cancel, progress).await;
                metrics.job_ended(&job.resource);
            }
            self.save(&job).await;
            self.release(&job.resource, job.id);
            (job, report)
        }
        .instrument(span)
        .await
    }

    /// Takes the store lock, runs the pass, ends the job.
    async fn run_locked(
        &self,
        job: &mut Job,
        cancel: CancellationToken,
        progress: &dyn Progress,
    ) -> Option<PassReport> {
        let store = &self.inner.store;
        let lock = match store.try_lock(&job.resource).await {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                self.inner.metrics.skipped(&job.resource, "locked");
                tracing::info!("another driftd replica holds this resource; skipped");
                job.finish(
                    JobStatus::Skipped,
                    Some("locked: another driftd replica is running this resource".into()),
                );
                return None;
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "could not take the resource lock");
                self.inner
                    .metrics
                    .pass_not_started(&job.resource, job.trigger);
                job.finish(JobStatus::Failed, Some(error_chain(&e)));
                return None;
            }
        };
        self.abandon_others(job).await;
        let Some(res) = self.inner.settings.resources.get(&job.resource) else {
            lock.release().await;
            job.finish(
                JobStatus::Failed,
                Some("resource no longer configured".into()),
            );
            return None;
        };
        let hooks = Hooks {
            progress,
            cancel,
            metrics: Some(self.inner.metrics.clone()),
        };
        let opts = PassOptions {
            mode: job.mode,
            dry_run: job.dry_run,
            force: job.force,
        };
        let report = run_pass(store.as_ref(), &job.resource, res, opts, &hooks).await;
        lock.release().await;
        self.inner.metrics.pass(&report, job.trigger);
        job.finish_with(&report);
        Some(report)
    }

    /// With the resource's lock held, no other job of it can be running
    /// anywhere: any other `running` record is one whose driftd died (or
    /// could not record its end). So is a `queued` one: a job is queued
    /// only for the moment between its record and its start (it never
    /// waits for the lock; a held lock skips it), so a queued record here
    /// is one whose driftd died before starting it, or one about to start,
    /// find the lock held and record itself skipped. Marks those failed.
    async fn abandon_others(&self, job: &Job) {
        let unfinished = match self.inner.store.unfinished_jobs().await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not look for abandoned jobs");
                return;
            }
        };
        for mut other in unfinished {
            if other.resource != job.resource
                || other.id == job.id
                || !matches!(other.status, JobStatus::Running | JobStatus::Queued)
            {
                continue;
            }
            other.finish(
                JobStatus::Failed,
                Some(
                    "abandoned: its driftd stopped or lost the database before recording the end"
                        .into(),
                ),
            );
            if let Ok(true) = self.inner.store.abandon_job(&other).await {
                tracing::warn!(abandoned = %other.id, "marked an abandoned job of this resource failed");
            }
        }
    }

    /// Records a job. The record of a job's end is retried (the database
    /// may be briefly gone) for up to [`FINAL_SAVE_FOR`]; if it still
    /// cannot be written, the next pass of the resource marks the job
    /// abandoned.
    async fn save(&self, job: &Job) {
        let deadline = tokio::time::Instant::now() + FINAL_SAVE_FOR;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.store.save_job(job).await {
                Ok(()) => return,
                Err(e) if job.status.is_final() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %error_chain(&e), retry_in_ms = delay.as_millis() as u64, "could not record the job's end; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "could not record the job");
                    return;
                }
            }
        }
    }

    /// Stops taking work, cancels running jobs (they stop at their next safe
    /// point) and waits for them up to `deadline`. Returns whether all ended.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.inner.closed.cancel();
        for active in self.lock_active().values() {
            active.cancel.cancel();
        }
        self.inner.tasks.close();
        tokio::time::timeout(deadline, self.inner.tasks.wait())
            .await
            .is_ok()
    }

    /// Waits until no job of this process is running (tests, CLI).
    pub async fn idle(&self) {
        loop {
            if self.lock_active().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

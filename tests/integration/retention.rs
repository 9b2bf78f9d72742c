//! `driftd_jobs` does not grow forever: jobs older than
//! `daemon.job_retention_days` are pruned, except each resource's latest
//! success, which the last-success metric is seeded from.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use driftd::jobs::{Job, JobFilter, JobStatus, Trigger};
use driftd::metrics::Metrics;
use driftd::pass::Mode;
use driftd::runner::Runner;
use driftd::store::{AnyStore, Ledger};

use crate::both_backends;
use crate::common::*;

fn ended(status: JobStatus, days_ago: u64) -> Job {
    let mut job = Job::queued("users", Trigger::Schedule, Mode::Full, false, false);
    job.status = status;
    let at = SystemTime::now() - Duration::from_secs(days_ago * 86_400);
    job.finished_at = Some(humantime::format_rfc3339_millis(at).to_string());
    job
}

async fn old_jobs_are_pruned_but_the_last_success_stays(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (_up, addr) = upstream(users(1)).await;
    let settings = Arc::new(
        ConfigBuilder {
            tail: "[daemon]\njob_retention_days = 30\n".into(),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let store = Arc::new(AnyStore::open(&settings.store.url, 2).await.unwrap());
    let old_success = ended(JobStatus::Succeeded, 60);
    let older_success = ended(JobStatus::Succeeded, 90);
    let old_failure = ended(JobStatus::Failed, 45);
    let recent = ended(JobStatus::Failed, 1);
    let mut running = Job::queued("users", Trigger::Http, Mode::Full, false, false);
    running.status = JobStatus::Running;
    for job in [
        &old_success,
        &older_success,
        &old_failure,
        &recent,
        &running,
    ] {
        store.save_job(job).await.unwrap();
    }
    let runner = Runner::new(settings, store.clone(), Arc::new(Metrics::new()));
    assert_eq!(runner.prune_jobs(SystemTime::now()).await.unwrap(), 2);
    let mut left: Vec<_> = store
        .list_jobs(&JobFilter {
            limit: 100,
            ..JobFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id.to_string())
        .collect();
    left.sort();
    let mut want: Vec<String> = [old_success.id, recent.id, running.id]
        .iter()
        .map(|id| id.to_string())
        .collect();
    want.sort();
    assert_eq!(left, want);
}

both_backends!(old_jobs_are_pruned_but_the_last_success_stays);

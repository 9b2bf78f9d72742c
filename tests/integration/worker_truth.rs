//! The worker tells the truth under faults: jobs, reports, metrics and
//! exit codes say what happened, never success over a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use driftd::daemon::Daemon;
use driftd::jobs::{JobStatus, Trigger};
use driftd::pass::Mode;
use driftd::runner::JobRequest;
use driftd::store::{AnyStore, Ledger};

use crate::common::*;

fn req(resource: &str) -> JobRequest {
    JobRequest {
        resource: resource.into(),
        trigger: Trigger::Http,
        mode: Mode::Full,
        dry_run: false,
        force: false,
    }
}

/// The `[resources.users...]` tables of a config, copied for resource
/// `name` over table `name`.
fn resource_copy(toml: &str, name: &str) -> String {
    let start = toml.find("[resources.users]").unwrap();
    let end = toml[start..]
        .find("[resources.users.policy]")
        .map(|i| start + i)
        .unwrap();
    let policy_end = toml[end..]
        .find("\n\n")
        .map(|i| end + i)
        .unwrap_or(toml.len());
    toml[start..policy_end]
        .replace("[resources.users", &format!("[resources.{name}"))
        .replace("table = \"users\"", &format!("table = \"{name}\""))
}

/// With the default pool (`store.max_connections = 4`) and four resources
/// whose passes start together (start-up passes, or schedules on the same
/// minute), every pass holds one pooled connection for its advisory lock
/// for its whole length and then needs another one for its work: the pool
/// is exhausted by the locks alone, and the passes fail with a pool
/// timeout against a healthy database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_started_together_do_not_starve_the_pool_with_their_locks() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    db.insert_users(&users(5)).await;
    let names = ["r1", "r2", "r3", "r4"];
    for n in names {
        db.exec(&format!("CREATE TABLE {n} (LIKE users INCLUDING ALL)"))
            .await;
    }
    let (_up, addr) = upstream(users(5)).await;
    let schedules = tempfile::tempdir().unwrap();
    let base = ConfigBuilder::default().toml(&db, addr);
    let mut toml: String = names
        .iter()
        .map(|n| resource_copy(&base, n))
        .collect::<Vec<_>>()
        .join("\n\n");
    toml = format!(
        "[store]\nurl = \"{}\"\n\n{toml}\n\n[admin]\nlisten = \"127.0.0.1:0\"\nallow_unauthenticated = true\n[daemon]\nschedules_dir = \"{}\"\nstartup = [\"r1\", \"r2\", \"r3\", \"r4\"]\n",
        db.url,
        schedules.path().display()
    );
    let settings = driftd::config::Settings::from_toml_str(&toml, "test.toml")
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(settings.store.max_connections, 4, "the default pool");
    let started = Instant::now();
    let d = Daemon::start(Arc::new(settings))
        .await
        .expect("daemon starts");
    // /readyz while the passes run: the database is up and answers.
    let ready = reqwest::get(format!("http://{}/readyz", d.addr))
        .await
        .unwrap();
    let ready_status = ready.status().as_u16();
    let ready_body = ready.text().await.unwrap();
    d.runner.idle().await;
    let store = AnyStore::open(&db.url.clone().into(), 1).await.unwrap();
    let jobs = store
        .list_jobs(&driftd::jobs::JobFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let summary: Vec<String> = jobs
        .iter()
        .map(|j| format!("{} {} {:?}", j.resource, j.status.as_str(), j.reason))
        .collect();
    let elapsed = started.elapsed();
    d.stop().await;
    let mut repaired = Vec::new();
    for n in names {
        repaired.push(db.count(n).await);
    }
    assert!(
        jobs.iter().all(|j| j.status == JobStatus::Succeeded) && repaired == [5, 5, 5, 5],
        "four passes on a healthy database, after {elapsed:?}: rows {repaired:?}, jobs {summary:#?}; /readyz said {ready_status} {ready_body}"
    );
    assert_eq!(ready_status, 200, "/readyz during the passes: {ready_body}");
}

/// `driftd_passes_total{outcome="failed"}` summed over triggers.
fn failed_passes(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("driftd_passes_total{") && l.contains("outcome=\"failed\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A job that fails because its resource lock cannot be taken (here the
/// SQLite lock file cannot be opened; on PostgreSQL the lock query failing)
/// is recorded `failed`, but is not counted in
/// `driftd_passes_total{outcome="failed"}`: the failing-pass alert never
/// sees a worker whose every pass fails this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failed_at_the_resource_lock_counts_as_a_failed_pass() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(3)).await;
    let (_up, addr) = upstream(users(3)).await;
    let settings = Arc::new(ConfigBuilder::default().settings(&db, addr));
    let path = db.url.strip_prefix("sqlite://").unwrap();
    // Something in the way of the lock file (a folder of that name).
    std::fs::create_dir(format!("{path}.driftd-users.lock")).unwrap();
    let store = Arc::new(AnyStore::open(&settings.store.url, 4).await.unwrap());
    let metrics = Arc::new(driftd::metrics::Metrics::new());
    let runner = driftd::runner::Runner::new(settings, store, metrics.clone());
    let before = failed_passes(&metrics.render());
    let (job, _) = runner.run(req("users"), &()).await.unwrap();
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let after = failed_passes(&metrics.render());
    assert_eq!(
        after - before,
        1.0,
        "the job failed ({:?}) but driftd_passes_total{{outcome=\"failed\"}} went {before} -> {after}",
        job.reason
    );
}

/// The SQLite resource lock is a file named after the database *path as
/// spelled in the config*, not after the database file: a `driftd
/// reconcile` whose config reaches the same file through a symlink
/// (`/etc/driftd/db.sqlite -> /srv/driftd/t.db`; SQLite itself follows the
/// link, so both processes share one database and one WAL) takes another
/// lock file and runs the resource while the worker runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_lock_holds_for_another_spelling_of_the_same_file() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    db.insert_users(&[ghost(1)]).await;
    let (_up, addr) = upstream(users(10)).await;
    let real = std::path::PathBuf::from(db.url.strip_prefix("sqlite://").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("db.sqlite");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let via_link = format!("sqlite://{}", link.display());
    let config = dir.path().join("driftd.toml");
    std::fs::write(
        &config,
        ConfigBuilder::default()
            .toml(&db, addr)
            .replace(&db.url, &via_link),
    )
    .unwrap();

    // The worker (here: this test) runs `users` through the real path.
    let holder = AnyStore::open(&db.url.clone().into(), 1).await.unwrap();
    let lock = holder
        .try_lock("users")
        .await
        .unwrap()
        .expect("free at first");
    let other = AnyStore::open(&via_link.clone().into(), 1).await.unwrap();
    let second = other.try_lock("users").await.unwrap();
    let second_held = second.is_some();
    if let Some(l) = second {
        l.release().await;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["reconcile", "users", "--config"])
        .arg(&config)
        .output()
        .expect("run driftd");
    let err = String::from_utf8_lossy(&out.stderr);
    let rows = db.count("users").await;
    lock.release().await;
    assert!(
        !second_held && out.status.code() != Some(0) && err.contains("locked") && rows == 11,
        "the users lock was held through the real path, yet through {via_link}: a second \
         holder: {}, and `driftd reconcile` exited {:?} leaving {rows} rows (11 before)\n{err}",
        second_held,
        out.status.code()
    );
}

/// `driftd_passes_total` of one outcome, summed over triggers.
fn passes(metrics: &str, outcome: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("driftd_passes_total{") && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A pass releases its resource lock *before* it records its job's end.
/// In that gap another replica's pass takes the lock, reads the first job
/// as `running`, and `abandon_others` overwrites the row unconditionally
/// with `failed` ("abandoned"); if the first replica's end record lands
/// between that read and that write (here made certain by holding the row
/// lock for a moment, as a slow or busy database does), the job that
/// succeeded ends up `failed` for good, and `/v1/resources` loses its last
/// success. The abandonment should only end a job that is still unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_does_not_mark_a_finished_job_of_another_abandoned() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    db.insert_users(&users(5)).await;
    let (up, addr) = upstream(users(5)).await;
    up.inject(driftd::sample::Fault::Delay {
        offset: 0,
        ms: 1000,
    });
    let settings = Arc::new(ConfigBuilder::default().settings(&db, addr));
    let replica = || async {
        let store = Arc::new(AnyStore::open(&settings.store.url, 4).await.unwrap());
        let metrics = Arc::new(driftd::metrics::Metrics::new());
        (
            driftd::runner::Runner::new(settings.clone(), store, metrics.clone()),
            metrics,
        )
    };
    let (a, a_metrics) = replica().await;
    let (b, _) = replica().await;
    let mut probe = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let waiting = |n: i64| {
        let url = db.url.clone();
        async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let w: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                )
                .fetch_one(&mut c)
                .await
                .unwrap();
                if w >= n {
                    return;
                }
                assert!(Instant::now() < until, "{w} writers waiting, not {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Replica A runs a pass; its job is recorded `running`.
    let job_a = a.submit(req("users")).await.unwrap().job_id();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = db
            .text(&format!(
                "SELECT status FROM driftd_jobs WHERE id = '{job_a}'"
            ))
            .await;
        if st.first().cloned().flatten().as_deref() == Some("running") {
            break;
        }
        assert!(Instant::now() < until, "job A never ran: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The database is slow to write job A's row for a moment.
    let mut tx = probe.begin().await.unwrap();
    sqlx::query("SELECT id FROM driftd_jobs WHERE id = $1 FOR UPDATE")
        .bind(job_a.to_string())
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    // A's pass ends (in sync) and releases the lock; its end record waits.
    let until = Instant::now() + Duration::from_secs(10);
    while passes(&a_metrics.render(), "in_sync") < 1.0 {
        assert!(Instant::now() < until, "A's pass did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiting(1).await;
    // Replica B's pass takes the free lock and reads job A as `running`.
    let job_b = b.submit(req("users")).await.unwrap().job_id();
    waiting(2).await;
    tx.commit().await.unwrap();
    a.idle().await;
    b.idle().await;

    let store = AnyStore::open(&db.url.clone().into(), 1).await.unwrap();
    let ja = store.get_job(job_a).await.unwrap().unwrap();
    let jb = store.get_job(job_b).await.unwrap().unwrap();
    assert_eq!(jb.status, JobStatus::Succeeded, "{jb:?}");
    assert_eq!(
        ja.status,
        JobStatus::Succeeded,
        "job A's pass was in sync (driftd_passes_total says so), but its job reads {} ({:?})",
        ja.status.as_str(),
        ja.reason
    );
}

/// One schedule entry, loaded as the worker loads it.
fn entry(cron: &str, timezone: &str) -> driftd::scheduler::Entry {
    let dir = tempfile::tempdir().unwrap();
    let settings = driftd::config::Settings::from_toml_str(
        &format!(
            r#"
[daemon]
schedules_dir = "{}"
[resources.users]
upstream = {{ base_url = "http://127.0.0.1:9", list_path = "/users", key_order = "asc" }}
key = {{ upstream = "/uuid", column = "uuid" }}
local = {{ table = "users" }}
"#,
            dir.path().display()
        ),
        "t.toml",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("s.toml"),
        format!(
            "[[schedule]]\nresource = \"users\"\ncron = \"{cron}\"\ntimezone = \"{timezone}\"\n"
        ),
    )
    .unwrap();
    driftd::scheduler::Schedules::load(dir.path(), &settings)
        .unwrap()
        .entries
        .remove(0)
}

/// A worker started while the system clock was ahead (a VM resumed, an
/// RTC off by two hours) keeps the fire time it computed then: once NTP
/// steps the clock back, `next_run_at` (computed from the corrected
/// clock) promises the next quarter hour, but the worker's `Due` waits
/// for the time computed before the step, so an every-15-minutes schedule
/// runs nothing for two hours while `/v1/resources` says it will run in
/// 15 minutes.
#[test]
fn a_clock_stepped_back_does_not_stall_the_schedule() {
    use chrono::TimeZone;
    let e = entry("*/15 * * * *", "UTC");
    let real = chrono::Utc.with_ymd_and_hms(2027, 1, 10, 12, 0, 0).unwrap();
    let ahead = real + chrono::Duration::hours(2);
    let mut due = driftd::scheduler::Due::new(&e, ahead);
    // NTP steps the clock back to the real time; the worker ticks on.
    let promised = e.next_after(real).unwrap();
    let mut now = real;
    let mut fired = None;
    while now < real + chrono::Duration::hours(3) {
        if due.poll(&e, now) {
            fired = Some(now);
            break;
        }
        now += chrono::Duration::seconds(1);
    }
    assert_eq!(
        fired,
        Some(promised),
        "after the clock stepped back to {real}, next_run_at promised {promised}, the worker waited for {:?}",
        due.next()
    );
}

/// `driftd reconcile users --remote URL` asks for a real pass. If a dry
/// run of `users` is running, the request is coalesced: the worker
/// records it `skipped` and the client follows the *dry run*, prints its
/// report and exits 0 (its `drift_found` counts as success), so a script
/// believes the table was repaired while nothing was written. Locally the
/// same request would be `skipped` (locked) and exit non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_reconcile_coalesced_with_a_dry_run_does_not_exit_0() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(5)).await;
    db.insert_users(&[ghost(1)]).await;
    let (up, addr) = upstream(users(5)).await;
    up.inject(driftd::sample::Fault::Delay {
        offset: 0,
        ms: 1200,
    });
    let schedules = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: open_worker_tail(schedules.path()),
        ..ConfigBuilder::default()
    };
    let d = Daemon::start(Arc::new(cfg.settings(&db, addr)))
        .await
        .expect("daemon starts");
    let base = format!("http://{}", d.addr);
    let dry = reqwest::Client::new()
        .post(format!("{base}/v1/resources/users/reconcile"))
        .body(r#"{"dry_run": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(dry.status().as_u16(), 202);
    let bin = env!("CARGO_BIN_EXE_driftd");
    let base2 = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["reconcile", "users", "--remote", &base2])
            .env_remove("DRIFTD_ADMIN__TOKEN")
            .output()
            .expect("run driftd")
    })
    .await
    .unwrap();
    d.runner.idle().await;
    let rows = db.count("users").await;
    d.stop().await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !(out.status.code() == Some(0) && rows == 6),
        "a real pass was asked for, nothing was written ({rows} rows, the extra one kept), yet the client exited 0:\n{text}"
    );
}

/// Pruning keeps "each resource's latest success" by picking the latest
/// row whose status is `succeeded`; but the last success is the latest
/// `succeeded` job that *is* a success ([`driftd::jobs::Job::is_success`]):
/// a dry run an older driftd recorded `succeeded` although it found drift
/// is not one. When such a row is the newest `succeeded`, pruning keeps it
/// and deletes the real last success: `last_success_at` turns null and the
/// next start seeds the last-success metric with 0, so the "no recent
/// success" alert fires for a resource that was fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_the_real_last_success() {
    use driftd::jobs::Job;
    let db = TestDb::new(Backend::Sqlite).await;
    let (_up, addr) = upstream(users(1)).await;
    let settings = Arc::new(ConfigBuilder::default().settings(&db, addr));
    let store = Arc::new(AnyStore::open(&settings.store.url, 2).await.unwrap());
    let ended = |dry_run: bool, days_ago: u64| {
        let mut job = Job::queued("users", Trigger::Schedule, Mode::Full, dry_run, false);
        job.status = JobStatus::Succeeded;
        let at = std::time::SystemTime::now() - Duration::from_secs(days_ago * 86_400);
        job.finished_at = Some(humantime::format_rfc3339_millis(at).to_string());
        job
    };
    let real = ended(false, 60);
    // Recorded by a driftd from before `drift_found`: a dry run with drift.
    let mut legacy = ended(true, 40);
    legacy.report = Some(serde_json::json!({
        "outcome": "dry_run",
        "dry_run": true,
        "found": {"missing": 0, "stale": 0, "extra": 3},
    }));
    assert!(real.is_success() && !legacy.is_success());
    store.save_job(&real).await.unwrap();
    store.save_job(&legacy).await.unwrap();
    let runner = driftd::runner::Runner::new(
        settings,
        store.clone(),
        Arc::new(driftd::metrics::Metrics::new()),
    );
    let before = runner.last_success("users").await.unwrap().map(|j| j.id);
    assert_eq!(before, Some(real.id));
    runner
        .prune_jobs(std::time::SystemTime::now())
        .await
        .unwrap();
    let after = runner.last_success("users").await.unwrap().map(|j| j.id);
    assert_eq!(
        after,
        Some(real.id),
        "pruning deleted the last success and kept a dry run that found drift"
    );
}

/// DESIGN rule 8: a pass may call itself `in_sync` or `repaired`, or exit
/// 0, only when the table matches upstream. A `repair-only` pass over a
/// table whose only drift is an extra row applies nothing and leaves the
/// row, yet its report says `outcome repaired`, `driftd_passes_total`
/// counts it `repaired`, and `driftd reconcile` exits 0; only the job
/// status (`drift_found`) tells the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_leaves_drift_does_not_say_repaired_or_exit_0() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(5)).await;
    db.insert_users(&[ghost(1)]).await;
    let (_up, addr) = upstream(users(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driftd.toml");
    std::fs::write(&config, ConfigBuilder::default().toml(&db, addr)).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args([
                "reconcile",
                "users",
                "--mode",
                "repair-only",
                "--json",
                "--config",
            ])
            .arg(&config)
            .output()
            .expect("run driftd")
    })
    .await
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(db.count("users").await, 6, "the extra row stays");
    assert_eq!(report["actions"]["purge"], 0);
    assert!(
        !(report["outcome"] == "repaired" || report["outcome"] == "in_sync")
            && out.status.code() != Some(0),
        "nothing applied, an extra row left, yet outcome {} and exit {:?}",
        report["outcome"],
        out.status.code()
    );
}

/// `/v1/resources` gives each resource "its running job", but only looks
/// at the passes of its own process: while a `driftd reconcile` (or, on
/// PostgreSQL, another replica) runs the resource's pass and holds its
/// lock, the worker answers `running_job: null` next to a `last_job` that
/// is `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_show_a_pass_running_in_another_process() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(5)).await;
    let (up, addr) = upstream(users(5)).await;
    up.inject(driftd::sample::Fault::Delay {
        offset: 0,
        ms: 1500,
    });
    let schedules = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: open_worker_tail(schedules.path()),
        ..ConfigBuilder::default()
    };
    let d = Daemon::start(Arc::new(cfg.settings(&db, addr)))
        .await
        .expect("daemon starts");
    let config = schedules.path().join("driftd.toml");
    std::fs::write(&config, ConfigBuilder::default().toml(&db, addr)).unwrap();
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["reconcile", "users", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run driftd");
    let until = Instant::now() + Duration::from_secs(10);
    let running = loop {
        let ids = db
            .text("SELECT id FROM driftd_jobs WHERE status = 'running'")
            .await;
        if let Some(Some(id)) = ids.first() {
            break id.clone();
        }
        assert!(Instant::now() < until, "the CLI's job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = reqwest::get(format!("http://{}/v1/resources", d.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let _ = tokio::task::spawn_blocking(move || cli.wait()).await;
    d.stop().await;
    let users = &body["resources"][0];
    assert_eq!(users["last_job"]["status"], "running", "{body}");
    assert_eq!(
        users["running_job"].as_str(),
        Some(running.as_str()),
        "job {running} runs users (and holds its lock), but /v1/resources says {body}"
    );
}

//! The worker tells the truth under database faults: a real PostgreSQL
//! behind a TCP proxy the test can cut. During an outage `/readyz` answers
//! 503 within a second, every trigger that cannot become a pass counts as
//! a failed one and a real Prometheus fires `DriftdPassFailing`;
//! afterwards passes resume and no job stays `running`. A
//! job a dead driftd left `running` is abandoned by the next pass of its
//! resource, and cancelling it answers that it ended.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftd::daemon::Daemon;
use driftd::jobs::{Job, JobStatus, Trigger};
use driftd::pass::Mode;
use driftd::store::{AnyStore, Ledger};
use serde_json::Value as Json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::common::*;

/// A TCP proxy to PostgreSQL that can be cut (every connection dropped,
/// new ones refused) and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (is_up, list) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("admin API answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// `driftd_passes_total{outcome="failed"}` summed over triggers.
fn failed_passes(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("driftd_passes_total{") && l.contains("outcome=\"failed\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn jobs(base: &str, status: &str) -> Vec<Json> {
    let (_, body) = get(&format!("{base}/v1/jobs?status={status}&limit=500")).await;
    let v: Json = serde_json::from_str(&body).unwrap_or_default();
    v["jobs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_shows_in_readyz_and_metrics_and_jobs_end() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    db.insert_users(&users(20)).await;
    let (_up, addr) = upstream(users(20)).await;
    let target = db
        .url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(target.clone()).await;
    let schedules = tempfile::tempdir().unwrap();
    std::fs::write(
        schedules.path().join("users.toml"),
        "[[schedule]]\nresource = \"users\"\ncron = \"* * * * * *\"\n",
    )
    .unwrap();
    let cfg = ConfigBuilder {
        tail: open_worker_tail(schedules.path()),
        ..ConfigBuilder::default()
    };
    let toml = cfg
        .toml(&db, addr)
        .replace(&target, &proxy.addr.to_string());
    let settings = driftd::config::Settings::from_toml_str(&toml, "test.toml").unwrap();
    let d = Daemon::start(Arc::new(settings))
        .await
        .expect("daemon starts");
    let base = format!("http://{}", d.addr);

    // Failed passes are a series from the start, so the first one counts.
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        metrics.contains(
            r#"driftd_passes_total{outcome="failed",resource="users",trigger="schedule"} 0"#
        ),
        "{metrics}"
    );
    let prometheus = crate::prometheus::with_alert_rules(&format!("{base}/metrics")).await;
    let until = Instant::now() + Duration::from_secs(15);
    while jobs(&base, "succeeded").await.is_empty() {
        assert!(Instant::now() < until, "no scheduled pass succeeded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let failed_before = failed_passes(&metrics);

    proxy.cut();
    let asked = Instant::now();
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        failed_passes(&metrics) > failed_before,
        "ticks during the outage must count as failed passes:\n{metrics}"
    );
    if let Err(alerts) = prometheus
        .wait_firing("DriftdPassFailing", Duration::from_secs(20))
        .await
    {
        panic!("DriftdPassFailing did not fire during the outage: {alerts}");
    }

    proxy.restore();
    let restored = chrono::Utc::now().to_rfc3339();
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let recent = jobs(&base, "succeeded").await.into_iter().any(|j| {
            j["started_at"]
                .as_str()
                .is_some_and(|t| t > restored.as_str())
        });
        let running = jobs(&base, "running").await;
        if recent && running.len() <= 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "passes did not resume, or jobs stayed running: {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200);
    d.stop().await;
    let store = AnyStore::open(&db.url.clone().into(), 1).await.unwrap();
    assert!(
        store.unfinished_jobs().await.unwrap().is_empty(),
        "a job stayed unfinished after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_a_dead_driftd_left_running_is_abandoned_by_the_next_pass() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    db.insert_users(&users(5)).await;
    let (_up, addr) = upstream(users(5)).await;
    let schedules = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: open_worker_tail(schedules.path()),
        ..ConfigBuilder::default()
    };
    let settings = Arc::new(cfg.settings(&db, addr));
    let d = Daemon::start(settings).await.expect("daemon starts");
    let base = format!("http://{}", d.addr);
    // A `driftd reconcile` killed with SIGKILL after the worker started.
    let store = AnyStore::open(&db.url.clone().into(), 1).await.unwrap();
    let mut dead = Job::queued("users", Trigger::Cli, Mode::Full, false, false);
    dead.status = JobStatus::Running;
    store.save_job(&dead).await.unwrap();
    let mut other = Job::queued("users", Trigger::Cli, Mode::Full, false, false);
    other.status = JobStatus::Running;
    store.save_job(&other).await.unwrap();

    // Cancelling it: nobody holds the lock, so it is over, not elsewhere.
    let resp = reqwest::Client::new()
        .delete(format!("{base}/v1/jobs/{}", dead.id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let body = resp.text().await.unwrap();
    assert!(body.contains("already_ended"), "{body}");
    let dead = store.get_job(dead.id).await.unwrap().unwrap();
    assert_eq!(dead.status, JobStatus::Failed, "{dead:?}");

    // The next pass of the resource abandons the other one.
    let (job, _) = d
        .runner
        .run(
            driftd::runner::JobRequest {
                resource: "users".into(),
                trigger: Trigger::Http,
                mode: Mode::Full,
                dry_run: false,
                force: false,
            },
            &(),
        )
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let other = store.get_job(other.id).await.unwrap().unwrap();
    assert_eq!(other.status, JobStatus::Failed, "{other:?}");
    assert!(other.reason.unwrap_or_default().contains("abandoned"));
    d.stop().await;
}

/// The database goes while a pass runs (its upstream is slow): the pass
/// cannot record its end, and every scheduled tick meanwhile, which would
/// be an overlap, cannot even record its skip: each counts as a failed
/// pass, so the failing-pass alert sees the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_during_an_outage_count_as_failed_while_a_pass_runs() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    db.insert_users(&users(20)).await;
    let (up, addr) = upstream(users(20)).await;
    let target = db
        .url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(target.clone()).await;
    let schedules = tempfile::tempdir().unwrap();
    std::fs::write(
        schedules.path().join("users.toml"),
        "[[schedule]]\nresource = \"users\"\ncron = \"* * * * * *\"\n",
    )
    .unwrap();
    let cfg = ConfigBuilder {
        tail: open_worker_tail(schedules.path()),
        ..ConfigBuilder::default()
    };
    let toml = cfg
        .toml(&db, addr)
        .replace(&target, &proxy.addr.to_string());
    let settings = driftd::config::Settings::from_toml_str(&toml, "test.toml").unwrap();
    up.inject(driftd::sample::Fault::Delay {
        offset: 0,
        ms: 1_500,
    });
    let d = Daemon::start(Arc::new(settings))
        .await
        .expect("daemon starts");
    let base = format!("http://{}", d.addr);
    let until = Instant::now() + Duration::from_secs(15);
    while jobs(&base, "running").await.is_empty() {
        assert!(Instant::now() < until, "no scheduled pass started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let failed_before = failed_passes(&metrics);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        failed_passes(&metrics) >= failed_before + 3.0,
        "ticks during the outage, a pass running, must count as failed ({failed_before} before):\n{metrics}"
    );
    proxy.restore();
    d.stop().await;
}

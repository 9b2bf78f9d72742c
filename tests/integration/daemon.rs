//! `driftd run` as operators use it: the admin API, jobs, coalescing,
//! cancellation, schedules, metrics, shutdown, replicas on PostgreSQL.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftd::config::Settings;
use driftd::daemon::Daemon;
use driftd::jobs::{Job, JobStatus, Trigger};
use driftd::pass::Mode;
use driftd::sample::Fault;
use driftd::store::{AnyStore, Ledger};
use serde_json::{json, Value as Json};

use crate::common::*;

pub const TOKEN: &str = "test-admin-token";

/// The admin and daemon tables for a test, schedules in `dir`.
fn tail(dir: &std::path::Path, listen: &str) -> String {
    format!(
        "[admin]\nlisten = \"{listen}\"\ntoken = \"{TOKEN}\"\n\n[daemon]\nschedules_dir = \"{}\"\nshutdown_grace_secs = 10\n",
        dir.display()
    )
}

struct Setup {
    db: TestDb,
    up: Arc<driftd::sample::SampleUpstream>,
    settings: Arc<Settings>,
    schedules: tempfile::TempDir,
}

async fn setup(backend: Backend, rows: u64, page_size: u32) -> Setup {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let mut local = users(rows);
    local.push(ghost(1));
    db.insert_users(&local).await;
    let (up, addr) = upstream(users(rows)).await;
    let schedules = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        page_size,
        tail: tail(schedules.path(), "127.0.0.1:0"),
        ..ConfigBuilder::default()
    };
    let settings = Arc::new(cfg.settings(&db, addr));
    Setup {
        db,
        up,
        settings,
        schedules,
    }
}

/// Calls the admin API; returns the status and the JSON body.
pub async fn api(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, Json) {
    let http = reqwest::Client::new();
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("admin API answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, json)
}

/// Polls a job until it has ended.
pub async fn wait_job(base: &str, id: &str) -> Json {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, job) = api("GET", &format!("{base}/v1/jobs/{id}"), None, None).await;
        assert_eq!(status, 200, "{job}");
        if !matches!(job["status"].as_str(), Some("queued" | "running")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_through_the_api_reaches_succeeded() {
    let s = setup(Backend::Sqlite, 300, 100).await;
    let d = Daemon::start(s.settings.clone())
        .await
        .expect("daemon starts");
    let base = format!("http://{}", d.addr);

    let (status, body) = api(
        "POST",
        &format!("{base}/v1/resources/users/reconcile"),
        Some(TOKEN),
        Some(r#"{"mode": "full", "dry_run": false, "force": false}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    let job = wait_job(&base, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["trigger"], "http");
    assert_eq!(job["report"]["outcome"], "repaired");
    assert_eq!(job["report"]["actions"]["purge"], 1);
    assert_eq!(s.db.count("users").await, 300);

    let (_, jobs) = api(
        "GET",
        &format!("{base}/v1/jobs?resource=users&status=succeeded&limit=5"),
        None,
        None,
    )
    .await;
    assert_eq!(jobs["jobs"][0]["id"], id.as_str());
    let (_, res) = api("GET", &format!("{base}/v1/resources"), None, None).await;
    assert_eq!(res["resources"][0]["name"], "users");
    assert!(res["resources"][0]["last_success_at"].is_string(), "{res}");

    let (status, ready) = api("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    let (status, _) = api("GET", &format!("{base}/healthz"), None, None).await;
    assert_eq!(status, 200);

    let (_, metrics) = api("GET", &format!("{base}/metrics"), None, None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains(
            r#"driftd_passes_total{outcome="repaired",resource="users",trigger="http"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics
        .contains(r#"driftd_actions_total{action="purge",dry_run="false",resource="users"} 1"#));
    assert!(
        metrics.contains("driftd_upstream_requests_total{resource=\"users\",status_class=\"2xx\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains(&id), "job ids never become labels");
    assert!(d.stop().await);

    // Restarted, the worker shows the last pass's figures at once (its
    // job report), not nothing until the next pass.
    let d = Daemon::start(s.settings.clone())
        .await
        .expect("daemon starts again");
    let base = format!("http://{}", d.addr);
    let (_, metrics) = api("GET", &format!("{base}/metrics"), None, None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    for line in [
        r#"driftd_local_rows{resource="users"} 301"#,
        r#"driftd_upstream_rows{resource="users"} 300"#,
        r#"driftd_drift_rows{kind="extra",resource="users"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} after a restart:\n{metrics}");
    }
    assert!(d.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_trigger_during_a_pass_is_coalesced() {
    let s = setup(Backend::Sqlite, 300, 100).await;
    s.up.inject(Fault::Delay {
        offset: 100,
        ms: 1_500,
    });
    let d = Daemon::start(s.settings.clone()).await.unwrap();
    let base = format!("http://{}", d.addr);
    let url = format!("{base}/v1/resources/users/reconcile");
    let (_, first) = api("POST", &url, Some(TOKEN), None).await;
    let (status, second) = api("POST", &url, Some(TOKEN), Some("{}")).await;
    assert_eq!(status, 202);
    assert_eq!(second["coalesced"], true, "{second}");
    assert_eq!(second["job_id"], first["job_id"]);
    let skipped = second["skipped_job_id"].as_str().unwrap();
    let (_, sk) = api("GET", &format!("{base}/v1/jobs/{skipped}"), None, None).await;
    assert_eq!(sk["status"], "skipped");
    assert!(
        sk["reason"].as_str().unwrap().starts_with("overlap"),
        "{sk}"
    );
    let job = wait_job(&base, first["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, metrics) = api("GET", &format!("{base}/metrics"), None, None).await;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains(r#"driftd_triggers_skipped_total{reason="overlap",resource="users"} 1"#));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_pass_and_changes_nothing() {
    let s = setup(Backend::Sqlite, 300, 100).await;
    s.up.inject(Fault::Delay {
        offset: 200,
        ms: 1_500,
    });
    let before = s.db.keys("users").await;
    let d = Daemon::start(s.settings.clone()).await.unwrap();
    let base = format!("http://{}", d.addr);
    let (_, started) = api(
        "POST",
        &format!("{base}/v1/resources/users/reconcile"),
        Some(TOKEN),
        None,
    )
    .await;
    let id = started["job_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = api("DELETE", &format!("{base}/v1/jobs/{id}"), None, None).await;
    assert_eq!(status, 401, "cancel needs the token: {body}");
    let (status, body) = api("DELETE", &format!("{base}/v1/jobs/{id}"), Some(TOKEN), None).await;
    assert_eq!(status, 202, "{body}");
    let job = wait_job(&base, &id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(s.db.keys("users").await, before);
    let (status, _) = api("DELETE", &format!("{base}/v1/jobs/{id}"), Some(TOKEN), None).await;
    assert_eq!(status, 409, "an ended job cannot be cancelled");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_4xx() {
    let s = setup(Backend::Sqlite, 10, 100).await;
    let d = Daemon::start(s.settings.clone()).await.unwrap();
    let base = format!("http://{}", d.addr);
    let reconcile = format!("{base}/v1/resources/users/reconcile");
    let oversized = format!(
        "{{\"mode\": \"full\", \"pad\": \"{}\"}}",
        "x".repeat(3 << 20)
    );
    for (method, url, token, body, want) in [
        ("POST", reconcile.as_str(), None, None, 401),
        ("POST", reconcile.as_str(), Some("wrong"), None, 401),
        (
            "POST",
            reconcile.as_str(),
            Some(TOKEN),
            Some("{not json"),
            400,
        ),
        (
            "POST",
            reconcile.as_str(),
            Some(TOKEN),
            Some(r#"{"mode": "sideways"}"#),
            400,
        ),
        (
            "POST",
            reconcile.as_str(),
            Some(TOKEN),
            Some(r#"{"bogus": 1}"#),
            400,
        ),
        (
            "POST",
            &format!("{base}/v1/resources/nope/reconcile"),
            Some(TOKEN),
            None,
            404,
        ),
        (
            "GET",
            &format!("{base}/v1/jobs/not-a-uuid"),
            None,
            None,
            400,
        ),
        (
            "GET",
            &format!("{base}/v1/jobs/7f2c1e4e-0000-4000-8000-000000000000"),
            None,
            None,
            404,
        ),
        (
            "GET",
            &format!("{base}/v1/jobs?status=weird"),
            None,
            None,
            400,
        ),
        ("GET", &format!("{base}/v1/jobs?limit=0"), None, None, 400),
        ("GET", &format!("{base}/v1/jobs?color=red"), None, None, 400),
        (
            "GET",
            &format!("{base}/v1/jobs?resource=nope"),
            None,
            None,
            404,
        ),
        ("GET", &format!("{base}/nowhere"), None, None, 404),
        ("PUT", &format!("{base}/v1/jobs"), None, None, 405),
        // a path that does not decode, a body that is not an object, an
        // oversized body: JSON errors too
        ("GET", &format!("{base}/v1/jobs/%ff"), None, None, 400),
        (
            "DELETE",
            &format!("{base}/v1/jobs/%ff"),
            Some(TOKEN),
            None,
            400,
        ),
        ("POST", reconcile.as_str(), Some(TOKEN), Some("[]"), 400),
        (
            "POST",
            reconcile.as_str(),
            Some(TOKEN),
            Some(&oversized),
            413,
        ),
    ] {
        let (status, json) = api(method, url, token, body).await;
        assert_eq!(status, want, "{method} {url} {body:?}: {json}");
        assert!(
            json["error"]["message"].is_string(),
            "{method} {url}: {json}"
        );
    }
    // the bearer scheme is case-insensitive
    let resp = reqwest::Client::new()
        .post(&reconcile)
        .header("Authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    // every documented route answers
    let (_, doc) = api("GET", &format!("{base}/openapi.json"), None, None).await;
    assert_eq!(doc["openapi"], "3.0.3");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_mutations_are_refused() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[daemon]\nschedules_dir = \"{}\"\n",
            dir.path().display()
        ),
        ..ConfigBuilder::default()
    };
    let d = Daemon::start(Arc::new(cfg.settings(&db, addr)))
        .await
        .unwrap();
    let (status, body) = api(
        "POST",
        &format!("http://{}/v1/resources/users/reconcile", d.addr),
        Some("anything"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_fire_and_abandoned_jobs_are_failed() {
    let s = setup(Backend::Sqlite, 50, 100).await;
    std::fs::write(
        s.schedules.path().join("users.toml"),
        "[[schedule]]\nresource = \"users\"\nmode = \"repair-only\"\ncron = \"* * * * * *\"\ntimezone = \"Europe/Paris\"\n",
    )
    .unwrap();
    // a job a crash left running
    let store = AnyStore::open(&s.settings.store.url, 2).await.unwrap();
    let mut stale = Job::queued("users", Trigger::Http, Mode::Full, false, false);
    stale.status = JobStatus::Running;
    store.save_job(&stale).await.unwrap();

    let d = Daemon::start(s.settings.clone()).await.unwrap();
    let base = format!("http://{}", d.addr);
    let recovered = store.get_job(stale.id).await.unwrap().unwrap();
    assert_eq!(recovered.status, JobStatus::Failed);
    assert!(recovered.reason.unwrap().contains("abandoned"));

    let deadline = Instant::now() + Duration::from_secs(10);
    let job = loop {
        let (_, jobs) = api(
            "GET",
            // repair-only leaves the ghost row: drift found, not succeeded
            &format!("{base}/v1/jobs?status=drift_found"),
            None,
            None,
        )
        .await;
        if let Some(j) = jobs["jobs"]
            .as_array()
            .and_then(|a| a.iter().find(|j| j["trigger"] == "schedule"))
        {
            break j.clone();
        }
        assert!(Instant::now() < deadline, "no scheduled job ran: {jobs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["mode"], "repair-only");
    let (_, res) = api("GET", &format!("{base}/v1/resources"), None, None).await;
    assert!(res["resources"][0]["next_run_at"].is_string(), "{res}");
    d.stop().await;
}

fn driftd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_driftd"))
}

#[test]
fn schedules_command_lists_next_fires_and_rejects_bad_entries() {
    let dir = tempfile::tempdir().unwrap();
    let sched = dir.path().join("schedules");
    std::fs::create_dir(&sched).unwrap();
    std::fs::write(
        sched.join("nightly.toml"),
        "[[schedule]]\nresource = \"users\"\ncron = \"0 3 * * *\"\ntimezone = \"America/Montreal\"\njitter_secs = 30\n",
    )
    .unwrap();
    let config = dir.path().join("driftd.toml");
    std::fs::write(
        &config,
        "[store]\nurl = \"sqlite::memory:\"\n[resources.users]\nupstream = { base_url = \"http://127.0.0.1:9\", list_path = \"/u\", key_order = \"asc\" }\nkey = { upstream = \"/uuid\", column = \"uuid\" }\nlocal = { table = \"users\" }\n",
    )
    .unwrap();
    let out = driftd()
        .args(["schedules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("    next ").count(), 3, "{text}");
    assert!(
        text.contains("nightly.toml#1") && text.contains("America/Montreal"),
        "{text}"
    );

    std::fs::write(
        sched.join("typo.toml"),
        "[[schedule]]\nresource = \"users\"\ncron = \"0 25 * * *\"\n",
    )
    .unwrap();
    let out = driftd()
        .args(["schedules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("typo.toml") && err.contains("#1") && err.contains("`cron`"),
        "{err}"
    );
}

/// A `driftd run` process on its own port.
struct Process {
    child: Child,
    base: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn_run(config_text: &str, dir: &std::path::Path, name: &str) -> Process {
    let port = free_port();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        config_text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let child = driftd()
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start driftd run");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(Instant::now() < deadline, "driftd run did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Process { child, base }
}

fn sigterm(p: &Process) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_pass_exits_cleanly_with_the_table_consistent() {
    let s = setup(Backend::Sqlite, 300, 100).await;
    s.up.inject(Fault::Delay {
        offset: 200,
        ms: 3_000,
    });
    let before = s.db.keys("users").await;
    let cfg = ConfigBuilder {
        tail: tail(s.schedules.path(), "127.0.0.1:0"),
        ..ConfigBuilder::default()
    }
    .toml(
        &s.db,
        s.settings.resources["users"]
            .upstream
            .base_url
            .trim_start_matches("http://")
            .parse()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn_run(&cfg, dir.path(), "a").await;
    let (_, started) = api(
        "POST",
        &format!("{}/v1/resources/users/reconcile", p.base),
        Some(TOKEN),
        None,
    )
    .await;
    let id = started["job_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopping = Instant::now();
    sigterm(&p);
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "driftd did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    let store = AnyStore::open(&s.settings.store.url, 1).await.unwrap();
    let job = store.get_job(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Cancelled, "{job:?}");
    assert_eq!(s.db.keys("users").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let s = setup(Backend::Sqlite, 300, 100).await;
    // The pass confirms its purge candidate (the ghost) with a get-by-key
    // request that hangs until its timeout: the graceful stop waits for it.
    s.up.inject(Fault::SlowGet { ms: 30_000 });
    let addr = s.settings.resources["users"]
        .upstream
        .base_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let cfg = ConfigBuilder {
        tail: tail(s.schedules.path(), "127.0.0.1:0"),
        ..ConfigBuilder::default()
    }
    .toml(&s.db, addr);
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn_run(&cfg, dir.path(), "a").await;
    api(
        "POST",
        &format!("{}/v1/resources/users/reconcile", p.base),
        Some(TOKEN),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&p);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = Instant::now();
    sigterm(&p);
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(1),
            "a second SIGTERM did not force the exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_never_run_a_resource_at_once() {
    let s = setup(Backend::Postgres, 300, 100).await;
    s.up.inject(Fault::Delay {
        offset: 100,
        ms: 1_500,
    });
    let addr = s.settings.resources["users"]
        .upstream
        .base_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: tail(s.schedules.path(), "127.0.0.1:0"),
        ..ConfigBuilder::default()
    }
    .toml(&s.db, addr);
    let a = spawn_run(&cfg, dir.path(), "a").await;
    let b = spawn_run(&cfg, dir.path(), "b").await;
    let (_, ja) = api(
        "POST",
        &format!("{}/v1/resources/users/reconcile", a.base),
        Some(TOKEN),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, jb) = api(
        "POST",
        &format!("{}/v1/resources/users/reconcile", b.base),
        Some(TOKEN),
        None,
    )
    .await;
    let ja = wait_job(&a.base, ja["job_id"].as_str().unwrap()).await;
    let jb = wait_job(&b.base, jb["job_id"].as_str().unwrap()).await;
    assert_eq!(ja["status"], "succeeded", "{ja}");
    assert_eq!(jb["status"], "skipped", "{jb}");
    assert!(jb["reason"].as_str().unwrap().starts_with("locked"), "{jb}");
    // filters work on PostgreSQL too
    let (_, skipped) = api(
        "GET",
        &format!("{}/v1/jobs?resource=users&status=skipped", a.base),
        None,
        None,
    )
    .await;
    assert_eq!(
        skipped["jobs"].as_array().map(Vec::len),
        Some(1),
        "{skipped}"
    );
    assert_eq!(skipped["jobs"][0]["id"], jb["id"]);
    // the lock is released: b can run it now
    let (_, again) = api(
        "POST",
        &format!("{}/v1/resources/users/reconcile", b.base),
        Some(TOKEN),
        None,
    )
    .await;
    let again = wait_job(&b.base, again["job_id"].as_str().unwrap()).await;
    assert_eq!(again["status"], "succeeded", "{again}");
    assert_eq!(s.db.count("users").await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_remote_waits_for_the_job() {
    let s = setup(Backend::Sqlite, 100, 100).await;
    let d = Daemon::start(s.settings.clone()).await.unwrap();
    let base = format!("http://{}", d.addr);
    let out = tokio::task::spawn_blocking(move || {
        driftd()
            .args(["reconcile", "users", "--remote", &base, "--json"])
            .env("DRIFTD_ADMIN__TOKEN", TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["report"]["actions"]["purge"], json!(1));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let mut local = users(200);
    local.push(ghost(1));
    db.insert_users(&local).await;
    let (_up, addr) = upstream(users(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        policy: "max_purge_count = 0".into(),
        tail: format!("{}{}", tail(dir.path(), "127.0.0.1:0"), crate::events::BUS),
        ..ConfigBuilder::default()
    };
    let d = Daemon::start(Arc::new(cfg.settings(&db, addr)))
        .await
        .unwrap();
    let base = format!("http://{}", d.addr);
    // Events: one applied (with its own time, for the lag), one poison.
    let events = format!("{base}/v1/events/bus");
    let mut edited = users(1)[0].clone();
    edited["firstname"] = json!("Evented");
    for (body, want) in [
        (
            json!({"name": "user_created", "timestamp": "2026-01-01T00:00:00Z", "data": edited}),
            "applied",
        ),
        (json!({"name": "user_deleted", "data": {}}), "dead_lettered"),
    ] {
        let (status, out) = api("POST", &events, Some(TOKEN), Some(&body.to_string())).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["event"]["outcome"], want, "{out}");
    }
    let url = format!("{base}/v1/resources/users/reconcile");
    // a guard trip, then a forced repair, then a pass in sync
    for (body, want) in [
        ("{}", "guard_tripped"),
        (r#"{"force": true}"#, "succeeded"),
        ("{}", "succeeded"),
    ] {
        let (_, started) = api("POST", &url, Some(TOKEN), Some(body)).await;
        let job = wait_job(&base, started["job_id"].as_str().unwrap()).await;
        assert_eq!(job["status"], want, "{job}");
    }
    crate::prometheus::check_dashboard(&format!("{base}/metrics"), &[]).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_passes_run_when_the_worker_starts() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&[ghost(3)]).await;
    let (_up, addr) = upstream(users(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: tail(dir.path(), "127.0.0.1:0")
            .replace("[daemon]\n", "[daemon]\nstartup = [\"users\"]\n"),
        ..ConfigBuilder::default()
    };
    let d = Daemon::start(Arc::new(cfg.settings(&db, addr)))
        .await
        .unwrap();
    d.runner.idle().await;
    let base = format!("http://{}", d.addr);
    let (_, jobs) = api("GET", &format!("{base}/v1/jobs"), None, None).await;
    assert_eq!(jobs["jobs"][0]["trigger"], "startup", "{jobs}");
    assert_eq!(jobs["jobs"][0]["status"], "succeeded", "{jobs}");
    assert_eq!(db.count("users").await, 20);
    d.stop().await;
}

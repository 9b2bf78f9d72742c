//! Incremental runs against a change feed served by the test (a real HTTP
//! server on loopback): the feed is applied page by page with its
//! checkpoint; a run killed with SIGKILL mid-way resumes from the last
//! checkpoint it committed and converges; a broken feed stops the run
//! without moving the checkpoint past what it could not read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json as AxumJson, Router};
use driftd::pass::{Mode, Outcome, PassOptions};
use driftd::store::Ledger;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;

/// A change feed: `GET /changes?since=R` answers the changes after
/// revision `R`, at most `PAGE`, and the revision of the last one.
#[derive(Default)]
struct Feed {
    /// (revision, item), in revision order.
    log: Mutex<Vec<(u64, Json)>>,
    /// The `since` of every request, in order.
    asked: Mutex<Vec<String>>,
    /// The second request with this `since` (a run reads the feed twice:
    /// counting, then applying) waits this long before answering.
    slow: Mutex<Option<(String, Duration)>>,
    /// A `since` below this revision has expired: 410 Gone.
    expired_before: Mutex<u64>,
}

const PAGE: usize = 50;

impl Feed {
    fn push(&self, item: Json) {
        let mut log = self.log.lock().unwrap();
        let rev = log.len() as u64 + 1;
        log.push((rev, item));
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

async fn changes(
    State(feed): State<Arc<Feed>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let since: u64 = q.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
    if since < *feed.expired_before.lock().unwrap() {
        return (axum::http::StatusCode::GONE, "revision expired").into_response();
    }
    page(State(feed), Query(q)).await.into_response()
}

async fn page(
    State(feed): State<Arc<Feed>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> AxumJson<Json> {
    let since = q.get("since").cloned().unwrap_or_default();
    let times = {
        let mut asked = feed.asked.lock().unwrap();
        asked.push(since.clone());
        asked.iter().filter(|s| **s == since).count()
    };
    let slow = feed.slow.lock().unwrap().clone();
    if let Some((at, wait)) = slow {
        if at == since && times == 2 {
            tokio::time::sleep(wait).await;
        }
    }
    let from: u64 = since.parse().unwrap_or(0);
    let log = feed.log.lock().unwrap();
    let page: Vec<&(u64, Json)> = log.iter().filter(|(r, _)| *r > from).take(PAGE).collect();
    let next = page.last().map_or(from, |(r, _)| *r);
    AxumJson(json!({
        "items": page.iter().map(|(_, i)| i.clone()).collect::<Vec<_>>(),
        "next_revision": next.to_string(),
    }))
}

async fn serve(feed: Arc<Feed>) -> SocketAddr {
    let app = Router::new()
        .route("/0.1/users/changes", get(changes))
        .with_state(feed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The test feed, as the config names it.
const FEED: &str = r#"
[resources.users.incremental]
path = "/0.1/users/changes"
since_param = "since"
cursor_pointer = "/next_revision"
items_pointer = "/items"
deleted_pointer = "/deleted"
"#;

fn builder() -> ConfigBuilder {
    ConfigBuilder {
        tail: FEED.into(),
        ..ConfigBuilder::default()
    }
}

fn config(db: &TestDb, addr: SocketAddr) -> driftd::config::Settings {
    builder().settings(db, addr)
}

/// Creates of `n` users, edits of every fourth, deletes of every tenth;
/// returns what the table must hold after.
fn fill(feed: &Feed, from: u64, n: u64) -> BTreeMap<String, Json> {
    let mut expected = BTreeMap::new();
    for i in from..from + n {
        let mut u = driftd::sample::user(i, TENANTS);
        feed.push(u.clone());
        if i % 4 == 0 {
            u["firstname"] = json!(format!("Edited{i}"));
            feed.push(u.clone());
        }
        if i % 10 == 9 {
            feed.push(json!({"uuid": u["uuid"], "deleted": true}));
        } else {
            expected.insert(u["uuid"].as_str().unwrap().to_string(), u);
        }
    }
    expected
}

async fn checkpoint(settings: &driftd::config::Settings) -> Option<String> {
    let store = driftd::store::AnyStore::open(&settings.store.url, 2)
        .await
        .unwrap();
    store.checkpoint("users").await.unwrap()
}

fn incremental() -> PassOptions {
    PassOptions {
        mode: Mode::Incremental,
        ..PassOptions::default()
    }
}

async fn an_incremental_run_applies_the_feed_from_its_checkpoint(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let feed = Arc::new(Feed::default());
    let mut expected = fill(&feed, 0, 200);
    let addr = serve(feed.clone()).await;
    let s = config(&db, addr);
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_users(&db, &expected, 9).await;
    let last = feed.log.lock().unwrap().len().to_string();
    assert_eq!(checkpoint(&s).await.as_deref(), Some(last.as_str()));
    assert_eq!(r.actions.purge, 20, "{r:?}");
    // Caught up: one request, from the checkpoint, nothing changes.
    let before = feed.asked().len();
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
    assert_eq!(feed.asked()[before..], *std::slice::from_ref(&last));
    // New changes: only they are asked for and applied.
    expected.extend(fill(&feed, 200, 30));
    let before = feed.asked().len();
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(feed.asked()[before], last);
    assert_users(&db, &expected, 9).await;
}

/// SIGKILL while the run waits for a page: the pages before it are
/// applied with their checkpoint; the next run asks from there (not from
/// the start) and converges.
async fn an_incremental_run_killed_midway_resumes_from_its_checkpoint(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let feed = Arc::new(Feed::default());
    let expected = fill(&feed, 0, 400);
    let addr = serve(feed.clone()).await;
    let s = config(&db, addr);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    let text = builder().toml(&db, addr);
    std::fs::write(&path, text).unwrap();
    // The fourth page hangs while the run applies.
    let stuck = (3 * PAGE).to_string();
    *feed.slow.lock().unwrap() = Some((stuck.clone(), Duration::from_secs(30)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["reconcile", "users", "--mode", "incremental", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while feed.asked().iter().filter(|s| **s == stuck).count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never reached the fourth page"
        );
        assert!(child.try_wait().unwrap().is_none(), "driftd exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(checkpoint(&s).await.as_deref(), Some(stuck.as_str()));
    assert_eq!(
        db.count("users").await as usize,
        // Three pages applied: the creates among their changes, minus
        // the deletes.
        {
            let log = feed.log.lock().unwrap();
            let mut keys = std::collections::BTreeSet::new();
            for (_, item) in log.iter().take(3 * PAGE) {
                let k = item["uuid"].as_str().unwrap().to_string();
                if item["deleted"] == true {
                    keys.remove(&k);
                } else {
                    keys.insert(k);
                }
            }
            keys.len()
        }
    );
    *feed.slow.lock().unwrap() = None;
    let before = feed.asked().len();
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(feed.asked()[before], stuck, "resumed from the checkpoint");
    assert_users(&db, &expected, 9).await;
}

/// A change the run cannot read fails it, naming the change, before
/// anything is applied (the run reads the whole feed before it applies);
/// the checkpoint does not move, so nothing is skipped.
async fn a_broken_feed_stops_without_skipping(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let feed = Arc::new(Feed::default());
    fill(&feed, 0, 60);
    feed.push(json!({"uuid": "not-a-uuid", "firstname": "X"}));
    fill(&feed, 60, 10);
    let addr = serve(feed.clone()).await;
    let s = config(&db, addr);
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    let error = r.error.unwrap_or_default();
    assert!(
        error.contains("change ") && error.contains("since="),
        "{error}"
    );
    assert_eq!(checkpoint(&s).await, None);
    assert_eq!(db.count("users").await, 0);
    // Run again: it fails the same way, from the same place.
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(checkpoint(&s).await, None);
}

both_backends!(
    an_incremental_run_applies_the_feed_from_its_checkpoint,
    an_incremental_run_killed_midway_resumes_from_its_checkpoint,
    a_broken_feed_stops_without_skipping,
    a_deleted_marker_in_another_spelling_deletes,
    an_expired_checkpoint_can_be_reset,
);

/// A deleted marker spelled `1` or `"true"` where the config says `true`
/// deletes the row; it is never upserted as a live one.
async fn a_deleted_marker_in_another_spelling_deletes(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let feed = Arc::new(Feed::default());
    let all = users(3);
    for u in &all {
        feed.push(u.clone());
    }
    feed.push(json!({"uuid": all[0]["uuid"], "deleted": 1}));
    feed.push(json!({"uuid": all[1]["uuid"], "deleted": "TRUE"}));
    let mut live = all[2].clone();
    live["deleted"] = json!("false");
    feed.push(live);
    let addr = serve(feed.clone()).await;
    let s = config(&db, addr);
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(
        db.keys("users").await,
        [all[2]["uuid"].as_str().unwrap().to_string()].into(),
        "{r:?}"
    );
    // A marker that is neither: the run fails, the row is not touched.
    feed.push(json!({"uuid": all[2]["uuid"], "deleted": "perhaps"}));
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("perhaps"), "{r:?}");
    assert_eq!(db.count("users").await, 1);
}

/// A feed that no longer serves the stored checkpoint (410): every run
/// fails naming the way back; `driftd checkpoint reset` and `set` take it.
async fn an_expired_checkpoint_can_be_reset(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let feed = Arc::new(Feed::default());
    let mut expected = fill(&feed, 0, 20);
    let addr = serve(feed.clone()).await;
    let s = config(&db, addr);
    assert_eq!(pass(&s, incremental()).await.outcome, Outcome::Repaired);
    let at: u64 = checkpoint(&s).await.unwrap().parse().unwrap();
    // The feed moves on and forgets everything before.
    expected.extend(fill(&feed, 20, 10));
    *feed.expired_before.lock().unwrap() = at + 5;
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("no longer serves checkpoint")
            && error.contains("driftd checkpoint reset users"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    std::fs::write(&path, builder().toml(&db, addr)).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Json>(&out.stdout).unwrap()
    };
    assert_eq!(
        cli(&["checkpoint", "show", "users"])["checkpoint"],
        at.to_string()
    );
    // Reset: read from `initial` (0), which has expired too here.
    assert_eq!(
        cli(&["checkpoint", "reset", "users"])["checkpoint"],
        Json::Null
    );
    assert_eq!(checkpoint(&s).await, None);
    // Set to the feed's first revision still served (after a full pass,
    // which this feed-only upstream has no listing for).
    let from = (at + 5).to_string();
    cli(&["checkpoint", "set", "users", &from]);
    let r = pass(&s, incremental()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(
        checkpoint(&s).await.as_deref(),
        Some(feed.log.lock().unwrap().len().to_string().as_str())
    );
}

#[test]
fn incremental_config_and_schedules_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let text = |inc: &str| {
        format!(
            r#"
[store]
url = "sqlite://{db}"
[resources.users]
key = {{ upstream = "/uuid", column = "uuid", type = "uuid" }}
local = {{ table = "users" }}
[resources.users.upstream]
base_url = "http://127.0.0.1:9"
list_path = "/users"
key_order = "asc"
[resources.users.columns]
name = {{ from = "/name" }}
{inc}
"#,
            db = dir.path().join("t.db").display()
        )
    };
    let err = driftd::config::Settings::from_toml_str(
        &text("[resources.users.incremental]\ncursor_pointer = \"/next\"\n"),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("since_param"), "{err}");
    let err = driftd::config::Settings::from_toml_str(
        &text(
            "[resources.users.incremental]\nsince_param = \"since\"\ncursor_pointer = \"next\"\n",
        ),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("incremental.cursor_pointer"), "{err}");
    // A schedule of incremental runs for a resource without a feed.
    let config = dir.path().join("driftd.toml");
    let schedules = dir.path().join("schedules");
    std::fs::create_dir(&schedules).unwrap();
    std::fs::write(
        &config,
        format!(
            "{}\n[daemon]\nschedules_dir = \"{}\"\n",
            text(""),
            schedules.display()
        ),
    )
    .unwrap();
    std::fs::write(
        schedules.join("feed.toml"),
        "[[schedule]]\nresource = \"users\"\ncron = \"*/5 * * * *\"\nmode = \"incremental\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["schedules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("feed.toml")
            && err.contains("`mode`")
            && err.contains("[resources.users.incremental]"),
        "{err}"
    );
}

/// Through the worker's API: the job records the incremental mode and
/// succeeds, and it is not a last success (a full pass proves the table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_job_through_the_api_is_not_a_last_success() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let feed = Arc::new(Feed::default());
    let expected = fill(&feed, 0, 60);
    let addr = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = ConfigBuilder {
        tail: format!("{FEED}{}", open_worker_tail(dir.path())),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let d = driftd::daemon::Daemon::start(Arc::new(s)).await.unwrap();
    let base = format!("http://{}", d.addr);
    let (status, body) = crate::daemon::api(
        "POST",
        &format!("{base}/v1/resources/users/reconcile"),
        None,
        Some(r#"{"mode": "incremental"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = crate::daemon::wait_job(&base, body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["mode"], "incremental", "{job}");
    assert_users(&db, &expected, 7).await;
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"driftd_last_success_timestamp_seconds{resource="users"} 0"#),
        "{metrics}"
    );
    assert!(d.stop().await);
}

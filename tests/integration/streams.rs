//! The Redis Streams source against a real server (Debian's redis-server,
//! started by the test script on loopback): entries added to the stream
//! reach the table within a second; a `driftd run` killed with SIGKILL
//! while entries flow loses none; entries left pending by a dead consumer
//! are taken over; an entry delivered too often becomes a dead letter.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftd::config::Settings;
use redis::aio::MultiplexedConnection;
use redis::Value;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;

/// The server the test script started. Missing is a failure, not a skip.
pub fn redis_url() -> String {
    std::env::var("DRIFTD_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("DRIFTD_TEST_REDIS_URL is not set: run the suite with ./scripts/test.sh, which starts Redis")
    })
}

pub async fn redis() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis")
}

/// A stream key of its own per test: tests share one server.
pub fn stream_name() -> String {
    format!("driftd-test-{:x}", fastrand::u64(..))
}

/// What every test here starts with: an empty `users` table, an upstream
/// (for refetches), a directory, a stream name of its own.
pub struct Setup {
    pub db: TestDb,
    pub _up: Arc<driftd::sample::SampleUpstream>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub stream: String,
}

pub async fn setup(backend: Backend) -> Setup {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    Setup {
        db,
        _up,
        addr,
        dir: tempfile::tempdir().unwrap(),
        stream: stream_name(),
    }
}

pub async fn drop_stream(con: &mut MultiplexedConnection, stream: &str) {
    let _: i64 = redis::cmd("DEL")
        .arg(stream)
        .query_async(con)
        .await
        .unwrap();
}

/// `[sources.bus]` reading `stream`; `extra` goes in `[sources.bus.redis]`.
pub fn source(stream: &str, extra: &str) -> String {
    format!(
        r#"
[sources.bus]
kind = "redis"
name_header = "name"
batch_size = 100
[sources.bus.redis]
url = "{url}"
stream = "{stream}"
group = "driftd"
consumer = "driftd-test"
max_backoff_secs = 1
block_ms = 500
{extra}
[sources.bus.events]
user_created = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
user_edited = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
user_deleted = {{ resource = "users", op = "delete", key = "/data/uuid" }}
"#,
        url = redis_url(),
    )
}

pub fn settings(
    db: &TestDb,
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    src: &str,
) -> Arc<Settings> {
    let cfg = ConfigBuilder {
        tail: format!("{}{}", open_worker_tail(dir), src),
        ..ConfigBuilder::default()
    };
    Arc::new(cfg.settings(db, addr))
}

/// XADD an event as a producer would: its name in field `name`, the JSON
/// body in `payload`. Returns the entry id.
pub async fn add(con: &mut MultiplexedConnection, stream: &str, name: &str, data: &Json) -> String {
    let body = json!({
        "name": name,
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "data": data,
    });
    redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("name")
        .arg(name)
        .arg("payload")
        .arg(body.to_string())
        .query_async(con)
        .await
        .expect("XADD")
}

/// Waits until no entry of `stream` is pending in the group: every entry
/// read was acknowledged.
pub async fn all_acked(con: &MultiplexedConnection, stream: &str, within: Duration) {
    eventually(within, "every entry acknowledged", || {
        let mut con = con.clone();
        async move {
            let p = pending(&mut con, stream).await;
            p.is_empty().then_some(()).ok_or(format!("pending: {p:?}"))
        }
    })
    .await;
}

/// Runs a command; fails the test on an error.
pub async fn raw(con: &mut MultiplexedConnection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Entries pending in the group, by consumer.
pub async fn pending(con: &mut MultiplexedConnection, stream: &str) -> BTreeMap<String, i64> {
    let reply: Value = match redis::cmd("XPENDING")
        .arg(stream)
        .arg("driftd")
        .query_async(con)
        .await
    {
        Ok(v) => v,
        // Not created yet.
        Err(e) if e.code() == Some("NOGROUP") => return BTreeMap::new(),
        Err(e) => panic!("XPENDING: {e}"),
    };
    let mut out = BTreeMap::new();
    if let Value::Array(parts) = reply {
        if let Some(Value::Array(consumers)) = parts.get(3) {
            for c in consumers {
                if let Value::Array(pair) = c {
                    if let (Some(Value::BulkString(name)), Some(Value::BulkString(n))) =
                        (pair.first(), pair.get(1))
                    {
                        out.insert(
                            String::from_utf8_lossy(name).into_owned(),
                            String::from_utf8_lossy(n).parse().unwrap(),
                        );
                    }
                }
            }
        }
    }
    out
}

async fn entries_show_up_within_a_second(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let (d, base) = start_connected(settings(&db, addr, dir.path(), &source(&stream, ""))).await;
    let s = sources(&base).await;
    assert_eq!(s["sources"][0]["kind"], "redis", "{s}");
    let mut con = redis().await;
    for (i, u) in users(5).into_iter().enumerate() {
        let key = u["uuid"].as_str().unwrap().to_string();
        let added = Instant::now();
        add(&mut con, &stream, "user_created", &u).await;
        eventually(
            Duration::from_secs(1),
            "an entry reaches the table within a second",
            || {
                let db = &db;
                let key = key.clone();
                async move {
                    (db.keys("users").await.contains(&key))
                        .then_some(())
                        .ok_or(format!("entry {i} not applied yet"))
                }
            },
        )
        .await;
        assert!(added.elapsed() < Duration::from_secs(1));
    }
    add(
        &mut con,
        &stream,
        "user_deleted",
        &json!({"uuid": users(1)[0]["uuid"]}),
    )
    .await;
    eventually(Duration::from_secs(2), "the delete applies", || async {
        (db.count("users").await == 4)
            .then_some(())
            .ok_or("not yet".into())
    })
    .await;
    // Acknowledged once applied: nothing pending.
    all_acked(&con, &stream, Duration::from_secs(2)).await;
    let (_, readyz) = crate::daemon::api("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(readyz["status"], "ready", "{readyz}");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains(r#"driftd_events_total{outcome="applied",resource="users",source="bus"} 6"#),
        "{metrics}"
    );
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// A `driftd run` process.
/// A `driftd` child process, killed when dropped.
pub(crate) struct Process(pub(crate) Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `driftd run` with `config`, its output discarded.
pub(crate) fn spawn_run(config: &std::path::Path) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start driftd run"),
    )
}

/// SIGKILL while a burst of entries is being applied (entries read, not
/// yet acknowledged), twice: every entry is applied, in order (a user
/// deleted after its creation stays deleted), none is left pending.
async fn sigkill_mid_stream_loses_none(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let schedules = dir.path().join("schedules");
    std::fs::create_dir(&schedules).unwrap();
    let cfg = ConfigBuilder {
        tail: format!("{}{}", open_worker_tail(&schedules), source(&stream, "")),
        ..ConfigBuilder::default()
    };
    let path = dir.path().join("driftd.toml");
    std::fs::write(&path, cfg.toml(&db, addr)).unwrap();
    let mut con = redis().await;
    // Creates, edits of every third, deletes of every tenth, in order.
    let mut ops: Vec<(&str, Json)> = Vec::new();
    let mut expected: BTreeMap<String, Json> = BTreeMap::new();
    for (i, mut u) in users(1500).into_iter().enumerate() {
        ops.push(("user_created", u.clone()));
        if i % 3 == 0 {
            u["firstname"] = json!(format!("Edited{i}"));
            ops.push(("user_edited", u.clone()));
        }
        if i % 10 == 9 {
            ops.push(("user_deleted", json!({"uuid": u["uuid"]})));
        } else {
            expected.insert(u["uuid"].as_str().unwrap().to_string(), u);
        }
    }
    let mut run = spawn_run(&path);
    let bursts: Vec<_> = ops.chunks(ops.len() / 3 + 1).collect();
    for (n, burst) in bursts.iter().enumerate() {
        let mut pipe = redis::pipe();
        for (name, data) in burst.iter() {
            let body = json!({"name": name, "data": data});
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("name")
                .arg(*name)
                .arg("payload")
                .arg(body.to_string())
                .ignore();
        }
        let _: () = pipe.query_async(&mut con).await.unwrap();
        if n == bursts.len() - 1 {
            break;
        }
        // Kill while the consumer holds entries it read but has not
        // acknowledged: SIGKILL, no chance to acknowledge what it applied.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(run.0.try_wait().unwrap().is_none(), "driftd run exited");
            let held = pending(&mut con, &stream)
                .await
                .get("driftd-test")
                .copied()
                .unwrap_or(0);
            if held > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "driftd never read the burst");
        }
        drop(run);
        assert!(
            pending(&mut con, &stream)
                .await
                .get("driftd-test")
                .copied()
                .unwrap_or(0)
                > 0,
            "killed mid-batch"
        );
        run = spawn_run(&path);
    }
    eventually(Duration::from_secs(30), "every entry applied", || {
        let db = &db;
        let want = expected.len() as i64;
        async move {
            let n = db.count("users").await;
            (n == want)
                .then_some(())
                .ok_or(format!("{n} rows, want {want}"))
        }
    })
    .await;
    all_acked(&con, &stream, Duration::from_secs(5)).await;
    assert_users(&db, &expected, 5).await;
    drop(run);
    drop_stream(&mut con, &stream).await;
}

/// A consumer that read entries and died: after `claim_idle_secs` driftd
/// takes them over and applies them.
async fn entries_of_a_dead_consumer_are_taken_over(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let mut con = redis().await;
    raw(
        &mut con,
        &["XGROUP", "CREATE", &stream, "driftd", "0", "MKSTREAM"],
    )
    .await;
    let all = users(30);
    for u in &all {
        add(&mut con, &stream, "user_created", u).await;
    }
    // Another replica reads them all, then dies before acknowledging.
    raw(
        &mut con,
        &[
            "XREADGROUP",
            "GROUP",
            "driftd",
            "replica-b",
            "COUNT",
            "100",
            "STREAMS",
            &stream,
            ">",
        ],
    )
    .await;
    assert_eq!(pending(&mut con, &stream).await.get("replica-b"), Some(&30));
    let src = source(&stream, "claim_idle_secs = 0.5\nclaim_every_secs = 0.2");
    let (d, _) = start_connected(settings(&db, addr, dir.path(), &src)).await;
    eventually(
        Duration::from_secs(5),
        "the dead consumer's entries applied",
        || async {
            let n = db.count("users").await;
            (n == 30).then_some(()).ok_or(format!("{n} rows"))
        },
    )
    .await;
    all_acked(&con, &stream, Duration::from_secs(2)).await;
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// An entry that was delivered more than `max_deliveries` times (it killed
/// every consumer that took it) is kept as a dead letter, not applied; the
/// entries after it flow.
async fn an_entry_delivered_too_often_becomes_a_dead_letter(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let mut con = redis().await;
    raw(
        &mut con,
        &["XGROUP", "CREATE", &stream, "driftd", "0", "MKSTREAM"],
    )
    .await;
    let u = users(2);
    let poison = add(&mut con, &stream, "user_created", &u[0]).await;
    // Read by driftd's own consumer name three times (three crashes).
    for _ in 0..3 {
        raw(
            &mut con,
            &[
                "XREADGROUP",
                "GROUP",
                "driftd",
                "driftd-test",
                "COUNT",
                "1",
                "STREAMS",
                &stream,
                "0",
            ],
        )
        .await;
        raw(
            &mut con,
            &[
                "XREADGROUP",
                "GROUP",
                "driftd",
                "driftd-test",
                "COUNT",
                "1",
                "STREAMS",
                &stream,
                ">",
            ],
        )
        .await;
    }
    add(&mut con, &stream, "user_created", &u[1]).await;
    let src = source(&stream, "max_deliveries = 2");
    let (d, base) = start_connected(settings(&db, addr, dir.path(), &src)).await;
    eventually(Duration::from_secs(3), "the next entry applies", || async {
        let keys = db.keys("users").await;
        (keys.len() == 1 && keys.contains(u[1]["uuid"].as_str().unwrap()))
            .then_some(())
            .ok_or(format!("{keys:?}"))
    })
    .await;
    let (status, letters) =
        crate::daemon::api("GET", &format!("{base}/v1/dead-letters"), None, None).await;
    assert_eq!(status, 200, "{letters}");
    let list = letters["dead_letters"].as_array().expect("a list");
    assert_eq!(list.len(), 1, "{letters}");
    let error = list[0]["error"].as_str().unwrap();
    assert!(
        error.contains(&poison) && error.contains("max_deliveries = 2"),
        "{error}"
    );
    assert!(pending(&mut con, &stream).await.is_empty());
    // The dead letter applies once replayed.
    let id = list[0]["id"].as_str().unwrap();
    let (status, v) = crate::daemon::api(
        "POST",
        &format!("{base}/v1/dead-letters/{id}/replay"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(db.count("users").await, 2);
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// `[sources.bus]` with reprovision control events.
pub fn reprovision_source(stream: &str, reprovision: &str) -> String {
    format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\nid_pointer = \"/data/id\"\n{reprovision}\n",
        source(stream, "")
    )
}

pub async fn wait_rows(db: &TestDb, want: i64, what: &str) {
    eventually(Duration::from_secs(5), what, || async {
        let n = db.count("users").await;
        (n == want)
            .then_some(())
            .ok_or(format!("{n} rows, want {want}"))
    })
    .await;
}

pub async fn reprovisions(settings: &Settings) -> Vec<driftd::store::Reprovision> {
    use driftd::store::Ledger;
    let store = driftd::store::AnyStore::open(&settings.store.url, 2)
        .await
        .unwrap();
    store.reprovisions("bus", 10).await.unwrap()
}

pub fn key(u: &Json) -> String {
    u["uuid"].as_str().unwrap().to_string()
}

/// A reprovision cycle: the old rows serve until the completion, then
/// exactly the rows not re-sent (and not written by a live event since the
/// start) are purged, as a job of their own. `driftd replay` then rebuilds
/// the table after it was emptied by hand.
async fn a_reprovision_purges_exactly_what_was_not_resent(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let schedules = dir.path().join("schedules");
    std::fs::create_dir(&schedules).unwrap();
    let stream = stream_name();
    let src = reprovision_source(&stream, "completed = \"ReprovisionCompleted\"");
    let s = settings(&db, addr, &schedules, &src);
    let (d, base) = start_connected(s.clone()).await;
    let mut con = redis().await;
    let all = users(22);
    for u in &all[..20] {
        add(&mut con, &stream, "user_created", u).await;
    }
    wait_rows(&db, 20, "the first generation applied").await;
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "r1"}),
    )
    .await;
    // Re-sent: users 0..15, user 3 with a new name.
    for (i, u) in all[..15].iter().enumerate() {
        let mut u = u.clone();
        if i == 3 {
            u["firstname"] = json!("Renamed");
        }
        add(&mut con, &stream, "user_created", &u).await;
    }
    // Live traffic meanwhile: user 15 edited, user 20 created, user 14
    // deleted.
    let mut edited = all[15].clone();
    edited["firstname"] = json!("Live");
    add(&mut con, &stream, "user_edited", &edited).await;
    add(&mut con, &stream, "user_created", &all[20]).await;
    add(
        &mut con,
        &stream,
        "user_deleted",
        &json!({"uuid": all[14]["uuid"]}),
    )
    .await;
    // The old rows serve until the reprovision completes: 20 + 1 - 1.
    wait_rows(&db, 20, "old rows kept while the reprovision runs").await;
    // A completion of another reprovision id is ignored.
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r0"}),
    )
    .await;
    add(&mut con, &stream, "user_created", &all[21]).await;
    wait_rows(&db, 21, "nothing purged by a foreign completion").await;
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r1"}),
    )
    .await;
    // 0..14 re-sent (14 deleted live), 15 edited live, 20 and 21 created
    // live: 16..19 purged.
    let mut want: std::collections::BTreeSet<String> = all[..14].iter().map(key).collect();
    for i in [15, 20, 21] {
        want.insert(key(&all[i]));
    }
    eventually(
        Duration::from_secs(5),
        "exactly the rows not re-sent purged",
        || {
            let db = &db;
            let want = want.clone();
            async move {
                let keys = db.keys("users").await;
                (keys == want)
                    .then_some(())
                    .ok_or(format!("{} rows", keys.len()))
            }
        },
    )
    .await;
    let renamed = db
        .text(&format!(
            "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{}'",
            key(&all[3])
        ))
        .await;
    assert_eq!(renamed, vec![Some("Renamed".to_string())]);
    let r = reprovisions(&s).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].state, "completed", "{r:?}");
    assert_eq!(r[0].event_id.as_deref(), Some("r1"));
    assert_eq!(r[0].jobs.len(), 1);
    let (status, job) = crate::daemon::api(
        "GET",
        &format!("{base}/v1/jobs/{}", r[0].jobs[0]),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["trigger"], "reprovision", "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["report"]["actions"]["purge"], 4, "{job}");
    assert!(d.stop().await);

    // Emptied by hand, the table is rebuilt from the stream, from the
    // reprovision's start on; nothing is purged by the replay.
    db.exec("DELETE FROM users").await;
    let config = dir.path().join("driftd.toml");
    let cfg = ConfigBuilder {
        tail: format!("{}{}", open_worker_tail(&schedules), src),
        ..ConfigBuilder::default()
    };
    std::fs::write(&config, cfg.toml(&db, addr)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["replay", "bus", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["from"].as_str(),
        r[0].position.as_deref(),
        "{report}"
    );
    assert_eq!(db.keys("users").await, want, "{report}");
    drop_stream(&mut con, &stream).await;
}

/// A new start before the completion abandons the open reprovision, and a
/// timeout abandons one that never completes: neither purges anything.
async fn an_abandoned_reprovision_purges_nothing(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = reprovision_source(
        &stream,
        "completed = \"ReprovisionCompleted\"\ntimeout_secs = 2",
    );
    let s = settings(&db, addr, dir.path(), &src);
    let (d, _) = start_connected(s.clone()).await;
    let mut con = redis().await;
    let all = users(10);
    for u in &all {
        add(&mut con, &stream, "user_created", u).await;
    }
    wait_rows(&db, 10, "seeded").await;
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "r1"}),
    )
    .await;
    for u in &all[..3] {
        add(&mut con, &stream, "user_created", u).await;
    }
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "r2"}),
    )
    .await;
    add(&mut con, &stream, "user_created", &all[0]).await;
    // The abandoned one's completion changes nothing.
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r1"}),
    )
    .await;
    eventually(Duration::from_secs(5), "r1 abandoned, r2 times out", || {
        let s = s.clone();
        async move {
            let r = reprovisions(&s).await;
            let states: Vec<&str> = r.iter().map(|r| r.state.as_str()).collect();
            (states == ["abandoned", "abandoned"])
                .then_some(())
                .ok_or(format!("{states:?}"))
        }
    })
    .await;
    // Completed after its timeout: too late, nothing is open.
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r2"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(db.count("users").await, 10);
    let r = reprovisions(&s).await;
    assert!(r.iter().all(|r| r.jobs.is_empty()), "{r:?}");
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// Without a completion event, a quiet source completes the reprovision;
/// one that re-sent too little trips the purge guard and purges nothing.
async fn a_quiet_reprovision_completes_behind_the_purge_guard(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let cfg = ConfigBuilder {
        tail: format!(
            "{}{}",
            open_worker_tail(dir.path()),
            reprovision_source(&stream, "quiet_secs = 1")
        ),
        policy: "max_purge_fraction = 0.5\nmax_purge_count = 1000".into(),
        ..ConfigBuilder::default()
    };
    let s = Arc::new(cfg.settings(&db, addr));
    let (d, _) = start_connected(s.clone()).await;
    let mut con = redis().await;
    let all = users(10);
    for u in &all {
        add(&mut con, &stream, "user_created", u).await;
    }
    wait_rows(&db, 10, "seeded").await;
    // Re-sends 7 of 10: 3 purged once quiet.
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "q1"}),
    )
    .await;
    for u in &all[..7] {
        add(&mut con, &stream, "user_created", u).await;
    }
    wait_rows(&db, 7, "the rows not re-sent purged once quiet").await;
    // Re-sends 2 of 7: 71% would go, above the 50% guard.
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "q2"}),
    )
    .await;
    for u in &all[..2] {
        add(&mut con, &stream, "user_created", u).await;
    }
    eventually(
        Duration::from_secs(5),
        "q2 ends incomplete (guard tripped)",
        || {
            let s = s.clone();
            async move {
                let r = reprovisions(&s).await;
                let states: Vec<&str> = r.iter().map(|r| r.state.as_str()).collect();
                (states == ["incomplete", "completed"])
                    .then_some(())
                    .ok_or(format!("{states:?}"))
            }
        },
    )
    .await;
    assert_eq!(db.count("users").await, 7);
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// Quiet time counts only while the source is connected: a source that
/// cannot read may have re-sent rows waiting, which must not be purged.
async fn quiet_time_does_not_count_while_the_source_is_down(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let s = settings(
        &db,
        addr,
        dir.path(),
        &reprovision_source(&stream, "quiet_secs = 1.5"),
    );
    let events = crate::events::engine(&s).await;
    let msg = |name: &str, data: &Json| {
        driftd::engine::events::Envelope::new(
            [("name".to_string(), name.to_string())].into(),
            json!({"name": name, "data": data}).to_string().into_bytes(),
        )
    };
    let all = users(10);
    let mut batch: Vec<_> = all.iter().map(|u| msg("user_created", u)).collect();
    batch.push(msg("ReprovisionStarted", &json!({"id": "d1"})));
    batch.extend(all[..6].iter().map(|u| msg("user_created", u)));
    events.deliver("bus", &batch).await.unwrap();
    assert_eq!(db.count("users").await, 10);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    events.tick_reprovisions(&|_| false).await.unwrap();
    assert_eq!(reprovisions(&s).await[0].state, "open");
    assert_eq!(db.count("users").await, 10, "nothing purged while down");
    // Back: the quiet time starts again.
    events.tick_reprovisions(&|_| true).await.unwrap();
    assert_eq!(reprovisions(&s).await[0].state, "open");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // Connected, quiet, but no read answered since: a hung connection is
    // not a quiet stream.
    events.tick_reprovisions(&|_| true).await.unwrap();
    assert_eq!(reprovisions(&s).await[0].state, "open");
    assert_eq!(db.count("users").await, 10, "nothing purged without a read");
    // A read answers, empty, after the quiet time: complete.
    events.heard("bus");
    events.tick_reprovisions(&|_| true).await.unwrap();
    assert_eq!(reprovisions(&s).await[0].state, "completed");
    assert_eq!(db.count("users").await, 6);
}

both_backends!(
    quiet_time_does_not_count_while_the_source_is_down,
    entries_show_up_within_a_second,
    sigkill_mid_stream_loses_none,
    entries_of_a_dead_consumer_are_taken_over,
    an_entry_delivered_too_often_becomes_a_dead_letter,
    a_reprovision_purges_exactly_what_was_not_resent,
    an_abandoned_reprovision_purges_nothing,
    a_quiet_reprovision_completes_behind_the_purge_guard,
);

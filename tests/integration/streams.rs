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
use driftd::daemon::Daemon;
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

fn settings(
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

/// Runs a command; fails the test on an error.
async fn raw(con: &mut MultiplexedConnection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Entries pending in the group, by consumer.
async fn pending(con: &mut MultiplexedConnection, stream: &str) -> BTreeMap<String, i64> {
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

async fn start_connected(settings: Arc<Settings>) -> (Daemon, String) {
    let d = Daemon::start(settings).await.unwrap();
    let base = format!("http://{}", d.addr);
    eventually(Duration::from_secs(20), "the source connects", || async {
        (sources(&base).await["sources"][0]["connected"] == true)
            .then_some(())
            .ok_or("not yet".into())
    })
    .await;
    (d, base)
}

async fn entries_show_up_within_a_second(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_name();
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
    eventually(Duration::from_secs(2), "every entry acknowledged", || {
        let mut con = con.clone();
        let stream = stream.clone();
        async move {
            let p = pending(&mut con, &stream).await;
            p.is_empty().then_some(()).ok_or(format!("pending: {p:?}"))
        }
    })
    .await;
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
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
}

/// A `driftd run` process.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_run(config: &std::path::Path) -> Process {
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
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_name();
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
    eventually(Duration::from_secs(5), "every entry acknowledged", || {
        let mut con = con.clone();
        let stream = stream.clone();
        async move {
            let p = pending(&mut con, &stream).await;
            p.is_empty().then_some(()).ok_or(format!("pending: {p:?}"))
        }
    })
    .await;
    assert_eq!(db.keys("users").await, expected.keys().cloned().collect());
    for (key, u) in expected.iter().step_by(5) {
        let got = db
            .text(&format!(
                "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
            ))
            .await;
        assert_eq!(
            got,
            vec![u["firstname"].as_str().map(str::to_string)],
            "{key}"
        );
    }
    drop(run);
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
}

/// A consumer that read entries and died: after `claim_idle_secs` driftd
/// takes them over and applies them.
async fn entries_of_a_dead_consumer_are_taken_over(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_name();
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
    eventually(Duration::from_secs(2), "and acknowledged", || {
        let mut con = con.clone();
        let stream = stream.clone();
        async move {
            let p = pending(&mut con, &stream).await;
            p.is_empty().then_some(()).ok_or(format!("pending: {p:?}"))
        }
    })
    .await;
    assert!(d.stop().await);
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
}

/// An entry that was delivered more than `max_deliveries` times (it killed
/// every consumer that took it) is kept as a dead letter, not applied; the
/// entries after it flow.
async fn an_entry_delivered_too_often_becomes_a_dead_letter(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_name();
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
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
}

both_backends!(
    entries_show_up_within_a_second,
    sigkill_mid_stream_loses_none,
    entries_of_a_dead_consumer_are_taken_over,
    an_entry_delivered_too_often_becomes_a_dead_letter,
);

//! Entries that vanish before driftd reads them (design rules 9 and 11): a
//! stream trimmed while driftd was stopped, entries deleted while pending
//! on another consumer, a Redis restarted without persistence. Each is a
//! loss: counted in `driftd_events_lost_total`, shown in `/v1/sources`,
//! and an open reprovision ends `incomplete`, purging nothing, instead of
//! purging the rows whose re-sends were lost.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;
use crate::events::engine;
use crate::streams::{
    add, all_acked, drop_stream, raw, redis, redis_url, reprovision_source, reprovisions, settings,
    setup, source, wait_rows, Setup,
};

const COMPLETED: &str = "completed = \"ReprovisionCompleted\"";

/// Waits until the reprovision is no longer open; returns its state and
/// reason.
async fn ended(s: &driftd::config::Settings) -> (String, String) {
    eventually(Duration::from_secs(15), "the reprovision ends", || async {
        let r = reprovisions(s).await;
        match r.first() {
            Some(r) if r.state != "open" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let r = reprovisions(s).await.remove(0);
    (r.state, r.reason.unwrap_or_default())
}

/// The worker's `driftd_events_lost_total` for `reason`.
async fn lost_metric(base: &str, reason: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("driftd_events_lost_total")
                && l.contains(&format!("reason=\"{reason}\""))
                && l.contains("source=\"bus\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no driftd_events_lost_total for {reason}:\n{text}"))
}

/// 20 users added and applied; then reprovision `id` starts and re-sends
/// users 0..10, all acknowledged. Returns the users.
async fn half_resent(
    con: &mut MultiplexedConnection,
    stream: &str,
    db: &TestDb,
    id: &str,
) -> Vec<serde_json::Value> {
    let all = users(20);
    for u in &all {
        add(con, stream, "user_created", u).await;
    }
    wait_rows(db, 20, "the first generation applied").await;
    add(con, stream, "ReprovisionStarted", &json!({ "id": id })).await;
    for u in &all[..10] {
        add(con, stream, "user_created", u).await;
    }
    // The group was given every entry (lag 0) and acknowledged them all.
    eventually(Duration::from_secs(10), "driftd read every entry", || {
        let mut con = con.clone();
        async move {
            let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async(&mut con)
                .await
                .unwrap();
            let g = &groups[0];
            (g.get("lag") == Some(&redis::Value::Int(0)))
                .then_some(())
                .ok_or(format!("{g:?}"))
        }
    })
    .await;
    all_acked(con, stream, Duration::from_secs(10)).await;
    all
}

/// A worker consuming a stream of its own with reprovisions, after
/// [`half_resent`] of reprovision `id`: what most tests here start from.
struct Resending {
    db: TestDb,
    _up: std::sync::Arc<driftd::sample::SampleUpstream>,
    _dir: tempfile::TempDir,
    stream: String,
    s: std::sync::Arc<driftd::config::Settings>,
    d: driftd::daemon::Daemon,
    con: MultiplexedConnection,
    all: Vec<serde_json::Value>,
}

async fn resending(backend: Backend, id: &str) -> Resending {
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
        &reprovision_source(&stream, COMPLETED),
    );
    let (d, _) = start_connected(s.clone()).await;
    let mut con = redis().await;
    let all = half_resent(&mut con, &stream, &db, id).await;
    Resending {
        db,
        _up,
        _dir: dir,
        stream,
        s,
        d,
        con,
        all,
    }
}

/// Completes reprovision `id`, then waits for it to end `incomplete`
/// for `reason`, with every row kept.
async fn complete_and_expect_incomplete(
    con: &mut MultiplexedConnection,
    stream: &str,
    s: &driftd::config::Settings,
    db: &TestDb,
    id: &str,
    reason: &str,
) {
    add(con, stream, "ReprovisionCompleted", &json!({ "id": id })).await;
    let (state, why) = ended(s).await;
    assert_eq!(state, "incomplete", "{why}");
    assert!(why.contains(reason), "{why}");
    assert_eq!(
        db.count("users").await,
        20,
        "rows whose re-sends were lost were purged"
    );
}

/// 20 rows; a reprovision re-sends 0..10 while driftd runs and 10..20
/// while it is stopped, which a producer's MAXLEN trims away before driftd
/// is back; then the completion. driftd finds the gap at start: the
/// reprovision is incomplete, nothing is purged, the loss is counted and
/// shown.
async fn a_stream_trimmed_while_driftd_was_stopped_purges_nothing(backend: Backend) {
    let Resending {
        db,
        _up,
        _dir,
        stream,
        s,
        d,
        mut con,
        all,
    } = resending(backend, "r1").await;
    assert_eq!(reprovisions(&s).await[0].state, "open");
    assert!(d.stop().await);
    for u in &all[10..] {
        add(&mut con, &stream, "user_created", u).await;
    }
    raw(&mut con, &["XTRIM", &stream, "MAXLEN", "0"]).await;
    let (d, base) = start_connected(s.clone()).await;
    complete_and_expect_incomplete(&mut con, &stream, &s, &db, "r1", "trimmed").await;
    assert!(lost_metric(&base, "trimmed").await >= 1.0);
    let src = sources(&base).await;
    assert!(
        src["sources"][0]["lost"].as_u64().unwrap_or(0) >= 1,
        "{src}"
    );
    assert!(
        src["sources"][0]["last_loss"]
            .as_str()
            .is_some_and(|l| l.contains("trimmed")),
        "{src}"
    );
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// Re-sends read by another consumer of the group, then deleted from the
/// stream before it settled them (its crash, then a producer's XDEL). The
/// completion waits for them; taking them over finds them gone: a loss,
/// and the reprovision purges nothing.
async fn entries_deleted_while_pending_elsewhere_purge_nothing(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\nid_pointer = \"/data/id\"\n{COMPLETED}\n",
        source(&stream, "claim_idle_secs = 0.2\nclaim_every_secs = 0.2")
    );
    let s = settings(&db, addr, dir.path(), &src);
    let (d, _) = start_connected(s.clone()).await;
    let mut con = redis().await;
    let all = half_resent(&mut con, &stream, &db, "r2").await;
    assert!(d.stop().await);
    let mut held = Vec::new();
    for u in &all[10..15] {
        held.push(add(&mut con, &stream, "user_created", u).await);
    }
    // Another consumer reads them (and dies); the producer deletes them.
    raw(
        &mut con,
        &[
            "XREADGROUP",
            "GROUP",
            "driftd",
            "other",
            "COUNT",
            "100",
            "STREAMS",
            &stream,
            ">",
        ],
    )
    .await;
    let mut xdel = vec!["XDEL", stream.as_str()];
    xdel.extend(held.iter().map(String::as_str));
    raw(&mut con, &xdel).await;
    let (d, base) = start_connected(s.clone()).await;
    complete_and_expect_incomplete(&mut con, &stream, &s, &db, "r2", "deleted_pending").await;
    assert!(lost_metric(&base, "deleted_pending").await >= 5.0);
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// A Redis server of the test's own (it is restarted), in memory only.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Self::spawn(port, dir.path());
        OwnRedis { port, dir, child }
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
            ])
            .arg(port.to_string())
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/test.sh) starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn connect(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Kills it (nothing is saved) and starts it again: empty, or from the
    /// dump a `SAVE` left in its directory.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, self.dir.path());
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis restarts without persistence in the middle of a reprovision,
/// while driftd consumes: re-sends added before the restart that driftd
/// had not read are gone, and the group is created anew. The reprovision
/// ends incomplete and purges nothing.
async fn a_redis_restart_mid_reprovision_purges_nothing(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let mut own = OwnRedis::start();
    let src = reprovision_source(&stream, COMPLETED).replace(&redis_url(), &own.url());
    let s = settings(&db, addr, dir.path(), &src);
    let (d, base) = start_connected(s.clone()).await;
    let connect = |url: String| async move {
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    };
    let mut con = connect(own.url()).await;
    half_resent(&mut con, &stream, &db, "r3").await;
    own.restart();
    // driftd reconnects (at most a second apart) and creates the group
    // again.
    eventually(Duration::from_secs(20), "the loss is seen", || async {
        let src = sources(&base).await;
        (src["sources"][0]["lost"].as_u64().unwrap_or(0) >= 1)
            .then_some(())
            .ok_or(format!("{src}"))
    })
    .await;
    let mut con = connect(own.url()).await;
    complete_and_expect_incomplete(&mut con, &stream, &s, &db, "r3", "group_recreated").await;
    assert!(lost_metric(&base, "group_recreated").await >= 1.0);
    assert!(d.stop().await);
}

fn body(name: &str, data: &Json) -> String {
    json!({"name": name, "timestamp": chrono::Utc::now().to_rfc3339(), "data": data}).to_string()
}

/// A producer re-sends in one transaction (MULTI/EXEC, as redis-py's
/// default pipeline does) with an inline `MAXLEN 3`, and completes: the
/// trim happens while driftd waits in XREADGROUP, between its checks, and
/// the read moves the group past the first entry left. The check before
/// the completion counts the group's lag against the entries left: the
/// reprovision is incomplete and purges nothing.
async fn a_trim_inside_a_producer_transaction_purges_nothing(backend: Backend) {
    let Resending {
        db,
        _up,
        _dir,
        stream,
        s,
        d,
        mut con,
        all,
    } = resending(backend, "r1").await;
    // driftd is caught up and blocked in XREADGROUP. One transaction
    // re-sends users 10..20 with MAXLEN 3 and completes.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for u in &all[10..] {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg(3)
            .arg("*")
            .arg("name")
            .arg("user_created")
            .arg("payload")
            .arg(body("user_created", u))
            .ignore();
    }
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(3)
        .arg("*")
        .arg("name")
        .arg("ReprovisionCompleted")
        .arg("payload")
        .arg(body("ReprovisionCompleted", &json!({"id": "r1"})))
        .ignore();
    let () = pipe.query_async(&mut con).await.unwrap();
    let (state, why) = ended(&s).await;
    let n = db.count("users").await;
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
    assert_eq!(
        (state.as_str(), n),
        ("incomplete", 20),
        "re-sends of users 10..18 were trimmed unread, yet the reprovision ended {state} ({why}) and left {n} rows"
    );
}

/// `driftd replay` reads outside the group, without the worker's loss
/// checks: re-sends deleted before anyone read them are simply absent
/// from its range. It never starts or completes a reprovision; the worker,
/// reading the completion through its group, finds the loss.
async fn a_replay_never_completes_a_reprovision(backend: Backend) {
    let Resending {
        db,
        _up,
        _dir,
        stream,
        s,
        d,
        mut con,
        all,
    } = resending(backend, "r2").await;
    assert!(d.stop().await);
    // While the worker is down: re-sends of 10..20, five of them deleted
    // before anyone read them, then the completion.
    let mut ids = Vec::new();
    for u in &all[10..] {
        ids.push(add(&mut con, &stream, "user_created", u).await);
    }
    let mut xdel = vec!["XDEL", stream.as_str()];
    xdel.extend(ids[..5].iter().map(String::as_str));
    raw(&mut con, &xdel).await;
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r2"}),
    )
    .await;
    // The operator rebuilds with `driftd replay bus` (from the last start).
    let events = engine(&s).await;
    let out = driftd::sources::redis::replay(&events, "bus", None)
        .await
        .unwrap();
    let r = reprovisions(&s).await.remove(0);
    assert_eq!(r.state, "open", "{r:?}; {out:?}");
    assert_eq!(db.count("users").await, 20, "{out:?}");
    // Its start and completion: a replay acts on neither.
    assert_eq!(out.outcomes.get("ignored"), Some(&2), "{out:?}");
    // The worker reads the completion through its group and finds the
    // deleted re-sends.
    let (d, _) = start_connected(s.clone()).await;
    let (state, why) = ended(&s).await;
    assert_eq!(state, "incomplete", "{why}");
    assert_eq!(db.count("users").await, 20);
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// One entry deleted unread while driftd was stopped (a loss, before any
/// reprovision), then a retention trim of entries driftd had read: the
/// loss is reported once, the trim is no loss, and a later reprovision
/// read entry by entry completes and purges what was not re-sent.
async fn an_old_loss_does_not_fail_later_reprovisions(backend: Backend) {
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
        &reprovision_source(&stream, COMPLETED),
    );
    let all = users(6);
    let (d, _) = start_connected(s.clone()).await;
    let mut con = redis().await;
    for u in &all[..5] {
        add(&mut con, &stream, "user_created", u).await;
    }
    wait_rows(&db, 5, "applied").await;
    assert!(d.stop().await);
    // One entry deleted unread while driftd is down: a real loss, before
    // any reprovision.
    let gone = add(&mut con, &stream, "user_created", &all[5]).await;
    raw(&mut con, &["XDEL", &stream, &gone]).await;
    let (d, base) = start_connected(s.clone()).await;
    add(&mut con, &stream, "user_edited", &all[0]).await;
    all_acked(&con, &stream, Duration::from_secs(10)).await;
    // A retention job empties the stream of entries driftd has read: no
    // loss at all.
    raw(&mut con, &["XTRIM", &stream, "MAXLEN", "0"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let src = sources(&base).await;
    // Much later, a clean reprovision: start, re-send users 0..4, complete.
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "r3"}),
    )
    .await;
    for u in &all[..4] {
        add(&mut con, &stream, "user_created", u).await;
    }
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r3"}),
    )
    .await;
    let (state, why) = ended(&s).await;
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
    assert_eq!(
        state, "completed",
        "a reprovision read entry by entry ended {state}: {why}; sources: {src}"
    );
    assert_eq!(db.count("users").await, 4);
}

/// Redis restarts from an older RDB snapshot while driftd runs: the group
/// survives, rolled back, and re-sends added after the snapshot that
/// driftd had not read are gone. The group's position going back is a
/// loss: the reprovision purges nothing.
async fn a_redis_restart_from_an_older_snapshot_purges_nothing(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let mut own = OwnRedis::start();
    let src = reprovision_source(&stream, COMPLETED).replace(&redis_url(), &own.url());
    let s = settings(&db, addr, dir.path(), &src);
    let (d, _) = start_connected(s.clone()).await;
    let mut con = own.connect().await;
    let all = half_resent(&mut con, &stream, &db, "r4").await;
    raw(&mut con, &["SAVE"]).await;
    // Keep driftd busy inside its next batch (a slow database), so that the
    // re-sends after it wait unread in the stream.
    let locker = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    add(&mut con, &stream, "user_created", &all[10]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    for u in &all[11..] {
        add(&mut con, &stream, "user_created", u).await;
    }
    // Redis crashes and comes back from its last snapshot.
    own.restart();
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut con = own.connect().await;
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r4"}),
    )
    .await;
    let (state, why) = ended(&s).await;
    let n = db.count("users").await;
    assert!(d.stop().await);
    assert_eq!(
        (state.as_str(), n),
        ("incomplete", 20),
        "re-sends of 11..20 were lost in Redis's rollback; the reprovision ended {state} ({why}) with {n} rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_redis_restart_from_an_older_snapshot_purges_nothing() {
    a_redis_restart_from_an_older_snapshot_purges_nothing(Backend::Postgres).await
}

/// A Lua script adds the re-sends and the completion, and deletes two of
/// the re-sends before driftd reads any: incomplete, nothing purged.
async fn an_xdel_in_the_completions_batch_purges_nothing(backend: Backend) {
    let Resending {
        db,
        _up,
        _dir,
        stream,
        s,
        d,
        mut con,
        all,
    } = resending(backend, "h1").await;
    let mut inv = redis::cmd("EVAL");
    inv.arg(r#"local ids = {}
        for i, b in ipairs(ARGV) do ids[i] = redis.call('XADD', KEYS[1], '*', 'name', i == #ARGV and 'ReprovisionCompleted' or 'user_created', 'payload', b) end
        redis.call('XDEL', KEYS[1], ids[2], ids[3])
        return #ids"#).arg(1).arg(&stream);
    for u in &all[10..] {
        inv.arg(body("user_created", u));
    }
    inv.arg(body("ReprovisionCompleted", &json!({"id": "h1"})));
    let _: i64 = inv.query_async(&mut con).await.unwrap();
    let (state, why) = ended(&s).await;
    let n = db.count("users").await;
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
    assert_eq!((state.as_str(), n), ("incomplete", 20), "{why}");
}

/// Every XADD trims with `MAXLEN ~ 20` while driftd keeps up: entries it
/// read are trimmed, none unread; the reprovision completes and purges.
async fn an_approximate_maxlen_while_keeping_up_is_no_loss(backend: Backend) {
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
        &reprovision_source(&stream, COMPLETED),
    );
    let (d, _) = start_connected(s.clone()).await;
    let mut con = redis().await;
    let all = users(150);
    let xadd = |name: &str, data: &Json| {
        let mut c = redis::cmd("XADD");
        c.arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(20)
            .arg("*")
            .arg("name")
            .arg(name)
            .arg("payload")
            .arg(body(name, data));
        c
    };
    for u in &all {
        add(&mut con, &stream, "user_created", u).await;
    }
    wait_rows(&db, 150, "applied").await;
    let _: String = xadd("ReprovisionStarted", &json!({"id": "h2"}))
        .query_async(&mut con)
        .await
        .unwrap();
    for u in &all[..140] {
        let _: String = xadd("user_created", u).query_async(&mut con).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: String = xadd("ReprovisionCompleted", &json!({"id": "h2"}))
        .query_async(&mut con)
        .await
        .unwrap();
    let (state, why) = ended(&s).await;
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
    assert_eq!(state, "completed", "{why}");
    assert_eq!(db.count("users").await, 140);
}

/// The group destroyed and re-sends added in one transaction while driftd
/// runs: the group is created anew, the loss reported, nothing purged.
async fn a_group_destroyed_while_running_purges_nothing(backend: Backend) {
    let Resending {
        db,
        _up,
        _dir,
        stream,
        s,
        d,
        mut con,
        all,
    } = resending(backend, "h3").await;
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg("driftd")
        .ignore();
    for u in &all[10..15] {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("name")
            .arg("user_created")
            .arg("payload")
            .arg(body("user_created", u))
            .ignore();
    }
    let () = pipe.query_async(&mut con).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "h3"}),
    )
    .await;
    let (state, why) = ended(&s).await;
    let n = db.count("users").await;
    assert!(d.stop().await);
    drop_stream(&mut con, &stream).await;
    assert_eq!((state.as_str(), n), ("incomplete", 20), "{why}");
}

both_backends!(
    a_stream_trimmed_while_driftd_was_stopped_purges_nothing,
    entries_deleted_while_pending_elsewhere_purge_nothing,
    a_redis_restart_mid_reprovision_purges_nothing,
    a_trim_inside_a_producer_transaction_purges_nothing,
    a_replay_never_completes_a_reprovision,
    an_old_loss_does_not_fail_later_reprovisions,
    an_xdel_in_the_completions_batch_purges_nothing,
    an_approximate_maxlen_while_keeping_up_is_no_loss,
    a_group_destroyed_while_running_purges_nothing,
);

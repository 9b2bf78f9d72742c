//! Entries that vanish before driftd reads them (design rules 9 and 11): a
//! stream trimmed while driftd was stopped, entries deleted while pending
//! on another consumer, a Redis restarted without persistence. Each is a
//! loss: counted in `driftd_events_lost_total`, shown in `/v1/sources`,
//! and an open reprovision ends `incomplete`, purging nothing, instead of
//! purging the rows whose re-sends were lost.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;

use crate::both_backends;
use crate::common::*;
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
    all_acked(con, stream, Duration::from_secs(10)).await;
    all
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
    let all = half_resent(&mut con, &stream, &db, "r1").await;
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

    /// Kills it (nothing is saved) and starts it again, empty.
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

both_backends!(
    a_stream_trimmed_while_driftd_was_stopped_purges_nothing,
    entries_deleted_while_pending_elsewhere_purge_nothing,
    a_redis_restart_mid_reprovision_purges_nothing,
);

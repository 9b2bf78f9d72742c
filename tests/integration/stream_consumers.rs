//! One consumer name, one process: a second `driftd run` reading the same
//! group under the name another process is using would take that
//! process's pending entries for its own (and a reprovision's completion
//! would not wait for re-sends the other holds). It waits, showing why in
//! `/v1/sources`, until the name is free.

use std::time::Duration;

use serde_json::json;

use crate::both_backends;
use crate::common::*;
use crate::streams::{add, drop_stream, redis, settings, setup, source, wait_rows, Setup};

async fn a_consumer_name_in_use_is_not_shared(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let s = settings(&db, addr, dir.path(), &source(&stream, ""));
    let (first, _) = start_connected(s.clone()).await;
    let second = driftd::daemon::Daemon::start(s.clone()).await.unwrap();
    let base = format!("http://{}", second.addr);
    eventually(
        Duration::from_secs(10),
        "the second refuses the name",
        || async {
            let src = sources(&base).await;
            let s = &src["sources"][0];
            (s["connected"] == false
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("in use by another process")))
            .then_some(())
            .ok_or(format!("{src}"))
        },
    )
    .await;
    // The first goes: the name is free once its last read is over.
    assert!(first.stop().await);
    eventually(
        Duration::from_secs(15),
        "the second takes the name",
        || async {
            let src = sources(&base).await;
            (src["sources"][0]["connected"] == true)
                .then_some(())
                .ok_or(format!("{src}"))
        },
    )
    .await;
    let mut con = redis().await;
    add(&mut con, &stream, "user_created", &users(1)[0]).await;
    wait_rows(&db, 1, "the second consumes").await;
    assert!(second.stop().await);
    drop_stream(&mut con, &stream).await;
}

/// A process busy settling a batch for longer than a blocking read (a
/// refetch on a slow upstream) keeps its consumer name: the lease is
/// renewed apart from the reads, and a second `driftd run` waits.
async fn a_busy_consumer_keeps_its_name(backend: Backend) {
    use crate::streams::{add, drop_stream, redis, settings, setup, source, Setup};
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = source(&stream, "").replace(
        "[sources.bus.events]\n",
        "[sources.bus.events]\nuser_refetch = { resource = \"users\", op = \"refetch\", key = \"/data/uuid\" }\n",
    );
    let all = users(1);
    _up.set("users", "uuid", all.clone());
    let s = settings(&db, addr, dir.path(), &src);
    let (first, _) = start_connected(s.clone()).await;
    _up.inject(driftd::sample::Fault::SlowGet { ms: 6_000 });
    let mut con = redis().await;
    add(
        &mut con,
        &stream,
        "user_refetch",
        &json!({"uuid": uuid(&all[0])}),
    )
    .await;
    // The first reads it and is still settling it (its refetch waits on
    // the slow upstream for about 4 s).
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let second = driftd::daemon::Daemon::start(s.clone()).await.unwrap();
    let base = format!("http://{}", second.addr);
    let mut seen = Vec::new();
    let mut took_it = false;
    for _ in 0..20 {
        let src = sources(&base).await;
        let st = &src["sources"][0];
        seen.push(format!(
            "connected={} last_error={}",
            st["connected"], st["last_error"]
        ));
        if st["connected"] == true {
            took_it = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // ... and settles the entry the first holds, a second time.
    let mut second_applied = String::new();
    if took_it {
        for _ in 0..100 {
            let m = reqwest::get(format!("{base}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            second_applied = m
                .lines()
                .filter(|l| {
                    l.starts_with("driftd_events_total")
                        || l.starts_with("driftd_upstream_requests_total")
                })
                .collect::<Vec<_>>()
                .join("; ");
            if second_applied.contains("resource=\"users\",source=\"bus\"} 1") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let letters = db.count("driftd_dead_letters").await;
    assert!(second.stop().await);
    assert!(first.stop().await);
    drop_stream(&mut con, &stream).await;
    assert!(
        !took_it,
        "a second process took consumer name `driftd-test` while the first still settled its entry: {seen:?}; the second's own counts: {second_applied}; dead letters for the one message: {letters}"
    );
}

both_backends!(
    a_consumer_name_in_use_is_not_shared,
    a_busy_consumer_keeps_its_name,
);

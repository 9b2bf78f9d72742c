//! One consumer name, one process: a second `driftd run` reading the same
//! group under the name another process is using would take that
//! process's pending entries for its own (and a reprovision's completion
//! would not wait for re-sends the other holds). It waits, showing why in
//! `/v1/sources`, until the name is free.

use std::time::Duration;

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

both_backends!(a_consumer_name_in_use_is_not_shared);

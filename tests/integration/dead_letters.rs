//! Dead letters keep what could not be applied until an operator acts:
//! listed in arrival order (a replay in listed order applies the newer
//! edit last), never dropped by a replay that applies nothing (an event no
//! longer mapped), and replayable once the table takes them (a column
//! widened since, without a restart).

use std::sync::Arc;

use driftd::config::Settings;
use driftd::store::Ledger;
use serde_json::json;

use crate::both_backends;
use crate::common::*;
use crate::events::{engine, message, BUS};

fn config(db: &TestDb, addr: std::net::SocketAddr, bus: &str) -> Arc<Settings> {
    Arc::new(
        ConfigBuilder {
            tail: bus.to_string(),
            ..ConfigBuilder::default()
        }
        .settings(db, addr),
    )
}

/// Eight letters of one batch (they share a receive time) list in the
/// order they arrived.
async fn letters_list_in_arrival_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let events = engine(&config(&db, addr, BUS)).await;
    let batch: Vec<_> = (0..8)
        .map(|i| message("user_created", json!({"firstname": format!("no key {i}")})))
        .collect();
    let out = events.deliver("bus", &batch).await.unwrap();
    assert!(out.iter().all(|v| v.outcome == "dead_lettered"), "{out:?}");
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 100)
        .await
        .unwrap();
    let order: Vec<String> = letters
        .iter()
        .map(|l| {
            let body: serde_json::Value = serde_json::from_slice(&l.raw).unwrap();
            body["data"]["firstname"].as_str().unwrap().to_string()
        })
        .collect();
    let want: Vec<String> = (0..8).map(|i| format!("no key {i}")).collect();
    assert_eq!(order, want);
}

/// A batch delivered again (its acknowledgement lost: a consumer
/// timeout, a closed connection) keeps one letter per message and counts
/// it once: one message, one outcome.
async fn a_batch_delivered_again_keeps_one_letter_per_message(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let events = engine(&config(&db, addr, BUS)).await;
    let batch = vec![
        message("user_created", json!({"firstname": "no key"})),
        message("user_created", users(1)[0].clone()),
    ];
    let first = events.deliver("bus", &batch).await.unwrap();
    let again = events.deliver("bus", &batch).await.unwrap();
    assert_eq!(first[0].dead_letter, again[0].dead_letter, "{again:?}");
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let metrics = events.metrics().render();
    assert!(
        metrics.contains(
            r#"driftd_events_total{outcome="dead_lettered",resource="users",source="bus"} 1"#
        ),
        "{metrics}"
    );
}

/// A letter whose event the config no longer maps: its replay applies
/// nothing, so the letter stays and the replay says it failed.
async fn a_replay_of_an_unmapped_event_keeps_the_letter(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let events = engine(&config(&db, addr, BUS)).await;
    let mut bad = users(1).remove(0);
    bad["extension"] = json!("not a number");
    let out = events
        .deliver("bus", &[message("user_created", bad)])
        .await
        .unwrap();
    let id = out[0].dead_letter.clone().expect("a dead letter");
    let unmapped = BUS.replace(
        "[sources.bus.events.user_created]",
        "[sources.bus.events.user_created_v0]",
    );
    let events = engine(&config(&db, addr, &unmapped)).await;
    let v = events.replay(&id).await.unwrap();
    assert_eq!(v.outcome, "dead_lettered", "{v:?}");
    assert!(v.error.as_deref().unwrap().contains("not mapped"), "{v:?}");
    assert!(events.store().get_dead_letter(&id).await.unwrap().is_some());
}

/// PostgreSQL's `lastname` is varchar(64): a longer one is a dead letter.
/// The column widened, the running engine takes the replay.
async fn postgres_a_widened_column_takes_the_letter() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let events = engine(&config(&db, addr, BUS)).await;
    let mut long = users(1).remove(0);
    long["lastname"] = json!("x".repeat(100));
    let out = events
        .deliver("bus", &[message("user_created", long)])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    db.exec("ALTER TABLE users ALTER COLUMN lastname TYPE VARCHAR(200)")
        .await;
    let v = events
        .replay(out[0].dead_letter.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(v.outcome, "applied", "{v:?}");
    assert_eq!(db.count("users").await, 1);
}

/// A letter stored by another process (a replica, the CLI) shows in the
/// worker's `driftd_dead_letters` within seconds, and its deletion too.
async fn the_gauge_follows_the_table(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let s = config(&db, addr, &format!("{}{BUS}", open_worker_tail(dir.path())));
    let (d, base) = start_connected(s.clone()).await;
    let gauge = |base: String| async move {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(r#"driftd_dead_letters{source="bus"}"#))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .unwrap_or_default()
    };
    let other = engine(&s).await;
    let out = other
        .deliver("bus", &[message("user_created", json!({"no": "key"}))])
        .await
        .unwrap();
    let id = out[0].dead_letter.clone().unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the gauge shows the letter",
        || {
            let base = base.clone();
            async move {
                let g = gauge(base).await;
                (g == "1").then_some(()).ok_or(g)
            }
        },
    )
    .await;
    assert!(other.store().delete_dead_letter(&id).await.unwrap());
    eventually(
        std::time::Duration::from_secs(10),
        "the gauge drops to 0",
        || {
            let base = base.clone();
            async move {
                let g = gauge(base).await;
                (g == "0").then_some(()).ok_or(g)
            }
        },
    )
    .await;
    assert!(d.stop().await);
}

/// Two webhook requests settle concurrently: the first (an edit that
/// does not fit, beside a slow refetch) arrives first but settles last.
/// Letters list in arrival order, so replayed in listed order the newer
/// edit applies last. PostgreSQL only: its `lastname` is varchar(64).
async fn postgres_letters_of_concurrent_batches_list_in_arrival_order() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    let all = users(2);
    let (up, addr) = upstream(all.clone()).await;
    let s = Arc::new(
        ConfigBuilder {
            tail: BUS.to_string(),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let events = Arc::new(engine(&s).await);
    let key = uuid(&all[0]);
    let edit = |tag: &str| {
        let mut u = all[0].clone();
        u["lastname"] = json!(format!("{tag}{}", "x".repeat(70)));
        message("user_created", u)
    };
    up.inject(driftd::sample::Fault::SlowGet { ms: 800 });
    let first = vec![
        edit("old"),
        message("user_refetch", json!({"uuid": uuid(&all[1])})),
    ];
    let e1 = events.clone();
    let t1 = tokio::spawn(async move { e1.deliver("bus", &first).await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let second = vec![edit("new")];
    let out2 = events.deliver("bus", &second).await.unwrap();
    let out1 = t1.await.unwrap();
    assert_eq!(out1[0].outcome, "dead_lettered", "{out1:?}");
    assert_eq!(out2[0].outcome, "dead_lettered", "{out2:?}");
    up.clear_faults();
    // The operator widens the column and replays the letters in listed
    // (arrival, says the README) order.
    db.exec("ALTER TABLE users ALTER COLUMN lastname TYPE TEXT")
        .await;
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    let mut verdicts = Vec::new();
    for l in &letters {
        verdicts.push(events.replay(&l.id).await.unwrap().outcome);
    }
    let lastname = db
        .text(&format!(
            "SELECT lastname FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
        ))
        .await;
    assert!(
        lastname[0].as_deref().unwrap().starts_with("new"),
        "replayed in listed order ({verdicts:?}), the older edit applied last: {lastname:?}; letters listed: {:?}",
        letters.iter().map(|l| (&l.received_at, &l.failed_at)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_batches() {
    postgres_letters_of_concurrent_batches_list_in_arrival_order().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_widened_column() {
    postgres_a_widened_column_takes_the_letter().await
}

both_backends!(
    letters_list_in_arrival_order,
    a_batch_delivered_again_keeps_one_letter_per_message,
    a_replay_of_an_unmapped_event_keeps_the_letter,
    the_gauge_follows_the_table,
);

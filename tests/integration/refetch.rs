//! Refetch events (the event carries a key, the row comes from the
//! upstream's get-by-key endpoint) delete only what a pass would purge, and
//! a slow upstream holds only its own refetches: a 404 deletes when both
//! spellings of a uuid are gone and `get_path` is shown to find a key the
//! listing has; a wrong `get_path` deletes nothing and keeps the event as a
//! dead letter; a hung refetch becomes a dead letter when the batch's
//! budget runs out while the rest of the batch applies.

use std::time::{Duration, Instant};

use driftd::sample::Fault;
use driftd::store::Ledger;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;
use crate::events::{engine, message, BUS};

use driftd::config::Settings;

fn config(db: &TestDb, addr: std::net::SocketAddr, get_path: &str, budget: f64) -> Settings {
    let bus = BUS.replacen(
        "kind = \"webhook\"\n",
        &format!("kind = \"webhook\"\nrefetch_budget_secs = {budget}\n"),
        1,
    );
    ConfigBuilder {
        tail: bus,
        get_path: get_path.into(),
        ..ConfigBuilder::default()
    }
    .settings(db, addr)
}

fn uuid(u: &Json) -> String {
    u["uuid"].as_str().unwrap().to_string()
}

/// A `get_path` with a typo answers 404 for every key: a refetch of a
/// row the table holds and upstream lists deletes nothing; the event is a
/// dead letter saying why. With the right path, a 404 for a row upstream
/// removed deletes it.
async fn a_wrong_get_path_deletes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(5);
    db.insert_users(&all).await;
    let (up, addr) = upstream(all.clone()).await;
    let s = std::sync::Arc::new(config(&db, addr, "/0.1/userz/{key}", 30.0));
    let events = engine(&s).await;
    let out = events
        .deliver(
            "bus",
            &[message("user_refetch", json!({"uuid": uuid(&all[0])}))],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    let error = out[0].error.as_deref().unwrap();
    assert!(
        error.contains("nothing deleted") && error.contains("get_path"),
        "{error}"
    );
    assert_eq!(db.count("users").await, 5, "a wrong get_path deleted a row");

    // The right path: a row upstream removed goes.
    let s = std::sync::Arc::new(config(&db, addr, "/0.1/users/{key}", 30.0));
    let events = engine(&s).await;
    up.remove("users", &uuid(&all[0]));
    let out = events
        .deliver(
            "bus",
            &[message("user_refetch", json!({"uuid": uuid(&all[0])}))],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    assert_eq!(db.count("users").await, 4);
}

/// An upstream that keeps uuids in upper case and matches them exactly:
/// the lower-case spelling driftd stores answers 404, the upper-case one
/// finds the row. The refetch applies it; it does not delete it.
async fn a_uuid_is_gone_only_if_both_spellings_are(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(3);
    db.insert_users(&all).await;
    let upper: Vec<Json> = all
        .iter()
        .map(|u| {
            let mut u = u.clone();
            u["uuid"] = json!(uuid(&u).to_ascii_uppercase());
            u["firstname"] = json!("Upper");
            u
        })
        .collect();
    let (_up, addr) = upstream(upper).await;
    let s = std::sync::Arc::new(config(&db, addr, "/0.1/users/{key}", 30.0));
    let events = engine(&s).await;
    let key = uuid(&all[1]);
    let out = events
        .deliver("bus", &[message("user_refetch", json!({"uuid": key}))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    assert_eq!(db.count("users").await, 3, "a row upstream has was deleted");
    assert_eq!(
        db.text(&format!(
            "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
        ))
        .await,
        vec![Some("Upper".to_string())]
    );
}

/// A get-by-key endpoint that hangs (3 s an answer, retries after): the
/// refetch becomes a dead letter when the batch's 0.5 s budget runs out,
/// and the upsert beside it applies without waiting for the retries.
async fn a_hung_refetch_holds_only_itself(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(3);
    db.insert_users(&all[..1]).await;
    let (up, addr) = upstream(all.clone()).await;
    let s = std::sync::Arc::new(config(&db, addr, "/0.1/users/{key}", 0.5));
    let events = engine(&s).await;
    up.inject(Fault::SlowGet { ms: 3_000 });
    let started = Instant::now();
    let out = events
        .deliver(
            "bus",
            &[
                message("user_refetch", json!({"uuid": uuid(&all[0])})),
                message("user_created", all[1].clone()),
                message("user_refetch", json!({"uuid": uuid(&all[2])})),
            ],
        )
        .await
        .unwrap();
    let took = started.elapsed();
    let outcomes: Vec<&str> = out.iter().map(|v| v.outcome).collect();
    assert_eq!(
        outcomes,
        ["dead_lettered", "applied", "dead_lettered"],
        "{out:#?}"
    );
    assert!(
        out[0].error.as_deref().unwrap().contains("refetch budget"),
        "{out:?}"
    );
    assert!(
        took < Duration::from_millis(2_500),
        "the batch waited {took:?} for a hung upstream"
    );
    assert_eq!(
        db.count("users").await,
        2,
        "nothing deleted, the upsert applied"
    );
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 2);
}

both_backends!(
    a_wrong_get_path_deletes_nothing,
    a_uuid_is_gone_only_if_both_spellings_are,
    a_hung_refetch_holds_only_itself,
);

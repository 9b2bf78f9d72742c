//! Refetch events (the event carries a key, the row comes from the
//! upstream's get-by-key endpoint) delete only what a pass would purge, and
//! a slow upstream holds only its own refetches: a 404 deletes when both
//! spellings of a uuid are gone and `get_path` is shown to find a key the
//! listing has; a wrong `get_path` deletes nothing and keeps the event as a
//! dead letter; a hung refetch becomes a dead letter when the batch's
//! budget runs out while the rest of the batch applies.

use std::net::SocketAddr;
use std::sync::Arc;
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
    let s = Arc::new(config(&db, addr, "/0.1/userz/{key}", 30.0));
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
    let s = Arc::new(config(&db, addr, "/0.1/users/{key}", 30.0));
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
    let s = Arc::new(config(&db, addr, "/0.1/users/{key}", 30.0));
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
    let s = Arc::new(config(&db, addr, "/0.1/users/{key}", 0.5));
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

/// An upstream whose listing serves `items` (one page, with its total),
/// and whose get-by-key answers 404 for the keys in `unfetchable` and the
/// item for the others: a get endpoint scoped narrower than the listing
/// (Wazo: `GET /users?recurse=true` lists sub-tenants' users, `GET
/// /users/{uuid}` without the tenant's header answers 404 for them).
async fn narrow_get_upstream(items: Vec<Json>, unfetchable: Vec<String>) -> SocketAddr {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::get;
    type S = Arc<(Vec<Json>, Vec<String>)>;
    let state: S = Arc::new((items, unfetchable));
    let app = axum::Router::new()
        .route(
            "/0.1/users",
            get(
                |State(s): State<S>,
                 axum::extract::Query(q): axum::extract::Query<
                    std::collections::BTreeMap<String, String>,
                >| async move {
                    let n = |k: &str, d: usize| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
                    let (offset, limit) = (n("offset", 0), n("limit", 100));
                    let page: Vec<Json> = s.0.iter().skip(offset).take(limit).cloned().collect();
                    axum::Json(json!({"items": page, "total": s.0.len()}))
                },
            ),
        )
        .route(
            "/0.1/users/{key}",
            get(|State(s): State<S>, Path(key): Path<String>| async move {
                if s.1.contains(&key) {
                    return (StatusCode::NOT_FOUND, "not found").into_response();
                }
                match s.0.iter().find(|u| u["uuid"] == json!(key)) {
                    Some(u) => axum::Json(u.clone()).into_response(),
                    None => (StatusCode::NOT_FOUND, "not found").into_response(),
                }
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// A get endpoint scoped narrower than the listing (Wazo: the listing
/// recurses into sub-tenants, the get does not) answers 404 for a key the
/// listing has: a pass would keep it, so the refetch deletes nothing.
async fn a_404_for_a_key_the_listing_has_deletes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(5);
    db.insert_users(&all).await;
    let victim = uuid(&all[0]);
    let addr = narrow_get_upstream(all.clone(), vec![victim.clone()]).await;
    let s = Arc::new(
        ConfigBuilder {
            tail: BUS.to_string(),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let events = engine(&s).await;
    let out = events
        .deliver(
            "bus",
            &[message("user_refetch", json!({"uuid": victim.clone()}))],
        )
        .await
        .unwrap();
    let after_refetch = db.count("users").await;
    // The same upstream, judged by a pass: the row is listed, a pass puts
    // it back (it never purges a listed key).
    let report = pass(&s, driftd::pass::PassOptions::default()).await;
    assert_eq!(
        after_refetch,
        5,
        "a refetch deleted `{victim}`, which the listing (page 1, read by the refetch's own get_path check) has. verdict: {out:?}; the pass after it: {:?}, {} row(s) inserted back",
        report.outcome, report.actions.insert
    );
}

both_backends!(
    a_wrong_get_path_deletes_nothing,
    a_uuid_is_gone_only_if_both_spellings_are,
    a_hung_refetch_holds_only_itself,
    a_404_for_a_key_the_listing_has_deletes_nothing,
);

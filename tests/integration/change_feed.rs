//! Incremental runs against change feeds that misbehave: cascades across
//! pages, a parent deleted and re-created, deletions left by policy, runs
//! cut short, cursors that cycle, the purge guard across runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::routing::get;
use axum::{Json as AxumJson, Router};
use driftd::jobs::JobStatus;
use driftd::pass::{Mode, Outcome, PassOptions};
use driftd::sample::{tenant, user};
use driftd::store::Ledger;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;

/// A scripted change feed: (path, since) -> page; an unknown `since`
/// answers no change and the same checkpoint.
#[derive(Default)]
struct Script {
    pages: Mutex<HashMap<(String, String), Json>>,
    asked: Mutex<Vec<(String, String)>>,
}

impl Script {
    fn page(&self, path: &str, since: &str, items: Json, next: &str) {
        self.pages.lock().unwrap().insert(
            (path.to_string(), since.to_string()),
            json!({"items": items, "next": next}),
        );
    }
    fn asked(&self, path: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }
}

async fn answer(
    State(s): State<Arc<Script>>,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> AxumJson<Json> {
    let since = q.get("since").cloned().unwrap_or_default();
    let path = uri.path().to_string();
    s.asked.lock().unwrap().push((path.clone(), since.clone()));
    let page = s.pages.lock().unwrap().get(&(path, since.clone())).cloned();
    AxumJson(page.unwrap_or_else(|| json!({"items": [], "next": since})))
}

async fn serve(s: Arc<Script>) -> SocketAddr {
    let app = Router::new()
        .route("/0.1/users/changes", get(answer))
        .route("/0.1/tenants/changes", get(answer))
        .with_state(s);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

const USERS: &str = "/0.1/users/changes";
const TENANTS_FEED: &str = "/0.1/tenants/changes";

fn users_feed(extra: &str) -> String {
    format!(
        r#"
[resources.users.incremental]
path = "/0.1/users/changes"
since_param = "since"
cursor_pointer = "/next"
items_pointer = "/items"
deleted_pointer = "/deleted"
{extra}
"#
    )
}

fn incremental() -> PassOptions {
    PassOptions {
        mode: Mode::Incremental,
        ..PassOptions::default()
    }
}

async fn checkpoint(s: &driftd::config::Settings, resource: &str) -> Option<String> {
    let store = driftd::store::AnyStore::open(&s.store.url, 2)
        .await
        .unwrap();
    store.checkpoint(resource).await.unwrap()
}

/// users (child of tenants) + tenants with a change feed.
async fn family(backend: Backend) -> (TestDb, driftd::config::Settings, Arc<Script>) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE tenants (uuid TEXT PRIMARY KEY, name TEXT)",
        Backend::Postgres => "CREATE TABLE tenants (uuid UUID PRIMARY KEY, name TEXT)",
    })
    .await;
    for i in 0..TENANTS {
        let t = tenant(i);
        db.exec(&format!(
            "INSERT INTO tenants (uuid, name) VALUES ('{}', '{}')",
            uuid(&t),
            t["name"].as_str().unwrap()
        ))
        .await;
    }
    db.insert_users(&users(30)).await;
    let script = Arc::new(Script::default());
    let addr = serve(script.clone()).await;
    let tail = format!(
        r#"
[resources.users.parent]
resource = "tenants"
column = "tenant_uuid"

[resources.tenants]
key = {{ upstream = "/uuid", column = "uuid", type = "uuid" }}
local = {{ table = "tenants" }}
[resources.tenants.upstream]
base_url = "http://{addr}"
list_path = "/0.1/tenants"
key_order = "asc"
query = {{ order = "uuid" }}
backoff_ms = 1
retries = 1
[resources.tenants.columns]
name = {{ from = "/name" }}
[resources.tenants.policy]
max_purge_fraction = 1.0
[resources.tenants.incremental]
path = "/0.1/tenants/changes"
since_param = "since"
cursor_pointer = "/next"
items_pointer = "/items"
deleted_pointer = "/deleted"
"#
    );
    let s = ConfigBuilder {
        tail,
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    (db, s, script)
}

async fn users_of(db: &TestDb, tenant_uuid: &str) -> i64 {
    db.text(&format!(
        "SELECT CAST(uuid AS TEXT) FROM users WHERE LOWER(CAST(tenant_uuid AS TEXT)) = '{tenant_uuid}'"
    ))
    .await
    .len() as i64
}

/// The parent's delete commits with the checkpoint; the cascade runs
/// after, in its own transaction. If it fails, the run fails but the
/// checkpoint is already past the delete: no later run cascades it. (The
/// events engine was fixed for exactly this in review4: a redelivery
/// cascades a stale delete whose parent is gone.)
async fn a_parent_delete_whose_cascade_failed_is_never_cascaded(backend: Backend) {
    let (db, s, script) = family(backend).await;
    let t0 = uuid(&tenant(0));
    assert_eq!(users_of(&db, &t0).await, 3);
    script.page(
        TENANTS_FEED,
        "0",
        json!([{"uuid": t0, "deleted": true}]),
        "1",
    );

    db.exec("ALTER TABLE users RENAME TO users_away").await;
    let r = pass_resource(&s, "tenants", incremental()).await;
    assert_eq!(r.outcome, Outcome::Failed, "the cascade cannot run: {r:?}");
    db.exec("ALTER TABLE users_away RENAME TO users").await;

    let r2 = pass_resource(&s, "tenants", incremental()).await;
    assert_eq!(db.count("tenants").await, TENANTS as i64 - 1);
    assert_eq!(
        users_of(&db, &t0).await,
        0,
        "children of the deleted tenant must be purged once a run succeeds; checkpoint {:?}, second run {:?} / {:?}",
        checkpoint(&s, "tenants").await,
        r2.outcome,
        r2.actions
    );
}

/// One page: tenant T deleted, then created again (same key). T is live at
/// the end of the page, but the delete is in `purged`, so the cascade
/// purges every user of the live tenant T (users created in the new T,
/// which upstream still has).
async fn a_parent_deleted_then_recreated_in_one_page_keeps_its_children(backend: Backend) {
    let (db, s, script) = family(backend).await;
    let t0 = uuid(&tenant(0));
    assert_eq!(users_of(&db, &t0).await, 3);
    script.page(
        TENANTS_FEED,
        "0",
        json!([{"uuid": t0, "deleted": true}, {"uuid": t0, "name": "Tenant 0 again"}]),
        "2",
    );
    let r = pass_resource(&s, "tenants", incremental()).await;
    assert_eq!(db.count("tenants").await, TENANTS as i64, "T lives: {r:?}");
    assert_eq!(
        users_of(&db, &t0).await,
        3,
        "the users of a live tenant were purged: {:?}",
        r.actions
    );
}

/// `purge_extra = false`: the feed's deletions are left (found.extra,
/// left.extra), yet the run says `in_sync` and its job `succeeded`; a full
/// pass leaving extras says `drift_left` (job `drift_found`).
async fn deletions_left_by_purge_extra_false_are_not_in_sync(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(3)).await;
    let script = Arc::new(Script::default());
    let addr = serve(script.clone()).await;
    let s = ConfigBuilder {
        policy: "max_purge_fraction = 1.0\nmax_purge_count = 1000000\npurge_extra = false".into(),
        tail: users_feed(""),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    script.page(
        USERS,
        "0",
        json!([{"uuid": uuid(&user(0, TENANTS)), "deleted": true}]),
        "1",
    );
    let r = pass(&s, incremental()).await;
    assert_eq!(db.count("users").await, 3, "left, by policy");
    assert_eq!(r.left.extra, 1, "{r:?}");
    assert_ne!(
        JobStatus::of_report(&r),
        JobStatus::Succeeded,
        "a row upstream deleted is left, yet: outcome {:?}",
        r.outcome
    );
}

/// `max_pages` cuts the run short of the feed's end, yet the run says
/// `repaired` (job `succeeded`) and logs "reached the end of the feed".
async fn a_run_cut_by_max_pages_does_not_claim_success(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let script = Arc::new(Script::default());
    let addr = serve(script.clone()).await;
    let s = ConfigBuilder {
        tail: users_feed("max_pages = 2"),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    for i in 0..5u64 {
        script.page(
            USERS,
            &i.to_string(),
            json!([user(i, TENANTS)]),
            &(i + 1).to_string(),
        );
    }
    let r = pass(&s, incremental()).await;
    assert_eq!(checkpoint(&s, "users").await.as_deref(), Some("2"));
    assert_eq!(db.count("users").await, 2);
    assert_ne!(
        JobStatus::of_report(&r),
        JobStatus::Succeeded,
        "3 pages of changes not applied, yet {:?}",
        r.outcome
    );
}

/// A feed whose cursor cycles (0 -> 1 -> 0 ...) with items each time is
/// not detected: the run re-applies the same two pages until max_pages
/// (default 100 000 requests) and then reports success.
async fn a_cycling_cursor_is_detected(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let script = Arc::new(Script::default());
    let addr = serve(script.clone()).await;
    let s = ConfigBuilder {
        tail: users_feed(""),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    script.page(USERS, "0", json!([user(0, TENANTS)]), "1");
    script.page(USERS, "1", json!([user(1, TENANTS)]), "0");
    let done = tokio::time::timeout(Duration::from_secs(10), pass(&s, incremental())).await;
    let n = script.asked(USERS);
    match done {
        Err(_) => panic!("still looping after 10 s and {n} requests"),
        Ok(r) => assert_ne!(
            JobStatus::of_report(&r),
            JobStatus::Succeeded,
            "{n} requests, outcome {:?}",
            r.outcome
        ),
    }
}

/// The purge-count guard only limits one run: the checkpoint keeps the
/// pages before the trip, so each scheduled run deletes up to
/// max_purge_count more. A broken feed that lists everything as deleted
/// (the case the guard's comment names) empties the table over a few runs,
/// each reported `guard_tripped`.
async fn the_purge_guard_holds_across_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    let script = Arc::new(Script::default());
    let addr = serve(script.clone()).await;
    let s = ConfigBuilder {
        policy: "max_purge_fraction = 1.0\nmax_purge_count = 3".into(),
        tail: users_feed(""),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    for p in 0..5u64 {
        let items: Vec<Json> = (2 * p..2 * p + 2)
            .map(|i| json!({"uuid": uuid(&user(i, TENANTS)), "deleted": true}))
            .collect();
        script.page(USERS, &p.to_string(), json!(items), &(p + 1).to_string());
    }
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let r = pass(&s, incremental()).await;
        outcomes.push(r.outcome);
    }
    assert!(
        db.count("users").await >= 7,
        "the guard (max 3) let {} of 10 rows go over runs {outcomes:?}",
        10 - db.count("users").await
    );
}

both_backends!(
    a_parent_delete_whose_cascade_failed_is_never_cascaded,
    a_parent_deleted_then_recreated_in_one_page_keeps_its_children,
    deletions_left_by_purge_extra_false_are_not_in_sync,
    a_run_cut_by_max_pages_does_not_claim_success,
    a_cycling_cursor_is_detected,
    the_purge_guard_holds_across_runs,
);

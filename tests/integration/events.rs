//! The live half: events applied through the journal, and the race rule
//! between an event and a pass (design rule 3), with real interleavings
//! against a slow upstream. The event side opens its own store (its own
//! connections): on PostgreSQL that is a second replica sharing the
//! database with the one running the pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use driftd::config::Settings;
use driftd::engine::events::{Envelope, Events};
use driftd::metrics::Metrics;
use driftd::pass::{run_pass, Hooks, Outcome, PassOptions};
use driftd::sample::{sample_uuid, Fault};
use driftd::store::{AnyStore, Change, Ledger, Mirror, PassWrite};
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::{upstream, users, Backend, ConfigBuilder, TestDb};

/// `[sources.bus]`: a webhook source with users' upsert, delete and
/// refetch events, wazo-style (`name` and `data` in the body).
pub const BUS: &str = r#"
[sources.bus]
kind = "webhook"
name_pointer = "/name"
time_pointer = "/timestamp"
[sources.bus.events.user_created]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
[sources.bus.events.user_edited]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
version = "/data/version"
[sources.bus.events.user_deleted]
resource = "users"
op = "delete"
key = "/data/uuid"
[sources.bus.events.user_refetch]
resource = "users"
op = "refetch"
key = "/data/uuid"

[sources.hooks]
kind = "webhook"
name_header = "Event-Name"
[sources.hooks.events]
user_deleted = { resource = "users", op = "delete", key = "/uuid" }
"#;

pub fn message(name: &str, data: Json) -> Envelope {
    Envelope::new(
        BTreeMap::new(),
        json!({"name": name, "timestamp": "2026-01-01T00:00:00Z", "data": data})
            .to_string()
            .into_bytes(),
    )
}

/// The event engine on a store of its own.
pub async fn engine(settings: &Arc<Settings>) -> Events {
    let store = AnyStore::open(&settings.store.url, 4)
        .await
        .expect("open store");
    Events::new(settings.clone(), Arc::new(store), Arc::new(Metrics::new())).expect("events")
}

fn settings(builder: &ConfigBuilder, db: &TestDb, addr: std::net::SocketAddr) -> Arc<Settings> {
    let mut b = ConfigBuilder {
        tail: BUS.to_string(),
        ..ConfigBuilder::default()
    };
    b.page_size = builder.page_size;
    b.policy = builder.policy.clone();
    Arc::new(b.settings(db, addr))
}

async fn firstname(db: &TestDb, key: &str) -> Option<String> {
    db.text(&format!(
        "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
    ))
    .await
    .into_iter()
    .next()
    .flatten()
}

async fn events_apply_idempotently_and_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(3);
    let (_up, addr) = upstream(all.clone()).await;
    let s = settings(&ConfigBuilder::default(), &db, addr);
    let events = engine(&s).await;
    let key = all[0]["uuid"].as_str().unwrap().to_string();

    // Created, then the same event again: one row, unchanged.
    for _ in 0..2 {
        let v = events
            .deliver("bus", &[message("user_created", all[0].clone())])
            .await
            .unwrap();
        assert_eq!(v[0].outcome, "applied", "{v:?}");
    }
    assert_eq!(db.count("users").await, 1);

    // Versioned edits: v2 applies, v1 (older, delivered late) is stale.
    let mut v2 = all[0].clone();
    v2["firstname"] = json!("Second");
    v2["version"] = json!(2);
    let mut v1 = all[0].clone();
    v1["firstname"] = json!("First");
    v1["version"] = json!(1);
    let out = events
        .deliver("bus", &[message("user_edited", v2.clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
    let out = events
        .deliver("bus", &[message("user_edited", v1.clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "stale", "{out:?}");
    assert_eq!(firstname(&db, &key).await.as_deref(), Some("Second"));
    // v2 delivered again after a pass (or anyone) changed the row: the
    // duplicate does not undo it.
    db.exec(&format!(
        "UPDATE users SET firstname = 'Repaired' WHERE CAST(uuid AS TEXT) = '{key}'"
    ))
    .await;
    let out = events
        .deliver("bus", &[message("user_edited", v2.clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "stale", "{out:?}");
    assert_eq!(firstname(&db, &key).await.as_deref(), Some("Repaired"));

    // In one batch, the older version loses too, whatever the order.
    let mut v3 = all[0].clone();
    v3["firstname"] = json!("Third");
    v3["version"] = json!(3);
    let out = events
        .deliver(
            "bus",
            &[message("user_edited", v3), message("user_edited", v1)],
        )
        .await
        .unwrap();
    assert_eq!(
        out.iter().map(|v| v.outcome).collect::<Vec<_>>(),
        ["applied", "stale"]
    );
    assert_eq!(firstname(&db, &key).await.as_deref(), Some("Third"));

    // Deleted, twice: gone, and the second changes nothing.
    for _ in 0..2 {
        let out = events
            .deliver("bus", &[message("user_deleted", json!({"uuid": key}))])
            .await
            .unwrap();
        assert_eq!(out[0].outcome, "applied");
    }
    assert_eq!(db.count("users").await, 0);

    // The name from a header, whatever case HTTP gave its name.
    db.insert_users(&all[1..2]).await;
    let headers = BTreeMap::from([("event-name".to_string(), "user_deleted".to_string())]);
    let body = json!({"uuid": all[1]["uuid"]}).to_string().into_bytes();
    let out = events
        .deliver("hooks", &[Envelope::new(headers, body.clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    assert_eq!(db.count("users").await, 0);
    let out = events
        .deliver("hooks", &[Envelope::new(BTreeMap::new(), body)])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered");
    assert!(
        out[0]
            .error
            .as_deref()
            .unwrap()
            .contains("header `Event-Name`"),
        "{out:?}"
    );

    // Unknown names are ignored and counted; nothing is written.
    let out = events
        .deliver("bus", &[message("user_moved", json!({"uuid": key}))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "ignored");
    let metrics = events.metrics().render();
    assert!(
        metrics.contains(r#"driftd_events_total{outcome="ignored",resource="",source="bus"} 1"#),
        "{metrics}"
    );
}

async fn refetch_upserts_or_deletes_on_404(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(2);
    let (up, addr) = upstream(all.clone()).await;
    let s = settings(&ConfigBuilder::default(), &db, addr);
    let events = engine(&s).await;
    let key = all[1]["uuid"].as_str().unwrap().to_string();
    // wazo-confd's user events carry only ids: the row comes from upstream.
    let out = events
        .deliver(
            "bus",
            &[message("user_refetch", json!({"uuid": key, "id": 7}))],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    assert_eq!(firstname(&db, &key).await.as_deref(), Some("First1"));
    up.remove("users", &key);
    let out = events
        .deliver("bus", &[message("user_refetch", json!({"uuid": key}))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
    assert_eq!(db.count("users").await, 0, "a 404 on refetch deletes");
    // An upstream that does not answer in time, retries included: the
    // event is kept as a dead letter, not dropped and not applied.
    up.inject(Fault::SlowGet { ms: 3_000 });
    let other = all[0]["uuid"].as_str().unwrap().to_string();
    let out = events
        .deliver("bus", &[message("user_refetch", json!({"uuid": other}))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    let error = out[0].error.as_deref().unwrap();
    assert!(
        error.contains("refetch of") && error.contains("after retries"),
        "{error}"
    );
    assert_eq!(db.count("users").await, 0);
    let letters = events.store().list_dead_letters(None, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
}

async fn poison_events_become_dead_letters_and_the_rest_applies(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(3);
    let (_up, addr) = upstream(all.clone()).await;
    let s = settings(&ConfigBuilder::default(), &db, addr);
    let events = engine(&s).await;
    let mut bad_type = all[1].clone();
    bad_type["extension"] = json!("not a number");
    let mut too_long = all[2].clone();
    // PostgreSQL's lastname is varchar(64): the database refuses it.
    too_long["lastname"] = json!("x".repeat(100));
    let batch = vec![
        Envelope::new(BTreeMap::new(), b"{not json".to_vec()),
        message("user_created", json!({"firstname": "no key"})),
        message("user_created", bad_type),
        message("user_created", all[0].clone()),
        message("user_created", too_long),
    ];
    let out = events.deliver("bus", &batch).await.unwrap();
    let outcomes: Vec<&str> = out.iter().map(|v| v.outcome).collect();
    let last = if backend == Backend::Postgres {
        "dead_lettered"
    } else {
        "applied"
    };
    assert_eq!(
        outcomes,
        [
            "dead_lettered",
            "dead_lettered",
            "dead_lettered",
            "applied",
            last
        ],
        "{out:#?}"
    );
    assert!(out[0].error.as_deref().unwrap().contains("not JSON"));
    assert!(
        out[1].error.as_deref().unwrap().contains("/data/uuid"),
        "{:?}",
        out[1].error
    );
    assert!(out[2].error.as_deref().unwrap().contains("extension"));
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 100)
        .await
        .unwrap();
    let expected = if backend == Backend::Postgres { 4 } else { 3 };
    assert_eq!(letters.len(), expected);
    assert!(
        letters
            .iter()
            .any(|l| l.body == "{not json" && l.raw == b"{not json"),
        "the raw message is kept"
    );
    // The good one applied in the same batch.
    assert_eq!(
        firstname(&db, all[0]["uuid"].as_str().unwrap())
            .await
            .as_deref(),
        Some("First0")
    );
    let metrics = events.metrics().render();
    assert!(
        metrics.contains(&format!(
            r#"driftd_dead_letters{{source="bus"}} {expected}"#
        )),
        "{metrics}"
    );

    // Replaying a letter that still cannot apply keeps it (new error);
    // deleting it removes it.
    let id = letters
        .iter()
        .find(|l| l.body == "{not json")
        .map(|l| l.id.clone())
        .unwrap();
    let v = events.replay(&id).await.unwrap();
    assert_eq!(v.outcome, "dead_lettered");
    let after = events.store().list_dead_letters(None, 100).await.unwrap();
    assert_eq!(after.len(), expected);
    assert!(events.store().delete_dead_letter(&id).await.unwrap());
    assert!(events.store().get_dead_letter(&id).await.unwrap().is_none());
}

/// A table driftd cannot write (dropped under it) is not the events'
/// fault: nothing is settled, nothing dead-lettered; they wait to be
/// delivered again, and apply once the table is back.
async fn an_unusable_table_settles_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(2);
    let (_up, addr) = upstream(all.clone()).await;
    let s = settings(&ConfigBuilder::default(), &db, addr);
    let events = engine(&s).await;
    // Prepared while the table was there.
    events
        .deliver("bus", &[message("user_created", all[0].clone())])
        .await
        .unwrap();
    db.exec("DROP TABLE users").await;
    let batch = [message("user_created", all[1].clone())];
    let err = events.deliver("bus", &batch).await.unwrap_err();
    assert!(!err.is_refusal(), "{err}");
    assert!(events
        .store()
        .list_dead_letters(None, 10)
        .await
        .unwrap()
        .is_empty());
    db.create_users().await;
    let out = events.deliver("bus", &batch).await.unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
}

/// A pass that listed a user before an event deleted it (and upstream with
/// it) does not re-insert it; a user an event edited while the pass paged
/// keeps the event's copy, not the pass's older one.
async fn a_pass_yields_to_events_applied_while_it_listed(backend: Backend) {
    race(backend, false).await
}

/// The same, the pass run by another driftd process (`driftd reconcile`):
/// on PostgreSQL, two replicas sharing one database; on SQLite, two
/// processes on one file.
async fn a_pass_in_another_process_yields_to_events(backend: Backend) {
    race(backend, true).await
}

async fn race(backend: Backend, other_process: bool) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let mut all = users(30);
    // Locally: everything but user 2 (the pass will want to insert it),
    // and user 5 stale (the pass will want to repair it).
    let mut local = all.clone();
    local.remove(2);
    local[4]["firstname"] = json!("Stale");
    db.insert_users(&local).await;
    let (up, addr) = upstream(all.clone()).await;
    let builder = ConfigBuilder {
        page_size: 10,
        ..ConfigBuilder::default()
    };
    let s = settings(&builder, &db, addr);
    // The second page is slow: the events arrive while the pass waits.
    up.inject(Fault::Delay {
        offset: 15,
        ms: 1500,
    });
    let deleted = all[2]["uuid"].as_str().unwrap().to_string();
    let edited = all[5]["uuid"].as_str().unwrap().to_string();
    // Sorts before user 0: page one's range.
    let created = sample_uuid(0, 0);
    let pass_settings = s.clone();
    let config_dir = tempfile::tempdir().unwrap();
    let config_path = config_dir.path().join("driftd.toml");
    std::fs::write(
        &config_path,
        ConfigBuilder {
            page_size: 10,
            ..ConfigBuilder::default()
        }
        .toml(&db, addr),
    )
    .unwrap();
    let pass = tokio::spawn(async move {
        if other_process {
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_driftd"))
                    .args(["reconcile", "users", "--json", "--config"])
                    .arg(&config_path)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            serde_json::from_slice::<Json>(&out.stdout).unwrap_or_else(|_| {
                panic!(
                    "driftd reconcile: {}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        } else {
            let store = AnyStore::open(&pass_settings.store.url, 4).await.unwrap();
            let res = pass_settings.resource("users").unwrap();
            let report = run_pass(
                &store,
                "users",
                res,
                PassOptions::default(),
                &Hooks::default(),
            )
            .await;
            serde_json::to_value(&report).unwrap()
        }
    });
    // Wait for the slow page to be asked for: page one is listed.
    let waited = std::time::Instant::now();
    while up.list_requests() < 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the pass never paged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Upstream changes, announced by events, applied by another replica:
    // user 2 deleted, a new user created in page one's range (the list
    // keeps its length there, so the pass's page boundary holds), user 5
    // edited.
    up.remove("users", &deleted);
    let mut new_user = all[0].clone();
    new_user["uuid"] = json!(created);
    new_user["firstname"] = json!("Created");
    let mut items = up.items("users");
    items.push(new_user.clone());
    all[5]["firstname"] = json!("Edited");
    for item in &mut items {
        if item["uuid"] == all[5]["uuid"] {
            item["firstname"] = json!("Edited");
        }
    }
    up.set("users", "uuid", items);
    let events = engine(&s).await;
    let out = events
        .deliver(
            "bus",
            &[
                message("user_deleted", json!({"uuid": deleted})),
                message("user_created", new_user),
                message("user_edited", all[5].clone()),
            ],
        )
        .await
        .unwrap();
    assert!(out.iter().all(|v| v.outcome == "applied"), "{out:?}");
    let report = pass.await.unwrap();
    assert!(
        matches!(report["outcome"].as_str(), Some("repaired" | "in_sync")),
        "{report:#}"
    );
    assert_eq!(report["upstream_relists"], 0, "the page boundary held");
    assert!(
        report["actions"]["yielded"].as_u64() >= Some(2),
        "{:#}",
        report["actions"]
    );
    let parsed: driftd::pass::PassReport = serde_json::from_value(report.clone()).unwrap();
    let text = driftd::report::human(&parsed);
    assert!(text.contains("yielded"), "{text}");
    let keys = db.keys("users").await;
    assert!(
        !keys.contains(&deleted),
        "the pass re-inserted a user an event deleted"
    );
    assert!(
        keys.contains(&created),
        "the pass purged a user an event created"
    );
    assert_eq!(
        firstname(&db, &edited).await.as_deref(),
        Some("Edited"),
        "the pass overwrote an event's edit with its older copy"
    );
    // And a quiet pass converges: nothing left to do.
    up.clear_faults();
    let store = AnyStore::open(&s.store.url, 4).await.unwrap();
    let again = run_pass(
        &store,
        "users",
        s.resource("users").unwrap(),
        PassOptions::default(),
        &Hooks::default(),
    )
    .await;
    assert_eq!(again.outcome, Outcome::InSync, "{again:#?}");
}

/// The fence at the store: a key journaled after a pass's mark is left
/// alone by every kind of pass write, on any connection.
async fn the_journal_fences_every_pass_write(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(3);
    db.insert_users(&all[..1]).await;
    let (_up, addr) = upstream(all.clone()).await;
    let s = settings(&ConfigBuilder::default(), &db, addr);
    let spec = s.resource("users").unwrap().table_spec();
    let pass_store = AnyStore::open(&s.store.url, 2).await.unwrap();
    pass_store.prepare(&spec).await.unwrap();
    let mark = pass_store.journal_mark("users").await.unwrap();
    // A pass scanned user 0 and plans to purge it; an event (re)creates
    // it after the mark.
    let events = engine(&s).await;
    events
        .deliver("bus", &[message("user_created", all[0].clone())])
        .await
        .unwrap();
    let key = driftd::model::Key(all[0]["uuid"].as_str().unwrap().into());
    let w = pass_store
        .write_pass(
            &spec,
            "users",
            mark,
            PassWrite::Purge(std::slice::from_ref(&key)),
        )
        .await
        .unwrap();
    assert_eq!((w.done, w.yielded.len()), (0, 1));
    assert_eq!(db.count("users").await, 1);
    // A mark taken after the event lets the next pass purge it.
    let later = pass_store.journal_mark("users").await.unwrap();
    assert!(later > mark);
    let w = pass_store
        .write_pass(
            &spec,
            "users",
            later,
            PassWrite::Purge(std::slice::from_ref(&key)),
        )
        .await
        .unwrap();
    assert_eq!((w.done, w.yielded.len()), (1, 0));
    // A change for another key does not fence this one.
    let other = driftd::model::Key(all[1]["uuid"].as_str().unwrap().into());
    let r = events
        .store()
        .apply_changes(
            &spec,
            "users",
            &[Change {
                key: other,
                row: None,
                version: None,
            }],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
}

both_backends!(
    events_apply_idempotently_and_in_order,
    an_unusable_table_settles_nothing,
    refetch_upserts_or_deletes_on_404,
    poison_events_become_dead_letters_and_the_rest_applies,
    a_pass_yields_to_events_applied_while_it_listed,
    a_pass_in_another_process_yields_to_events,
    the_journal_fences_every_pass_write,
);

/// A value PostgreSQL would round into its column (`numeric(5,2)` given
/// `1.234`) is refused naming the column, as a pass refuses it; applied,
/// the row would not be what upstream holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_column_would_change_is_dead_lettered() {
    let db = TestDb::new(Backend::Postgres).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, price NUMERIC(5,2))")
        .await;
    let toml = format!(
        r#"
[store]
url = "{url}"
[resources.items]
key = {{ upstream = "/id", column = "id" }}
local = {{ table = "items" }}
upstream = {{ base_url = "http://127.0.0.1:9", list_path = "/items", key_order = "asc" }}
columns = {{ price = {{ from = "/price", type = "numeric" }} }}
[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events]
item_saved = {{ resource = "items", op = "upsert", key = "/data/id", payload = "/data" }}
"#,
        url = db.url
    );
    let s = Arc::new(Settings::from_toml_str(&toml, "items.toml").unwrap());
    let events = engine(&s).await;
    let out = events
        .deliver(
            "bus",
            &[
                message("item_saved", json!({"id": "a", "price": "1.234"})),
                message("item_saved", json!({"id": "b", "price": "1.23"})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    assert!(
        out[0].error.as_deref().unwrap().contains("price"),
        "{out:?}"
    );
    assert_eq!(out[1].outcome, "applied", "{out:?}");
    assert_eq!(
        db.text("SELECT CAST(price AS TEXT) FROM items").await,
        vec![Some("1.23".to_string())]
    );
}

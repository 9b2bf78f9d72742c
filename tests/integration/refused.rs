//! A row the database refuses is one message's problem (design rule 10):
//! a trigger that raises, a foreign key from a table driftd does not
//! manage, on an upsert, on a cascade from a deleted parent and on a
//! reprovision's purge. The refused message becomes a dead letter naming
//! the refusal, every other message of the batch applies, and the source
//! goes on; a reprovision purge the database refuses ends `incomplete`
//! with one failed job naming the row, never `completed`.

use std::sync::Arc;

use driftd::config::Settings;
use driftd::jobs::{JobFilter, JobStatus};
use driftd::sample::{tenant, SampleUpstream};
use driftd::store::{AnyStore, Ledger};
use serde_json::json;

use crate::both_backends;
use crate::common::*;
use crate::events::{engine, message};

/// `users` (child of `tenants`) and `tenants`, fed by the webhook source
/// `bus`; `reprovision` adds reprovision control events for users.
fn config(db: &TestDb, addr: std::net::SocketAddr, reprovision: bool) -> Arc<Settings> {
    let tenant_lines = tenants_resource(addr);
    let mut tail = format!(
        r#"
{tenant_lines}
[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.auth_tenant_deleted]
resource = "tenants"
op = "delete"
key = "/data/uuid"
[sources.bus.events.user_created]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
"#
    );
    if reprovision {
        tail.push_str(
            "[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\nid_pointer = \"/data/id\"\nresources = [\"users\"]\n",
        );
    }
    let builder = ConfigBuilder {
        tail,
        ..ConfigBuilder::default()
    };
    Arc::new(builder.settings(db, addr))
}

/// 10 tenants and 30 users in them; `lines` (a table of the service's own,
/// which driftd does not manage) references one user.
async fn world(backend: Backend) -> (TestDb, Arc<SampleUpstream>, std::net::SocketAddr, String) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    create_tenants(&db).await;
    db.exec(match backend {
        Backend::Sqlite => {
            "CREATE TABLE lines (id INTEGER PRIMARY KEY, user_uuid TEXT REFERENCES users (uuid))"
        }
        Backend::Postgres => {
            "CREATE TABLE lines (id INTEGER PRIMARY KEY, user_uuid UUID REFERENCES users (uuid))"
        }
    })
    .await;
    let all = users(30);
    db.insert_users(&all).await;
    let referenced = all[0]["uuid"].as_str().unwrap().to_string();
    db.exec(&format!(
        "INSERT INTO lines (id, user_uuid) VALUES (1, '{referenced}')"
    ))
    .await;
    let (up, addr) = upstream(all).await;
    up.set("tenants", "uuid", (0..TENANTS).map(tenant).collect());
    (db, up, addr, referenced)
}

/// A trigger raising on one row's value: that message is a dead letter
/// with the trigger's words, the messages around it apply, alone or in a
/// batch, and the source's next batch applies too.
async fn a_trigger_that_raises_refuses_one_message(backend: Backend) {
    let (db, _up, addr, _) = world(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TRIGGER no_poison BEFORE UPDATE ON users WHEN NEW.firstname = 'Poison' \
             BEGIN SELECT RAISE(ABORT, 'poison is not a name'); END",
        Backend::Postgres => "CREATE FUNCTION no_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.firstname = 'Poison' THEN RAISE EXCEPTION 'poison is not a name'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER no_poison BEFORE INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION no_poison()",
    })
    .await;
    db.exec(match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER no_poison_insert BEFORE INSERT ON users WHEN NEW.firstname = 'Poison' \
             BEGIN SELECT RAISE(ABORT, 'poison is not a name'); END"
        }
        Backend::Postgres => "SELECT 1",
    })
    .await;
    let s = config(&db, addr, false);
    let events = engine(&s).await;
    let all = users(33);
    let mut poison = all[31].clone();
    poison["firstname"] = json!("Poison");
    let mut edited = all[1].clone();
    edited["firstname"] = json!("Edited");
    let batch = vec![
        message("user_created", all[30].clone()),
        message("user_created", poison.clone()),
        message("user_created", edited),
    ];
    let out = events
        .deliver("bus", &batch)
        .await
        .expect("a refused row never fails the batch");
    let outcomes: Vec<&str> = out.iter().map(|v| v.outcome).collect();
    assert_eq!(
        outcomes,
        ["applied", "dead_lettered", "applied"],
        "{out:#?}"
    );
    let error = out[1].error.as_deref().unwrap();
    assert!(error.contains("poison is not a name"), "{error}");
    assert_eq!(db.count("users").await, 31);
    assert_eq!(
        db.text(&format!(
            "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{}'",
            all[1]["uuid"].as_str().unwrap()
        ))
        .await,
        vec![Some("Edited".to_string())]
    );
    // Alone, and an update of an existing row: the same.
    let mut poisoned_edit = all[2].clone();
    poisoned_edit["firstname"] = json!("Poison");
    let out = events
        .deliver("bus", &[message("user_created", poisoned_edit)])
        .await
        .expect("a refused row never fails the batch");
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    // The source goes on.
    let out = events
        .deliver("bus", &[message("user_created", all[32].clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(events
        .metrics()
        .render()
        .contains(r#"driftd_dead_letters{source="bus"} 2"#));
}

/// A deleted tenant whose user the database will not purge (a line
/// references it): the tenant's delete event is a dead letter naming the
/// refusal, the other event of the batch applies; once the line is gone,
/// replaying the letter purges the children.
async fn a_cascade_the_database_refuses_is_a_dead_letter(backend: Backend) {
    let (db, _up, addr, referenced) = world(backend).await;
    let s = config(&db, addr, false);
    let events = engine(&s).await;
    let t0 = tenant(0)["uuid"].as_str().unwrap().to_string();
    let users_of_t0 =
        format!("SELECT CAST(uuid AS TEXT) FROM users WHERE CAST(tenant_uuid AS TEXT) = '{t0}'");
    let before = db.text(&users_of_t0).await;
    assert!(
        before.contains(&Some(referenced.clone())),
        "user 0 belongs to tenant 0: {before:?}"
    );
    let newcomer = users(31)[30].clone();
    let out = events
        .deliver(
            "bus",
            &[
                message("auth_tenant_deleted", json!({"uuid": t0})),
                message("user_created", newcomer),
            ],
        )
        .await
        .expect("a refused cascade never fails the batch");
    assert_eq!(out[0].outcome, "dead_lettered", "{out:#?}");
    let error = out[0].error.as_deref().unwrap();
    assert!(error.contains("refused to purge its children"), "{error}");
    assert!(error.to_lowercase().contains("foreign key"), "{error}");
    assert_eq!(out[1].outcome, "applied", "{out:#?}");
    assert_eq!(db.count("users").await, 31);
    // The referenced user is still there; the letter waits.
    assert!(db.keys("users").await.contains(&referenced));
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    db.exec("DELETE FROM lines").await;
    let v = events.replay(&letters[0].id).await.unwrap();
    assert_ne!(v.outcome, "dead_lettered", "{v:?}");
    assert_eq!(v.cascaded.get("users"), Some(&4), "{v:?}");
    assert_eq!(
        db.text(&users_of_t0).await,
        Vec::<Option<String>>::new(),
        "the replay purged the children: {v:?}"
    );
    assert!(events
        .store()
        .get_dead_letter(&letters[0].id)
        .await
        .unwrap()
        .is_none());
}

/// A reprovision that re-sent 10 of 30 users, one of the 20 others
/// referenced by a line: the 19 others are purged, the referenced one is
/// kept, its job fails naming the row, the reprovision is `incomplete`,
/// exactly one purge job is recorded, and the source keeps applying.
async fn a_reprovision_purge_the_database_refuses_is_incomplete(backend: Backend) {
    let (db, _up, addr, referenced) = world(backend).await;
    let s = config(&db, addr, true);
    let events = engine(&s).await;
    let all = users(31);
    let mut batch = vec![message("ReprovisionStarted", json!({"id": "r1"}))];
    batch.extend(
        all[10..20]
            .iter()
            .map(|u| message("user_created", u.clone())),
    );
    batch.push(message("ReprovisionCompleted", json!({"id": "r1"})));
    batch.push(message("user_created", all[30].clone()));
    let out = events
        .deliver("bus", &batch)
        .await
        .expect("a refused purge never fails the batch");
    assert!(out.iter().all(|v| v.outcome == "applied"), "{out:#?}");
    let keys = db.keys("users").await;
    assert_eq!(
        keys.len(),
        12,
        "10 re-sent, the referenced one, the newcomer: {keys:?}"
    );
    assert!(keys.contains(&referenced));
    let store = AnyStore::open(&s.store.url, 2).await.unwrap();
    let r = store.reprovisions("bus", 10).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].state, "incomplete", "{:?}", r[0]);
    let reason = r[0].reason.clone().unwrap_or_default();
    assert!(reason.contains(&referenced), "{reason}");
    let jobs = store
        .list_jobs(&JobFilter {
            resource: Some("users".into()),
            status: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].status, JobStatus::Failed);
    // The batch is not delivered again (it settled): no second job.
    let out = events
        .deliver("bus", &[message("user_created", all[0].clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
}

fn hook_config(db: &TestDb, addr: std::net::SocketAddr) -> Arc<Settings> {
    let builder = ConfigBuilder {
        tail: r#"
[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.user_created]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
"#
        .into(),
        ..ConfigBuilder::default()
    };
    Arc::new(builder.settings(db, addr))
}

/// A trigger that fails on one row's value (it parses a name as JSON):
/// SQLite says plain SQLITE_ERROR, PostgreSQL 22P02. Either way that
/// message is a dead letter and the others of the batch apply.
async fn a_data_error_in_a_trigger_refuses_one_message(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.exec("CREATE TABLE audit (uuid TEXT, nick TEXT)").await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TRIGGER audit_users AFTER INSERT ON users BEGIN \
             INSERT INTO audit VALUES (NEW.uuid, CASE WHEN NEW.firstname LIKE '{%' THEN json_extract(NEW.firstname, '$.nick') END); END",
        Backend::Postgres => "CREATE FUNCTION audit_users() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             INSERT INTO audit VALUES (NEW.uuid, CASE WHEN NEW.firstname LIKE '{%' THEN (NEW.firstname::jsonb)->>'nick' END); RETURN NEW; END $$; \
             CREATE TRIGGER audit_users AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION audit_users()",
    })
    .await;
    let (_up, addr) = upstream(users(0)).await;
    let s = hook_config(&db, addr);
    let events = engine(&s).await;
    let all = users(3);
    let mut poison = all[1].clone();
    poison["firstname"] = json!("{broken");
    let out = events
        .deliver(
            "bus",
            &[
                message("user_created", all[0].clone()),
                message("user_created", poison),
                message("user_created", all[2].clone()),
            ],
        )
        .await
        .expect("one row's bad value must not hand the whole batch back forever");
    let outcomes: Vec<&str> = out.iter().map(|v| v.outcome).collect();
    assert_eq!(outcomes, ["applied", "dead_lettered", "applied"]);
}

/// A BEFORE trigger that drops the row (PostgreSQL: RETURN NULL; SQLite:
/// RAISE(IGNORE)) is neither an error nor a write: driftd counts the rows
/// the database kept, so such a message is not `applied`.
async fn a_row_a_trigger_drops_is_not_applied(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.exec(match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER skip BEFORE INSERT ON users WHEN NEW.firstname = 'Skip' \
             BEGIN SELECT RAISE(IGNORE); END"
        }
        Backend::Postgres => {
            "CREATE FUNCTION skip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.firstname = 'Skip' THEN RETURN NULL; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER skip BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION skip()"
        }
    })
    .await;
    let (_up, addr) = upstream(users(0)).await;
    let s = hook_config(&db, addr);
    let events = engine(&s).await;
    let mut u = users(1).remove(0);
    u["firstname"] = json!("Skip");
    let out = events
        .deliver("bus", &[message("user_created", u)])
        .await
        .unwrap();
    assert_eq!(db.count("users").await, 0);
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    let error = out[0].error.as_deref().unwrap();
    assert!(error.contains("kept 0 of the 1 row"), "{error}");
}

/// One row the database is always too slow for (a trigger sleeping past
/// `statement_timeout`): that message is a dead letter, the others apply,
/// and a second delivery of the batch settles too.
async fn a_statement_timeout_on_one_row_refuses_one_message(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.exec(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.firstname = 'Slow' THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION slow()",
    )
    .await;
    let name = db.url.rsplit('/').next().unwrap().to_string();
    db.exec(&format!(
        "ALTER DATABASE {name} SET statement_timeout = '1s'"
    ))
    .await;
    let (_up, addr) = upstream(users(0)).await;
    let s = hook_config(&db, addr);
    let events = engine(&s).await;
    let all = users(3);
    let mut slow = all[1].clone();
    slow["firstname"] = json!("Slow");
    let batch = [
        message("user_created", all[0].clone()),
        message("user_created", slow),
        message("user_created", all[2].clone()),
    ];
    for attempt in 0..2 {
        let out = events.deliver("bus", &batch).await.unwrap_or_else(|e| {
            panic!(
                "attempt {attempt}: the batch is handed back ({}); the source is stuck on one message",
                driftd::pass::error_chain(&e)
            )
        });
        let outcomes: Vec<&str> = out.iter().map(|v| v.outcome).collect();
        assert_eq!(outcomes, ["applied", "dead_lettered", "applied"], "{out:?}");
    }
    assert_eq!(db.count("users").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_statement_timeout_on_one_row_refuses_one_message() {
    a_statement_timeout_on_one_row_refuses_one_message(Backend::Postgres).await
}

both_backends!(
    a_trigger_that_raises_refuses_one_message,
    a_cascade_the_database_refuses_is_a_dead_letter,
    a_reprovision_purge_the_database_refuses_is_incomplete,
    a_data_error_in_a_trigger_refuses_one_message,
    a_row_a_trigger_drops_is_not_applied,
);

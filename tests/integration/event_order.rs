//! Events apply in the order they were sent, versions decide between
//! edits, cascades follow deleted parents, dead letters keep what failed
//! and RabbitMQ redeliveries change nothing twice. Each test states the
//! promise it holds driftd to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftd::config::Settings;
use driftd::daemon::Daemon;
use driftd::sample::tenant;
use driftd::store::Ledger;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;
use crate::events::{engine, message, BUS};

fn bus_settings(db: &TestDb, addr: std::net::SocketAddr) -> Arc<Settings> {
    let b = ConfigBuilder {
        tail: BUS.to_string(),
        ..ConfigBuilder::default()
    };
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

fn key_of(u: &Json) -> String {
    u["uuid"].as_str().unwrap().to_string()
}

fn edit(u: &Json, name: &str, version: i64) -> Json {
    let mut e = u.clone();
    e["firstname"] = json!(name);
    e["version"] = json!(version);
    e
}

/// Promise 2 (ordered apply). v5 was applied; then the user is deleted
/// (`user_deleted` carries no version) and the older edit v3 arrives late.
/// One event at a time, the delete applies and v3 is stale: the user is
/// gone. In one batch, `Group::add` lets the unversioned delete be
/// replaced by v3 (an unversioned change never counts as newer), v3 is
/// then judged against the journal (v5) and dropped as stale, and with it
/// the delete: the deleted user stays, and the delete's verdict says
/// `stale`.
async fn a_delete_batched_with_an_older_edit_is_not_lost(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(2);
    let (_up, addr) = upstream(all.clone()).await;
    let s = bus_settings(&db, addr);
    let events = engine(&s).await;

    // One at a time (the control): gone.
    let one = key_of(&all[1]);
    let out = events
        .deliver("bus", &[message("user_edited", edit(&all[1], "Fifth", 5))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
    events
        .deliver("bus", &[message("user_deleted", json!({"uuid": one}))])
        .await
        .unwrap();
    let out = events
        .deliver("bus", &[message("user_edited", edit(&all[1], "Third", 3))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "stale");
    assert_eq!(firstname(&db, &one).await, None, "control: deleted");

    // The same events, the last two in one batch.
    let key = key_of(&all[0]);
    let out = events
        .deliver("bus", &[message("user_edited", edit(&all[0], "Fifth", 5))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
    let out = events
        .deliver(
            "bus",
            &[
                message("user_deleted", json!({"uuid": key})),
                message("user_edited", edit(&all[0], "Third", 3)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (firstname(&db, &key).await, out[0].outcome),
        (None, "applied"),
        "the delete must apply (the older edit is stale), as it does one event at a time: {out:?}"
    );
}

/// README: "Two different edits carrying the same version keep the
/// first". Across batches they do (`judge_versions`: `new <= old` is
/// stale); within one batch `Group::add` only treats `new < old` as
/// older, so the second edit replaces the first: the row depends on how
/// the broker happened to batch the messages.
async fn equal_versions_in_one_batch_keep_the_first(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(2);
    let (_up, addr) = upstream(all.clone()).await;
    let s = bus_settings(&db, addr);
    let events = engine(&s).await;

    // Two batches (the control): the first stays.
    let one = key_of(&all[1]);
    for name in ["A", "B"] {
        events
            .deliver("bus", &[message("user_edited", edit(&all[1], name, 2))])
            .await
            .unwrap();
    }
    assert_eq!(firstname(&db, &one).await.as_deref(), Some("A"));

    // One batch.
    let key = key_of(&all[0]);
    let out = events
        .deliver(
            "bus",
            &[
                message("user_edited", edit(&all[0], "A", 2)),
                message("user_edited", edit(&all[0], "B", 2)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        firstname(&db, &key).await.as_deref(),
        Some("A"),
        "same version in one batch must keep the first, as across batches: {out:?}"
    );
}

/// Promise 2. Two events of one resource carry versions of different
/// kinds (a revision number, an `updated_at` time). Config accepts it, but
/// their sortable forms do not compare: every timestamp sorts after every
/// integer (`"2026-..."` > `"09223..."`). Once a timestamp-versioned event
/// applied, every later integer-versioned event of the key is `stale`
/// forever: real edits are dropped. Either the config refuses mixed kinds
/// for one resource, or the newer edit applies.
async fn mixed_version_kinds_on_one_resource_drop_newer_edits(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(1);
    let (_up, addr) = upstream(all.clone()).await;
    let tail = r#"
[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.user_touched]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
version = "/data/updated_at"
version_kind = "timestamp"
[sources.bus.events.user_edited]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
version = "/data/revision"
version_kind = "integer"
"#;
    let text = ConfigBuilder {
        tail: tail.to_string(),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);
    let Ok(settings) = Settings::from_toml_str(&text, "mixed.toml") else {
        return; // refused: fine
    };
    let events = engine(&Arc::new(settings)).await;
    let key = key_of(&all[0]);
    let mut touched = all[0].clone();
    touched["firstname"] = json!("Touched");
    touched["updated_at"] = json!("2026-01-01T00:00:00Z");
    let out = events
        .deliver("bus", &[message("user_touched", touched)])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
    let mut edited = all[0].clone();
    edited["firstname"] = json!("Edited");
    edited["revision"] = json!(2);
    let out = events
        .deliver("bus", &[message("user_edited", edited)])
        .await
        .unwrap();
    assert_eq!(
        (out[0].outcome, firstname(&db, &key).await.as_deref()),
        ("applied", Some("Edited")),
        "config accepted mixed version kinds, and the later edit was dropped: {out:?}"
    );
}

/// tenants and users (users belong to tenants), a webhook source with
/// user upserts and versioned tenant deletes.
async fn family(backend: Backend) -> (TestDb, Arc<Settings>, Arc<driftd::sample::SampleUpstream>) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    create_tenants(&db).await;
    let tenants: Vec<_> = (0..TENANTS).map(tenant).collect();
    db.insert_users(&users(30)).await;
    let (up, addr) = upstream(users(30)).await;
    up.set("tenants", "uuid", tenants);
    let tenant_lines = tenants_resource(addr);
    let tail = format!(
        r#"
{tenant_lines}
[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.auth_tenant_deleted]
resource = "tenants"
op = "delete"
key = "/data/uuid"
version = "/data/revision"
[sources.bus.events.user_created]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
"#
    );
    let settings = ConfigBuilder {
        tail,
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    (db, Arc::new(settings), up)
}

async fn users_of(db: &TestDb, tenant_uuid: &str) -> i64 {
    db.text(&format!(
        "SELECT CAST(uuid AS TEXT) FROM users WHERE LOWER(CAST(tenant_uuid AS TEXT)) = '{tenant_uuid}'"
    ))
    .await
    .len() as i64
}

/// Promises 1 and 4. A versioned parent delete commits, then its cascade
/// fails (the child table is unusable for a moment): `deliver` returns
/// `Err`, so the message is not acked and comes again, as it should. But
/// the parent's delete already committed and journaled its version, so
/// the redelivery is `stale`, and only an `applied` delete cascades: the
/// children of the deleted tenant are never purged (the cascade is lost;
/// the parent delete and its cascade are two transactions).
async fn a_redelivered_parent_delete_still_purges_its_children(backend: Backend) {
    let (db, settings, _up) = family(backend).await;
    let events = engine(&settings).await;
    let t0 = tenant(0)["uuid"].as_str().unwrap().to_string();
    assert_eq!(users_of(&db, &t0).await, 3);
    let msg = message("auth_tenant_deleted", json!({"uuid": t0, "revision": 2}));

    db.exec("ALTER TABLE users RENAME TO users_away").await;
    let first = events.deliver("bus", std::slice::from_ref(&msg)).await;
    assert!(
        first.is_err(),
        "the cascade cannot run: not settled, to be delivered again: {first:?}"
    );
    db.exec("ALTER TABLE users_away RENAME TO users").await;

    // The broker delivers it again.
    let out = events
        .deliver("bus", std::slice::from_ref(&msg))
        .await
        .unwrap();
    assert_eq!(db.count("tenants").await, TENANTS as i64 - 1);
    assert_eq!(
        users_of(&db, &t0).await,
        0,
        "the children of the deleted tenant must be purged once the redelivered event settles: {out:?}"
    );
}

/// Promise 4 and ordered apply. In one batch, user U is created in tenant
/// T, then T is deleted. One event at a time, the cascade purges U. In one
/// batch, `settle` applies resources in name order (`tenants` before
/// `users`), not arrival order: T's cascade runs before U is inserted, and
/// U survives, a child of a deleted parent.
async fn a_child_created_before_its_parent_is_deleted_in_one_batch_is_purged(backend: Backend) {
    let (db, settings, _up) = family(backend).await;
    let events = engine(&settings).await;
    let more = users(32);

    // One at a time (the control): user 31 of tenant 1 is purged.
    let t1 = tenant(1)["uuid"].as_str().unwrap().to_string();
    assert_eq!(more[31]["tenant_uuid"], json!(t1));
    events
        .deliver("bus", &[message("user_created", more[31].clone())])
        .await
        .unwrap();
    let out = events
        .deliver(
            "bus",
            &[message(
                "auth_tenant_deleted",
                json!({"uuid": t1, "revision": 1}),
            )],
        )
        .await
        .unwrap();
    assert_eq!(out[0].cascaded.get("users"), Some(&4), "{out:?}");
    assert_eq!(users_of(&db, &t1).await, 0, "control");

    // The same two events in one batch: user 30 of tenant 0.
    let t0 = tenant(0)["uuid"].as_str().unwrap().to_string();
    assert_eq!(more[30]["tenant_uuid"], json!(t0));
    let out = events
        .deliver(
            "bus",
            &[
                message("user_created", more[30].clone()),
                message("auth_tenant_deleted", json!({"uuid": t0, "revision": 1})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        users_of(&db, &t0).await,
        0,
        "a user created before its tenant's delete (same batch) survived the cascade: {out:?}"
    );
}

/// Promises 1 and 5. A version pointer of kind `timestamp` whose string
/// holds a NUL: the event is bad input and should become a dead letter.
/// Its error quotes the raw string (`canonical::timestamp`), NUL
/// included; PostgreSQL refuses that text, so storing the dead letter
/// fails, `deliver` returns `Err`, and the source hands the message back:
/// the queue is stuck on it forever (the webhook answers 503 forever).
async fn a_nul_in_a_timestamp_version_is_dead_lettered(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(1);
    let (_up, addr) = upstream(all.clone()).await;
    let tail = BUS.replace(
        "version = \"/data/version\"",
        "version = \"/data/updated_at\"\nversion_kind = \"timestamp\"",
    );
    let s = Arc::new(
        ConfigBuilder {
            tail,
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let events = engine(&s).await;
    let mut e = all[0].clone();
    e["updated_at"] = json!("2026-01-01T00:00:00Z\u{0}");
    let out = events.deliver("bus", &[message("user_edited", e)]).await;
    let out = out.unwrap_or_else(|err| {
        panic!("bad input must be dead-lettered, not block the source: {err}")
    });
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
}

/// Promise 1 (nothing dropped silently). Replaying a dead letter that
/// fails again deletes the letter, then stores a new one: two steps, no
/// transaction. When the database fails between them (here a trigger
/// refuses the insert), the replay answers an error and the dead letter
/// is gone for good.
async fn a_failed_replay_keeps_its_dead_letter(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(1)).await;
    let s = bus_settings(&db, addr);
    let events = engine(&s).await;
    let out = events
        .deliver(
            "bus",
            &[driftd::engine::events::Envelope::new(
                BTreeMap::new(),
                b"{not json".to_vec(),
            )],
        )
        .await
        .unwrap();
    let id = out[0].dead_letter.clone().expect("dead-lettered");

    db.exec(match backend {
        Backend::Sqlite => "CREATE TRIGGER r4_full BEFORE INSERT ON driftd_dead_letters BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        Backend::Postgres => "CREATE FUNCTION r4_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$; \
             CREATE TRIGGER r4_full BEFORE INSERT ON driftd_dead_letters FOR EACH ROW EXECUTE FUNCTION r4_full()",
    })
    .await;
    // A replay that fails again records the new error in place (one
    // statement): whether or not the database lets that through, the
    // letter stays.
    let replay = events.replay(&id).await;
    if let Ok(v) = &replay {
        assert_eq!(v.outcome, "dead_lettered", "{replay:?}");
    }
    db.exec(match backend {
        Backend::Sqlite => "DROP TRIGGER r4_full",
        Backend::Postgres => "DROP TRIGGER r4_full ON driftd_dead_letters",
    })
    .await;

    let letters = events.store().list_dead_letters(None, 10).await.unwrap();
    assert_eq!(
        letters.len(),
        1,
        "a replay that failed must leave the dead letter in place; it was deleted and nothing stored"
    );
}

/// Promise 2 across the journal's life. v3 was dead-lettered (a field
/// missing), v5 applied. The operator fixes the config and replays the
/// letter: stale, as long as the journal remembers v5. But the daemon
/// prunes journal entries older than `job_retention_days` (versions
/// included): a replay after that applies v3 over v5. Simulated by pruning
/// as the daemon does once the retention has passed.
async fn replaying_an_old_dead_letter_after_the_journal_is_pruned_is_stale(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(1);
    let (_up, addr) = upstream(all.clone()).await;
    let strict = bus_settings(&db, addr);
    let events = engine(&strict).await;
    let key = key_of(&all[0]);
    let mut v3 = edit(&all[0], "Third", 3);
    v3.as_object_mut().unwrap().remove("email");
    let out = events
        .deliver("bus", &[message("user_edited", v3)])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    let id = out[0].dead_letter.clone().unwrap();
    let out = events
        .deliver("bus", &[message("user_edited", edit(&all[0], "Fifth", 5))])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");

    // job_retention_days later, the daemon's prune (before = now - retention).
    let later = humantime::format_rfc3339_millis(
        std::time::SystemTime::now() + Duration::from_secs(86_400),
    )
    .to_string();
    events.store().prune_jobs(&later).await.unwrap();

    // The config fixed (email optional), the letter replayed.
    let text = ConfigBuilder {
        tail: BUS.to_string(),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr)
    .replace(
        "email = { from = \"/email\" }",
        "email = { from = \"/email\", optional = true }",
    );
    let fixed = Arc::new(Settings::from_toml_str(&text, "fixed.toml").unwrap());
    let events = engine(&fixed).await;
    let v = events.replay(&id).await.unwrap();
    assert_eq!(
        (v.outcome, firstname(&db, &key).await.as_deref()),
        ("stale", Some("Fifth")),
        "an older event (v3) overwrote the newer row (v5) once the journal was pruned"
    );
}

/// Promise 1's consequence for a cascade by type. The parent key is a
/// uuid (canonical lower case); the child's parent column is mapped with
/// the default type, text, which keeps upstream's spelling. Config accepts
/// the pair; upstream spells tenant uuids in upper case; a deleted tenant's
/// cascade compares text and matches none of its users (SQLite keeps them
/// as text).
async fn a_parent_column_mapped_as_text_still_cascades(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.exec("CREATE TABLE tenants (uuid TEXT PRIMARY KEY, name TEXT)")
        .await;
    let t0 = tenant(0)["uuid"].as_str().unwrap().to_string();
    db.exec(&format!(
        "INSERT INTO tenants (uuid, name) VALUES ('{t0}', 'Tenant 0')"
    ))
    .await;
    let mut all = users(3);
    for u in &mut all {
        u["tenant_uuid"] = json!(t0.to_uppercase());
    }
    let (up, addr) = upstream(all.clone()).await;
    up.set("tenants", "uuid", vec![tenant(0)]);
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
get_path = "/0.1/tenants/{{key}}"
key_order = "asc"
backoff_ms = 1
query = {{ order = "uuid" }}
[resources.tenants.columns]
name = {{ from = "/name" }}

[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.auth_tenant_deleted]
resource = "tenants"
op = "delete"
key = "/data/uuid"
"#
    );
    let text = ConfigBuilder {
        tail,
        ..ConfigBuilder::default()
    }
    .toml(&db, addr)
    .replace(
        "tenant_uuid = { from = \"/tenant_uuid\", type = \"uuid\" }",
        "tenant_uuid = { from = \"/tenant_uuid\" }",
    );
    let Ok(settings) = Settings::from_toml_str(&text, "text-parent.toml") else {
        return; // refused: fine
    };
    let settings = Arc::new(settings);
    // The users arrive by a pass, as upstream spells them.
    let report = pass(&settings, Default::default()).await;
    assert_eq!(db.count("users").await, 3, "{report:?}");
    let events = engine(&settings).await;
    let out = events
        .deliver(
            "bus",
            &[message(
                "auth_tenant_deleted",
                json!({"uuid": t0.to_uppercase()}),
            )],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    assert_eq!(db.count("tenants").await, 0);
    assert_eq!(
        db.count("users").await,
        0,
        "the deleted tenant's users were not cascaded (config accepted a text parent column for a uuid parent key): {out:?}"
    );
}

/// Ordered apply across resources. A tenant is added, then a user in it,
/// in one batch; the users table has a foreign key to tenants (as a
/// mirror of owned data often does). `settle` applies resource groups in
/// the resources' name order, not arrival order: with the tenants resource
/// named after `users` (here `z_tenants`), the user is inserted before its
/// tenant, the database refuses it, and a valid, in-order event becomes a
/// dead letter. One event at a time, both apply.
async fn events_of_two_resources_in_one_batch_apply_in_arrival_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE tenants (uuid TEXT PRIMARY KEY, name TEXT); \
            CREATE TABLE users (uuid TEXT PRIMARY KEY, tenant_uuid TEXT REFERENCES tenants (uuid), firstname TEXT, lastname TEXT, email TEXT, enabled BOOLEAN, extension INTEGER, deleted_at TEXT, note TEXT)",
        Backend::Postgres => "CREATE TABLE tenants (uuid UUID PRIMARY KEY, name TEXT); \
            CREATE TABLE users (uuid UUID PRIMARY KEY, tenant_uuid UUID REFERENCES tenants (uuid), firstname TEXT, lastname VARCHAR(64), email TEXT, enabled BOOLEAN, extension INTEGER, deleted_at TIMESTAMPTZ, note TEXT)",
    })
    .await;
    let (_up, addr) = upstream(users(0)).await;
    let tail = format!(
        r#"
[resources.z_tenants]
key = {{ upstream = "/uuid", column = "uuid", type = "uuid" }}
local = {{ table = "tenants" }}
[resources.z_tenants.upstream]
base_url = "http://{addr}"
list_path = "/0.1/tenants"
get_path = "/0.1/tenants/{{key}}"
key_order = "asc"
query = {{ order = "uuid" }}
[resources.z_tenants.columns]
name = {{ from = "/name" }}

[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.auth_tenant_added]
resource = "z_tenants"
op = "upsert"
key = "/data/uuid"
payload = "/data"
[sources.bus.events.user_created]
resource = "users"
op = "upsert"
key = "/data/uuid"
payload = "/data"
"#
    );
    let settings = Arc::new(
        ConfigBuilder {
            tail,
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let events = engine(&settings).await;
    let all = users(2);

    // One at a time (the control): both apply.
    events
        .deliver("bus", &[message("auth_tenant_added", tenant(1))])
        .await
        .unwrap();
    let out = events
        .deliver("bus", &[message("user_created", all[1].clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "control: {out:?}");

    // The same, in one batch.
    let out = events
        .deliver(
            "bus",
            &[
                message("auth_tenant_added", tenant(0)),
                message("user_created", all[0].clone()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        out.iter().map(|v| v.outcome).collect::<Vec<_>>(),
        ["applied", "applied"],
        "a user created after its tenant (same batch) was applied before it: {out:?}"
    );
}

both_backends!(
    a_delete_batched_with_an_older_edit_is_not_lost,
    equal_versions_in_one_batch_keep_the_first,
    mixed_version_kinds_on_one_resource_drop_newer_edits,
    a_redelivered_parent_delete_still_purges_its_children,
    a_child_created_before_its_parent_is_deleted_in_one_batch_is_purged,
    a_nul_in_a_timestamp_version_is_dead_lettered,
    a_failed_replay_keeps_its_dead_letter,
    replaying_an_old_dead_letter_after_the_journal_is_pruned_is_stale,
    events_of_two_resources_in_one_batch_apply_in_arrival_order,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_parent_column_mapped_as_text_still_cascades() {
    a_parent_column_mapped_as_text_still_cascades(Backend::Sqlite).await
}

// ---------------------------------------------------------------------
// RabbitMQ: a batch handed back (nack, requeue) while later messages are
// already delivered to driftd.

fn amqp_url() -> String {
    std::env::var("DRIFTD_TEST_AMQP_URL").expect("DRIFTD_TEST_AMQP_URL is not set")
}

async fn publish(ch: &lapin::Channel, exchange: &str, name: &str, data: Json) {
    let body = json!({"name": name, "timestamp": chrono::Utc::now().to_rfc3339(), "data": data});
    let mut headers = BTreeMap::new();
    headers.insert("name".into(), AMQPValue::LongString(name.into()));
    let confirm = ch
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_headers(FieldTable::from(headers))
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
}

async fn ready_messages(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Promise 1 and ordered apply ("two consumers never apply a queue's
/// events out of order (a create after its delete)"). With batch_size 1
/// and a prefetch window, `user_created U` is being applied when the
/// database fails (a lost connection); meanwhile `user_deleted U` has
/// already been delivered to driftd. driftd nacks the create with
/// requeue: RabbitMQ puts it back and delivers it again *after* the
/// delete already in driftd's buffer. The delete applies first, then the
/// create: U, deleted upstream, is in the table. (`R4_CONTROL=1` skips
/// the lost connection: then the test passes, the order kept.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_handed_back_batch_is_not_applied_after_later_events() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let n = fastrand::u64(..);
    let exchange = format!("review4-x-{n:x}");
    let queue = format!("review4-q-{n:x}");
    let source = format!(
        r#"
[sources.wazo]
kind = "rabbitmq"
name_header = "name"
batch_size = 1
[sources.wazo.rabbitmq]
url = "{url}"
exchange = "{exchange}"
exchange_type = "headers"
queue = "{queue}"
prefetch = 10
max_backoff_secs = 1
[sources.wazo.events]
user_created = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
user_deleted = {{ resource = "users", op = "delete", key = "/data/uuid" }}
"#,
        url = amqp_url()
    );
    let settings = Arc::new(
        ConfigBuilder {
            tail: format!("{}{}", open_worker_tail(dir.path()), source),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let d = Daemon::start(settings).await.unwrap();
    let base = format!("http://{}", d.addr);
    wait_for(Duration::from_secs(20), "the source connects", || async {
        sources(&base).await["sources"][0]["connected"] == true
    })
    .await;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    // Hold the users table: the create will wait on it.
    use sqlx::Connection as _;
    let mut locker = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let u = users(1)[0].clone();
    let key = key_of(&u);
    publish(&ch, &exchange, "user_created", u.clone()).await;
    let waiting = "SELECT CAST(pid AS TEXT) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    wait_for(
        Duration::from_secs(10),
        "driftd waits on the lock",
        || async { !db.text(waiting).await.is_empty() },
    )
    .await;
    // The delete reaches driftd (delivered, in its prefetch window) while
    // the create is still being applied.
    publish(&ch, &exchange, "user_deleted", json!({"uuid": key})).await;
    wait_for(
        Duration::from_secs(10),
        "the delete is delivered",
        || async { ready_messages(&ch, &queue).await == 0 },
    )
    .await;
    // The database connection applying the create is lost.
    let pid = db.text(waiting).await[0].clone().unwrap();
    if std::env::var("R4_CONTROL").is_err() {
        sqlx::query(&format!("SELECT pg_terminate_backend({pid})"))
            .execute(&mut locker)
            .await
            .unwrap();
    }
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();

    // Both events settle.
    wait_for(Duration::from_secs(15), "both events settle", || async {
        sources(&base).await["sources"][0]["events"].as_u64() == Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = db.keys("users").await;
    eprintln!("R4 sources: {}", sources(&base).await);
    assert!(d.stop().await);
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    assert!(
        !left.contains(&key),
        "created then deleted on the bus, yet the user is in the table: the create was applied after the delete"
    );
}

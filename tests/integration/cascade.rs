//! Cascades keep every guard of the child (design rule 2 for children):
//! deleting a parent whose children are more than the child's
//! `max_purge_count` or a larger share of its rows than its
//! `max_purge_fraction` deletes neither. An event's delete is `held` (kept
//! as a letter to replay, counted), never `applied`; a pass or a
//! reprovision purge trips the `cascade` guard and purges nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use driftd::config::Settings;
use driftd::pass::{Outcome, PassOptions};
use driftd::sample::tenant;
use driftd::store::Ledger;
use serde_json::json;

use crate::both_backends;
use crate::common::*;
use crate::events::{engine, message};

/// tenants (parent) and users (3 per tenant, at most `fraction` of them
/// purged at once), fed by the webhook source `bus`.
fn config(db: &TestDb, addr: std::net::SocketAddr, fraction: f64) -> Arc<Settings> {
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
"#
    );
    Arc::new(
        ConfigBuilder {
            policy: format!("max_purge_fraction = {fraction}\nmax_purge_count = 1000"),
            tail,
            ..ConfigBuilder::default()
        }
        .settings(db, addr),
    )
}

async fn world(
    backend: Backend,
) -> (
    TestDb,
    Arc<driftd::sample::SampleUpstream>,
    std::net::SocketAddr,
) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    create_tenants(&db).await;
    db.insert_users(&users(30)).await;
    let (up, addr) = upstream(users(30)).await;
    up.set("tenants", "uuid", (0..TENANTS).map(tenant).collect());
    (db, up, addr)
}

/// Deleting tenant 0 would purge 3 of 30 users (10%) where the users'
/// policy allows 5%: the event is held, the tenant and its users stay, the
/// letter waits and `driftd_events_total{outcome="held"}` counts it.
/// Replayed under a policy that allows it, it deletes both.
async fn a_delete_past_the_child_fraction_is_held(backend: Backend) {
    let (db, _up, addr) = world(backend).await;
    let s = config(&db, addr, 0.05);
    let events = engine(&s).await;
    let t0 = tenant(0)["uuid"].as_str().unwrap().to_string();
    let out = events
        .deliver(
            "bus",
            &[message("auth_tenant_deleted", json!({"uuid": t0}))],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "held", "{out:?}");
    let error = out[0].error.as_deref().unwrap();
    assert!(error.contains("max_purge_fraction"), "{error}");
    assert_eq!(
        db.count("tenants").await,
        TENANTS as i64,
        "the parent was deleted"
    );
    assert_eq!(db.count("users").await, 30);
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let metrics = events.metrics().render();
    assert!(
        metrics
            .contains(r#"driftd_events_total{outcome="held",resource="tenants",source="bus"} 1"#),
        "{metrics}"
    );
    // Replayed under the same policy: held again, the letter stays.
    let v = events.replay(&letters[0].id).await.unwrap();
    assert_eq!(v.outcome, "held", "{v:?}");
    assert!(events
        .store()
        .get_dead_letter(&letters[0].id)
        .await
        .unwrap()
        .is_some());
    // The operator allows it: the replay deletes parent and children.
    let events = engine(&config(&db, addr, 1.0)).await;
    let v = events.replay(&letters[0].id).await.unwrap();
    assert_eq!(v.outcome, "applied", "{v:?}");
    assert_eq!(v.cascaded.get("users"), Some(&3), "{v:?}");
    assert_eq!(db.count("tenants").await, TENANTS as i64 - 1);
    assert_eq!(db.count("users").await, 27);
}

/// A pass of tenants that would purge tenant 0 (gone upstream) and with
/// it 10% of the users trips the `cascade` guard: nothing purged, no
/// orphan.
async fn a_pass_purging_past_the_child_guard_trips(backend: Backend) {
    let (db, up, addr) = world(backend).await;
    let s = config(&db, addr, 0.05);
    up.remove("tenants", tenant(0)["uuid"].as_str().unwrap());
    let report = pass_resource(&s, "tenants", PassOptions::default()).await;
    assert_eq!(report.outcome, Outcome::GuardTripped, "{report:?}");
    assert_eq!(report.guard.as_ref().map(|g| g.name()), Some("cascade"));
    assert_eq!(db.count("tenants").await, TENANTS as i64);
    assert_eq!(db.count("users").await, 30);
    // Allowed, the same pass purges both.
    let s = config(&db, addr, 1.0);
    let report = pass_resource(&s, "tenants", PassOptions::default()).await;
    assert_eq!(report.outcome, Outcome::Repaired, "{report:?}");
    assert_eq!(db.count("tenants").await, TENANTS as i64 - 1);
    assert_eq!(db.count("users").await, 27);
}

async fn orphans(db: &TestDb) -> i64 {
    db.text(
        "SELECT CAST(COUNT(*) AS TEXT) FROM users WHERE tenant_uuid NOT IN (SELECT uuid FROM tenants)",
    )
    .await[0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// tenants and users as [`family_config`], with tenants' create event.
fn config_with_create(db: &TestDb, addr: SocketAddr, fraction: f64) -> Arc<Settings> {
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
[sources.bus.events.auth_tenant_created]
resource = "tenants"
op = "upsert"
key = "/data/uuid"
payload = "/data"
"#
    );
    Arc::new(
        ConfigBuilder {
            policy: format!("max_purge_fraction = {fraction}\nmax_purge_count = 1000"),
            tail,
            ..ConfigBuilder::default()
        }
        .settings(db, addr),
    )
}

/// Two tenant deletes in one batch, each purging 3 of 30 users (10%)
/// where the users' policy allows 10.5%: judged together (20%), the
/// second is held; no parent is deleted while its children stay.
async fn the_deletes_of_one_batch_are_judged_together(backend: Backend) {
    let (db, _up, addr) = world(backend).await;
    let s = config(&db, addr, 0.105);
    let events = engine(&s).await;
    let t = |i: u64| tenant(i)["uuid"].as_str().unwrap().to_string();
    let out = events
        .deliver(
            "bus",
            &[
                message("auth_tenant_deleted", json!({"uuid": t(0)})),
                message("auth_tenant_deleted", json!({"uuid": t(1)})),
            ],
        )
        .await
        .unwrap();
    let letters = events
        .store()
        .list_dead_letters(Some("bus"), 10)
        .await
        .unwrap();
    assert_eq!(
        orphans(&db).await,
        0,
        "a parent was deleted while its children were kept (orphans), verdicts {out:#?}, letters kept: {}",
        letters.len()
    );
}

/// A held delete replayed after its parent came back (created again by a
/// later event, and upstream lists it) is stale: the parent and its
/// children stay.
async fn a_held_delete_replayed_after_the_parent_came_back_is_stale(backend: Backend) {
    let (db, _up, addr) = world(backend).await;
    let t0 = tenant(0);
    let key = uuid(&t0);
    let events = engine(&config_with_create(&db, addr, 0.05)).await;
    let out = events
        .deliver(
            "bus",
            &[message("auth_tenant_deleted", json!({"uuid": key}))],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "held", "{out:?}");
    let letter = out[0].dead_letter.clone().unwrap();
    let out = events
        .deliver("bus", &[message("auth_tenant_created", t0.clone())])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied", "{out:?}");
    let events = engine(&config_with_create(&db, addr, 1.0)).await;
    let v = events.replay(&letter).await.unwrap();
    assert_eq!(
        (db.count("tenants").await, db.count("users").await),
        (TENANTS as i64, 30),
        "the replayed held delete removed a tenant created again since (upstream lists it) and its users: {v:?}"
    );
}

both_backends!(
    a_delete_past_the_child_fraction_is_held,
    a_pass_purging_past_the_child_guard_trips,
    the_deletes_of_one_batch_are_judged_together,
    a_held_delete_replayed_after_the_parent_came_back_is_stale,
);

//! The live half through `driftd run`: the webhook source behind the admin
//! token, `/v1/sources`, the dead-letter API and CLI, and cascades from a
//! deleted parent (by event and by pass) behind the child's purge guard.

use std::sync::Arc;

use driftd::config::Settings;
use driftd::daemon::Daemon;
use driftd::pass::{Outcome, PassOptions};
use driftd::sample::{tenant, SampleUpstream};
use serde_json::json;

use crate::both_backends;
use crate::common::*;
use crate::daemon::{api, TOKEN};

/// tenants and users, users belonging to tenants; a webhook source `bus`
/// carrying wazo-auth's tenant events and wazo-confd's user events.
fn config_text(
    db: &TestDb,
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    users_purge_max: u64,
) -> String {
    let tenant_lines = tenants_resource(addr);
    let tail = format!(
        r#"
{tenant_lines}
[sources.bus]
kind = "webhook"
name_pointer = "/name"
[sources.bus.events.auth_tenant_added]
resource = "tenants"
op = "upsert"
key = "/data/uuid"
payload = "/data"
[sources.bus.events.auth_tenant_deleted]
resource = "tenants"
op = "delete"
key = "/data/uuid"
[sources.bus.events.user_edited]
resource = "users"
op = "refetch"
key = "/data/uuid"

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[daemon]
schedules_dir = "{dir}"
"#,
        dir = dir.display()
    );
    let builder = ConfigBuilder {
        policy: format!("max_purge_fraction = 1.0\nmax_purge_count = {users_purge_max}"),
        tail,
        ..ConfigBuilder::default()
    };
    builder.toml(db, addr)
}

fn config(
    db: &TestDb,
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    users_purge_max: u64,
) -> Settings {
    Settings::from_toml_str(&config_text(db, addr, dir, users_purge_max), "live.toml")
        .expect("valid config")
}

struct World {
    db: TestDb,
    up: Arc<SampleUpstream>,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

/// 10 tenants and 30 users (3 per tenant), the same upstream and locally.
async fn world(backend: Backend) -> World {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    create_tenants(&db).await;
    let tenants: Vec<_> = (0..TENANTS).map(tenant).collect();
    db.insert_users(&users(30)).await;
    let (up, addr) = upstream(users(30)).await;
    up.set("tenants", "uuid", tenants);
    World {
        db,
        up,
        addr,
        dir: tempfile::tempdir().unwrap(),
    }
}

async fn users_of(db: &TestDb, tenant_uuid: &str) -> i64 {
    db.text(&format!(
        "SELECT CAST(uuid AS TEXT) FROM users WHERE CAST(tenant_uuid AS TEXT) = '{tenant_uuid}'"
    ))
    .await
    .len() as i64
}

async fn webhook_events_apply_and_cascade_through_the_worker(backend: Backend) {
    let w = world(backend).await;
    let settings = Arc::new(config(&w.db, w.addr, w.dir.path(), 1000));
    let d = Daemon::start(settings.clone())
        .await
        .expect("daemon starts");
    let base = format!("http://{}", d.addr);
    let url = format!("{base}/v1/events/bus");
    let t0 = tenant(0)["uuid"].as_str().unwrap().to_string();
    assert_eq!(users_of(&w.db, &t0).await, 3);

    // The token guards the webhook like every mutating route.
    let body = json!({"name": "auth_tenant_deleted", "data": {"uuid": t0}}).to_string();
    let (status, _) = api("POST", &url, None, Some(&body)).await;
    assert_eq!(status, 401);
    assert_eq!(w.db.count("tenants").await, TENANTS as i64);

    let (status, out) = api("POST", &url, Some(TOKEN), Some(&body)).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["event"]["outcome"], "applied", "{out}");
    assert_eq!(out["event"]["cascaded"]["users"], 3, "{out}");
    assert_eq!(w.db.count("tenants").await, TENANTS as i64 - 1);
    assert_eq!(
        users_of(&w.db, &t0).await,
        0,
        "children purged with the parent"
    );
    assert_eq!(w.db.count("users").await, 27);

    // A new tenant by event, in a second.
    let t = json!({"uuid": "aaaaaaaa-0000-4000-8000-000000000001", "name": "Fresh"});
    let body = json!({"name": "auth_tenant_added", "data": t}).to_string();
    let (status, out) = api("POST", &url, Some(TOKEN), Some(&body)).await;
    assert_eq!(
        (status, out["event"]["outcome"].as_str()),
        (200, Some("applied"))
    );
    assert_eq!(w.db.count("tenants").await, TENANTS as i64);

    // Poison: kept, listed, replayable, deletable.
    let (status, out) = api(
        "POST",
        &url,
        Some(TOKEN),
        Some("{\"name\": \"auth_tenant_deleted\"}"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(out["event"]["outcome"], "dead_lettered", "{out}");
    let id = out["event"]["dead_letter"].as_str().unwrap().to_string();
    // Credentials sent along are not kept with the message.
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(TOKEN)
        .header("Cookie", "session=cookie-secret")
        .header("X-Trace", "t-1")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let letters_url = format!("{base}/v1/dead-letters?source=bus");
    let (_, all) = api("GET", &letters_url, Some(TOKEN), None).await;
    let kept = all["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["body"] == "not json")
        .unwrap()
        .clone();
    assert_eq!(kept["headers"]["x-trace"], "t-1", "{kept}");
    assert!(!kept.to_string().contains("cookie-secret"), "{kept}");
    assert!(!kept.to_string().contains(TOKEN), "{kept}");
    let gone = kept["id"].as_str().unwrap();
    let (status, _) = api(
        "DELETE",
        &format!("{base}/v1/dead-letters/{gone}"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = api("GET", &letters_url, None, None).await;
    assert_eq!(status, 401, "dead letters hold other services' data");
    let (_, list) = api("GET", &letters_url, Some(TOKEN), None).await;
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{list}");
    assert_eq!(letters[0]["body"], "{\"name\": \"auth_tenant_deleted\"}");
    assert!(letters[0]["error"].as_str().unwrap().contains("/data/uuid"));
    let (_, metrics) = api("GET", &format!("{base}/metrics"), None, None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("driftd_dead_letters{source=\"bus\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "driftd_events_total{outcome=\"applied\",resource=\"tenants\",source=\"bus\"} 2"
        ),
        "{metrics}"
    );
    let (status, _) = api(
        "POST",
        &format!("{base}/v1/dead-letters/{id}/replay"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, out) = api(
        "POST",
        &format!("{base}/v1/dead-letters/{id}/replay"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, out["event"]["outcome"].as_str()),
        (200, Some("dead_lettered")),
        "{out}"
    );
    let (status, _) = api(
        "DELETE",
        &format!("{base}/v1/dead-letters/{id}"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = api(
        "DELETE",
        &format!("{base}/v1/dead-letters/{id}"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Sources and readiness.
    let (_, sources) = api("GET", &format!("{base}/v1/sources"), None, None).await;
    assert_eq!(sources["sources"][0]["name"], "bus");
    assert_eq!(sources["sources"][0]["state"], "connected");
    assert_eq!(sources["sources"][0]["events"], 4, "{sources}");
    let (status, ready) = api("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(status, 200, "{ready}");
    let (status, _) = api(
        "POST",
        &format!("{base}/v1/events/nope"),
        Some(TOKEN),
        Some("{}"),
    )
    .await;
    assert_eq!(status, 404);
    assert!(d.stop().await);
}

/// Two parents deleted in one batch: each event's answer counts its own
/// children.
async fn each_deleted_parent_reports_its_own_children(backend: Backend) {
    let w = world(backend).await;
    let settings = Arc::new(config(&w.db, w.addr, w.dir.path(), 1000));
    let events = crate::events::engine(&settings).await;
    let batch: Vec<_> = [3, 4]
        .iter()
        .map(|i| crate::events::message("auth_tenant_deleted", json!({"uuid": tenant(*i)["uuid"]})))
        .collect();
    let out = events.deliver("bus", &batch).await.unwrap();
    for v in &out {
        assert_eq!(v.outcome, "applied", "{out:?}");
        assert_eq!(v.cascaded.get("users"), Some(&3), "{out:?}");
    }
    assert_eq!(w.db.count("users").await, 24);
}

async fn a_parent_purged_by_a_pass_purges_its_children(backend: Backend) {
    let w = world(backend).await;
    let settings = config(&w.db, w.addr, w.dir.path(), 1000);
    let t1 = tenant(1)["uuid"].as_str().unwrap().to_string();
    w.up.remove("tenants", &t1);
    let report = pass_resource(&settings, "tenants", PassOptions::default()).await;
    assert_eq!(report.outcome, Outcome::Repaired, "{report:#?}");
    assert_eq!(report.actions.purge, 1);
    assert_eq!(
        report.actions.cascaded.get("users"),
        Some(&3),
        "{report:#?}"
    );
    let text = driftd::report::human(&report);
    assert!(text.contains("cascade  3 users row(s)"), "{text}");
    assert_eq!(users_of(&w.db, &t1).await, 0);
    assert_eq!(w.db.count("users").await, 27);
}

async fn a_cascade_beyond_the_childs_purge_guard_is_held(backend: Backend) {
    let w = world(backend).await;
    // users may lose at most 2 rows at once; a tenant has 3.
    let settings = config(&w.db, w.addr, w.dir.path(), 2);
    let t1 = tenant(1)["uuid"].as_str().unwrap().to_string();
    w.up.remove("tenants", &t1);
    let report = pass_resource(&settings, "tenants", PassOptions::default()).await;
    assert_eq!(report.outcome, Outcome::GuardTripped, "{report:#?}");
    assert_eq!(report.guard.as_ref().map(|g| g.name()), Some("cascade"));
    assert!(report.actions.cascaded.is_empty(), "{report:#?}");
    assert_eq!(users_of(&w.db, &t1).await, 3, "the child's guard holds");
    assert_eq!(
        w.db.count("tenants").await,
        TENANTS as i64,
        "the parent stays with its children (no orphans)"
    );
}

/// `driftd dead-letters list|replay|delete` on the same table.
async fn the_cli_lists_replays_and_deletes_dead_letters(backend: Backend) {
    let w = world(backend).await;
    let settings = Arc::new(config(&w.db, w.addr, w.dir.path(), 1000));
    let events = crate::events::engine(&settings).await;
    let out = events
        .deliver(
            "bus",
            &[crate::events::message(
                "auth_tenant_deleted",
                json!({"uuid": 5}),
            )],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered", "{out:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    std::fs::write(&path, config_text(&w.db, w.addr, w.dir.path(), 1000)).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_driftd"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = cli(&["dead-letters", "list"]);
    assert_eq!(code, Some(0), "{stderr}");
    let letter: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let id = letter["id"].as_str().unwrap().to_string();
    assert!(
        letter["error"].as_str().unwrap().contains("/data/uuid"),
        "{letter}"
    );
    let (code, stdout, _) = cli(&["dead-letters", "replay", &id]);
    assert_eq!(code, Some(1), "still fails: {stdout}");
    let (code, _, stderr) = cli(&["dead-letters", "delete", &id]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = cli(&["dead-letters", "delete", &id]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no dead letter"), "{stderr}");
    let (code, stdout, _) = cli(&["dead-letters", "list"]);
    assert_eq!((code, stdout.as_str()), (Some(0), ""));
}

both_backends!(
    webhook_events_apply_and_cascade_through_the_worker,
    each_deleted_parent_reports_its_own_children,
    a_parent_purged_by_a_pass_purges_its_children,
    a_cascade_beyond_the_childs_purge_guard_is_held,
    the_cli_lists_replays_and_deletes_dead_letters,
);

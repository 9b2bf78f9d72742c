//! Each guard of DESIGN.md "What must never happen", attacked. Every test
//! here fails if its guard is removed: the upstream misbehaves so that a
//! pass without the guard would purge rows upstream still has (or apply a
//! purge that should need --force), and the test checks the local table.
//!
//! Listing-guard tests use permissive purge limits (100%), so the purge
//! guards cannot hide a missing listing guard.

use std::collections::BTreeSet;

use driftd::pass::{Outcome, PassOptions};
use driftd::sample::Fault;

use crate::both_backends;
use crate::common::*;

const N: u64 = 1000;

/// A local copy equal to upstream plus 5 ghosts; returns the local keys.
async fn in_sync_plus_ghosts(db: &TestDb) -> BTreeSet<String> {
    db.create_users().await;
    let mut local = users(N);
    local.extend((0..5).map(ghost));
    db.insert_users(&local).await;
    db.keys("users").await
}

/// Runs a pass against an upstream with `fault` and checks that it failed
/// with an error mentioning `expect` and that no row was touched.
async fn attack(backend: Backend, fault: Fault, cfg: ConfigBuilder, expect: &str) {
    let db = TestDb::new(backend).await;
    let before = in_sync_plus_ghosts(&db).await;
    let (up, addr) = upstream(users(N)).await;
    up.inject(fault.clone());
    let settings = cfg.settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{fault:?}: {r:?}");
    assert_eq!(r.actions.purge, 0, "{fault:?}");
    let err = r.error.clone().unwrap_or_default();
    assert!(
        err.contains(expect),
        "{fault:?}: error `{err}` lacks `{expect}`"
    );
    assert_eq!(
        db.keys("users").await,
        before,
        "{fault:?}: local rows changed"
    );
}

async fn http_error_after_retries_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Status {
            offset: 500,
            status: 503,
            times: 10,
        },
        ConfigBuilder::default(),
        "HTTP 503",
    )
    .await;
}

async fn client_error_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Status {
            offset: 300,
            status: 401,
            times: 10,
        },
        ConfigBuilder::default(),
        "HTTP 401",
    )
    .await;
}

async fn transient_error_is_retried(backend: Backend) {
    let db = TestDb::new(backend).await;
    in_sync_plus_ghosts(&db).await;
    let (up, addr) = upstream(users(N)).await;
    up.inject(Fault::Status {
        offset: 500,
        status: 502,
        times: 1,
    });
    let r = pass(
        &ConfigBuilder::default().settings(&db, addr),
        PassOptions::default(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Repaired, "{:?}", r.error);
    assert_eq!(r.actions.purge, 5);
}

async fn timeout_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Delay {
            offset: 700,
            ms: 3_000,
        },
        ConfigBuilder {
            retries: 0,
            ..ConfigBuilder::default()
        },
        "GET",
    )
    .await;
}

async fn malformed_json_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Malformed { offset: 200 },
        ConfigBuilder::default(),
        "invalid JSON",
    )
    .await;
}

async fn missing_items_field_aborts(backend: Backend) {
    attack(
        backend,
        Fault::NoItems { offset: 200 },
        ConfigBuilder::default(),
        "no items",
    )
    .await;
}

async fn truncated_page_aborts(backend: Backend) {
    // A short page looks like the last one; only the announced total shows
    // the listing stopped early.
    attack(
        backend,
        Fault::Truncate {
            offset: 400,
            keep: 10,
        },
        ConfigBuilder::default(),
        "announced 1000",
    )
    .await;
}

async fn repeated_page_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Repeat {
            offset: 300,
            from: 200,
        },
        ConfigBuilder {
            ordered: false,
            ..ConfigBuilder::default()
        },
        "listed twice",
    )
    .await;
}

async fn shifting_offsets_abort(backend: Backend) {
    // Rows deleted mid-listing shift the offsets: later rows are skipped.
    // The upstream keeps announcing the old total.
    attack(
        backend,
        Fault::ShiftKeepTotal {
            offset: 500,
            count: 30,
        },
        ConfigBuilder::default(),
        "announced 1000",
    )
    .await;
    // ... or announces the new one, which then changed while listing.
    attack(
        backend,
        Fault::Shift {
            offset: 500,
            count: 30,
        },
        ConfigBuilder::default(),
        "changed",
    )
    .await;
}

async fn broken_key_order_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Reverse { offset: 600 },
        ConfigBuilder {
            total: false,
            ..ConfigBuilder::default()
        },
        "ascending order",
    )
    .await;
}

async fn cursor_loop_aborts(backend: Backend) {
    attack(
        backend,
        Fault::CursorLoop,
        ConfigBuilder {
            total: false,
            ordered: false,
            upstream: r#"pagination = { kind = "cursor", next_pointer = "/next" }"#.into(),
            ..ConfigBuilder::default()
        },
        "loop",
    )
    .await;
}

async fn link_loop_aborts(backend: Backend) {
    attack(
        backend,
        Fault::CursorLoop,
        ConfigBuilder {
            total: false,
            ordered: false,
            upstream: r#"pagination = { kind = "link" }"#.into(),
            ..ConfigBuilder::default()
        },
        "",
    )
    .await;
}

async fn purge_fraction_trips_and_force_applies(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(100)).await;
    // upstream lost 20 of 100 users: a 20% purge, above the 10% default
    let (_up, addr) = upstream(users(80)).await;
    let cfg = ConfigBuilder {
        policy: String::new(),
        ..ConfigBuilder::default()
    };
    let settings = cfg.settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::GuardTripped, "{r:?}");
    assert_eq!(r.guard.as_ref().map(|g| g.name()), Some("purge_fraction"));
    assert_eq!(db.count("users").await, 100);
    let r = pass(
        &settings,
        PassOptions {
            force: true,
            ..PassOptions::default()
        },
    )
    .await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(db.count("users").await, 80);
}

async fn guard_trip_applies_nothing_at_all(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(100)[..50]).await;
    db.insert_users(&(0..10).map(ghost).collect::<Vec<_>>())
        .await;
    let (_up, addr) = upstream(users(100)).await;
    let settings = ConfigBuilder {
        policy: "max_purge_count = 5".into(),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::GuardTripped, "{r:?}");
    assert_eq!(r.guard.as_ref().map(|g| g.name()), Some("purge_count"));
    // not even the 50 inserts were applied
    assert_eq!(db.count("users").await, 60);
}

async fn empty_upstream_trips(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(50)).await;
    let (_up, addr) = upstream(users(50)).await;
    _up.inject(Fault::Empty);
    let settings = ConfigBuilder::default().settings(&db, addr); // 100% allowed
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::GuardTripped, "{r:?}");
    assert_eq!(r.guard.as_ref().map(|g| g.name()), Some("empty_upstream"));
    assert_eq!(db.count("users").await, 50);
}

async fn confirm_before_purge_keeps_rows_still_upstream(backend: Backend) {
    let db = TestDb::new(backend).await;
    let before = in_sync_plus_ghosts(&db).await;
    let (up, addr) = upstream(users(N)).await;
    // A silently truncated listing (no total to catch it) that makes real
    // rows look extra; only the get-by-key check can tell.
    up.inject(Fault::Truncate {
        offset: 900,
        keep: 50,
    });
    let settings = ConfigBuilder {
        total: false,
        policy: "max_purge_fraction = 1.0\nconfirm_purge = true".into(),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(r.found.extra, 55);
    assert_eq!((r.actions.purge, r.actions.purge_kept), (5, 50));
    let ghosts: BTreeSet<String> = (0..5)
        .map(|i| ghost(i)["uuid"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = before.difference(&ghosts).cloned().collect();
    assert_eq!(db.keys("users").await, expected);
}

async fn confirm_with_a_wrong_get_path_purges_nothing(backend: Backend) {
    // A get_path that 404s for everything would confirm every candidate as
    // gone. The canary check (a key the listing has must be found) stops it.
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(N)).await;
    let (up, addr) = upstream(users(N)).await;
    up.inject(Fault::Truncate {
        offset: 900,
        keep: 50,
    });
    let settings = ConfigBuilder {
        total: false,
        get_path: "/0.1/nothing/{key}".into(),
        policy: "max_purge_fraction = 1.0\nconfirm_purge = true".into(),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("canary"), "{r:?}");
    assert_eq!(db.count("users").await, N as i64);
}

both_backends!(
    http_error_after_retries_aborts,
    client_error_aborts,
    transient_error_is_retried,
    timeout_aborts,
    malformed_json_aborts,
    missing_items_field_aborts,
    truncated_page_aborts,
    repeated_page_aborts,
    shifting_offsets_abort,
    broken_key_order_aborts,
    cursor_loop_aborts,
    link_loop_aborts,
    purge_fraction_trips_and_force_applies,
    guard_trip_applies_nothing_at_all,
    empty_upstream_trips,
    confirm_before_purge_keeps_rows_still_upstream,
    confirm_with_a_wrong_get_path_purges_nothing,
);

//! Each guard of docs/DESIGN.md "What must never happen", attacked. Every test
//! here fails if its guard is removed: the upstream misbehaves so that a
//! pass without the guard would purge rows upstream still has (or apply a
//! purge that should need --force), and the test checks the local table.
//!
//! Listing-guard tests use permissive purge limits (100%), so the purge
//! guards cannot hide a missing listing guard.

use std::collections::BTreeSet;

use driftd::config::Settings;
use driftd::pass::{Outcome, PassOptions};
use driftd::sample::{user, Fault};
use serde_json::Value as Json;

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

/// The listing guards alone: purge candidates are not confirmed with the
/// get-by-key endpoint (where the pagination kind allows that), so only the
/// pager and the differ stand between a bad listing and a purge.
fn unconfirmed(cfg: ConfigBuilder) -> ConfigBuilder {
    let offset = !cfg.upstream.contains("kind") || cfg.upstream.contains("\"offset\"");
    if offset && cfg.ordered {
        ConfigBuilder {
            policy: format!("{}\nconfirm_purge = false", cfg.policy),
            ..cfg
        }
    } else {
        cfg
    }
}

/// Runs a pass against an upstream with `fault` and checks that it failed
/// with an error mentioning `expect` and that no row was touched.
async fn attack(backend: Backend, fault: Fault, cfg: ConfigBuilder, expect: &str) {
    let cfg = unconfirmed(cfg);
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

async fn hidden_rows_abort(backend: Backend) {
    // Rows left out of every listing: only the announced total shows it.
    // The listing is tried again (the upstream keeps missing them), then
    // the pass fails.
    attack(
        backend,
        Fault::Unlisted {
            from: 400,
            count: 10,
            counted: true,
        },
        ConfigBuilder::default(),
        "announced 1000",
    )
    .await;
}

async fn short_page_does_not_end_the_listing(backend: Backend) {
    // A page shorter than asked is not the last one: offset paging goes on
    // from the rows really served, with or without a total.
    for total in [true, false] {
        let db = TestDb::new(backend).await;
        let before = in_sync_plus_ghosts(&db).await;
        let (up, addr) = upstream(users(N)).await;
        up.inject(Fault::Truncate {
            offset: 400,
            keep: 10,
        });
        up.inject(Fault::CapLimit { max: 30 });
        let settings = unconfirmed(ConfigBuilder {
            total,
            ..ConfigBuilder::default()
        })
        .settings(&db, addr);
        let r = pass(&settings, PassOptions::default()).await;
        assert_eq!(r.outcome, Outcome::Repaired, "total {total}: {r:?}");
        assert_eq!(r.upstream_rows, N, "total {total}");
        assert_eq!((r.actions.purge, r.found.extra), (5, 5), "total {total}");
        let ghosts: BTreeSet<String> = (0..5)
            .map(|i| ghost(i)["uuid"].as_str().unwrap().to_string())
            .collect();
        let expected: BTreeSet<String> = before.difference(&ghosts).cloned().collect();
        assert_eq!(db.keys("users").await, expected, "total {total}");
    }
}

async fn one_row_per_page_aborts(backend: Backend) {
    // Repeating the last row of a one-row page would make no progress and
    // end the listing after its first row.
    attack(
        backend,
        Fault::CapLimit { max: 1 },
        ConfigBuilder {
            total: false,
            ..ConfigBuilder::default()
        },
        "one row per page",
    )
    .await;
    // A list of one row is still listed whole.
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(1)).await;
    db.insert_users(&[ghost(1)]).await;
    let (_up, addr) = upstream(users(1)).await;
    let r = pass(
        &unconfirmed(ConfigBuilder::default()).settings(&db, addr),
        PassOptions::default(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!((r.upstream_rows, r.actions.purge), (1, 1), "{r:?}");
}

async fn capped_page_numbers_abort(backend: Backend) {
    // Page-number paging against an upstream that serves 30 rows where 100
    // were asked: its page 2 starts at row 100, so rows 30..100 were never
    // served. A short page followed by more rows is an error.
    attack(
        backend,
        Fault::CapLimit { max: 30 },
        ConfigBuilder {
            total: false,
            upstream: r#"pagination = { kind = "page" }"#.into(),
            ..ConfigBuilder::default()
        },
        "caps its page size",
    )
    .await;
}

async fn repeated_page_aborts(backend: Backend) {
    // Offset paging: the repeated page does not start with the row the
    // previous page ended on.
    attack(
        backend,
        Fault::Repeat {
            offset: 300,
            from: 200,
        },
        ConfigBuilder::default(),
        "moved",
    )
    .await;
    // Cursor paging: the differ sees keys listed twice.
    attack(
        backend,
        Fault::Repeat {
            offset: 300,
            from: 200,
        },
        ConfigBuilder {
            ordered: false,
            total: false,
            upstream: r#"pagination = { kind = "cursor", next_pointer = "/next" }"#.into(),
            ..ConfigBuilder::default()
        },
        "listed twice",
    )
    .await;
}

async fn shifting_offsets_relist_or_abort(backend: Backend) {
    // Rows deleted mid-listing shift the offsets under the reader. The
    // upstream keeps announcing the old total: every new listing disagrees
    // with it, so the pass fails.
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
    // ... or the shift shows (the page no longer starts with the row the
    // previous one ended on), the listing starts over, and the second
    // listing is whole: exactly the 30 deleted rows and the 5 ghosts go.
    let db = TestDb::new(backend).await;
    in_sync_plus_ghosts(&db).await;
    let (up, addr) = upstream(users(N)).await;
    up.inject(Fault::Shift {
        offset: 500,
        count: 30,
    });
    let settings = unconfirmed(ConfigBuilder {
        total: false,
        ..ConfigBuilder::default()
    })
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(r.upstream_relists, 1, "{r:?}");
    assert_eq!(r.actions.purge, 35);
    let now: BTreeSet<String> = up.keys("users").into_iter().collect();
    assert_eq!(db.keys("users").await, now);
}

async fn busy_upstream_under_offset_paging_never_skips(backend: Backend) {
    // The everyday case: 30 rows, pages of 10, total and ascending order
    // announced. After page 1 is served one row before the offset goes and
    // one is appended at the end: the total stays 30 and keys stay
    // ascending, yet a plain offset reader skips a row and purges it.
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(30)).await;
    let (up, addr) = upstream(users(30)).await;
    up.on_list(
        "users",
        "uuid",
        Box::new(|request, churn| {
            if request == 2 {
                churn.remove(0);
                churn.put(user(500, TENANTS));
            }
        }),
    );
    let settings = unconfirmed(ConfigBuilder {
        page_size: 10,
        ..ConfigBuilder::default()
    })
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(r.upstream_relists, 1, "{r:?}");
    assert_eq!((r.actions.insert, r.actions.purge), (1, 1), "{r:?}");
    let now: BTreeSet<String> = up.keys("users").into_iter().collect();
    assert_eq!(db.keys("users").await, now);
}

async fn broken_key_order_aborts(backend: Backend) {
    attack(
        backend,
        Fault::Reverse { offset: 600 },
        ConfigBuilder {
            total: false,
            upstream: r#"pagination = { kind = "cursor", next_pointer = "/next" }"#.into(),
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
    // A listing silently missing rows (no total to catch it) that makes real
    // rows look extra; only the get-by-key check can tell.
    up.inject(Fault::Unlisted {
        from: 900,
        count: 50,
        counted: false,
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

/// Purge confirmations keep to the upstream's pace: with `look_ahead =
/// false` (an upstream that takes one request at a time) one get-by-key
/// at a time, else a few at once.
async fn confirmations_respect_one_request_at_a_time(backend: Backend) {
    let mut most = Vec::new();
    for look_ahead in [false, true] {
        let db = TestDb::new(backend).await;
        in_sync_plus_ghosts(&db).await;
        let (up, addr) = upstream(users(N)).await;
        up.inject(Fault::SlowGet { ms: 30 });
        let settings = ConfigBuilder {
            policy: "max_purge_fraction = 1.0\nconfirm_purge = true".into(),
            upstream: format!("look_ahead = {look_ahead}"),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr);
        let r = pass(&settings, PassOptions::default()).await;
        assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
        assert_eq!(r.actions.purge, 5, "{r:?}");
        most.push(up.max_concurrent_gets());
    }
    assert_eq!(most[0], 1, "look_ahead = false: {most:?}");
    assert!(most[1] > 1, "look_ahead = true: {most:?}");
}

/// A guard-tripped report names a sample of the keys it would have
/// purged, not all of them; a dry run names every one.
async fn a_tripped_report_carries_a_sample_of_keys(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(200)).await;
    let (_up, addr) = upstream(users(150)).await;
    let settings = ConfigBuilder {
        policy: "max_purge_fraction = 0.1".into(),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::GuardTripped, "{r:?}");
    assert_eq!(r.keys.purge.len(), 10, "{:?}", r.keys.purge.len());
    let dry = pass(
        &settings,
        PassOptions {
            dry_run: true,
            ..PassOptions::default()
        },
    )
    .await;
    assert_eq!(dry.keys.purge.len(), 50);
    assert_eq!(db.count("users").await, 200);
}

async fn confirm_with_a_wrong_get_path_purges_nothing(backend: Backend) {
    // A get_path that 404s for everything would confirm every candidate as
    // gone. The canary check (a key the listing has must be found) stops it.
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(N)).await;
    let (up, addr) = upstream(users(N)).await;
    up.inject(Fault::Unlisted {
        from: 900,
        count: 50,
        counted: false,
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

async fn renamed_field_fails_and_mass_update_trips(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(100)).await;
    let before = db
        .text("SELECT CAST(uuid AS TEXT) || firstname FROM users ORDER BY 1")
        .await;
    let renamed: Vec<_> = users(100)
        .into_iter()
        .map(|mut u| {
            let first = u["firstname"].take();
            u.as_object_mut().unwrap().remove("firstname");
            u["first_name"] = first;
            u
        })
        .collect();
    let (_up, addr) = upstream(renamed).await;
    let cfg = ConfigBuilder::default();
    // An absent mapped field fails the pass, naming the item and column.
    let r = pass(&cfg.settings(&db, addr), PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    let err = r.error.clone().unwrap_or_default();
    assert!(
        err.contains("column `firstname` from `/firstname`: the field is absent"),
        "{err}"
    );
    // Declared optional, it would NULL every row: the update guard stops it.
    let toml = cfg.toml(&db, addr).replace(
        r#"firstname = { from = "/firstname" }"#,
        r#"firstname = { from = "/firstname", optional = true }"#,
    );
    let settings = Settings::from_toml_str(&toml, "test.toml").unwrap();
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::GuardTripped, "{r:?}");
    assert_eq!(r.guard.as_ref().map(|g| g.name()), Some("update_fraction"));
    let after = db
        .text("SELECT CAST(uuid AS TEXT) || firstname FROM users ORDER BY 1")
        .await;
    assert_eq!(before, after);
    // --force applies it.
    let r = pass(
        &settings,
        PassOptions {
            force: true,
            ..PassOptions::default()
        },
    )
    .await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(
        db.text("SELECT firstname FROM users WHERE firstname IS NOT NULL")
            .await
            .len(),
        0
    );
}

async fn nul_text_is_refused_naming_the_item(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    let mut items = users(10);
    items[3]["firstname"] = Json::String("bad\u{0}name".into());
    let (up, addr) = upstream(items).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    let err = r.error.clone().unwrap_or_default();
    let key = users(10)[3]["uuid"].as_str().unwrap().to_string();
    assert!(
        err.contains(&key) && err.contains("column `firstname`") && err.contains("NUL"),
        "{err}"
    );
    // Once upstream is fixed, passes work again.
    let mut items = users(10);
    items[3]["firstname"] = Json::String("fixed".into());
    up.set("users", "uuid", items);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
}

async fn big_numbers_keep_their_digits_in_text(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    let mut items = users(10);
    items[0]["lastname"] = serde_json::from_str("123456789012345678901234567890").unwrap();
    items[1]["lastname"] = serde_json::from_str("0.1000").unwrap();
    let (_up, addr) = upstream(items).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    let mut got = db
        .text("SELECT lastname FROM users WHERE lastname NOT LIKE 'Last%'")
        .await;
    got.sort();
    assert_eq!(
        got,
        vec![
            Some("0.1000".to_string()),
            Some("123456789012345678901234567890".to_string())
        ]
    );
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
}

both_backends!(
    renamed_field_fails_and_mass_update_trips,
    nul_text_is_refused_naming_the_item,
    confirmations_respect_one_request_at_a_time,
    a_tripped_report_carries_a_sample_of_keys,
    big_numbers_keep_their_digits_in_text,
    http_error_after_retries_aborts,
    client_error_aborts,
    transient_error_is_retried,
    timeout_aborts,
    malformed_json_aborts,
    missing_items_field_aborts,
    hidden_rows_abort,
    short_page_does_not_end_the_listing,
    capped_page_numbers_abort,
    one_row_per_page_aborts,
    repeated_page_aborts,
    shifting_offsets_relist_or_abort,
    busy_upstream_under_offset_paging_never_skips,
    broken_key_order_aborts,
    cursor_loop_aborts,
    link_loop_aborts,
    purge_fraction_trips_and_force_applies,
    guard_trip_applies_nothing_at_all,
    empty_upstream_trips,
    confirm_before_purge_keeps_rows_still_upstream,
    confirm_with_a_wrong_get_path_purges_nothing,
);

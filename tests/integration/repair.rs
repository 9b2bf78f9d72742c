//! A pass finds and repairs drift, on both backends, under every pagination
//! scheme, and changes nothing in dry-run.

use driftd::jobs::JobStatus;
use driftd::pass::{Mode, Outcome, PassOptions};
use serde_json::json;

use crate::both_backends;
use crate::common::*;

const N: u64 = 1000;

/// Local copy of `N` users with every 50th missing, every 80th stale, and 10
/// ghosts; returns the expected key set after a full repair.
async fn drifted(db: &TestDb) -> std::collections::BTreeSet<String> {
    db.create_users().await;
    let mut local = Vec::new();
    for (i, mut u) in users(N).into_iter().enumerate() {
        if i % 50 == 3 {
            continue;
        }
        if i % 80 == 11 {
            u["email"] = json!("stale@example.com");
            u["enabled"] = json!(!u["enabled"].as_bool().unwrap());
        }
        local.push(u);
    }
    local.extend((0..10).map(ghost));
    db.insert_users(&local).await;
    users(N)
        .iter()
        .map(|u| u["uuid"].as_str().unwrap().to_string())
        .collect()
}

async fn full_repair(backend: Backend) {
    let db = TestDb::new(backend).await;
    let expected = drifted(&db).await;
    let (_up, addr) = upstream(users(N)).await;
    let settings = ConfigBuilder::default().settings(&db, addr);

    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{:?}", r.error);
    assert_eq!(
        (r.found.missing, r.found.stale, r.found.extra),
        (20, 13, 10)
    );
    assert_eq!(
        (r.actions.insert, r.actions.update, r.actions.purge),
        (20, 13, 10)
    );
    assert_eq!(db.keys("users").await, expected);
    let stale = db
        .text("SELECT email FROM users WHERE email = 'stale@example.com'")
        .await;
    assert!(stale.is_empty(), "stale rows left: {stale:?}");

    let again = pass(&settings, PassOptions::default()).await;
    assert_eq!(again.outcome, Outcome::InSync, "{:?}", again);
    assert_eq!(again.local_rows, N);
}

async fn dry_run_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    drifted(&db).await;
    let before = db
        .text("SELECT CAST(uuid AS TEXT) || ':' || COALESCE(email, '') FROM users ORDER BY 1")
        .await;
    let (_up, addr) = upstream(users(N)).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(
        &settings,
        PassOptions {
            dry_run: true,
            ..PassOptions::default()
        },
    )
    .await;
    assert_eq!(r.outcome, Outcome::DryRun, "{:?}", r.error);
    // every key is reported in dry-run
    assert_eq!(r.keys.purge.len(), 10);
    assert_eq!(r.keys.insert.len(), 20);
    assert_eq!(r.keys.update.len(), 13);
    let after = db
        .text("SELECT CAST(uuid AS TEXT) || ':' || COALESCE(email, '') FROM users ORDER BY 1")
        .await;
    assert_eq!(before, after);
}

async fn every_pagination_scheme_lists_everything(backend: Backend) {
    for pagination in [
        r#"pagination = { kind = "page" }"#,
        r#"pagination = { kind = "cursor", next_pointer = "/next" }"#,
        r#"pagination = { kind = "link" }"#,
        r#"pagination = { kind = "offset" }"#,
    ] {
        let db = TestDb::new(backend).await;
        let expected = drifted(&db).await;
        let (_up, addr) = upstream(users(N)).await;
        let settings = ConfigBuilder {
            upstream: pagination.into(),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr);
        let r = pass(&settings, PassOptions::default()).await;
        assert_eq!(r.outcome, Outcome::Repaired, "{pagination}: {:?}", r.error);
        assert_eq!(r.upstream_rows, N, "{pagination}");
        assert_eq!(db.keys("users").await, expected, "{pagination}");
    }
}

async fn modes_restrict_actions(backend: Backend) {
    let db = TestDb::new(backend).await;
    drifted(&db).await;
    let (_up, addr) = upstream(users(N)).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(
        &settings,
        PassOptions {
            mode: Mode::RepairOnly,
            ..PassOptions::default()
        },
    )
    .await;
    assert_eq!(
        (r.actions.insert, r.actions.update, r.actions.purge),
        (20, 13, 0)
    );
    assert_eq!(db.count("users").await, N as i64 + 10);
    // The extra rows are still there: not a success (docs/DESIGN.md rule 8).
    assert_eq!((r.left.missing, r.left.stale, r.left.extra), (0, 0, 10));
    assert_eq!(
        r.outcome,
        Outcome::DriftLeft,
        "never `repaired` over extra rows"
    );
    assert_eq!(
        driftd::report::exit_code(&r),
        driftd::report::exit::DRIFT_LEFT
    );
    assert_eq!(JobStatus::of_report(&r), JobStatus::DriftFound);
    let r = pass(
        &settings,
        PassOptions {
            mode: Mode::PurgeOnly,
            ..PassOptions::default()
        },
    )
    .await;
    assert_eq!(
        (r.actions.insert, r.actions.update, r.actions.purge),
        (0, 0, 10)
    );
    assert_eq!(db.count("users").await, N as i64);
    assert_eq!((r.left.missing, r.left.stale, r.left.extra), (0, 0, 0));
    assert_eq!(JobStatus::of_report(&r), JobStatus::Succeeded);
}

async fn soft_delete_marks_and_revives(backend: Backend) {
    let db = TestDb::new(backend).await;
    drifted(&db).await;
    let (up, addr) = upstream(users(N)).await;
    let settings = ConfigBuilder {
        policy: "max_purge_fraction = 1.0\npurge = { soft_delete = { column = \"deleted_at\" } }"
            .into(),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{:?}", r.error);
    assert_eq!(r.actions.purge, 10);
    // soft: the ghosts are still there, marked
    assert_eq!(db.count("users").await, N as i64 + 10);
    let marked = db
        .text("SELECT CAST(uuid AS TEXT) FROM users WHERE deleted_at IS NOT NULL")
        .await;
    assert_eq!(marked.len(), 10);
    // a second pass does not see soft-deleted rows as extra
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
    // upstream brings a deleted user back: it is revived, not duplicated
    let mut all = users(N);
    all.push(ghost(0));
    up.set("users", "uuid", all);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!((r.found.missing, r.actions.insert), (1, 1), "{r:?}");
    let marked = db
        .text("SELECT CAST(uuid AS TEXT) FROM users WHERE deleted_at IS NOT NULL")
        .await;
    assert_eq!(marked.len(), 9);
}

async fn unowned_columns_are_left_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    drifted(&db).await;
    db.exec("UPDATE users SET note = 'kept'").await;
    let (_up, addr) = upstream(users(N)).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{:?}", r.error);
    // repaired rows keep their unowned column
    let notes = db
        .text("SELECT note FROM users WHERE email LIKE 'user11@%'")
        .await;
    assert_eq!(notes, vec![Some("kept".to_string())]);
}

async fn bad_local_schema_is_a_clear_error(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE users (uuid TEXT PRIMARY KEY, email TEXT)")
        .await;
    let (_up, addr) = upstream(users(10)).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Failed);
    let err = r.error.unwrap();
    assert!(
        err.contains("column `enabled` not found") || err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("users"), "{err}");
}

both_backends!(
    full_repair,
    dry_run_changes_nothing,
    every_pagination_scheme_lists_everything,
    modes_restrict_actions,
    soft_delete_marks_and_revives,
    unowned_columns_are_left_alone,
    bad_local_schema_is_a_clear_error,
    look_ahead_costs_one_request_and_can_be_turned_off,
    a_load_bigger_than_memory_goes_through_a_file,
);

/// The page look-ahead: a listing of full pages asks for at most one page
/// past its end (dropped when not needed, it may never arrive) and nothing
/// else more, repairs the same drift, and `look_ahead = false` asks for one
/// page at a time.
async fn look_ahead_costs_one_request_and_can_be_turned_off(backend: Backend) {
    let mut requests = Vec::new();
    for look_ahead in [false, true] {
        let db = TestDb::new(backend).await;
        let expected = drifted(&db).await;
        let (up, addr) = upstream(users(N)).await;
        let settings = ConfigBuilder {
            upstream: format!("look_ahead = {look_ahead}"),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr);
        let r = pass(&settings, PassOptions::default()).await;
        assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
        assert_eq!(
            (r.found.missing, r.found.stale, r.found.extra),
            (20, 13, 10)
        );
        assert_eq!(db.keys("users").await, expected);
        requests.push(up.list_requests());
    }
    // Pages of 100 over 1000 rows, each repeating the previous page's last
    // row: 11 pages and the empty one that ends the listing.
    assert_eq!(requests[0], 12, "requests without look-ahead");
    assert!(
        (12..=13).contains(&requests[1]),
        "requests with look-ahead: {requests:?}"
    );
}

/// A first load bigger than the rows a pass keeps in memory
/// (`driftd::rows::IN_MEMORY`): the rows past it go through a temporary
/// file and come back whole. A value that does not fit its column in a row
/// that went to the file still stops the pass before anything is written;
/// without it, every row lands, and the next pass is in sync.
async fn a_load_bigger_than_memory_goes_through_a_file(backend: Backend) {
    let n = driftd::rows::IN_MEMORY as u64 + 3000;
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE users (uuid TEXT PRIMARY KEY, tenant_uuid TEXT, firstname TEXT, lastname TEXT, email TEXT, enabled BOOLEAN, extension INTEGER)",
        Backend::Postgres => "CREATE TABLE users (uuid UUID PRIMARY KEY, tenant_uuid UUID, firstname TEXT, lastname VARCHAR(64), email TEXT, enabled BOOLEAN, extension INTEGER CHECK (extension < 1000000000))",
    })
    .await;
    let mut all = users(n);
    let last = all.len() - 1;
    all[last]["extension"] = json!(i64::MAX);
    let (up, addr) = upstream(all).await;
    let mut config = ConfigBuilder {
        page_size: 1000,
        ..ConfigBuilder::default()
    };
    let settings = config.settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    if backend == Backend::Sqlite {
        // SQLite's INTEGER holds any i64: the row fits there.
        assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
        assert_eq!(db.count("users").await, n as i64);
        db.exec("DELETE FROM users").await;
    } else {
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(db.count("users").await, 0, "nothing written: {r:?}");
    }
    // A lastname too long for the column, in the last row (PostgreSQL's
    // varchar(64); SQLite stores any length, so it fits there).
    up.upsert("users", "uuid", {
        let mut u = users(n)[last].clone();
        u["lastname"] = json!("x".repeat(if backend == Backend::Postgres { 65 } else { 64 }));
        u
    });
    let r = pass(&settings, PassOptions::default()).await;
    let r = if backend == Backend::Postgres {
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("does not fit"),
            "{r:?}"
        );
        assert_eq!(db.count("users").await, 0, "nothing written: {r:?}");
        up.upsert("users", "uuid", users(n)[last].clone());
        config.policy.push_str("\nbatch_size = 5000");
        pass(&config.settings(&db, addr), PassOptions::default()).await
    } else {
        r
    };
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!((r.found.missing, r.actions.insert), (n, n), "{r:?}");
    assert_eq!(db.count("users").await, n as i64);
    let want: std::collections::BTreeSet<String> = users(n)
        .iter()
        .map(|u| u["uuid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(db.keys("users").await, want);
    let again = pass(&settings, PassOptions::default()).await;
    assert_eq!(again.outcome, Outcome::InSync, "{again:?}");
}

/// An in-memory SQLite database has one connection, which events and the
/// API need too: the ordered merge reads the whole table into its channel
/// and frees the connection while the listing goes on (here held up for
/// 1.8 seconds by a slow page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_database_stays_usable_while_a_merge_lists() {
    use driftd::store::{AnyStore, Ledger, SqliteStore};
    let n = 40_000;
    let store = SqliteStore::open("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE users (uuid TEXT PRIMARY KEY, tenant_uuid TEXT, firstname TEXT, lastname TEXT, email TEXT, enabled BOOLEAN, extension INTEGER, deleted_at TEXT, note TEXT)")
        .execute(store.pool())
        .await
        .unwrap();
    for statement in insert_users_sql(&users(n)) {
        sqlx::raw_sql(&statement)
            .execute(store.pool())
            .await
            .unwrap();
    }
    let (up, addr) = upstream(users(n)).await;
    up.inject(driftd::sample::Fault::Delay {
        offset: 6_000,
        ms: 1800,
    });
    let toml = ConfigBuilder {
        page_size: 1000,
        ..ConfigBuilder::default()
    }
    .toml(&TestDb::new(Backend::Sqlite).await, addr)
    .lines()
    .map(|l| {
        if l.starts_with("url = ") {
            "url = \"sqlite::memory:\"".to_string()
        } else {
            l.to_string()
        }
    })
    .collect::<Vec<_>>()
    .join("\n");
    let settings = driftd::config::Settings::from_toml_str(&toml, "test.toml").unwrap();
    let store = std::sync::Arc::new(AnyStore::Sqlite(store));
    let pass = tokio::spawn({
        let store = store.clone();
        async move {
            let res = settings.resource("users").unwrap();
            driftd::pass::run_pass(
                &*store,
                "users",
                res,
                PassOptions::default(),
                &driftd::pass::Hooks::default(),
            )
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    if pass.is_finished() {
        panic!("the listing should still be held up: {:?}", pass.await);
    }
    let ping = tokio::time::timeout(std::time::Duration::from_millis(800), store.ping()).await;
    assert!(
        matches!(ping, Ok(Ok(()))),
        "the connection is held by the listing: {ping:?}"
    );
    let r = pass.await.unwrap();
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
    assert_eq!(r.local_rows, n);
}

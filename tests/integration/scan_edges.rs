//! Edges of the local scan and of soft deletes: rows at the extremes of
//! SQLite's rowids, and a soft-delete column that upstream also maps.

use driftd::pass::{Outcome, PassOptions};

use crate::common::*;

/// SQLite rowids range over all of i64, `-9223372036854775808` included.
/// The chunked scan starts at `rowid > i64::MIN`, so a row stored at the
/// smallest rowid is never scanned: a local row upstream does not have is
/// neither purged nor counted, and the pass says `in_sync` while the table
/// holds a row upstream never had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_row_at_the_smallest_rowid_is_scanned() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(3)).await;
    let g = ghost(1);
    db.exec(&format!(
        "INSERT INTO users (rowid, uuid, firstname) VALUES (-9223372036854775808, '{}', 'ghost')",
        g["uuid"].as_str().unwrap()
    ))
    .await;
    let (_up, addr) = upstream(users(3)).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    let left = db.count("users").await;
    assert!(
        left == 3 || r.outcome == Outcome::Failed,
        "outcome {:?} with {left} local rows against 3 upstream: {r:?}",
        r.outcome
    );
}

/// The soft-delete column may also be a mapped column (an upstream that
/// itself says `deleted_at`): nothing refuses that. A row upstream lists
/// with `deleted_at` set is inserted as such, then reads as not live, so
/// the next pass plans it again as missing and "revives" it with
/// `SET deleted_at = <upstream>, deleted_at = NULL`. SQLite keeps the
/// rightmost assignment: the row ends with `deleted_at` NULL while
/// upstream says it is set, and the pass reports `repaired` (every pass
/// after it too). It must refuse the config or leave the table equal.
async fn soft_delete_column_that_is_also_mapped(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let mut up_users = users(3);
    up_users[0]["deleted_at"] = "2026-01-01T00:00:00Z".into();
    let key = up_users[0]["uuid"].as_str().unwrap().to_string();
    let (_up, addr) = upstream(up_users).await;
    let cfg = ConfigBuilder {
        policy: "max_update_fraction = 1.0\nmax_purge_fraction = 1.0\npurge = { soft_delete = { column = \"deleted_at\" } }".into(),
        ..Default::default()
    };
    let toml = cfg.toml(&db, addr).replace(
        "extension = { from = \"/extension\", type = \"integer\" }",
        "extension = { from = \"/extension\", type = \"integer\" }\ndeleted_at = { from = \"/deleted_at\", type = \"timestamp\", optional = true }",
    );
    let settings = match driftd::config::Settings::from_toml_str(&toml, "test.toml") {
        Ok(s) => s,
        Err(e) => {
            // refused, naming the field: fine
            assert!(e.to_string().contains("soft_delete.column"), "{e}");
            return;
        }
    };
    for round in 0..3 {
        let r = pass(&settings, PassOptions::default()).await;
        if r.outcome == Outcome::Failed {
            return; // refused at run time: fine
        }
        let nulls = db
            .text(&format!(
                "SELECT CASE WHEN deleted_at IS NULL THEN 'null' ELSE 'set' END FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
            ))
            .await;
        assert_eq!(
            nulls,
            vec![Some("set".to_string())],
            "round {round}: outcome {:?} but upstream says deleted_at is set: {r:?}",
            r.outcome
        );
    }
}

crate::both_backends!(soft_delete_column_that_is_also_mapped);

/// PostgreSQL, driftd connecting as a role that row-level security
/// filters (the table enables it, the role may see one tenant's users):
/// the scan would see a third of the rows and take the rest for missing
/// (or be `in_sync` over them). The table is refused, naming row-level
/// security, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_hidden_by_row_level_security_are_refused() {
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    let all = users(30);
    db.insert_users(&all).await;
    let role = format!("driftd_rls_{:x}", fastrand::u32(..));
    let tenant = all[0]["tenant_uuid"].as_str().unwrap().to_string();
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN; GRANT ALL ON users TO {role}; \
         GRANT ALL ON SCHEMA public TO {role}; GRANT CREATE ON DATABASE {dbname} TO {role}; \
         ALTER TABLE users ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY one_tenant ON users TO {role} USING (tenant_uuid = '{tenant}')",
        dbname = db.url.rsplit('/').next().unwrap()
    ))
    .await;
    let (_up, addr) = upstream(all.clone()).await;
    let mut settings = ConfigBuilder::default().settings(&db, addr);
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    settings.store.url = url.into();
    let r = pass(&settings, PassOptions::default()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("row-level security"),
        "{r:?}"
    );
    assert_eq!(db.count("users").await, 30);
}

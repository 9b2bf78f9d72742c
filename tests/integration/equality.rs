//! driftd's equality is the database's (docs/DESIGN.md rule 7): keys and values
//! the column would store, compare or sort differently are canonicalised
//! where the type defines how, and refused with an error naming the column
//! or the row otherwise. Each test here broke on a version that compared
//! in Rust what the database compares its own way.

use std::net::SocketAddr;

use driftd::config::Settings;
use driftd::pass::Outcome;
use driftd::sample::SampleUpstream;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;

/// A resource `items` keyed by `/id` into `items.id`, with `columns` (TOML
/// lines of `[resources.items.columns]`).
fn items_settings(db: &TestDb, addr: SocketAddr, key_type: &str, columns: &str) -> Settings {
    let toml = format!(
        r#"
[store]
url = "{db}"

[resources.items]
key = {{ upstream = "/id", column = "id", type = "{key_type}" }}
local = {{ table = "items" }}

[resources.items.upstream]
base_url = "http://{addr}"
list_path = "/0.1/items"
page_size = 7
total_pointer = "/total"
backoff_ms = 1

[resources.items.columns]
{columns}

[resources.items.policy]
max_update_fraction = 1.0
purge_extra = false
"#,
        db = db.url
    );
    Settings::from_toml_str(&toml, "test.toml").expect("test config is valid")
}

async fn items_upstream(items: Vec<Json>) -> (std::sync::Arc<SampleUpstream>, SocketAddr) {
    serve_collection("items", "id", items).await
}

fn failed_with(r: &driftd::pass::PassReport, needles: &[&str]) {
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    let err = r.error.as_deref().unwrap_or("");
    for n in needles {
        assert!(err.contains(n), "error `{err}` lacks `{n}`");
    }
}

async fn case_insensitive_key_collation_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    match backend {
        Backend::Sqlite => {
            db.exec("CREATE TABLE items (id TEXT COLLATE NOCASE PRIMARY KEY, name TEXT)")
                .await
        }
        Backend::Postgres => {
            db.exec(
                "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
                 CREATE TABLE items (id TEXT COLLATE ci PRIMARY KEY, name TEXT)",
            )
            .await
        }
    }
    db.exec("INSERT INTO items VALUES ('alice', 'a')").await;
    let (_up, addr) = items_upstream(vec![json!({"id": "Alice", "name": "a"})]).await;
    let settings = items_settings(&db, addr, "text", r#"name = { from = "/name" }"#);
    let r = pass_items(&settings).await;
    failed_with(&r, &["key column `id`", "collation"]);
    assert_eq!(
        db.text("SELECT id FROM items").await,
        vec![Some("alice".into())]
    );

    // The collation of a unique index on the key counts too, whatever
    // the column's own.
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => {
            "CREATE TABLE items (id TEXT NOT NULL, name TEXT);
             CREATE UNIQUE INDEX items_id ON items (id COLLATE NOCASE)"
        }
        Backend::Postgres => {
            "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TABLE items (id TEXT NOT NULL, name TEXT);
             CREATE UNIQUE INDEX items_id ON items (id COLLATE ci)"
        }
    })
    .await;
    db.exec("INSERT INTO items VALUES ('alice', 'a')").await;
    let settings = items_settings(&db, addr, "text", r#"name = { from = "/name" }"#);
    failed_with(&pass_items(&settings).await, &["collation"]);
    assert_eq!(
        db.text("SELECT id FROM items").await,
        vec![Some("alice".into())],
        "a purge-only or full pass deleted `alice`, which upstream has as `Alice`"
    );
}

async fn uuid_keys_are_canonical(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ddl = match backend {
        Backend::Sqlite => "CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)",
        Backend::Postgres => "CREATE TABLE items (id UUID PRIMARY KEY, name TEXT)",
    };
    db.exec(ddl).await;
    db.exec("INSERT INTO items VALUES ('6f9619ff-8b86-d011-b42d-00c04fc964ff', 'a')")
        .await;
    let upper = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
    let (_up, addr) = items_upstream(vec![
        json!({"id": upper, "name": "a"}),
        json!({"id": "0AAAAAAA-8B86-D011-B42D-00C04FC964FF", "name": "b"}),
    ])
    .await;
    if backend == Backend::Postgres {
        // A uuid column with text keys is refused, with the fix.
        let settings = items_settings(&db, addr, "text", r#"name = { from = "/name" }"#);
        failed_with(&pass_items(&settings).await, &["set key.type = \"uuid\""]);
    }
    let settings = items_settings(&db, addr, "uuid", r#"name = { from = "/name" }"#);
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!((r.actions.insert, r.actions.purge), (1, 0), "{r:?}");
    for _ in 0..2 {
        let r = pass_items(&settings).await;
        assert_eq!(r.outcome, Outcome::InSync, "no flap: {r:?}");
    }
    let mut keys: Vec<_> = db.text("SELECT CAST(id AS TEXT) FROM items").await;
    keys.sort();
    assert_eq!(
        keys,
        vec![
            Some("0aaaaaaa-8b86-d011-b42d-00c04fc964ff".into()),
            Some("6f9619ff-8b86-d011-b42d-00c04fc964ff".into())
        ]
    );
}

async fn key_type_must_match_the_column(backend: Backend) {
    // An integer key in a TEXT column: `'01'` and `'1'` are two rows to the
    // database and one key to an integer comparison.
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)")
        .await;
    db.exec("INSERT INTO items VALUES ('1', 'a'), ('01', 'b')")
        .await;
    let (_up, addr) = items_upstream(vec![json!({"id": 1, "name": "a"})]).await;
    let settings = items_settings(&db, addr, "integer", r#"name = { from = "/name" }"#);
    failed_with(
        &pass_items(&settings).await,
        &["key column `id`", "`integer` keys"],
    );
    assert_eq!(db.count("items").await, 2);

    // A key column holding keys not in the key type's canonical form: such
    // a row cannot pair with any upstream row, and the pass says so
    // instead of purging it.
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)")
        .await;
    db.exec("INSERT INTO items VALUES ('Alice', 'a'), ('bob', 'b')")
        .await;
    let (_up, addr) = items_upstream(vec![json!({"id": "alice", "name": "a"})]).await;
    let settings = items_settings(&db, addr, "uuid", r#"name = { from = "/name" }"#);
    failed_with(
        &pass_items(&settings).await,
        &["not in canonical uuid form"],
    );
    assert_eq!(db.count("items").await, 2);
}

async fn values_that_do_not_fit_are_refused_naming_row_and_column(backend: Backend) {
    if backend == Backend::Sqlite {
        // SQLite stores any length in a VARCHAR(5): nothing to refuse.
        return;
    }
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id VARCHAR(8) PRIMARY KEY, name VARCHAR(5), n INTEGER, amount NUMERIC(6,2))")
        .await;
    db.exec("INSERT INTO items VALUES ('k1', 'Barth', 1, 1.5)")
        .await;
    let cols = r#"name = { from = "/name" }
n = { from = "/n", type = "integer" }
amount = { from = "/amount", type = "numeric" }"#;
    for (item, needle) in [
        (
            json!({"id": "k1", "name": "Bartholomew", "n": 1, "amount": 1.5}),
            "row `k1`: column `name`",
        ),
        (
            json!({"id": "k123456789", "name": "B", "n": 1, "amount": 1.5}),
            "key column `id`",
        ),
        (
            json!({"id": "k1", "name": "B", "n": 3000000000_i64, "amount": 1.5}),
            "row `k1`: column `n`",
        ),
        (
            json!({"id": "k1", "name": "B", "n": 1, "amount": 1.234}),
            "row `k1`: column `amount`",
        ),
    ] {
        let (_up, addr) = items_upstream(vec![item.clone()]).await;
        let settings = items_settings(&db, addr, "text", cols);
        let r = pass_items(&settings).await;
        failed_with(&r, &[needle, "nothing was written"]);
        assert_eq!(
            db.text("SELECT id || name || n || amount FROM items").await,
            vec![Some("k1Barth11.50".into())],
            "{item}"
        );
    }
}

async fn column_types_must_match(backend: Backend) {
    if backend == Backend::Sqlite {
        return;
    }
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, at TIMESTAMPTZ)")
        .await;
    let (_up, addr) = items_upstream(vec![json!({"id": "a", "at": "2027-01-01T00:00:00Z"})]).await;
    let settings = items_settings(&db, addr, "text", r#"at = { from = "/at" }"#);
    failed_with(
        &pass_items(&settings).await,
        &[
            "column `at` is timestamp with time zone",
            "type = \"timestamp\"",
        ],
    );
}

async fn every_type_converges(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ddl = match backend {
        Backend::Sqlite => "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, at TEXT, amount TEXT, doc TEXT, raw TEXT, ref TEXT, n INTEGER, flag BOOLEAN)",
        Backend::Postgres => "CREATE TABLE items (id BIGINT PRIMARY KEY, name VARCHAR(20), at TIMESTAMPTZ, amount NUMERIC(12,4), doc JSONB, raw JSON, ref UUID, n SMALLINT, flag BOOLEAN)",
    };
    db.exec(ddl).await;
    let items: Vec<Json> = (0..20)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("name {i} é"),
                "at": format!("2027-10-31T02:{:02}:00.5+02:00", i),
                "amount": serde_json::from_str::<Json>(&format!("{i}.50")).unwrap(),
                "doc": serde_json::from_str::<Json>(&format!(
                    r#"{{"zz": [1, 1.50, 2e1, "x\"y"], "a": {{"k": null}}, "n": {i}, "é": true}}"#
                )).unwrap(),
                "raw": {"b": 1, "a": [true]},
                "ref": format!("6F9619FF-8B86-D011-B42D-00C04FC964{i:02X}"),
                "n": i - 10,
                "flag": i % 2 == 0,
            })
        })
        .collect();
    let (_up, addr) = items_upstream(items).await;
    let cols = r#"name = { from = "/name" }
at = { from = "/at", type = "timestamp" }
amount = { from = "/amount", type = "numeric" }
doc = { from = "/doc", type = "json" }
raw = { from = "/raw", type = "json" }
ref = { from = "/ref", type = "uuid" }
n = { from = "/n", type = "integer" }
flag = { from = "/flag", type = "boolean" }"#;
    let settings = items_settings(&db, addr, "integer", cols);
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(r.actions.insert, 20);
    let r = pass_items(&settings).await;
    assert_eq!(
        r.outcome,
        Outcome::InSync,
        "second pass over an unchanged upstream: {r:?}"
    );
    // Touch every column behind driftd's back: each is repaired, then quiet.
    db.exec(
        "UPDATE items SET name = 'x' WHERE id = 1; UPDATE items SET amount = 99 WHERE id = 2;
         UPDATE items SET ref = NULL WHERE id = 3; UPDATE items SET n = 7 WHERE id = 4;
         UPDATE items SET flag = NULL WHERE id = 5",
    )
    .await;
    let r = pass_items(&settings).await;
    assert_eq!((r.outcome, r.found.stale), (Outcome::Repaired, 5), "{r:?}");
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
}

async fn sqlite_storage_classes_are_compared(backend: Backend) {
    if backend == Backend::Postgres {
        return;
    }
    // A cast would make REAL 12.7 or '12abc' equal 12, and 'yes' equal
    // false: the rows must read as stale and be repaired.
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, flag BOOLEAN, name TEXT)")
        .await;
    db.exec(
        "INSERT INTO items VALUES ('a', 12.7, 0, 'x'), ('b', '12abc', 'yes', 'x'), ('c', 12, 'true', 'x' || char(0) || 'y'), ('d', 12, 0, 12), ('e', 12, 0, 'x')",
    )
    .await;
    let items: Vec<Json> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|k| json!({"id": k, "n": 12, "flag": false, "name": "x"}))
        .collect();
    let (_up, addr) = items_upstream(items).await;
    let cols = r#"n = { from = "/n", type = "integer" }
flag = { from = "/flag", type = "boolean" }
name = { from = "/name" }"#;
    let settings = items_settings(&db, addr, "text", cols);
    let r = pass_items(&settings).await;
    assert_eq!((r.outcome, r.found.stale), (Outcome::Repaired, 4), "{r:?}");
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
    assert_eq!(
        db.text("SELECT typeof(n) || typeof(flag) || name FROM items ORDER BY id")
            .await,
        vec![Some("integerintegerx".to_string()); 5]
    );
}

/// `driftd check` and `driftd run` refuse a table driftd cannot mirror,
/// before any pass; `check` says OK for one it can.
async fn check_and_run_refuse_an_unsafe_table(backend: Backend) {
    let db = TestDb::new(backend).await;
    match backend {
        Backend::Sqlite => {
            db.exec("CREATE TABLE items (id TEXT COLLATE NOCASE PRIMARY KEY, name TEXT)")
                .await
        }
        Backend::Postgres => {
            db.exec("CREATE TABLE items (id UUID PRIMARY KEY, name TEXT)")
                .await
        }
    }
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    let toml = |key_type: &str| {
        format!(
            r#"
[store]
url = "{db}"
[admin]
listen = "127.0.0.1:0"
allow_unauthenticated = true
[resources.items]
key = {{ upstream = "/id", column = "id", type = "{key_type}" }}
local = {{ table = "items" }}
upstream = {{ base_url = "http://{addr}", list_path = "/items", key_order = "asc" }}
columns = {{ name = {{ from = "/name" }} }}
"#,
            db = db.url
        )
    };
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect("run driftd")
    };
    std::fs::write(&path, toml("text")).unwrap();
    for args in [&["check"][..], &["run"][..]] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("key column `id`"), "{args:?}: {err}");
    }
    if backend == Backend::Postgres {
        std::fs::write(&path, toml("uuid")).unwrap();
        let out = run(&["check"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(stdout.contains("table items: OK"), "{stdout}");
    }
}

/// With `key_order = "asc"` the pass pairs the listing with the local
/// rows bytewise, whatever the key column's collation: under ICU's en-US,
/// `a` sorts before `A` and `_x` before `a`, so a merge with the column's
/// own order would pair the wrong rows (or purge listed ones); there the
/// pass reads an index instead. Integer keys merge numerically (9 before
/// 10).
async fn an_ordered_listing_pairs_keys_whatever_the_collation(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)",
        Backend::Postgres => {
            "CREATE TABLE items (id TEXT COLLATE \"en-US-x-icu\" PRIMARY KEY, name TEXT)"
        }
    })
    .await;
    db.exec(
        "INSERT INTO items VALUES ('A', 'A'), ('a-c', 'old'), ('aa', 'ghost'), ('ab', 'ab'),
           ('Z', 'ghost'), ('é', 'é'), ('a', 'a'), ('_x', 'old')",
    )
    .await;
    let mut keys = vec!["A", "B", "_x", "a", "a-c", "ab", "b", "z", "é", "a b"];
    keys.sort_unstable();
    let items: Vec<Json> = keys.iter().map(|k| json!({"id": k, "name": k})).collect();
    let (_up, addr) = items_upstream(items).await;
    let config = |key_type, addr| {
        let c = ItemsCfg {
            key_type,
            page_size: 3,
            ..ItemsCfg::default()
        };
        items_config(&db.url, addr, &c)
    };
    let settings = config("text", addr);
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(
        (r.found.missing, r.found.stale, r.found.extra),
        (4, 2, 2),
        "{r:?}"
    );
    assert_eq!(r.keys.purge, vec!["Z", "aa"], "{r:?}");
    let mut got: Vec<String> = db
        .text("SELECT id || '=' || name FROM items")
        .await
        .into_iter()
        .flatten()
        .collect();
    got.sort_unstable();
    let mut want: Vec<String> = keys.iter().map(|k| format!("{k}={k}")).collect();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(pass_items(&settings).await.outcome, Outcome::InSync);

    // Integer keys: numeric order, 9 before 10, in both the listing and
    // the scan.
    db.exec("DROP TABLE items").await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)",
        Backend::Postgres => "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT)",
    })
    .await;
    db.exec("INSERT INTO items VALUES (-3, 'ghost'), (2, 'old'), (9, '9'), (100, 'ghost')")
        .await;
    let items: Vec<Json> = [-20, 2, 9, 10, 11]
        .iter()
        .map(|i| json!({"id": i, "name": i.to_string()}))
        .collect();
    let (_up, addr2) = items_upstream(items).await;
    let settings = config("integer", addr2);
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(r.keys.purge, vec!["-3", "100"], "{r:?}");
    assert_eq!(
        (r.found.missing, r.found.stale, r.found.extra),
        (3, 1, 2),
        "{r:?}"
    );
    assert_eq!(pass_items(&settings).await.outcome, Outcome::InSync);
}

both_backends!(
    an_ordered_listing_pairs_keys_whatever_the_collation,
    check_and_run_refuse_an_unsafe_table,
    case_insensitive_key_collation_is_refused,
    uuid_keys_are_canonical,
    key_type_must_match_the_column,
    values_that_do_not_fit_are_refused_naming_row_and_column,
    column_types_must_match,
    every_type_converges,
    sqlite_storage_classes_are_compared,
);

/// The SQLite scan reads cells through SQLite's C API: it must see what
/// the database holds, whatever the table's layout. A `WITHOUT ROWID`
/// table with soft-deleted rows is read whole but for the deleted ones; a
/// key that is not valid UTF-8 stops the pass before anything is written.
#[tokio::test]
async fn sqlite_scan_reads_what_the_table_holds() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.exec(
        "CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT, n INTEGER, on_ INTEGER, deleted_at TEXT) WITHOUT ROWID;
         INSERT INTO items VALUES ('a', 'same', 1, 1, NULL), ('b', 'old', 2, 0, NULL),
           ('c', 'gone', 3, 1, '2026-01-01'), ('e', 'ghost', 5, 1, NULL),
           ('f', 'same', 'six', 1, NULL), ('g', 'same', 7, 'yes', NULL)",
    )
    .await;
    let (_up, addr) = items_upstream(vec![
        json!({"id": "a", "name": "same", "n": 1, "on": true}),
        json!({"id": "b", "name": "new", "n": 2, "on": false}),
        json!({"id": "d", "name": "added", "n": 4, "on": true}),
        json!({"id": "f", "name": "same", "n": 6, "on": true}),
        json!({"id": "g", "name": "same", "n": 7, "on": true}),
    ])
    .await;
    let toml = format!(
        r#"
[store]
url = "{db}"
[resources.items]
key = {{ upstream = "/id", column = "id" }}
local = {{ table = "items" }}
[resources.items.upstream]
base_url = "http://{addr}"
list_path = "/0.1/items"
page_size = 2
total_pointer = "/total"
key_order = "asc"
[resources.items.columns]
name = {{ from = "/name" }}
n = {{ from = "/n", type = "integer" }}
on_ = {{ from = "/on", type = "boolean" }}
[resources.items.policy]
max_purge_fraction = 1.0
max_update_fraction = 1.0
purge = {{ soft_delete = {{ column = "deleted_at" }} }}
"#,
        db = db.url
    );
    let settings = Settings::from_toml_str(&toml, "test.toml").expect("valid");
    let r = pass_items(&settings).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    // c is soft-deleted: not local, not extra; e is extra; the texts 'six'
    // in the integer column and 'yes' in the boolean one are stale.
    assert_eq!(r.local_rows, 5, "{r:?}");
    assert_eq!(
        (r.found.missing, r.found.stale, r.found.extra),
        (1, 3, 1),
        "{r:?}"
    );
    let again = pass_items(&settings).await;
    assert_eq!(again.outcome, Outcome::InSync, "{again:?}");
    assert_eq!(
        db.text("SELECT id || ':' || typeof(n) || ':' || typeof(on_) FROM items WHERE deleted_at IS NULL ORDER BY id")
            .await
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        ["a:integer:integer", "b:integer:integer", "d:integer:integer", "f:integer:integer", "g:integer:integer"]
    );

    // A key SQLite holds as text that is not UTF-8.
    db.exec("INSERT INTO items VALUES (CAST(X'FF61' AS TEXT), 'x', 1, 1, NULL)")
        .await;
    let before = db.count("items").await;
    let r = pass_items(&settings).await;
    failed_with(&r, &["not valid UTF-8"]);
    assert_eq!(db.count("items").await, before);
}

/// Two columns whose pointers name one array element two ways (`0` and
/// `00`): both hold upstream's value, and an equal local row is in sync
/// (the descending decoder once read the second as absent and wrote NULL
/// over a correct row; found by a hostile review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointers_naming_one_element_two_ways_read_the_same_value() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.exec(
        "CREATE TABLE items (id TEXT PRIMARY KEY, first TEXT, again TEXT);
         INSERT INTO items VALUES ('a', 'x@y', 'x@y')",
    )
    .await;
    let (_up, addr) = serve_collection(
        "items",
        "id",
        vec![json!({"id": "a", "emails": [{"address": "x@y"}]})],
    )
    .await;
    let toml = format!(
        r#"
[store]
url = "{db}"
[resources.items]
key = {{ upstream = "/id", column = "id" }}
local = {{ table = "items" }}
[resources.items.upstream]
base_url = "http://{addr}"
list_path = "/0.1/items"
total_pointer = "/total"
key_order = "asc"
[resources.items.columns]
first = {{ from = "/emails/0/address", optional = true }}
again = {{ from = "/emails/00/address", optional = true }}
[resources.items.policy]
max_update_fraction = 1.0
"#,
        db = db.url
    );
    let settings = Settings::from_toml_str(&toml, "test.toml").expect("valid");
    let r = pass_items(&settings).await;
    assert_eq!(
        db.text("SELECT coalesce(first, 'NULL') || ' ' || coalesce(again, 'NULL') FROM items")
            .await,
        vec![Some("x@y x@y".to_string())],
        "upstream says x@y; report: {r:?}"
    );
    assert_eq!(r.outcome, Outcome::InSync, "{r:?}");
}

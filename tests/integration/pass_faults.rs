//! A pass under faults of the listing and of values: offset paging over a
//! mutable order, timestamps and numbers a column would store otherwise,
//! rows a scan could miss, confirmations of keys a URL mangles. Each test
//! is a way driftd once deleted a row upstream had, overwrote a row, or
//! reported `in_sync`/`repaired` over a table unequal to upstream.

use std::net::SocketAddr;

use driftd::config::Settings;
use driftd::pass::Outcome;
use driftd::sample::{Fault, SampleUpstream};
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;

/// A resource `items` keyed by `/id` into `items.id`. `upstream` and
/// `policy` are extra TOML lines for those tables; offset listings promise
/// ascending keys unless `upstream` says otherwise.
fn settings(
    db: &TestDb,
    addr: SocketAddr,
    key_type: &str,
    columns: &str,
    upstream: &str,
    policy: &str,
) -> Settings {
    try_settings(db, addr, key_type, columns, upstream, policy).expect("test config is valid")
}

fn try_settings(
    db: &TestDb,
    addr: SocketAddr,
    key_type: &str,
    columns: &str,
    upstream: &str,
    policy: &str,
) -> Result<Settings, driftd::config::ConfigError> {
    let order = if upstream.contains("key_order") || upstream.contains("cursor") {
        ""
    } else {
        "key_order = \"asc\""
    };
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
backoff_ms = 1
{order}
{upstream}

[resources.items.columns]
{columns}

[resources.items.policy]
{policy}
"#,
        db = db.url
    );
    Settings::from_toml_str(&toml, "test.toml")
}

/// Starts the sample upstream with `items` ordered (and got) by `order_field`.
async fn serve(
    items: Vec<Json>,
    order_field: &str,
) -> (std::sync::Arc<SampleUpstream>, SocketAddr) {
    serve_collection("items", order_field, items).await
}

async fn ids(db: &TestDb) -> Vec<String> {
    db.text("SELECT id FROM items ORDER BY id")
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Offset paging over a list sorted by a column that changes (here `name`,
/// as `?order=name` asks; `updated_at` behaves the same). The default
/// config (offset, no `key_order`, no `get_path`) is accepted and purges
/// unconfirmed. Between page 1 and page 2, upstream deletes one row already
/// listed and renames one row not yet listed so that it sorts first: the
/// row before the anchor count stays the same, so the overlap row matches,
/// the total stays 50 (one row also appended), and the renamed row is never
/// listed. driftd purges it although upstream has it the whole time.
async fn offset_over_a_mutable_order_purges_a_kept_row(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)")
        .await;
    let item = |i: u32, name: &str| json!({"id": format!("u{i:02}"), "name": name});
    let items: Vec<Json> = (0..50).map(|i| item(i, &format!("n{i:02}"))).collect();
    let values: Vec<String> = (0..50).map(|i| format!("('u{i:02}', 'n{i:02}')")).collect();
    db.exec(&format!("INSERT INTO items VALUES {}", values.join(",")))
        .await;
    // The sample keeps items sorted by the field named here: `name`.
    let (up, addr) = serve(items, "name").await;
    up.get_by("items", "id");
    up.on_list(
        "items",
        "name",
        Box::new(move |request, churn| {
            if request == 2 {
                // u00 is deleted upstream (it was on page 1)
                churn.remove(0);
                // u30 is renamed and now sorts first
                let at = (0..churn.len()).find(|&i| churn.key(i) == "n30").unwrap();
                churn.remove(at);
                churn.put(item(30, "a renamed"));
                // a new row keeps the total at 50
                churn.put(item(99, "z new"));
            }
        }),
    );
    // Unconfirmed purges over a listing not sorted by the key are refused.
    let err = try_settings(
        &db,
        addr,
        "text",
        r#"name = { from = "/name" }"#,
        "page_size = 10\ntotal_pointer = \"/total\"\nquery = { order = \"name\" }\nkey_order = \"none\"",
        "",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("upstream.key_order"), "{err}");
    // Without a key order, purge candidates are confirmed one by one, and
    // the renamed row, still upstream, is kept. (A `key_order = "asc"`
    // promise over a list sorted by name would be a false promise that no
    // listing can catch: the moved row is behind the reader.)
    let s = settings(
        &db,
        addr,
        "text",
        r#"name = { from = "/name" }"#,
        "page_size = 10\ntotal_pointer = \"/total\"\nquery = { order = \"name\" }\nkey_order = \"none\"\nget_path = \"/0.1/items/{key}\"",
        "max_purge_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    let upstream_has_u30 = up.items("items").iter().any(|i| i["id"] == "u30");
    assert!(upstream_has_u30);
    assert!(
        ids(&db).await.contains(&"u30".to_string()),
        "upstream has u30 (it had it during the whole pass) but the pass purged it: {r:?}"
    );
}

/// PostgreSQL's `to_char` answers NULL for `infinity`, so the scan reads a
/// local `'infinity'` timestamp as NULL: upstream `null` then "equals" it
/// and the pass reports `in_sync` over a table holding `infinity`.
async fn infinite_timestamp_reads_as_null(backend: Backend) {
    if backend == Backend::Sqlite {
        return;
    }
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, at TIMESTAMPTZ)")
        .await;
    db.exec("INSERT INTO items VALUES ('a', 'infinity'), ('b', '-infinity')")
        .await;
    let (_up, addr) = serve(
        vec![
            json!({"id": "a", "at": null}),
            json!({"id": "b", "at": null}),
        ],
        "id",
    )
    .await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"at = { from = "/at", type = "timestamp" }"#,
        "",
        "max_update_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    let nulls = db
        .text("SELECT CAST(at IS NULL AS TEXT) FROM items ORDER BY id")
        .await;
    assert!(
        r.outcome == Outcome::Failed || nulls == vec![Some("true".into()), Some("true".into())],
        "outcome {:?} but `at` IS NULL is {nulls:?} (upstream says null): {r:?}",
        r.outcome
    );
}

/// A zero with a positive exponent (`0E+2`, what Python's Decimal prints
/// for a quantized zero) is canonicalised to `00`, not `0`: PostgreSQL
/// stores 0 and every later pass sees the row stale and "repairs" it
/// again (the update guard counts it each time); SQLite stores the text
/// `00`, which is not the canonical form of zero.
async fn zero_with_exponent_numeric_flaps(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE items (id TEXT PRIMARY KEY, amount TEXT)",
        Backend::Postgres => "CREATE TABLE items (id TEXT PRIMARY KEY, amount NUMERIC)",
    })
    .await;
    let item: Json = serde_json::from_str(r#"{"id": "a", "amount": 0E+2}"#).unwrap();
    let (_up, addr) = serve(vec![item], "id").await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"amount = { from = "/amount", type = "numeric" }"#,
        "",
        "max_update_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    let r = pass_items(&s).await;
    assert_eq!(
        r.outcome,
        Outcome::InSync,
        "second pass over an unchanged upstream: {r:?}"
    );
    assert_eq!(
        db.text("SELECT CAST(amount AS TEXT) FROM items").await,
        vec![Some("0".to_string())]
    );
}

/// The same zero inside a json value (`{"n": 0e3}`, valid JSON) is
/// printed `000`, which is not JSON: PostgreSQL's jsonb refuses the insert
/// with a raw "invalid input syntax for type json" after the plan was
/// made, and SQLite stores the invalid text `{"n": 000}`.
async fn zero_with_exponent_in_json_is_not_json(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE items (id TEXT PRIMARY KEY, doc TEXT)",
        Backend::Postgres => "CREATE TABLE items (id TEXT PRIMARY KEY, doc JSONB)",
    })
    .await;
    let item: Json = serde_json::from_str(r#"{"id": "a", "doc": {"n": 0e3}}"#).unwrap();
    let (_up, addr) = serve(vec![item], "id").await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"doc = { from = "/doc", type = "json" }"#,
        "",
        "",
    );
    let r = pass_items(&s).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(
        db.text("SELECT CAST(doc AS TEXT) FROM items").await,
        vec![Some(r#"{"n": 0}"#.to_string())]
    );
}

/// A leap second (`23:59:60Z`, valid RFC 3339) is kept as `:60` by the
/// canonical form, but PostgreSQL stores the next minute: the row reads
/// stale on every pass and is "repaired" forever.
async fn leap_second_flaps(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE items (id TEXT PRIMARY KEY, at TEXT)",
        Backend::Postgres => "CREATE TABLE items (id TEXT PRIMARY KEY, at TIMESTAMPTZ)",
    })
    .await;
    let (_up, addr) = serve(vec![json!({"id": "a", "at": "2016-12-31T23:59:60Z"})], "id").await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"at = { from = "/at", type = "timestamp" }"#,
        "",
        "max_update_fraction = 1.0",
    );
    let first = pass_items(&s).await;
    let r = pass_items(&s).await;
    assert!(
        first.outcome == Outcome::Failed || r.outcome == Outcome::InSync,
        "first pass {:?}, second pass over an unchanged upstream: {r:?}",
        first.outcome
    );
}

/// SQLite: a user column named `rowid` hides the real rowid, and the
/// chunked scan pages on it (`WHERE rowid > ?`). Rows whose `rowid`
/// column is NULL are never scanned: a local-only row is never purged and
/// the pass says `in_sync`.
async fn sqlite_rowid_column_hides_rows_from_the_scan(backend: Backend) {
    if backend == Backend::Postgres {
        return;
    }
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT, rowid INTEGER)")
        .await;
    db.exec("INSERT INTO items VALUES ('a', 'x', 1), ('b', 'stale', NULL), ('ghost', 'g', NULL)")
        .await;
    let (_up, addr) = serve(
        vec![
            json!({"id": "a", "name": "x"}),
            json!({"id": "b", "name": "y"}),
        ],
        "id",
    )
    .await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"name = { from = "/name" }"#,
        "",
        "max_purge_fraction = 1.0\nmax_update_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    let rows = db
        .text("SELECT id || '=' || name FROM items ORDER BY id")
        .await;
    assert!(
        r.outcome == Outcome::Failed
            || rows == vec![Some("a=x".to_string()), Some("b=y".to_string())],
        "outcome {:?} but the table is {rows:?}: {r:?}",
        r.outcome
    );
}

/// Soft delete over a key column without a unique index (uniqueness only
/// among live rows is the usual soft-delete schema): the scan sees only
/// live rows, but the repair updated every row with the key, rewriting the
/// soft-deleted history row and clearing its `deleted_at`, leaving two
/// live rows with one key. A key that is not unique is now refused before
/// anything is written.
async fn soft_delete_repair_revives_history_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec(match backend {
        Backend::Sqlite => "CREATE TABLE items (id TEXT NOT NULL, name TEXT, deleted_at TEXT)",
        Backend::Postgres => {
            "CREATE TABLE items (id TEXT NOT NULL, name TEXT, deleted_at TIMESTAMPTZ)"
        }
    })
    .await;
    db.exec(
        "INSERT INTO items VALUES ('a', 'old', '2020-01-01T00:00:00Z'), ('a', 'stale', NULL), ('b', 'y', NULL)",
    )
    .await;
    let (_up, addr) = serve(
        vec![
            json!({"id": "a", "name": "new"}),
            json!({"id": "b", "name": "y"}),
        ],
        "id",
    )
    .await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"name = { from = "/name" }"#,
        "",
        "max_update_fraction = 1.0\npurge = { soft_delete = { column = \"deleted_at\" } }",
    );
    let r = pass_items(&s).await;
    let rows = db
        .text("SELECT id || '=' || name || CASE WHEN deleted_at IS NULL THEN ' live' ELSE ' deleted' END FROM items ORDER BY id, name")
        .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("no unique constraint"),
        "{r:?}"
    );
    assert_eq!(
        rows,
        vec![
            Some("a=old deleted".to_string()),
            Some("a=stale live".to_string()),
            Some("b=y live".to_string())
        ],
        "{r:?}"
    );
}

/// Purge confirmation under cursor paging (where it is required): a text
/// key `.` or `..` is put in the get-by-key path unencoded, the URL parser
/// resolves the dot segment away (`/0.1/items/..` is `/0.1/`), the
/// upstream answers 404 for that other path, and the row is purged
/// although get-by-key would find it. The listing missed the rows (the
/// case confirmation exists for); the canary (`a`) passes.
async fn dot_keys_are_confirmed_gone_and_purged(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)")
        .await;
    db.exec(
        "INSERT INTO items VALUES ('.', 'x'), ('..', 'x'), ('a', 'x'), ('b', 'x'), ('ghost', 'x')",
    )
    .await;
    let items: Vec<Json> = [".", "..", "a", "b"]
        .iter()
        .map(|k| json!({"id": k, "name": "x"}))
        .collect();
    let (up, addr) = serve(items, "id").await;
    // the list endpoint misses `.` and `..`; get-by-key still has them
    up.inject(Fault::Unlisted {
        from: 0,
        count: 2,
        counted: false,
    });
    let s = settings(
        &db,
        addr,
        "text",
        r#"name = { from = "/name" }"#,
        "get_path = \"/0.1/items/{key}\"\npagination = { kind = \"cursor\", next_pointer = \"/next\" }",
        "max_purge_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    assert_eq!(
        ids(&db).await,
        vec![".", "..", "a", "b"],
        "only `ghost` is gone upstream: {r:?}"
    );
}

/// Purge confirmation sends the canonical (lower-case) uuid, not the key
/// as upstream spells it. An upstream that stores keys as given and
/// matches them exactly answers 404 for the lower-case spelling of an
/// upper-case key, and the row is purged. The canary is a lower-case key.
async fn uuid_confirmation_uses_a_spelling_upstream_does_not_know(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)")
        .await;
    let lower = "00000000-0000-4000-8000-00000000000a";
    let upper = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
    db.exec(&format!(
        "INSERT INTO items VALUES ('{lower}', 'x'), ('{}', 'x')",
        upper.to_lowercase()
    ))
    .await;
    let (up, addr) = serve(
        vec![
            json!({"id": lower, "name": "x"}),
            json!({"id": upper, "name": "x"}),
        ],
        "id",
    )
    .await;
    // the list endpoint misses the upper-case one (sorted second)
    up.inject(Fault::Unlisted {
        from: 1,
        count: 1,
        counted: false,
    });
    let s = settings(
        &db,
        addr,
        "uuid",
        r#"name = { from = "/name" }"#,
        "get_path = \"/0.1/items/{key}\"\npagination = { kind = \"cursor\", next_pointer = \"/next\" }",
        "max_purge_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    assert_eq!(
        db.count("items").await,
        2,
        "upstream still has {upper}: {r:?}"
    );
}

/// A boolean mapped to an integer column is accepted by prepare (and by
/// `driftd check`), but PostgreSQL has no cast from boolean to smallint or
/// bigint: every write fails with a raw SQL error after the plan.
async fn boolean_into_smallint_is_accepted_then_fails(backend: Backend) {
    if backend == Backend::Sqlite {
        return;
    }
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, flag SMALLINT, big BIGINT)")
        .await;
    let (_up, addr) = serve(vec![json!({"id": "a", "flag": true, "big": false})], "id").await;
    let s = settings(
        &db,
        addr,
        "text",
        "flag = { from = \"/flag\", type = \"boolean\" }\nbig = { from = \"/big\", type = \"boolean\" }",
        "",
        "",
    );
    let r = pass_items(&s).await;
    assert_eq!(r.outcome, Outcome::Repaired, "{r:?}");
    assert_eq!(
        db.text("SELECT flag || ',' || big FROM items").await,
        vec![Some("1,0".to_string())]
    );
}

/// SQLite: a key stored as a BLOB in a TEXT key column (an application
/// binding bytes) scans as its text, but the purge binds text, which never
/// equals a BLOB: nothing is deleted, and the pass reports `repaired`
/// (every pass) over a table that still holds the row.
async fn sqlite_blob_key_is_reported_purged_but_stays(backend: Backend) {
    if backend == Backend::Postgres {
        return;
    }
    let db = TestDb::new(backend).await;
    db.exec("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT)")
        .await;
    db.exec("INSERT INTO items VALUES ('a', 'x'), (CAST('ghost' AS BLOB), 'g'), (CAST('b' AS BLOB), 'stale')")
        .await;
    let (_up, addr) = serve(
        vec![
            json!({"id": "a", "name": "x"}),
            json!({"id": "b", "name": "y"}),
        ],
        "id",
    )
    .await;
    let s = settings(
        &db,
        addr,
        "text",
        r#"name = { from = "/name" }"#,
        "",
        "max_purge_fraction = 1.0\nmax_update_fraction = 1.0",
    );
    let r = pass_items(&s).await;
    let rows = db
        .text("SELECT CAST(id AS TEXT) || '=' || name FROM items ORDER BY CAST(id AS TEXT)")
        .await;
    assert!(
        r.outcome == Outcome::Failed
            || rows == vec![Some("a=x".to_string()), Some("b=y".to_string())],
        "outcome {:?} (actions {:?}) but the table is {rows:?}",
        r.outcome,
        r.actions
    );
}

both_backends!(
    offset_over_a_mutable_order_purges_a_kept_row,
    infinite_timestamp_reads_as_null,
    zero_with_exponent_numeric_flaps,
    zero_with_exponent_in_json_is_not_json,
    leap_second_flaps,
    sqlite_rowid_column_hides_rows_from_the_scan,
    soft_delete_repair_revives_history_rows,
    dot_keys_are_confirmed_gone_and_purged,
    uuid_confirmation_uses_a_spelling_upstream_does_not_know,
    boolean_into_smallint_is_accepted_then_fails,
    sqlite_blob_key_is_reported_purged_but_stays,
);

//! Test helpers: a fresh database per test (a SQLite file in a temporary
//! directory, or a new PostgreSQL database on the server the test script
//! started), the bundled sample upstream on an ephemeral port, and config
//! built for both.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use driftd::config::Settings;
use driftd::pass::{run_pass, Hooks, PassOptions, PassReport};
use driftd::sample::{sample_uuid, user, SampleUpstream};
use driftd::store::AnyStore;
use serde_json::Value as Json;
use sqlx::{PgPool, SqlitePool};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const TENANTS: u64 = 10;

/// A fresh database for one test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pool: Pool,
    _dir: Option<tempfile::TempDir>,
}

enum Pool {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

/// The PostgreSQL server the test script started. Missing is a failure,
/// never a skip.
pub fn pg_admin_url() -> String {
    std::env::var("DRIFTD_TEST_PG_URL").unwrap_or_else(|_| {
        panic!("DRIFTD_TEST_PG_URL is not set: run the suite with ./scripts/test.sh, which starts PostgreSQL")
    })
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("t.db").display());
                let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("sqlite url");
                let pool = SqlitePool::connect_with(opts.create_if_missing(true))
                    .await
                    .expect("open sqlite");
                TestDb {
                    backend,
                    url,
                    pool: Pool::Sqlite(pool),
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin_url = pg_admin_url();
                let admin = PgPool::connect(&admin_url)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin_url}: {e}"));
                let name = format!("driftd_t_{}_{}", std::process::id(), fastrand::u64(..));
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .expect("create database");
                admin.close().await;
                let url = match admin_url.rfind('/') {
                    Some(i) => format!("{}/{name}", &admin_url[..i]),
                    None => panic!("bad DRIFTD_TEST_PG_URL"),
                };
                let pool = PgPool::connect(&url).await.expect("connect test db");
                TestDb {
                    backend,
                    url,
                    pool: Pool::Pg(pool),
                    _dir: None,
                }
            }
        }
    }

    pub async fn exec(&self, sql: &str) {
        let r = match &self.pool {
            Pool::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Pool::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        };
        r.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn text(&self, sql: &str) -> Vec<Option<String>> {
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await,
            Pool::Pg(p) => sqlx::query_scalar(sql).fetch_all(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query_scalar(&sql).fetch_one(p).await,
            Pool::Pg(p) => sqlx::query_scalar(&sql).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn keys(&self, table: &str) -> BTreeSet<String> {
        self.text(&format!("SELECT CAST(uuid AS TEXT) FROM {table}"))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The users table, with real column types on PostgreSQL (uuid,
    /// varchar, timestamptz) to prove values are cast to them.
    pub async fn create_users(&self) {
        self.exec(match self.backend {
            Backend::Sqlite => "CREATE TABLE users (uuid TEXT PRIMARY KEY, tenant_uuid TEXT, firstname TEXT, lastname TEXT, email TEXT, enabled BOOLEAN, extension INTEGER, deleted_at TEXT, note TEXT)",
            Backend::Postgres => "CREATE TABLE users (uuid UUID PRIMARY KEY, tenant_uuid UUID, firstname TEXT, lastname VARCHAR(64), email TEXT, enabled BOOLEAN, extension INTEGER, deleted_at TIMESTAMPTZ, note TEXT)",
        })
        .await;
    }

    /// Inserts users as given (JSON objects shaped like the sample's).
    pub async fn insert_users(&self, users: &[Json]) {
        for statement in insert_users_sql(users) {
            self.exec(&statement).await;
        }
    }
}

/// The `tenants` table holding the sample's `TENANTS` tenants, which the
/// users of [`users`] belong to.
pub async fn create_tenants(db: &TestDb) {
    db.exec(match db.backend {
        Backend::Sqlite => "CREATE TABLE tenants (uuid TEXT PRIMARY KEY, name TEXT)",
        Backend::Postgres => "CREATE TABLE tenants (uuid UUID PRIMARY KEY, name TEXT)",
    })
    .await;
    for i in 0..TENANTS {
        let t = driftd::sample::tenant(i);
        db.exec(&format!(
            "INSERT INTO tenants (uuid, name) VALUES ('{}', '{}')",
            t["uuid"].as_str().unwrap(),
            t["name"].as_str().unwrap()
        ))
        .await;
    }
}

/// Config lines making `users` a child of a `tenants` resource listed
/// (and got by key) from the sample upstream at `addr`, which purges.
pub fn tenants_resource(addr: SocketAddr) -> String {
    format!(
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
[resources.tenants.policy]
max_purge_fraction = 1.0
"#
    )
}

/// INSERT statements of `users` into the users table, 500 rows each.
pub fn insert_users_sql(users: &[Json]) -> Vec<String> {
    users
        .chunks(500)
        .map(|chunk| {
            let rows: Vec<String> = chunk
                .iter()
                .map(|u| {
                    format!(
                        "({}, {}, {}, {}, {}, {}, {})",
                        lit(&u["uuid"]),
                        lit(&u["tenant_uuid"]),
                        lit(&u["firstname"]),
                        lit(&u["lastname"]),
                        lit(&u["email"]),
                        lit(&u["enabled"]),
                        lit(&u["extension"])
                    )
                })
                .collect();
            format!(
                "INSERT INTO users (uuid, tenant_uuid, firstname, lastname, email, enabled, extension) VALUES {}",
                rows.join(",")
            )
        })
        .collect()
}

/// A SQL literal for test data (which the tests control).
fn lit(v: &Json) -> String {
    match v {
        Json::Null => "NULL".into(),
        Json::Bool(b) => if *b { "TRUE" } else { "FALSE" }.into(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => format!("'{}'", s.replace('\'', "''")),
        other => format!("'{}'", other.to_string().replace('\'', "''")),
    }
}

/// A sample item's `uuid`.
pub fn uuid(item: &Json) -> String {
    item["uuid"].as_str().unwrap().to_string()
}

/// `n` sample users.
pub fn users(n: u64) -> Vec<Json> {
    (0..n).map(|i| user(i, TENANTS)).collect()
}

/// A ghost user: local only, upstream never had it.
pub fn ghost(i: u64) -> Json {
    let mut u = user(900_000 + i, TENANTS);
    u["uuid"] = Json::String(sample_uuid(0x05, 900_000 + i));
    u
}

/// Starts the sample upstream with `users` as the users collection.
pub async fn upstream(users: Vec<Json>) -> (Arc<SampleUpstream>, SocketAddr) {
    serve_collection("users", "uuid", users).await
}

/// Starts the sample upstream serving `items` as `collection`, ordered
/// (and got by key) by the field `key_field`.
pub async fn serve_collection(
    collection: &str,
    key_field: &str,
    items: Vec<Json>,
) -> (Arc<SampleUpstream>, SocketAddr) {
    let up = SampleUpstream::new();
    up.set(collection, key_field, items);
    let addr = up.spawn("127.0.0.1:0").await.expect("bind sample upstream");
    (up, addr)
}

/// Builds the config for the `users` resource.
pub struct ConfigBuilder {
    pub page_size: u32,
    pub total: bool,
    pub ordered: bool,
    pub retries: u32,
    pub get_path: String,
    /// Extra lines in `[resources.users.upstream]`.
    pub upstream: String,
    /// Lines in `[resources.users.policy]`; permissive limits by default,
    /// so that listing guards are tested on their own.
    pub policy: String,
    /// Tables appended at the end (`[admin]`, `[daemon]`).
    pub tail: String,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self {
            page_size: 100,
            total: true,
            ordered: true,
            retries: 1,
            get_path: "/0.1/users/{key}".into(),
            upstream: String::new(),
            policy: "max_purge_fraction = 1.0\nmax_purge_count = 1000000".into(),
            tail: String::new(),
        }
    }
}

impl ConfigBuilder {
    pub fn toml(&self, db: &TestDb, addr: SocketAddr) -> String {
        format!(
            r#"
[store]
url = "{db}"

[resources.users]
key = {{ upstream = "/uuid", column = "uuid", type = "uuid" }}
local = {{ table = "users" }}

[resources.users.upstream]
base_url = "http://{addr}"
list_path = "/0.1/users"
get_path = "{get_path}"
page_size = {page_size}
retries = {retries}
backoff_ms = 1
timeout_secs = 2
query = {{ order = "uuid" }}
{total}
{order}
{upstream}

[resources.users.columns]
tenant_uuid = {{ from = "/tenant_uuid", type = "uuid" }}
firstname = {{ from = "/firstname" }}
lastname = {{ from = "/lastname" }}
email = {{ from = "/email" }}
enabled = {{ from = "/enabled", type = "boolean" }}
extension = {{ from = "/extension", type = "integer" }}

[resources.users.policy]
{policy}

{tail}
"#,
            db = db.url,
            page_size = self.page_size,
            get_path = self.get_path,
            retries = self.retries,
            total = if self.total {
                "total_pointer = \"/total\""
            } else {
                ""
            },
            order = if self.ordered {
                "key_order = \"asc\""
            } else {
                ""
            },
            upstream = self.upstream,
            policy = self.policy,
            tail = self.tail,
        )
    }

    pub fn settings(&self, db: &TestDb, addr: SocketAddr) -> Settings {
        Settings::from_toml_str(&self.toml(db, addr), "test.toml").expect("test config is valid")
    }
}

/// `[admin]` and `[daemon]` for a test worker: any free port, no token
/// (loopback only), schedules from `schedules_dir`.
pub fn open_worker_tail(schedules_dir: &std::path::Path) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallow_unauthenticated = true\n[daemon]\nschedules_dir = \"{}\"\n",
        schedules_dir.display()
    )
}

/// Runs one pass of `users`.
pub async fn pass(settings: &Settings, opts: PassOptions) -> PassReport {
    pass_resource(settings, "users", opts).await
}

/// Runs one pass of the resource `items` (the equality and review tests'
/// generic table).
pub async fn pass_items(settings: &Settings) -> PassReport {
    pass_resource(settings, "items", PassOptions::default()).await
}

/// Runs one pass of `name`.
pub async fn pass_resource(settings: &Settings, name: &str, opts: PassOptions) -> PassReport {
    let store = AnyStore::open(&settings.store.url, 4)
        .await
        .expect("open store");
    let res = settings.resource(name).expect("configured resource");
    run_pass(&store, name, res, opts, &Hooks::default()).await
}

/// Generates one `#[tokio::test]` per backend from an `async fn(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Waits until `check` holds, or fails after `within`.
pub async fn eventually<F, Fut>(within: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// A worker's `GET /v1/sources`.
pub async fn sources(base: &str) -> Json {
    let body = reqwest::get(format!("{base}/v1/sources"))
        .await
        .expect("GET /v1/sources")
        .text()
        .await
        .expect("its body");
    serde_json::from_str(&body).expect("JSON")
}

/// Asserts that `users` holds exactly the keys of `expected`, and (for a
/// sample, every `step`th) the expected `firstname`.
pub async fn assert_users(
    db: &TestDb,
    expected: &std::collections::BTreeMap<String, Json>,
    step: usize,
) {
    assert_eq!(
        db.keys("users").await,
        expected.keys().cloned().collect(),
        "the table holds exactly the users expected"
    );
    for (key, u) in expected.iter().step_by(step) {
        let got = db
            .text(&format!(
                "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
            ))
            .await;
        assert_eq!(
            got,
            vec![u["firstname"].as_str().map(str::to_string)],
            "{key}"
        );
    }
}

/// Starts a worker and waits until its (first) source consumes; returns it
/// and its admin URL.
pub async fn start_connected(settings: Arc<Settings>) -> (driftd::daemon::Daemon, String) {
    let d = driftd::daemon::Daemon::start(settings).await.unwrap();
    let base = format!("http://{}", d.addr);
    eventually(
        std::time::Duration::from_secs(20),
        "the source connects",
        || async {
            (sources(&base).await["sources"][0]["connected"] == true)
                .then_some(())
                .ok_or("not yet".into())
        },
    )
    .await;
    (d, base)
}

/// How [`items_config`] sets up `items`.
pub struct ItemsCfg<'a> {
    pub key_type: &'a str,
    /// `key_order = "asc"`.
    pub ordered: bool,
    pub page_size: u32,
    /// More lines of `[resources.items.upstream]`.
    pub upstream: &'a str,
    /// The lines of `[resources.items.policy]`.
    pub policy: &'a str,
}

impl Default for ItemsCfg<'_> {
    fn default() -> Self {
        ItemsCfg {
            key_type: "text",
            ordered: true,
            page_size: 97,
            upstream: "",
            policy:
                "max_update_fraction = 1.0\nmax_purge_fraction = 1.0\nmax_purge_count = 100000000",
        }
    }
}

/// The resource `items`, keyed by `/id` into `items.id`, its `name` from
/// `/name`, listed from `addr`, over the database at `db`.
pub fn items_config(db: &str, addr: SocketAddr, c: &ItemsCfg) -> Settings {
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
page_size = {page_size}
total_pointer = "/total"
backoff_ms = 1
{order}
{upstream}
[resources.items.columns]
name = {{ from = "/name" }}
[resources.items.policy]
{policy}
"#,
        db = db,
        key_type = c.key_type,
        page_size = c.page_size,
        order = if c.ordered { "key_order = \"asc\"" } else { "" },
        upstream = c.upstream,
        policy = c.policy,
    );
    Settings::from_toml_str(&toml, "test.toml").expect("valid test config")
}

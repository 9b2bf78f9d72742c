//! What the event benchmarks share: the worker's config up to its
//! sources, and a fresh PostgreSQL database with the `users` table.

/// The worker runs in the bench's process: with the allocator the `driftd`
/// binary has.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `[store]`, `[admin]`, `[daemon]` and the `users` resource (Wazo-shaped
/// users keyed by uuid), for a worker writing to `db`.
pub fn worker_config(db: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
[store]
url = "{db}"
max_connections = 4
[admin]
listen = "127.0.0.1:0"
allow_unauthenticated = true
[daemon]
schedules_dir = "{dir}"
[resources.users]
key = {{ upstream = "/uuid", column = "uuid", type = "uuid" }}
local = {{ table = "users" }}
[resources.users.upstream]
base_url = "http://127.0.0.1:9"
list_path = "/0.1/users"
key_order = "asc"
[resources.users.columns]
tenant_uuid = {{ from = "/tenant_uuid", type = "uuid" }}
firstname = {{ from = "/firstname" }}
lastname = {{ from = "/lastname" }}
email = {{ from = "/email" }}
enabled = {{ from = "/enabled", type = "boolean" }}
extension = {{ from = "/extension", type = "integer" }}
"#,
        dir = dir.display()
    )
}

/// A new database `name` on the server `admin` names, holding an empty
/// `users` table; its URL.
pub async fn fresh_pg_db(admin: &str, name: &str) -> String {
    let pool = sqlx::PgPool::connect(admin)
        .await
        .expect("connect PostgreSQL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&pool)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .expect("create");
    let i = admin.rfind('/').expect("db url");
    let url = format!("{}/{name}", &admin[..i]);
    let db = sqlx::PgPool::connect(&url).await.expect("bench db");
    sqlx::query("CREATE TABLE users (uuid UUID PRIMARY KEY, tenant_uuid UUID, firstname TEXT, lastname TEXT, email TEXT, enabled BOOLEAN, extension INTEGER)")
        .execute(&db)
        .await
        .expect("create users");
    url
}

/// How many messages a benchmark sends: `DRIFTD_BENCH_EVENTS`, or 100,000
/// under `cargo bench` and 2,000 as a smoke test under `cargo test`.
pub fn messages() -> usize {
    let benching = std::env::args().any(|a| a == "--bench");
    std::env::var("DRIFTD_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 100_000 } else { 2_000 })
}

/// The variable `var` the bench script sets, or a message naming it.
pub fn server(var: &str, bench: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run ./scripts/bench.sh {bench} (it starts the servers)")
    })
}

/// Prints both ack-only floors and driftd's rate, and the ratio to the
/// faster floor.
pub fn print_rates(unit: &str, n: usize, floor_before: f64, floor_after: f64, applied_in: f64) {
    let floor_rate = n as f64 / floor_before.min(floor_after);
    let rate = n as f64 / applied_in;
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "consumer",
        unit,
        "wall s",
        format!("{unit}/s")
    );
    for (name, wall) in [
        ("ack-only, before driftd", floor_before),
        ("ack-only, after driftd", floor_after),
    ] {
        println!("{name:<34} {n:>10} {wall:>10.2} {:>12.0}", n as f64 / wall);
    }
    println!(
        "{:<34} {n:>10} {applied_in:>10.2} {rate:>12.0}",
        "driftd -> PostgreSQL (applied)"
    );
    println!(
        "driftd applies at {:.0}% of the faster ack-only rate ({floor_rate:.0} {unit}/s)",
        100.0 * rate / floor_rate
    );
}

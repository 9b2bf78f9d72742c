//! One full pass over a large drifted table, on SQLite and on PostgreSQL.
//!
//! `./scripts/bench.sh` (starts PostgreSQL, then `cargo bench --bench pass`).
//! The upstream (the bundled sample, Wazo-shaped users, pages of 1000) runs
//! as its own process; the local table gets 1% missing, 1% stale and 1%
//! extra rows; the pass runs as a `driftd reconcile` child process, so its
//! wall time and peak RSS are its own. Rows: `DRIFTD_BENCH_ROWS` (default
//! 1,000,000; 2,000 when `cargo test` runs it as a smoke test). Without
//! `DRIFTD_TEST_PG_URL` only SQLite runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use driftd::sample::{sample_uuid, user};
use serde_json::Value as Json;

const TENANTS: u64 = 1000;

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let rows: u64 = std::env::var("DRIFTD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mut upstream, addr) = start_upstream(rows);
    println!("driftd pass benchmark: {rows} upstream rows, pages of 1000, 1% missing / 1% stale / 1% extra");
    println!(
        "{:<10} {:>10} {:>12} {:>14} {:>12}  drift (missing/stale/extra)",
        "backend", "rows", "wall s", "rows/s", "peak RSS MiB"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut targets = vec![("sqlite", sqlite_url)];
    match std::env::var("DRIFTD_TEST_PG_URL") {
        Ok(admin) => targets.push(("postgres", rt.block_on(fresh_pg_db(&admin)))),
        Err(_) => {
            eprintln!("DRIFTD_TEST_PG_URL not set: PostgreSQL skipped (run ./scripts/bench.sh)")
        }
    }
    for (backend, url) in targets {
        rt.block_on(seed(backend, &url, rows));
        let config = dir.path().join(format!("{backend}.toml"));
        std::fs::write(&config, config_text(&url, &addr)).expect("write config");
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args(["reconcile", "users", "--json", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run driftd");
        let peak = watch_peak_rss(child.id());
        let out = child.wait_with_output().expect("wait for driftd");
        let wall = started.elapsed().as_secs_f64();
        let rss_mib = peak.join().unwrap_or(0) as f64 / 1024.0;
        if !out.status.success() {
            panic!(
                "pass failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: Json = serde_json::from_slice(&out.stdout).expect("json report");
        let f = &report["found"];
        println!(
            "{backend:<10} {rows:>10} {wall:>12.2} {:>14.0} {rss_mib:>12.1}  {}/{}/{}",
            rows as f64 / wall,
            f["missing"],
            f["stale"],
            f["extra"]
        );
        println!("           phases: {}", report["timings"]);
        assert_eq!(report["outcome"], "repaired");
    }
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// Starts `driftd sample-upstream` on a free port; returns it and its address.
fn start_upstream(rows: u64) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args([
            "sample-upstream",
            "--listen",
            "127.0.0.1:0",
            "--tenants",
            &TENANTS.to_string(),
            "--users",
            &rows.to_string(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sample upstream");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("read upstream banner");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected banner: {line}"))
        .to_string();
    (child, addr)
}

/// Polls the child's peak resident set (`VmHWM`, KiB) until it exits.
/// The kernel keeps the high-water mark, so polling misses nothing but the
/// last few milliseconds.
fn watch_peak_rss(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let path = format!("/proc/{pid}/status");
        let mut peak = 0;
        while let Ok(status) = std::fs::read_to_string(&path) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            {
                peak = kib;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        peak
    })
}

fn config_text(db: &str, addr: &str) -> String {
    format!(
        r#"
[store]
url = "{db}"
[resources.users]
key = {{ upstream = "/uuid", column = "uuid" }}
local = {{ table = "users" }}
[resources.users.upstream]
base_url = "http://{addr}"
list_path = "/0.1/users"
page_size = 1000
total_pointer = "/total"
key_order = "asc"
query = {{ order = "uuid", direction = "asc" }}
[resources.users.columns]
tenant_uuid = {{ from = "/tenant_uuid" }}
firstname = {{ from = "/firstname" }}
lastname = {{ from = "/lastname" }}
email = {{ from = "/email" }}
enabled = {{ from = "/enabled", type = "boolean" }}
extension = {{ from = "/extension", type = "integer" }}
[resources.users.policy]
max_purge_fraction = 0.05
max_purge_count = 100000
"#
    )
}

async fn fresh_pg_db(admin: &str) -> String {
    let pool = sqlx::PgPool::connect(admin)
        .await
        .expect("connect PostgreSQL");
    sqlx::query("DROP DATABASE IF EXISTS driftd_bench")
        .execute(&pool)
        .await
        .expect("drop");
    sqlx::query("CREATE DATABASE driftd_bench")
        .execute(&pool)
        .await
        .expect("create");
    let i = admin.rfind('/').expect("db url");
    format!("{}/driftd_bench", &admin[..i])
}

/// The local copy: every 100th row missing, every 100th (offset 50) stale,
/// plus rows/100 ghosts.
fn local_rows(rows: u64) -> impl Iterator<Item = Json> {
    let ghosts = (0..rows / 100).map(|i| {
        let mut u = user(i, TENANTS);
        u["uuid"] = Json::String(sample_uuid(0x05, 0x4000_0000 + i));
        u
    });
    (0..rows)
        .filter(|i| i % 100 != 0)
        .map(|i| {
            let mut u = user(i, TENANTS);
            if i % 100 == 50 {
                u["email"] = Json::String("stale@example.com".into());
            }
            u
        })
        .chain(ghosts)
}

async fn seed(backend: &str, url: &str, rows: u64) {
    let ddl = "CREATE TABLE users (uuid TEXT PRIMARY KEY, tenant_uuid TEXT, firstname TEXT, lastname TEXT, email TEXT, enabled BOOLEAN, extension INTEGER)";
    let insert = "INSERT INTO users (uuid, tenant_uuid, firstname, lastname, email, enabled, extension) VALUES ";
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    for u in local_rows(rows) {
        batch.push(format!(
            "('{}','{}','{}','{}','{}',{},{})",
            u["uuid"].as_str().unwrap_or_default(),
            u["tenant_uuid"].as_str().unwrap_or_default(),
            u["firstname"].as_str().unwrap_or_default(),
            u["lastname"].as_str().unwrap_or_default(),
            u["email"].as_str().unwrap_or_default(),
            if u["enabled"].as_bool().unwrap_or(false) {
                "TRUE"
            } else {
                "FALSE"
            },
            u["extension"].as_i64().unwrap_or_default()
        ));
        if batch.len() == 2000 {
            batches.push(format!("{insert}{}", batch.join(",")));
            batch.clear();
        }
    }
    if !batch.is_empty() {
        batches.push(format!("{insert}{}", batch.join(",")));
    }
    if backend == "sqlite" {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("sqlite url");
        let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
            .await
            .expect("open");
        sqlx::raw_sql(ddl).execute(&pool).await.expect("ddl");
        let mut tx = pool.begin().await.expect("begin");
        for b in &batches {
            sqlx::raw_sql(b).execute(&mut *tx).await.expect("seed");
        }
        tx.commit().await.expect("commit");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        sqlx::raw_sql(ddl).execute(&pool).await.expect("ddl");
        for b in &batches {
            sqlx::raw_sql(b).execute(&pool).await.expect("seed");
        }
        sqlx::raw_sql("VACUUM ANALYZE users")
            .execute(&pool)
            .await
            .expect("analyze");
        pool.close().await;
    }
}

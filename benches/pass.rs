//! One full pass over a large drifted table, on SQLite and on PostgreSQL,
//! as a ratio to the floor measured in the same run.
//!
//! `./scripts/bench.sh` (starts PostgreSQL, then `cargo bench --bench pass`).
//! The workload is Wazo's user listing as wazo-auth serves it: ~350 bytes
//! of JSON a user, the e-mail nested in an `emails` array and mapped from
//! `/emails/0/address`, pages of 1000 sorted by uuid, served by the bundled
//! sample upstream in this process. The local table has 1% missing, 1%
//! stale and 1% extra rows. The pass runs as a `driftd reconcile` child
//! process, so its wall time and peak RSS are its own.
//!
//! The floor, per backend: fetch every page with `curl` (one connection)
//! plus read the same columns with the database's own CLI (`sqlite3`, or
//! `psql` with `COPY ... TO STDOUT`). Each driftd phase is printed with its
//! ratio to the part of the floor it does the work of (scan: the CLI read;
//! listing: the fetch), and the JSON decoded per second.
//!
//! Rows: `DRIFTD_BENCH_ROWS` (default 1,000,000; 2,000 when `cargo test`
//! runs it as a smoke test). Under `cargo bench`, a ratio above its limit
//! ([`LIMITS`]) fails the run: the per-phase regression check. Without
//! `DRIFTD_TEST_PG_URL` only SQLite runs. `DRIFTD_BENCH_WRAP` prefixes the
//! pass's command, to profile it alone: `DRIFTD_BENCH_WRAP="perf record
//! --call-graph dwarf -o /tmp/pass.data --"`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use driftd::sample::SampleUpstream;
use serde_json::{json, Value as Json};

const PAGE: usize = 1000;

/// Regression limits under `cargo bench`: driftd's time over the floor's,
/// whole pass and per phase; above them the bench fails. Set above what
/// this 2-core machine measures on a noisy day (wall 2.5-3.4x, scan
/// 1.2-2.0x, listing 3.8-7.5x on 2026-11-29), below what the code before
/// the speed work measured (wall 4.1-10.2x, SQLite scan 5.7-13x, listing
/// 9-21x): losing the direct SQLite scan or the descending decoder trips
/// them.
const LIMITS: Limits = Limits {
    wall: 4.0,
    scan: 3.0,
    list: 9.0,
};

struct Limits {
    wall: f64,
    scan: f64,
    list: f64,
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let rows: usize = std::env::var("DRIFTD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let users = wazo_users(rows);
    let upstream = SampleUpstream::new();
    let json_bytes: usize = users.iter().map(|u| u.to_string().len()).sum();
    upstream.set("users", "uuid", users.clone());
    let addr = serve(upstream);
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "driftd pass benchmark: {rows} wazo-shaped users ({:.0} MB of JSON), pages of {PAGE}, 1% missing / 1% stale / 1% extra; email from /emails/0/address",
        json_bytes as f64 / 1e6
    );
    let mut targets = vec![(
        "sqlite",
        format!("sqlite://{}", dir.path().join("bench.db").display()),
    )];
    match std::env::var("DRIFTD_TEST_PG_URL") {
        Ok(admin) => targets.push(("postgres", rt.block_on(fresh_pg_db(&admin)))),
        Err(_) => {
            eprintln!("DRIFTD_TEST_PG_URL not set: PostgreSQL skipped (run ./scripts/bench.sh)")
        }
    }
    let fetch = fetch_floor(&addr, rows, dir.path());
    let mut over = Vec::new();
    let mut table = Vec::new();
    for (backend, url) in &targets {
        rt.block_on(seed(backend, url, &users));
        let read = read_floor(backend, url);
        let floor = fetch + read;
        let config = dir.path().join(format!("{backend}.toml"));
        std::fs::write(&config, config_text(backend, url, &addr)).expect("write config");
        let (wall, rss_mib, report) = run_pass(&config);
        let t = &report["timings"];
        let ms = |k: &str| t[k].as_f64().unwrap_or(0.0) / 1000.0;
        let (scan, list, apply) = (ms("scan_ms"), ms("list_ms"), ms("apply_ms"));
        let f = &report["found"];
        println!();
        println!("{backend}:");
        println!(
            "  floor     {floor:>6.2} s  (curl every page {fetch:.2} s + {} reads the columns {read:.2} s)",
            if *backend == "sqlite" {
                "sqlite3"
            } else {
                "psql COPY"
            }
        );
        println!(
            "  driftd    {wall:>6.2} s  = {:.2}x floor, peak RSS {rss_mib:.0} MiB, found {}/{}/{} (missing/stale/extra)",
            wall / floor,
            f["missing"],
            f["stale"],
            f["extra"]
        );
        println!(
            "    scan    {scan:>6.2} s  = {:.2}x the CLI read",
            scan / read
        );
        println!(
            "    listing {list:>6.2} s  = {:.2}x the fetch, {:.0} MB/s of JSON decoded (the scan runs inside it)",
            list / fetch,
            json_bytes as f64 / 1e6 / list
        );
        println!("    apply   {apply:>6.2} s  (confirm and write the drift)");
        assert_eq!(report["outcome"], "repaired", "{report}");
        let drift = (rows / 100) as u64;
        for kind in ["missing", "stale", "extra"] {
            assert_eq!(f[kind].as_u64(), Some(drift), "{kind}: {report}");
        }
        for (what, ratio, limit) in [
            ("wall", wall / floor, LIMITS.wall),
            ("scan", scan / read, LIMITS.scan),
            ("listing", list / fetch, LIMITS.list),
        ] {
            if ratio > limit {
                over.push(format!(
                    "{backend} {what}: {ratio:.2}x its floor, limit {limit}x"
                ));
            }
        }
        table.push((backend.to_string(), floor, wall, rss_mib));
    }
    println!();
    println!("| backend | floor s | driftd s | ratio | peak RSS MiB |");
    println!("| --- | --- | --- | --- | --- |");
    for (backend, floor, wall, rss) in table {
        println!(
            "| {backend} | {floor:.2} | {wall:.2} | {:.2}x | {rss:.0} |",
            wall / floor
        );
    }
    if !over.is_empty() {
        if benching {
            eprintln!("regression: {}", over.join("; "));
            std::process::exit(1);
        }
        println!("(smoke run, limits not enforced: {})", over.join("; "));
    }
}

/// `n` users as wazo-auth lists them, deterministic, sorted by uuid.
fn wazo_users(n: usize) -> Vec<Json> {
    let mut rng = fastrand::Rng::with_seed(42);
    let mut uuid = || {
        let v = rng.u128(..);
        let v = (v & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
        let h = format!("{v:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    };
    let tenants: Vec<String> = (0..(n / 1000).max(1)).map(|_| uuid()).collect();
    let first = [
        "Ada", "Alan", "Grace", "Linus", "Barbara", "Edsger", "Donald", "Frances",
    ];
    let last = [
        "Lovelace", "Turing", "Hopper", "Torvalds", "Liskov", "Dijkstra", "Knuth", "Allen",
    ];
    let mut users: Vec<Json> = (0..n)
        .map(|i| {
            let (f, l) = (first[i % 8], last[(i / 8) % 8]);
            json!({
                "uuid": uuid(),
                "tenant_uuid": tenants[i % tenants.len()],
                "username": format!("{}.{}{i}", f.to_lowercase(), l.to_lowercase()),
                "firstname": f,
                "lastname": l,
                "purpose": "user",
                "enabled": i % 20 != 0,
                "authentication_method": "default",
                "emails": [{
                    "uuid": uuid(),
                    "address": format!("{}{i}@example.com", f.to_lowercase()),
                    "main": true,
                    "confirmed": true,
                }],
            })
        })
        .collect();
    users.sort_by(|a, b| a["uuid"].as_str().cmp(&b["uuid"].as_str()));
    users
}

/// Serves `upstream` on a free loopback port from its own thread; its
/// address.
fn serve(upstream: Arc<SampleUpstream>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("upstream runtime");
        rt.block_on(async move {
            let addr = upstream.spawn("127.0.0.1:0").await.expect("bind upstream");
            tx.send(addr.to_string()).expect("send address");
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("upstream address")
}

/// The seconds `curl` takes to fetch every page, past-the-end one
/// included, over one connection.
fn fetch_floor(addr: &str, rows: usize, dir: &std::path::Path) -> f64 {
    let list = dir.join("pages.curl");
    let mut f = std::fs::File::create(&list).expect("curl config");
    for offset in (0..=rows).step_by(PAGE) {
        writeln!(
            f,
            "url = \"http://{addr}/0.1/users?limit={PAGE}&offset={offset}\"\noutput = \"/dev/null\""
        )
        .expect("write curl config");
    }
    drop(f);
    let started = Instant::now();
    let status = Command::new("curl")
        .args(["-sSf", "-K"])
        .arg(&list)
        .status()
        .expect("run curl (apt-get install curl)");
    assert!(status.success(), "curl failed: {status}");
    started.elapsed().as_secs_f64()
}

/// The seconds the database's own CLI takes to read the columns the pass
/// reads.
fn read_floor(backend: &str, url: &str) -> f64 {
    let select =
        "SELECT uuid, tenant_uuid, username, firstname, lastname, email, enabled FROM users";
    let mut cmd = if backend == "sqlite" {
        let mut c = Command::new("sqlite3");
        c.arg(url.trim_start_matches("sqlite://")).arg(select);
        c
    } else {
        let mut c = Command::new("psql");
        c.arg(url)
            .arg("-qAt")
            .arg("-c")
            .arg(format!("COPY ({select}) TO STDOUT"));
        c
    };
    let started = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run the {backend} CLI (sqlite3 or psql): {e}"));
    assert!(status.success(), "{backend} CLI failed: {status}");
    started.elapsed().as_secs_f64()
}

/// Runs `driftd reconcile users`; its wall seconds, peak RSS (MiB) and
/// JSON report.
fn run_pass(config: &std::path::Path) -> (f64, f64, Json) {
    let started = Instant::now();
    // DRIFTD_BENCH_WRAP="perf record -g --" profiles the pass alone.
    let wrap = std::env::var("DRIFTD_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(env!("CARGO_BIN_EXE_driftd"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_driftd")),
    };
    let child = cmd
        .args(["reconcile", "users", "--json", "--config"])
        .arg(config)
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
    let report = serde_json::from_slice(&out.stdout).expect("json report");
    (wall, rss_mib, report)
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

fn config_text(backend: &str, db: &str, addr: &str) -> String {
    let key_type = if backend == "sqlite" { "text" } else { "uuid" };
    format!(
        r#"
[store]
url = "{db}"
[resources.users]
key = {{ upstream = "/uuid", column = "uuid", type = "{key_type}" }}
local = {{ table = "users" }}
[resources.users.upstream]
base_url = "http://{addr}"
list_path = "/0.1/users"
page_size = {PAGE}
total_pointer = "/total"
key_order = "asc"
query = {{ order = "uuid", direction = "asc" }}
[resources.users.columns]
tenant_uuid = {{ from = "/tenant_uuid", type = "{key_type}" }}
username = {{ from = "/username" }}
firstname = {{ from = "/firstname" }}
lastname = {{ from = "/lastname" }}
email = {{ from = "/emails/0/address" }}
enabled = {{ from = "/enabled", type = "boolean" }}
[resources.users.policy]
max_purge_fraction = 0.05
max_purge_count = 1000000
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

/// The local copy: every 100th user missing, every 100th (offset 50)
/// stale, and n/100 users upstream no longer has.
fn local_rows(users: &[Json]) -> Vec<[String; 7]> {
    let row = |u: &Json, lastname: &str| {
        let s = |k: &str| u[k].as_str().unwrap_or_default().to_string();
        [
            s("uuid"),
            s("tenant_uuid"),
            s("username"),
            s("firstname"),
            lastname.to_string(),
            u["emails"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            if u["enabled"].as_bool().unwrap_or(false) {
                "TRUE".into()
            } else {
                "FALSE".into()
            },
        ]
    };
    let mut rows: Vec<[String; 7]> = users
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 100 != 0)
        .map(|(i, u)| {
            let last = u["lastname"].as_str().unwrap_or_default();
            if i % 100 == 50 {
                row(u, &format!("{last}-old"))
            } else {
                row(u, last)
            }
        })
        .collect();
    // Ghosts: the first n/100 users with the uuid's first digit moved out
    // of the hex range upstream uses (still a valid uuid).
    for u in users.iter().take(users.len() / 100) {
        let mut r = row(u, u["lastname"].as_str().unwrap_or_default());
        r[0].replace_range(..8, "ffffffff");
        rows.push(r);
    }
    rows
}

async fn seed(backend: &str, url: &str, users: &[Json]) {
    let (key, enabled) = if backend == "sqlite" {
        ("TEXT", "INTEGER")
    } else {
        ("UUID", "BOOLEAN")
    };
    let ddl = format!(
        "CREATE TABLE users (uuid {key} PRIMARY KEY, tenant_uuid {key} NOT NULL, username TEXT, firstname TEXT, lastname TEXT, email TEXT, enabled {enabled} NOT NULL)"
    );
    let insert = "INSERT INTO users (uuid, tenant_uuid, username, firstname, lastname, email, enabled) VALUES ";
    let batches: Vec<String> = local_rows(users)
        .chunks(2000)
        .map(|chunk| {
            let values: Vec<String> = chunk
                .iter()
                .map(|r| {
                    format!(
                        "('{}','{}','{}','{}','{}','{}',{})",
                        r[0], r[1], r[2], r[3], r[4], r[5], r[6]
                    )
                })
                .collect();
            format!("{insert}{}", values.join(","))
        })
        .collect();
    if backend == "sqlite" {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("sqlite url");
        let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
            .await
            .expect("open");
        sqlx::raw_sql(&ddl).execute(&pool).await.expect("ddl");
        let mut tx = pool.begin().await.expect("begin");
        for b in &batches {
            sqlx::raw_sql(b).execute(&mut *tx).await.expect("seed");
        }
        tx.commit().await.expect("commit");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        sqlx::raw_sql(&ddl).execute(&pool).await.expect("ddl");
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

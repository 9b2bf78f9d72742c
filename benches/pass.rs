//! One full pass over a large drifted table, on SQLite and on PostgreSQL,
//! as a ratio to the floor measured in the same run, with the pass's peak
//! memory.
//!
//! `./scripts/bench.sh` (starts PostgreSQL, then `cargo bench --bench
//! pass`); `./scripts/bench.sh scale` runs 100k, 1M and 10M users, with
//! upstream promising key order and without.
//!
//! The workload is Wazo's user listing as wazo-auth serves it: ~350 bytes
//! of JSON a user, the e-mail nested in an `emails` array and mapped from
//! `/emails/0/address`, pages of 1000 sorted by uuid. An HTTP server in
//! this process makes each page when it is asked for (user `i` is a
//! function of `i`), so ten million users never sit in memory. The local
//! table has 1% missing, 1% stale and 1% extra rows. The pass runs as a
//! `driftd reconcile` child process, so its wall time and peak RSS are its
//! own.
//!
//! Two configurations of the same listing:
//! - `asc`: `key_order = "asc"`, as the Wazo listing sorted by uuid
//!   allows: the pass merges the listing with the local rows read in key
//!   order, holding a window;
//! - `none` (with `DRIFTD_BENCH_UNORDERED=1`): no order promised, so the
//!   pass holds an index of every local key, and (offset paging proving
//!   nothing without the order) confirms each purge candidate with a GET.
//!
//! The floor, per backend: fetch every page with `curl` (one connection)
//! plus read the same columns with the database's own CLI (`sqlite3`, or
//! `psql` with `COPY ... TO STDOUT`). Each driftd phase is printed with its
//! ratio to the part of the floor it does the work of (scan: the CLI read;
//! listing: the fetch), and the JSON decoded per second. In a merge the
//! scan runs beside the listing; its figure is the time the differ waited
//! for local rows. The floor reads only; the apply phase is set against
//! the same CLI writing the drift back from a script (the missing rows
//! inserted, the stale ones updated, the extra ones deleted, in
//! transactions of 1000 rows), timed on the drifted table before the pass.
//!
//! Rows: `DRIFTD_BENCH_ROWS`, one count or several separated by commas
//! (default 1,000,000; 2,000 when `cargo test` runs it as a smoke test).
//! Under `cargo bench`, a ratio or a peak RSS above its limit ([`LIMITS`])
//! fails the run: the regression check. Without `DRIFTD_TEST_PG_URL` only
//! SQLite runs. `DRIFTD_BENCH_WRAP` prefixes the pass's command, to profile
//! it alone: `DRIFTD_BENCH_WRAP="perf record --call-graph dwarf -o
//! /tmp/pass.data --"`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value as Json;
use sqlx::postgres::PgPoolCopyExt;

const PAGE: u64 = 1000;

/// Regression limits under `cargo bench`: driftd's time over the floor's,
/// whole pass and per phase, and its peak memory; above them the bench
/// fails. The ratios sit above what this 2-core machine measures on a
/// noisy day (wall 1.9-3.4x, scan 1.2-2.0x, listing 2.8-7.5x on
/// 2026-11-29), below what the code before the speed work measured (wall
/// 4.1-10.2x, SQLite scan 5.7-13x, listing 9-21x). Without the order
/// promise, at ten million rows, the index outgrows the caches (wall
/// 3.9-5.2x, scan 3.4x), and its own limits sit above that. The memory
/// limits are the issue's targets at ten million rows: 256 MiB with the
/// order promise, 1.2 GiB without. The apply limits sit above what the
/// writes measured against the CLI writing the same rows (SQLite 1.05-1.38x
/// with the order promise, up to 1.89x without, where purge candidates are
/// confirmed by GET first; PostgreSQL 0.24-0.72x).
const LIMITS: [Limits; 2] = [
    Limits {
        order: "asc",
        wall: 4.0,
        scan: 3.0,
        list: 9.0,
        apply: 3.0,
        rss_mib: 256.0,
    },
    Limits {
        order: "none",
        wall: 7.0,
        scan: 5.0,
        list: 12.0,
        apply: 4.0,
        rss_mib: 1228.8,
    },
];

struct Limits {
    order: &'static str,
    wall: f64,
    scan: f64,
    list: f64,
    /// The apply over the CLI writing the same rows back.
    apply: f64,
    rss_mib: f64,
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<u64> = match std::env::var("DRIFTD_BENCH_ROWS") {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("DRIFTD_BENCH_ROWS: `{n}` is not a row count"))
            })
            .collect(),
        Err(_) => vec![if benching { 1_000_000 } else { 2_000 }],
    };
    let unordered = std::env::var("DRIFTD_BENCH_UNORDERED").is_ok_and(|v| v == "1");
    let orders: &[&str] = if unordered {
        &["asc", "none"]
    } else {
        &["asc"]
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg_admin = std::env::var("DRIFTD_TEST_PG_URL").ok();
    if pg_admin.is_none() {
        eprintln!("DRIFTD_TEST_PG_URL not set: PostgreSQL skipped (run ./scripts/bench.sh)");
    }
    let mut over = Vec::new();
    let mut table = Vec::new();
    for &rows in &sizes {
        let users = Users::new(rows);
        let addr = serve(users);
        let dir = tempfile::tempdir().expect("temp dir");
        println!(
            "\ndriftd pass benchmark: {rows} wazo-shaped users ({:.0} MB of JSON), pages of {PAGE}, 1% missing / 1% stale / 1% extra; email from /emails/0/address",
            users.json_bytes() as f64 / 1e6
        );
        let mut targets = vec![(
            "sqlite",
            format!("sqlite://{}", dir.path().join("bench.db").display()),
        )];
        if let Some(admin) = &pg_admin {
            targets.push(("postgres", rt.block_on(fresh_pg_db(admin))));
        }
        let fetch = fetch_floor(&addr, rows, dir.path());
        for (backend, url) in &targets {
            rt.block_on(seed(backend, url, &users));
            let read = read_floor(backend, url);
            let floor = fetch + read;
            // What the database's CLI takes to write the drift back, in
            // transactions of 1000 rows as driftd's writes go: a floor for
            // the apply phase (the pass floor above reads only). The table
            // is drifted, written back by the CLI, then drifted again.
            rt.block_on(drift(backend, url, &users));
            let write = write_floor(backend, url, &users, dir.path());
            for &order in orders {
                rt.block_on(drift(backend, url, &users));
                let config = dir.path().join(format!("{backend}-{order}.toml"));
                std::fs::write(&config, config_text(backend, url, &addr, order))
                    .expect("write config");
                let (wall, rss_mib, report) = run_pass(&config);
                let t = &report["timings"];
                let ms = |k: &str| t[k].as_f64().unwrap_or(0.0) / 1000.0;
                let (scan, list, apply) = (ms("scan_ms"), ms("list_ms"), ms("apply_ms"));
                let f = &report["found"];
                println!("\n{backend}, {rows} rows, upstream order {order}:");
                println!(
                    "  floor     {floor:>6.2} s  (curl every page {fetch:.2} s + {} reads the columns {read:.2} s)",
                    if *backend == "sqlite" { "sqlite3" } else { "psql COPY" }
                );
                println!(
                    "  driftd    {wall:>6.2} s  = {:.2}x floor, peak RSS {rss_mib:.0} MiB, found {}/{}/{} (missing/stale/extra)",
                    wall / floor,
                    f["missing"],
                    f["stale"],
                    f["extra"]
                );
                println!(
                    "    scan    {scan:>6.2} s  = {:.2}x the CLI read{}",
                    scan / read,
                    if order == "asc" {
                        " (waited for local rows: the merge reads them beside the listing)"
                    } else {
                        ""
                    }
                );
                println!(
                    "    listing {list:>6.2} s  = {:.2}x the fetch, {:.0} MB/s of JSON decoded (the scan runs inside it)",
                    list / fetch,
                    users.json_bytes() as f64 / 1e6 / list
                );
                println!(
                    "    apply   {apply:>6.2} s  = {:.2}x the CLI writing the same rows back ({write:.2} s)",
                    apply / write
                );
                assert_eq!(report["outcome"], "repaired", "{report}");
                for kind in ["missing", "stale", "extra"] {
                    assert_eq!(f[kind].as_u64(), Some(rows / 100), "{kind}: {report}");
                }
                let limits = LIMITS
                    .iter()
                    .find(|l| l.order == order)
                    .expect("limits for each order");
                for (what, value, limit) in [
                    ("wall", wall / floor, limits.wall),
                    ("scan", scan / read, limits.scan),
                    ("listing", list / fetch, limits.list),
                    ("apply", apply / write, limits.apply),
                    ("peak RSS MiB", rss_mib, limits.rss_mib),
                ] {
                    if value > limit {
                        over.push(format!(
                            "{backend} {rows} {order} {what}: {value:.2}, limit {limit}"
                        ));
                    }
                }
                table.push((backend.to_string(), rows, order, floor, wall, rss_mib));
            }
        }
    }
    println!();
    println!("| backend | rows | upstream order | floor s | driftd s | ratio | peak RSS MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (backend, rows, order, floor, wall, rss) in table {
        println!(
            "| {backend} | {rows} | {order} | {floor:.2} | {wall:.2} | {:.2}x | {rss:.0} |",
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

/// `n` users as wazo-auth lists them, each made from its index when asked
/// for: user `i`'s uuid starts with `i` scaled into 47 bits, so the
/// listing is in uuid order without being sorted, and the rest of it is a
/// hash of `i`.
#[derive(Clone, Copy)]
struct Users {
    n: u64,
    stride: u64,
    tenants: u64,
}

const FIRST: [&str; 8] = [
    "Ada", "Alan", "Grace", "Linus", "Barbara", "Edsger", "Donald", "Frances",
];
const LAST: [&str; 8] = [
    "Lovelace", "Turing", "Hopper", "Torvalds", "Liskov", "Dijkstra", "Knuth", "Allen",
];

/// splitmix64: a well-mixed 64-bit hash of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A version-4 uuid whose first 48 bits are `high`.
fn push_uuid(out: &mut String, high: u64, seed: u64) {
    let (r, s) = (mix(seed), mix(seed ^ 0x5555));
    let _ = write!(
        out,
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        high >> 16,
        high & 0xffff,
        r & 0xfff,
        0x8000 | ((r >> 12) & 0x3fff),
        s & 0xffff_ffff_ffff
    );
}

impl Users {
    fn new(n: u64) -> Users {
        Users {
            n,
            stride: (1u64 << 47) / n.max(1),
            tenants: (n / 1000).max(1),
        }
    }

    fn uuid(&self, i: u64) -> String {
        let mut s = String::with_capacity(36);
        push_uuid(&mut s, i * self.stride, i);
        s
    }

    /// The index of the user with `uuid`, if there is one.
    fn index_of(&self, uuid: &str) -> Option<u64> {
        let hex: String = uuid.chars().filter(|c| *c != '-').take(12).collect();
        let high = u64::from_str_radix(&hex, 16).ok()?;
        let i = high / self.stride;
        (high % self.stride == 0 && i < self.n && self.uuid(i) == uuid).then_some(i)
    }

    fn tenant(&self, i: u64) -> String {
        let t = i % self.tenants;
        let mut s = String::with_capacity(36);
        push_uuid(&mut s, mix(t ^ 0x7e7a) >> 16, t ^ 0x7e7a);
        s
    }

    fn names(i: u64) -> (&'static str, &'static str) {
        (FIRST[(i % 8) as usize], LAST[((i / 8) % 8) as usize])
    }

    /// User `i` as wazo-auth lists it.
    fn push_json(&self, out: &mut String, i: u64) {
        let (f, l) = Users::names(i);
        let (fl, ll) = (f.to_lowercase(), l.to_lowercase());
        out.push_str("{\"uuid\":\"");
        push_uuid(out, i * self.stride, i);
        let _ = write!(
            out,
            "\",\"tenant_uuid\":\"{}\",\"username\":\"{fl}.{ll}{i}\",\"firstname\":\"{f}\",\"lastname\":\"{l}\",\"purpose\":\"user\",\"enabled\":{},\"authentication_method\":\"default\",\"emails\":[{{\"uuid\":\"",
            self.tenant(i),
            !i.is_multiple_of(20)
        );
        push_uuid(out, mix(i ^ 0xe3a1) >> 16, i ^ 0xe3a1);
        let _ = write!(
            out,
            "\",\"address\":\"{fl}{i}@example.com\",\"main\":true,\"confirmed\":true}}]}}"
        );
    }

    /// The page at `offset`, as the list endpoint returns it.
    fn page(&self, offset: u64, limit: u64) -> String {
        let end = offset.saturating_add(limit).min(self.n);
        let mut out = String::with_capacity(((end.saturating_sub(offset)) * 400 + 64) as usize);
        out.push_str("{\"items\":[");
        for i in offset..end {
            if i > offset {
                out.push(',');
            }
            self.push_json(&mut out, i);
        }
        let _ = write!(out, "],\"total\":{}}}", self.n);
        out
    }

    fn json_bytes(&self) -> u64 {
        // Every user has the same shape; the digits of `i` vary.
        let mut one = String::new();
        (0..self.n.min(1000))
            .map(|i| {
                one.clear();
                self.push_json(&mut one, i);
                one.len() as u64
            })
            .sum::<u64>()
            * self.n
            / self.n.clamp(1, 1000)
    }

    /// User `i` as the local table holds it in sync: uuid, tenant_uuid,
    /// username, firstname, lastname, email, enabled.
    fn row(&self, i: u64) -> [String; 7] {
        let (f, l) = Users::names(i);
        let fl = f.to_lowercase();
        [
            self.uuid(i),
            self.tenant(i),
            format!("{fl}.{}{i}", l.to_lowercase()),
            f.to_string(),
            l.to_string(),
            format!("{fl}{i}@example.com"),
            (!i.is_multiple_of(20)).to_string(),
        ]
    }

    /// The ghost of user `i`: its row under a uuid upstream never lists
    /// (first 32 bits all ones, above every listed uuid).
    fn ghost(&self, i: u64) -> [String; 7] {
        let mut r = self.row(i);
        r[0].replace_range(..8, "ffffffff");
        r
    }
}

#[derive(serde::Deserialize)]
struct PageQuery {
    limit: Option<u64>,
    offset: Option<u64>,
}

/// Serves `users` on a free loopback port from its own thread: the list
/// endpoint and get-by-key. Its address.
fn serve(users: Users) -> String {
    async fn list(State(users): State<Users>, Query(q): Query<PageQuery>) -> impl IntoResponse {
        let body = users.page(q.offset.unwrap_or(0), q.limit.unwrap_or(PAGE));
        ([(header::CONTENT_TYPE, "application/json")], body)
    }
    async fn get(State(users): State<Users>, Path(uuid): Path<String>) -> axum::response::Response {
        match users.index_of(&uuid) {
            Some(i) => {
                let mut body = String::new();
                users.push_json(&mut body, i);
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("upstream runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind upstream");
            tx.send(listener.local_addr().expect("address").to_string())
                .expect("send address");
            let app = axum::Router::new()
                .route("/0.1/users", axum::routing::get(list))
                .route("/0.1/users/{uuid}", axum::routing::get(get))
                .with_state(users);
            axum::serve(listener, app).await.expect("serve upstream");
        });
    });
    rx.recv().expect("upstream address")
}

/// The seconds `curl` takes to fetch every page, past-the-end one
/// included, over one connection.
fn fetch_floor(addr: &str, rows: u64, dir: &std::path::Path) -> f64 {
    let list = dir.join("pages.curl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&list).expect("curl config"));
    for offset in (0..=rows).step_by(PAGE as usize) {
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

const COLUMNS: &str = "uuid, tenant_uuid, username, firstname, lastname, email, enabled";

/// The seconds the database's own CLI takes to read the columns the pass
/// reads.
fn read_floor(backend: &str, url: &str) -> f64 {
    let select = format!("SELECT {COLUMNS} FROM users");
    let cmd = if backend == "sqlite" {
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
    timed(cmd, backend)
}

/// Runs a database CLI to its end, output discarded; its wall seconds.
fn timed(mut cmd: Command, backend: &str) -> f64 {
    let started = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run the {backend} CLI (sqlite3 or psql): {e}"));
    assert!(status.success(), "{backend} CLI failed: {status}");
    started.elapsed().as_secs_f64()
}

/// Writes the drift back with the database's own CLI (`sqlite3`, `psql`)
/// from a script: the missing users inserted, the stale ones' lastname
/// set, the ghosts deleted, each kind in transactions of 1000 rows. Its
/// wall seconds.
fn write_floor(backend: &str, url: &str, users: &Users, dir: &std::path::Path) -> f64 {
    let mut script = String::new();
    let missing: Vec<[String; 7]> = (0..users.n).step_by(100).map(|i| users.row(i)).collect();
    for rows in missing.chunks(1000) {
        let _ = writeln!(script, "BEGIN;\n{};\nCOMMIT;", insert_sql(backend, rows));
    }
    let stale: Vec<u64> = (50..users.n).step_by(100).collect();
    for chunk in stale.chunks(1000) {
        script.push_str("BEGIN;\n");
        for &i in chunk {
            let r = users.row(i);
            let _ = writeln!(
                script,
                "UPDATE users SET lastname = '{}' WHERE uuid = '{}';",
                r[4], r[0]
            );
        }
        script.push_str("COMMIT;\n");
    }
    let ghosts: Vec<String> = (0..users.n / 100)
        .map(|i| format!("'{}'", users.ghost(i)[0]))
        .collect();
    for keys in ghosts.chunks(1000) {
        let _ = writeln!(
            script,
            "BEGIN;\nDELETE FROM users WHERE uuid IN ({});\nCOMMIT;",
            keys.join(",")
        );
    }
    let path = dir.join(format!("{backend}-write-back.sql"));
    std::fs::write(&path, script).expect("write the script");
    let cmd = if backend == "sqlite" {
        let mut c = Command::new("sqlite3");
        c.arg("-bail")
            .arg(url.trim_start_matches("sqlite://"))
            .arg(format!(".read {}", path.display()));
        c
    } else {
        let mut c = Command::new("psql");
        c.arg(url)
            .arg("-q")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("-f")
            .arg(&path);
        c
    };
    let wall = timed(cmd, backend);
    // The script did write the drift back: every user, none stale.
    let check = "SELECT count(*), count(CASE WHEN lastname LIKE '%-old' THEN 1 END) FROM users";
    let out = if backend == "sqlite" {
        Command::new("sqlite3")
            .arg(url.trim_start_matches("sqlite://"))
            .arg(check)
            .output()
    } else {
        Command::new("psql")
            .arg(url)
            .arg("-qAt")
            .arg("-c")
            .arg(check)
            .output()
    }
    .expect("count the rows");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}|0", users.n),
        "{backend}: the CLI's script did not write the drift back"
    );
    wall
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

/// The resource: `order` "asc" promises key order; "none" does not, and
/// confirms purge candidates by GET instead.
fn config_text(backend: &str, db: &str, addr: &str, order: &str) -> String {
    let key_type = if backend == "sqlite" { "text" } else { "uuid" };
    let get_path = if order == "none" {
        "get_path = \"/0.1/users/{key}\""
    } else {
        ""
    };
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
{get_path}
page_size = {PAGE}
total_pointer = "/total"
key_order = "{order}"
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

/// Rows written per statement (SQLite) or per COPY chunk (PostgreSQL).
const SEED_CHUNK: u64 = 2000;

/// The local table, in sync with upstream: every user, in uuid order.
async fn seed(backend: &str, url: &str, users: &Users) {
    let (key, enabled) = if backend == "sqlite" {
        ("TEXT", "INTEGER")
    } else {
        ("UUID", "BOOLEAN")
    };
    let ddl = format!(
        "CREATE TABLE users (uuid {key} PRIMARY KEY, tenant_uuid {key} NOT NULL, username TEXT, firstname TEXT, lastname TEXT, email TEXT, enabled {enabled} NOT NULL)"
    );
    let chunks = (0..users.n).step_by(SEED_CHUNK as usize);
    if backend == "sqlite" {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("sqlite url");
        let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
            .await
            .expect("open");
        sqlx::raw_sql(&ddl).execute(&pool).await.expect("ddl");
        let mut tx = pool.begin().await.expect("begin");
        for start in chunks {
            let rows: Vec<[String; 7]> = (start..(start + SEED_CHUNK).min(users.n))
                .map(|i| users.row(i))
                .collect();
            sqlx::raw_sql(&insert_sql(backend, &rows))
                .execute(&mut *tx)
                .await
                .expect("seed");
        }
        tx.commit().await.expect("commit");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        sqlx::raw_sql(&ddl.replace(" PRIMARY KEY", ""))
            .execute(&pool)
            .await
            .expect("ddl");
        let mut copy = pool
            .copy_in_raw(&format!("COPY users ({COLUMNS}) FROM STDIN"))
            .await
            .expect("copy");
        let mut buf = String::new();
        for start in chunks {
            buf.clear();
            for i in start..(start + SEED_CHUNK).min(users.n) {
                buf.push_str(&users.row(i).join("\t"));
                buf.push('\n');
            }
            copy.send(buf.as_bytes()).await.expect("copy rows");
        }
        copy.finish().await.expect("copy end");
        sqlx::raw_sql("ALTER TABLE users ADD PRIMARY KEY (uuid)")
            .execute(&pool)
            .await
            .expect("primary key");
        pool.close().await;
    }
}

/// One multi-row INSERT of `rows`.
fn insert_sql(backend: &str, rows: &[[String; 7]]) -> String {
    let mut sql = format!("INSERT INTO users ({COLUMNS}) VALUES ");
    for (n, r) in rows.iter().enumerate() {
        if n > 0 {
            sql.push(',');
        }
        let enabled = match (backend, r[6].as_str()) {
            ("sqlite", "true") => "1",
            ("sqlite", _) => "0",
            (_, e) => e,
        };
        let _ = write!(
            sql,
            "('{}','{}','{}','{}','{}','{}',{enabled})",
            r[0], r[1], r[2], r[3], r[4], r[5]
        );
    }
    sql
}

/// Drifts the local table from an in-sync one: every 100th user deleted
/// (missing), every 100th from the 50th stale (its lastname changed), and
/// the first n/100 users' ghosts added (extra).
async fn drift(backend: &str, url: &str, users: &Users) {
    let quoted = |is: &mut dyn Iterator<Item = u64>| -> Vec<String> {
        is.map(|i| format!("'{}'", users.uuid(i))).collect()
    };
    let mut statements = Vec::new();
    let missing = quoted(&mut (0..users.n).step_by(100));
    let stale = quoted(&mut (50..users.n).step_by(100));
    for keys in missing.chunks(1000) {
        statements.push(format!(
            "DELETE FROM users WHERE uuid IN ({})",
            keys.join(",")
        ));
    }
    for keys in stale.chunks(1000) {
        statements.push(format!(
            "UPDATE users SET lastname = lastname || '-old' WHERE uuid IN ({})",
            keys.join(",")
        ));
    }
    let ghosts: Vec<[String; 7]> = (0..users.n / 100).map(|i| users.ghost(i)).collect();
    for rows in ghosts.chunks(SEED_CHUNK as usize) {
        statements.push(insert_sql(backend, rows));
    }
    if backend == "sqlite" {
        let pool = sqlx::SqlitePool::connect(url).await.expect("open");
        let mut tx = pool.begin().await.expect("begin");
        for s in &statements {
            sqlx::raw_sql(s).execute(&mut *tx).await.expect("drift");
        }
        tx.commit().await.expect("commit");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        let mut tx = pool.begin().await.expect("begin");
        for s in &statements {
            sqlx::raw_sql(s).execute(&mut *tx).await.expect("drift");
        }
        tx.commit().await.expect("commit");
        sqlx::raw_sql("VACUUM ANALYZE users")
            .execute(&pool)
            .await
            .expect("vacuum");
        pool.close().await;
    }
}

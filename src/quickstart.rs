//! `driftd quickstart`: the bundled sample upstream, a SQLite file seeded
//! with drift (missing, ghost and stale rows), a dry run, a real pass, and a
//! second pass that finds nothing left to do. No server to install.

use anyhow::Context;
use secrecy::ExposeSecret;

use std::sync::Arc;

use crate::config::Settings;
use crate::daemon::Daemon;
use crate::jobs::Trigger;
use crate::pass::Mode;
use crate::report;
use crate::runner::JobRequest;
use crate::sample::{populate, sample_uuid, tenant, user, SampleUpstream};
use crate::store::SqliteStore;

/// The quickstart configuration, shipped as an example too.
pub const CONFIG: &str = include_str!("../examples/quickstart/driftd.toml");
const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:8931";
const TENANTS: u64 = 50;
const USERS: u64 = 2000;

pub async fn run(serve: bool) -> anyhow::Result<i32> {
    let up = SampleUpstream::new();
    populate(&up, TENANTS, USERS);
    // The port from the example config if free, else any.
    let addr = match up.spawn("127.0.0.1:8931").await {
        Ok(a) => a,
        Err(_) => up
            .spawn("127.0.0.1:0")
            .await
            .context("cannot start the sample upstream")?,
    };
    let text = CONFIG.replace(DEFAULT_UPSTREAM, &format!("http://{addr}"));
    let mut settings = Settings::from_toml_str(&text, "examples/quickstart/driftd.toml")?;
    if !serve {
        // The demo runs its passes itself; schedules only when serving.
        // (unset, the default folder beside the config does not exist)
        settings.daemon.schedules_dir = None;
    }
    if std::net::TcpListener::bind(&settings.admin.listen).is_err() {
        settings.admin.listen = "127.0.0.1:0".into();
    }
    let url = settings.store.url.expose_secret().to_string();
    let path = url.trim_start_matches("sqlite://").to_string();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let store = SqliteStore::open(&url).await?;
    seed(&store)
        .await
        .context("seeding the quickstart database")?;
    drop(store);
    println!("sample upstream on http://{addr}: {TENANTS} tenants, {USERS} users");
    println!("local copy {path}: seeded with drift (rows missing, ghost rows, stale fields)\n");

    let daemon = Daemon::start(Arc::new(settings)).await?;
    let mut code = report::exit::OK;
    for (title, dry_run) in [
        ("1. dry run: what is out of sync", true),
        ("2. reconcile: repair it", false),
        ("3. reconcile again: nothing left to do", false),
    ] {
        println!("== {title}");
        for resource in ["tenants", "users"] {
            let req = JobRequest {
                resource: resource.into(),
                trigger: Trigger::Cli,
                mode: Mode::Full,
                dry_run,
                force: false,
            };
            let (job, report) = daemon.runner.run(req, &()).await?;
            let Some(mut r) = report else {
                println!("job {} {}", job.id, job.status.as_str());
                code = report::exit::ERROR;
                continue;
            };
            // Keep the output short: a sample of keys, not all.
            for keys in [&mut r.keys.insert, &mut r.keys.update, &mut r.keys.purge] {
                keys.truncate(5);
            }
            print!("{}", report::human(&r));
            code = code.max(report::exit_code(&r));
        }
        println!();
    }
    let metrics_url = format!("http://{}/metrics", daemon.addr);
    println!("== 4. metrics, as Prometheus scrapes them from {metrics_url}");
    let body = reqwest::get(&metrics_url).await?.text().await?;
    for line in body
        .lines()
        .filter(|l| l.starts_with("driftd_drift_rows") || l.starts_with("driftd_passes_total"))
    {
        println!("  {line}");
    }
    println!();
    if serve {
        println!(
            "serving: sample upstream http://{addr}, admin API http://{}",
            daemon.addr
        );
        println!(
            "  curl -X POST http://{}/v1/resources/users/reconcile",
            daemon.addr
        );
        println!("  curl http://{}/v1/jobs", daemon.addr);
        println!(
            "schedules from {}; Ctrl-C to stop",
            daemon.schedules.dir.display()
        );
        tokio::signal::ctrl_c().await?;
    } else {
        println!("Run `driftd quickstart --serve` to keep the admin API, the metrics and the");
        println!("schedules in schedules/ running, with the sample upstream.");
    }
    daemon.stop().await;
    Ok(code)
}

/// Creates the two mirrored tables and fills them with drifted copies.
async fn seed(store: &SqliteStore) -> anyhow::Result<()> {
    let pool = store.pool();
    sqlx::raw_sql(
        "CREATE TABLE tenants (uuid TEXT PRIMARY KEY, name TEXT, slug TEXT);
         CREATE TABLE users (uuid TEXT PRIMARY KEY, tenant_uuid TEXT, firstname TEXT, lastname TEXT,
                             email TEXT, enabled INTEGER, extension INTEGER);",
    )
    .execute(pool)
    .await?;
    let mut tx = pool.begin().await?;
    for i in 0..TENANTS {
        if i % 20 == 7 {
            continue; // missing locally
        }
        let t = tenant(i);
        sqlx::query("INSERT INTO tenants VALUES (?, ?, ?)")
            .bind(t["uuid"].as_str())
            .bind(t["name"].as_str())
            .bind(t["slug"].as_str())
            .execute(&mut *tx)
            .await?;
    }
    for ghost in 0..2u64 {
        sqlx::query("INSERT INTO tenants VALUES (?, 'Deleted tenant', NULL)")
            .bind(sample_uuid(0x7e, 900_000 + ghost))
            .execute(&mut *tx)
            .await?;
    }
    for i in 0..USERS {
        if i % 50 == 3 {
            continue; // missing locally
        }
        let u = user(i, TENANTS);
        let stale = i % 80 == 11;
        sqlx::query("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(u["uuid"].as_str())
            .bind(u["tenant_uuid"].as_str())
            .bind(u["firstname"].as_str())
            .bind(u["lastname"].as_str())
            .bind(if stale {
                Some("old@example.com")
            } else {
                u["email"].as_str()
            })
            .bind(u["enabled"].as_bool().map(|b| b != stale))
            .bind(u["extension"].as_i64())
            .execute(&mut *tx)
            .await?;
    }
    for ghost in 0..60u64 {
        sqlx::query("INSERT INTO users (uuid, tenant_uuid, firstname, email, enabled) VALUES (?, ?, 'Ghost', 'ghost@example.com', 1)")
            .bind(sample_uuid(0x05, 900_000 + ghost))
            .bind(sample_uuid(0x7e, 900_000))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

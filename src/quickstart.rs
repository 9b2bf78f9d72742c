//! `driftd quickstart`: the bundled sample upstream, a SQLite file seeded
//! with drift (missing, ghost and stale rows), a dry run, a real pass, and a
//! second pass that finds nothing left to do. No server to install.

use anyhow::Context;
use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::pass::PassOptions;
use crate::report;
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
    let settings = std::sync::Arc::new(Settings::from_toml_str(
        &text,
        "examples/quickstart/driftd.toml",
    )?);
    let url = settings.store.url.expose_secret().to_string();
    let path = url.trim_start_matches("sqlite://").to_string();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let store = SqliteStore::open(&url).await?;
    seed(&store)
        .await
        .context("seeding the quickstart database")?;
    println!("sample upstream on http://{addr}: {TENANTS} tenants, {USERS} users");
    println!("local copy {path}: seeded with drift (rows missing, ghost rows, stale fields)\n");

    let mut code = report::exit::OK;
    for (title, opts) in [
        (
            "1. dry run: what is out of sync",
            PassOptions {
                dry_run: true,
                ..PassOptions::default()
            },
        ),
        ("2. reconcile: repair it", PassOptions::default()),
        (
            "3. reconcile again: nothing left to do",
            PassOptions::default(),
        ),
    ] {
        println!("== {title}");
        for resource in ["tenants", "users"] {
            let mut r = crate::cli::reconcile(&settings, resource, opts, false).await?;
            // Keep the dry-run output short: a sample of keys, not all.
            for keys in [&mut r.keys.insert, &mut r.keys.update, &mut r.keys.purge] {
                keys.truncate(5);
            }
            print!("{}", report::human(&r));
            code = code.max(report::exit_code(&r));
        }
        println!();
    }
    println!("Try it yourself: `driftd sample-upstream` in one terminal, then");
    println!("`driftd reconcile users --dry-run --config examples/quickstart/driftd.toml`.");
    if serve {
        println!("serving the sample upstream on http://{addr}; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
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

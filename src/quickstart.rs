//! `driftd quickstart`: the bundled sample upstream, a SQLite file seeded
//! with drift (missing, ghost and stale rows), a dry run, a real pass, and a
//! second pass that finds nothing left to do. No server to install.
//!
//! The example config names fixed ports (8931 for the sample upstream, 9750
//! for the admin API); when one is taken the quickstart uses another. So that
//! the commands it prints stay true, it writes the config it really runs
//! (actual addresses, absolute paths) to `driftd-quickstart.toml` next to the
//! database, runs from that file, and prints every follow-up with the real
//! addresses and that file.

use anyhow::Context;
use secrecy::ExposeSecret;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Settings;
use crate::daemon::Daemon;
use crate::jobs::Trigger;
use crate::report;
use crate::runner::JobRequest;
use crate::sample::{populate, sample_uuid, tenant, user, SampleUpstream};
use crate::store::SqliteStore;
use crate::vocab::Mode;

/// The quickstart configuration, shipped as an example too.
pub const CONFIG: &str = include_str!("../examples/quickstart/driftd.toml");
/// Where [`CONFIG`] says it lives, for errors and relative paths in it.
const CONFIG_PATH: &str = "examples/quickstart/driftd.toml";
const DEFAULT_UPSTREAM: &str = "127.0.0.1:8931";
const DEFAULT_ADMIN: &str = "127.0.0.1:9750";
const DEFAULT_STORE: &str = "sqlite://driftd-quickstart.db";
/// The effective config, written next to the database.
const CONFIG_FILE: &str = "driftd-quickstart.toml";
const TENANTS: u64 = 50;
const USERS: u64 = 2000;

/// What the example config's fixed values become for one run.
#[derive(Debug, Clone)]
pub struct RunPlaces {
    /// Where the sample upstream really listens.
    pub upstream: SocketAddr,
    /// Where the admin API will listen.
    pub admin: SocketAddr,
    /// The SQLite file, absolute.
    pub database: PathBuf,
    /// The schedules folder, absolute; `None` when there is none (the
    /// quickstart run outside the repository).
    pub schedules: Option<PathBuf>,
}

pub async fn run(serve: bool) -> anyhow::Result<i32> {
    let up = SampleUpstream::new();
    populate(&up, TENANTS, USERS);
    // The port from the example config if free, else any.
    let upstream = match up.spawn(DEFAULT_UPSTREAM).await {
        Ok(a) => a,
        Err(_) => up
            .spawn("127.0.0.1:0")
            .await
            .context("cannot start the sample upstream")?,
    };
    let cwd = std::env::current_dir().context("current directory")?;
    let template = Settings::from_toml_str(CONFIG, CONFIG_PATH)?;
    let places = RunPlaces {
        upstream,
        admin: free_admin_addr()?,
        database: cwd.join(DEFAULT_STORE.trim_start_matches("sqlite://")),
        schedules: Some(absolute(&cwd, &template.schedules_dir())).filter(|d| d.is_dir()),
    };
    let config_path = cwd.join(CONFIG_FILE);
    let text = effective_config(CONFIG, &places)?;
    std::fs::write(&config_path, &text)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let settings = if serve {
        // What the printed follow-ups will load, loaded the same way.
        Settings::load(&config_path)?
    } else {
        // The demo runs its passes itself; schedules only when serving.
        // Unset and read as the example, the default folder beside it
        // (examples/quickstart/schedules) does not exist.
        let mut settings = Settings::from_toml_str(&text, CONFIG_PATH)?;
        settings.daemon.schedules_dir = None;
        settings
    };
    let url = settings.store.url.expose_secret().to_string();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", places.database.display()));
    }
    let store = SqliteStore::open(&url).await?;
    seed(&store)
        .await
        .context("seeding the quickstart database")?;
    drop(store);
    println!("sample upstream on http://{upstream}: {TENANTS} tenants, {USERS} users");
    println!(
        "local copy {}: seeded with drift (rows missing, ghost rows, stale fields)",
        places.database.display()
    );
    println!(
        "config of this run (the example, with these addresses): {}\n",
        config_path.display()
    );

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
    code = code.max(live(&up, &daemon).await?);
    let driftd = driftd_command(&cwd);
    if serve {
        println!(
            "serving: sample upstream http://{upstream}, admin API http://{}",
            daemon.addr
        );
        println!(
            "{} schedule entries from {}; Ctrl-C to stop",
            daemon.schedules.entries.len(),
            daemon.schedules.dir.display()
        );
        println!("try, from another terminal:");
        for command in follow_ups(&driftd, daemon.addr, &config_path) {
            println!("  {command}");
        }
        tokio::signal::ctrl_c().await?;
    } else {
        println!("Run `{driftd} quickstart --serve` to keep the admin API, the metrics and the");
        println!("schedules in schedules/ running, with the sample upstream.");
    }
    daemon.stop().await;
    Ok(code)
}

/// Step 5: the sample upstream changes and publishes events to the webhook
/// source; driftd applies them at once, and a pass then finds nothing to do.
async fn live(up: &SampleUpstream, daemon: &Daemon) -> anyhow::Result<i32> {
    let url = format!("http://{}/v1/events/sample_bus", daemon.addr);
    println!("== 5. live: the sample upstream publishes events to {url}");
    let created = user(USERS, TENANTS);
    up.upsert("users", "uuid", created.clone());
    let gone = user(1, TENANTS);
    let gone_uuid = gone["uuid"].as_str().unwrap_or_default().to_string();
    up.remove("users", &gone_uuid);
    // As wazo-confd: ids only; driftd refetches the user.
    let events = [
        (
            "user_created",
            serde_json::json!({"id": USERS, "uuid": created["uuid"], "tenant_uuid": created["tenant_uuid"]}),
        ),
        (
            "user_deleted",
            serde_json::json!({"id": 1, "uuid": gone_uuid}),
        ),
    ];
    for (name, data) in events {
        let key = data["uuid"].as_str().unwrap_or_default().to_string();
        let started = std::time::Instant::now();
        let answer = crate::sample::publish(&url, None, name, data).await?;
        println!(
            "  {name} {key}: {} in {} ms",
            answer["event"]["outcome"].as_str().unwrap_or("?"),
            started.elapsed().as_millis()
        );
    }
    let req = JobRequest {
        resource: "users".into(),
        trigger: Trigger::Cli,
        mode: Mode::Full,
        dry_run: true,
        force: false,
    };
    let (_, report) = daemon.runner.run(req, &()).await?;
    let Some(r) = report else {
        return Ok(report::exit::ERROR);
    };
    println!(
        "  then a dry run of users: {} (the events already did the work)\n",
        r.outcome.as_str()
    );
    Ok(report::exit_code(&r))
}

/// The commands to try against a serving quickstart, with the addresses and
/// the config file this run really uses.
pub fn follow_ups(driftd: &str, admin: SocketAddr, config: &Path) -> Vec<String> {
    let config = shell_word(&config.display().to_string());
    vec![
        format!("curl -X POST http://{admin}/v1/resources/users/reconcile"),
        format!("curl http://{admin}/v1/jobs"),
        format!("curl http://{admin}/metrics"),
        format!(
            "curl -X POST http://{admin}/v1/events/sample_bus -d '{{\"name\": \"user_edited\", \"data\": {{\"uuid\": \"{}\"}}}}'",
            sample_uuid(0x05, 2)
        ),
        format!("curl http://{admin}/v1/dead-letters"),
        format!("{driftd} reconcile users --dry-run --config {config}"),
        format!("{driftd} reconcile users --remote http://{admin}"),
    ]
}

/// The admin API's address: the example's port if free, else any free one.
/// (Probed, then released for the daemon to bind: a demo can live with the
/// small window in which another process could take it.)
fn free_admin_addr() -> anyhow::Result<SocketAddr> {
    let probe = std::net::TcpListener::bind(DEFAULT_ADMIN)
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .context("no free port for the admin API")?;
    Ok(probe.local_addr()?)
}

/// The example config with this run's addresses and absolute paths, checked
/// to have changed every place it names them: if the example's wording
/// drifts from what this function replaces, the quickstart says so instead
/// of printing commands that point at the wrong port.
pub fn effective_config(template: &str, places: &RunPlaces) -> anyhow::Result<String> {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let store = format!("sqlite://{}", places.database.display());
    let mut text = String::from(
        "# Written by `driftd quickstart`: examples/quickstart/driftd.toml with the\n\
         # addresses and paths this run really used.\n\n",
    );
    let mut schedules_seen = false;
    // The example's comments explain it in its own place (paths relative to
    // it, how to run it by hand); here they would mislead, so they go.
    for line in template
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        if line.trim_start().starts_with("schedules_dir") {
            schedules_seen = true;
            // Without a folder the line goes: a folder that is named must
            // exist, an unnamed one is optional.
            if let Some(dir) = &places.schedules {
                text.push_str(&format!(
                    "schedules_dir = {}\n",
                    quote(&dir.display().to_string())
                ));
            }
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    for (from, to) in [
        (
            format!("\"http://{DEFAULT_UPSTREAM}\""),
            quote(&format!("http://{}", places.upstream)),
        ),
        (
            format!("\"{DEFAULT_ADMIN}\""),
            quote(&places.admin.to_string()),
        ),
        (format!("\"{DEFAULT_STORE}\""), quote(&store)),
    ] {
        anyhow::ensure!(
            text.contains(&from),
            "{CONFIG_PATH} no longer says {from}: the quickstart cannot point it at this run"
        );
        text = text.replace(&from, &to);
    }
    anyhow::ensure!(
        schedules_seen,
        "{CONFIG_PATH} no longer sets daemon.schedules_dir"
    );
    Ok(text)
}

/// `path` made absolute against `cwd`, with `.` and `..` resolved by name
/// (the folder need not exist).
fn absolute(cwd: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in cwd.join(path).components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// How to call this very binary from `cwd`: `driftd` when that is what the
/// `PATH` finds, else its path (relative when it lies under `cwd`, as
/// `./target/release/driftd` after `cargo run --release`).
pub fn driftd_command(cwd: &Path) -> String {
    let Some(exe) = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok())
    else {
        return "driftd".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("driftd"))
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
            .is_some_and(|p| p == exe)
    });
    if on_path {
        return "driftd".into();
    }
    let shown = match cwd
        .canonicalize()
        .ok()
        .and_then(|c| exe.strip_prefix(c).ok().map(PathBuf::from))
    {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    };
    shell_word(&shown)
}

/// `word` as one shell word: as is when it needs no quoting, else in single
/// quotes.
pub fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@%,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn places() -> RunPlaces {
        RunPlaces {
            upstream: "127.0.0.1:40001".parse().unwrap(),
            admin: "127.0.0.1:40002".parse().unwrap(),
            database: "/tmp/some dir/driftd-quickstart.db".into(),
            schedules: Some("/repo/schedules".into()),
        }
    }

    #[test]
    fn the_effective_config_points_everything_at_this_run() {
        let text = effective_config(CONFIG, &places()).expect("the example has every field");
        let s = Settings::from_toml_str(&text, "driftd-quickstart.toml").expect("valid");
        assert!(!s.resources.is_empty());
        for (name, r) in &s.resources {
            assert_eq!(r.upstream.base_url, "http://127.0.0.1:40001", "{name}");
        }
        assert_eq!(s.admin.listen, "127.0.0.1:40002");
        assert_eq!(
            s.store.url.expose_secret(),
            "sqlite:///tmp/some dir/driftd-quickstart.db"
        );
        assert_eq!(s.schedules_dir(), Path::new("/repo/schedules"));
        assert!(!text.contains("8931") && !text.contains("9750"), "{text}");
    }

    #[test]
    fn without_a_schedules_folder_none_is_named() {
        let places = RunPlaces {
            schedules: None,
            ..places()
        };
        let text = effective_config(CONFIG, &places).expect("the example has every field");
        let s = Settings::from_toml_str(&text, "driftd-quickstart.toml").expect("valid");
        assert_eq!(s.daemon.schedules_dir, None);
    }

    #[test]
    fn a_changed_example_is_an_error_not_a_wrong_port() {
        let renamed = CONFIG.replace("127.0.0.1:9750", "127.0.0.1:9751");
        let err = effective_config(&renamed, &places()).unwrap_err();
        assert!(err.to_string().contains("9750"), "{err}");
    }

    #[test]
    fn follow_ups_use_the_real_addresses() {
        let admin = "127.0.0.1:40002".parse().unwrap();
        let cmds = follow_ups(
            "driftd",
            admin,
            Path::new("/tmp/a b/driftd-quickstart.toml"),
        );
        assert!(cmds.iter().all(|c| !c.contains("9750")));
        assert!(cmds.contains(
            &"driftd reconcile users --dry-run --config '/tmp/a b/driftd-quickstart.toml'".into()
        ));
        assert!(cmds.contains(&"curl http://127.0.0.1:40002/v1/jobs".into()));
    }

    #[test]
    fn relative_paths_become_absolute_by_name() {
        assert_eq!(
            absolute(
                Path::new("/w/repo"),
                Path::new("examples/quickstart/../../schedules")
            ),
            Path::new("/w/repo/schedules")
        );
        assert_eq!(
            absolute(Path::new("/w"), Path::new("/abs/./x")),
            Path::new("/abs/x")
        );
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(
            shell_word("./target/release/driftd"),
            "./target/release/driftd"
        );
        assert_eq!(shell_word("/a b/driftd"), "'/a b/driftd'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}

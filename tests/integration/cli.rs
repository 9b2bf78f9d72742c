//! The `driftd` binary as an operator runs it: exit codes, JSON reports,
//! config errors naming the field, secrets never printed.

use std::process::{Command, Output};

use crate::common::*;

fn driftd(args: &[&str], config: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_driftd"));
    cmd.args(args).arg("--config").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run driftd")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_json_and_exit_codes() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let mut local = users(200);
    local.push(ghost(1));
    db.insert_users(&local).await;
    let (up, addr) = upstream(users(200)).await;
    let config = ConfigBuilder::default().toml(&db, addr);

    let dry = driftd(&["reconcile", "users", "--dry-run", "--json"], &config, &[]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let report: serde_json::Value = serde_json::from_slice(&dry.stdout).expect("JSON report");
    assert_eq!(report["outcome"], "dry_run");
    assert_eq!(report["keys"]["purge"][0], ghost(1)["uuid"]);
    assert_eq!(db.count("users").await, 201);

    let real = driftd(&["reconcile", "users"], &config, &[]);
    assert_eq!(real.status.code(), Some(0), "{}", stderr(&real));
    let text = String::from_utf8_lossy(&real.stdout);
    assert!(text.contains("outcome repaired"), "{text}");
    assert_eq!(db.count("users").await, 200);

    // guard tripped: exit 3, nothing applied
    let strict = ConfigBuilder {
        policy: "max_purge_count = 0".into(),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);
    up.set("users", "uuid", users(150));
    let tripped = driftd(&["reconcile", "users"], &strict, &[]);
    assert_eq!(tripped.status.code(), Some(3), "{}", stderr(&tripped));
    assert_eq!(db.count("users").await, 200);

    // upstream failure: exit 1
    up.inject(driftd::sample::Fault::Status {
        offset: 0,
        status: 500,
        times: 100,
    });
    let failed = driftd(&["reconcile", "users"], &config, &[]);
    assert_eq!(failed.status.code(), Some(1));
    assert_eq!(db.count("users").await, 200);
}

#[test]
fn bad_config_is_one_line_naming_file_resource_and_field() {
    let db_url = "sqlite::memory:";
    let config = format!(
        r#"
[store]
url = "{db_url}"
[resources.users]
upstream = {{ base_url = "http://127.0.0.1:9", list_path = "/users" }}
key = {{ upstream = "/uuid", column = "uuid" }}
local = {{ table = "users; DROP TABLE users" }}
"#
    );
    let out = driftd(&["check"], &config, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("driftd.toml"), "{err}");
    assert!(err.contains("`users`"), "{err}");
    assert!(err.contains("local.table"), "{err}");

    let typo = config.replace("local = {", "locale = {");
    let out = driftd(&["check"], &typo, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("locale"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_printed() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(10)).await;
    let config = ConfigBuilder::default().toml(&db, addr);
    let secret = "s3cr3t-t0ken-value";
    let env = [
        ("DRIFTD_RESOURCES__USERS__UPSTREAM__TOKEN", secret),
        ("RUST_LOG", "trace"),
    ];
    let check = driftd(&["check"], &config, &env);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("set (hidden)"), "{out}");
    let run = driftd(&["reconcile", "users"], &config, &env);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    for o in [&check, &run] {
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(o));
        assert!(!all.contains(secret), "secret leaked:\n{all}");
    }
}

#[test]
fn a_missing_config_says_how_to_name_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .arg("check")
        .current_dir(dir.path())
        .env_remove("DRIFTD_CONFIG")
        .output()
        .expect("run driftd");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("driftd.toml: file not found")
            && err.contains("--config")
            && err.contains("DRIFTD_CONFIG"),
        "{err}"
    );
}

#[test]
fn unknown_resource_names_the_known_ones() {
    let config = r#"
[store]
url = "sqlite::memory:"
[resources.users]
upstream = { base_url = "http://127.0.0.1:9", list_path = "/users", key_order = "asc" }
key = { upstream = "/uuid", column = "uuid" }
local = { table = "users" }
"#;
    let out = driftd(&["reconcile", "tenant"], config, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("unknown resource `tenant`") && err.contains("users"),
        "{err}"
    );
}

#[test]
fn shipped_examples_validate() {
    for (path, env) in [
        ("examples/quickstart/driftd.toml", vec![]),
        (
            "examples/wazo-postgres/driftd.toml",
            vec![
                ("WAZO_AUTH_TOKEN", "example-token"),
                (
                    "WAZO_BUS_URL",
                    "amqp://driftd:bus-secret@127.0.0.1:5672/%2f",
                ),
            ],
        ),
        (
            "examples/data-service-redis/driftd.toml",
            vec![
                ("DATA_TOKEN", "example-token"),
                ("FEED_REDIS_URL", "redis://:bus-secret@127.0.0.1:6379/0"),
            ],
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args(["check", "--config", path])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(env)
            .output()
            .expect("run driftd");
        assert_eq!(out.status.code(), Some(0), "{path}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("example-token") && !stdout.contains("bus-secret"));
    }
    // the quickstart config runs the repository's schedules/
    let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["schedules", "--config", "examples/quickstart/driftd.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run driftd");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("users.toml#1") && text.contains("tenants.toml#2"),
        "{text}"
    );
}

#[test]
fn quickstart_finds_and_repairs_drift_and_serves_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .arg("quickstart")
        .current_dir(dir.path())
        .output()
        .expect("run driftd quickstart");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    let squeezed = text
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let steps: Vec<&str> = squeezed.split("== ").collect();
    assert!(
        steps[1].contains("outcome dry_run") && steps[1].contains("missing 40"),
        "{text}"
    );
    assert!(
        steps[2].contains("outcome repaired") && steps[2].contains("purge 60"),
        "{text}"
    );
    assert_eq!(steps[3].matches("outcome in_sync").count(), 2, "{text}");
    assert!(
        steps[4].contains(
            r#"driftd_passes_total{outcome="repaired",resource="users",trigger="cli"} 1"#
        ),
        "{text}"
    );
    assert!(dir.path().join("driftd-quickstart.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_killed_mid_apply_leaves_whole_batches_and_the_next_converges() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let all = users(10_000);
    db.insert_users(&all[..100]).await;
    let (_up, addr) = upstream(all.clone()).await;
    // one row per transaction, so the apply takes long enough to be killed
    let config = ConfigBuilder {
        page_size: 1000,
        policy: "batch_size = 1".into(),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    std::fs::write(&path, &config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["reconcile", "users", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let n = db.count("users").await;
        if n > 150 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "apply never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let partial = db.count("users").await;
    assert!(
        partial > 100 && partial < 10_000,
        "killed mid-apply: {partial} rows"
    );
    // every row present is whole
    let broken = db
        .text("SELECT uuid FROM users WHERE email IS NULL OR firstname IS NULL")
        .await;
    assert!(broken.is_empty(), "half-written rows: {broken:?}");

    let out = driftd(&["reconcile", "users", "--json"], &config, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["actions"]["insert"], 10_000 - partial);
    assert_eq!(db.count("users").await, 10_000);
    let again = driftd(&["reconcile", "users", "--json"], &config, &[]);
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["outcome"], "in_sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(10)).await;
    let config = ConfigBuilder::default().toml(&db, addr);
    // stderr is a pipe here, as under systemd, in CI or `2> file`
    let out = driftd(
        &["reconcile", "users"],
        &config,
        &[("RUST_LOG", "driftd=debug")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("pass finished"),
        "no log lines to check: {err}"
    );
    assert!(!err.contains('\x1b'), "escape codes on a pipe: {err:?}");
}

/// Rust's `Debug` spellings of the config's enums, which must never reach a
/// person: the config, the JSON report and the metrics use other words.
const DEBUG_NAMES: [&str; 14] = [
    "Full",
    "PurgeOnly",
    "RepairOnly",
    "DryRun",
    "InSync",
    "Repaired",
    "Offset",
    "Cursor {",
    "Delete",
    "SoftDelete",
    "Text",
    "Boolean",
    "Integer",
    "Some(",
];

fn assert_config_words(text: &str, words: &[&str]) {
    for word in words {
        assert!(text.contains(word), "`{word}` missing from:\n{text}");
    }
    for name in DEBUG_NAMES {
        assert!(!text.contains(name), "Rust name `{name}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_reports_speak_the_configs_words() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let mut local = users(20);
    local.push(ghost(1));
    db.insert_users(&local).await;
    let (_up, addr) = upstream(users(20)).await;
    let config = ConfigBuilder {
        upstream:
            r#"pagination = { kind = "offset", limit_param = "limit", offset_param = "offset" }"#
                .into(),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);

    let check = driftd(&["check"], &config, &[]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert_config_words(
        &String::from_utf8_lossy(&check.stdout),
        &[
            r#"offset (limit_param = "limit", offset_param = "offset")"#,
            "(boolean)",
            "(integer)",
            "(text)",
            "(delete)",
        ],
    );

    let soft = config.replace(
        "[resources.users.policy]",
        "[resources.users.policy]\npurge = { soft_delete = { column = \"deleted_at\" } }",
    );
    let check = driftd(&["check"], &soft, &[]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert_config_words(
        &String::from_utf8_lossy(&check.stdout),
        &[r#"soft_delete (column = "deleted_at")"#],
    );

    for (args, words, code) in [
        (
            &["reconcile", "users", "--dry-run"][..],
            &["mode full", "outcome dry_run"][..],
            0,
        ),
        (
            &["reconcile", "users", "--dry-run", "--mode", "purge-only"],
            &["mode purge-only", "outcome dry_run"],
            0,
        ),
        // the extra row is left in place: not in sync, exit 4
        (
            &["reconcile", "users", "--mode", "repair-only"],
            &["mode repair-only", "outcome drift_left"],
            4,
        ),
    ] {
        let out = driftd(args, &config, &[]);
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert_config_words(&String::from_utf8_lossy(&out.stdout), words);
    }
}

/// Stops a child process on drop, so a failed assertion leaves no server
/// behind.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_follow_ups_work_when_its_ports_are_taken() {
    use std::io::BufRead;
    use std::time::Duration;

    // Hold the example's ports (if someone else already holds them, they
    // are just as taken).
    let _upstream_port = std::net::TcpListener::bind("127.0.0.1:8931");
    let _admin_port = std::net::TcpListener::bind("127.0.0.1:9750");
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = Reap(
        Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args(["quickstart", "--serve"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("run driftd quickstart --serve"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut follow_ups = Vec::new();
    let mut in_block = false;
    while follow_ups.len() < 7 {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "no follow-up commands printed:\n{}\n{}",
                    seen.join("\n"),
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
                )
            });
        if in_block {
            follow_ups.push(line.trim().to_string());
        }
        in_block |= line.starts_with("try, from another terminal");
        seen.push(line);
    }
    let printed = seen.join("\n");
    assert!(
        !printed.contains(":8931") && !printed.contains(":9750"),
        "points at a port it could not use:\n{printed}"
    );
    assert!(
        dir.path().join("driftd-quickstart.toml").exists(),
        "{printed}"
    );

    let http = reqwest::Client::new();
    let mut ran = 0;
    for command in &follow_ups {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            // curl may be missing from a build machine: same request, in Rust
            ["curl", "-X", "POST", url] => {
                let resp = http.post(*url).send().await.expect(command);
                assert_eq!(resp.status().as_u16(), 202, "{command}");
                // as a person would, let the job end before the next
                // command (which would otherwise find the resource locked)
                let accepted: serde_json::Value =
                    serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON");
                let job_url = url.replace(
                    "/resources/users/reconcile",
                    &format!("/jobs/{}", accepted["job_id"].as_str().expect("job_id")),
                );
                let started = std::time::Instant::now();
                loop {
                    let body = http.get(&job_url).send().await.expect(&job_url);
                    let job: serde_json::Value =
                        serde_json::from_slice(&body.bytes().await.expect("body")).expect("JSON");
                    if !matches!(job["status"].as_str(), Some("queued" | "running")) {
                        break;
                    }
                    assert!(started.elapsed() < Duration::from_secs(60), "{job}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            ["curl", url] => {
                let resp = http.get(*url).send().await.expect(command);
                assert_eq!(resp.status().as_u16(), 200, "{command}");
            }
            _ => {
                // a driftd command, run by a shell exactly as printed, from
                // another directory (the config it names must not depend
                // on the current one)
                let out = Command::new("sh")
                    .args(["-c", command])
                    .current_dir(std::env::temp_dir())
                    .output()
                    .expect("sh");
                let text = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{command}\n{text}\n{}",
                    stderr(&out)
                );
                if command.starts_with("curl") {
                    // the event sent to the webhook source
                    assert!(text.contains(r#""outcome":"applied""#), "{command}\n{text}");
                } else {
                    assert!(text.contains("resource users"), "{command}\n{text}");
                }
            }
        }
        ran += 1;
    }
    assert_eq!(ran, 7, "{printed}");
    assert!(
        follow_ups
            .iter()
            .any(|c| c.contains("reconcile users --dry-run --config")),
        "{printed}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `| true` exits without reading, so by the time driftd (started a
    // moment later) prints, nobody reads the pipe: what `| head -1` does to
    // any output longer than a line.
    let script = format!(
        "(sleep 0.3; '{}' check --config examples/quickstart/driftd.toml; echo \"rc=$?\" >&2) | true",
        env!("CARGO_BIN_EXE_driftd")
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("sh");
    let err = stderr(&out);
    assert!(err.contains("rc=0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_from_the_environment_names_the_variable() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (_up, addr) = upstream(users(1)).await;
    let config = ConfigBuilder::default().toml(&db, addr);
    let out = driftd(
        &["check"],
        &config,
        &[(
            "DRIFTD_RESOURCES__USERS__LOCAL__TABLE",
            "users; DROP TABLE users",
        )],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("environment variable DRIFTD_RESOURCES__USERS__LOCAL__TABLE")
            && !err.contains("driftd.toml"),
        "{err}"
    );
    let out = driftd(
        &["check"],
        &config,
        &[("DRIFTD_RESOURCES__USERS__UPSTREAM__PAGESIZE", "3")],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("pagesize"), "{err}");
    assert_eq!(err.matches("unknown field").count(), 1, "said twice: {err}");
}

/// A RabbitMQ source whose URL comes from a variable: `check` and
/// `reconcile` work without it (and `check` says so, and warns about an
/// event no binding lets in); `driftd run` refuses to start naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_url_variable_is_needed_only_to_run() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder {
        tail: format!(
            "{}{}",
            open_worker_tail(dir.path()),
            r#"
[sources.bus]
kind = "rabbitmq"
[sources.bus.rabbitmq]
url_env = "DRIFTD_TEST_UNSET_BUS_URL"
exchange = "wazo-headers"
queue = "driftd-cli-test"
bind_headers = [{ name = "user_created" }]
[sources.bus.events]
user_created = { resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }
user_deleted = { resource = "users", op = "delete", key = "/data/uuid" }
"#
        ),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);
    let check = driftd(&["check"], &config, &[]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("from DRIFTD_TEST_UNSET_BUS_URL (NOT SET"),
        "{out}"
    );
    assert!(
        out.contains("event user_deleted is mapped, but no binding lets it into the queue"),
        "{out}"
    );
    assert!(!out.contains("event user_created is mapped, but"), "{out}");
    let pass = driftd(&["reconcile", "users"], &config, &[]);
    assert_eq!(pass.status.code(), Some(0), "{}", stderr(&pass));
    let run = driftd(&["run"], &config, &[]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("DRIFTD_TEST_UNSET_BUS_URL is not set"),
        "{}",
        stderr(&run)
    );
}

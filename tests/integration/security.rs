//! Security edges (issue 7): blank admin tokens, credentials and redirects,
//! secrets in store URLs, the `DRIFTD_` environment, and what counts as a
//! success.

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use driftd::daemon::Daemon;
use driftd::pass::{Outcome, PassOptions};
use secrecy::SecretString;
use serde_json::{json, Value as Json};

use crate::common::*;

fn driftd_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_driftd"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `[admin]` on `listen` with `admin` lines, `[daemon]` with no schedules.
fn tail(dir: &std::path::Path, listen: &str, admin: &str) -> String {
    format!(
        "[admin]\nlisten = \"{listen}\"\n{admin}\n\n[daemon]\nschedules_dir = \"{}\"\nshutdown_grace_secs = 5\n",
        dir.display()
    )
}

/// POSTs a reconcile of `users`; returns the HTTP status.
async fn post_reconcile(base: &str, authorization: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new().post(format!("{base}/v1/resources/users/reconcile"));
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    req.send()
        .await
        .expect("admin API answers")
        .status()
        .as_u16()
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `driftd run` on `config` (its `127.0.0.1:0` replaced by a free
/// port) with `env` added; returns the process and the admin API's base URL.
fn start_run(config: &str, env: &[(&str, &str)], dir: &std::path::Path) -> (Running, String) {
    let port = free_port();
    let path = dir.join("driftd.toml");
    std::fs::write(
        &path,
        config.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let mut cmd = driftd_bin();
    cmd.args(["run", "--config"])
        .arg(&path)
        .env_remove("DRIFTD_ADMIN__TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = Running(cmd.spawn().expect("start driftd run"));
    (child, format!("http://127.0.0.1:{port}"))
}

/// Runs `driftd run` with `env` and waits up to 10 s for it to exit. If it
/// is still running, it serves: the returned error says what an
/// unauthenticated POST got.
async fn run_expecting_exit(config: &str, env: &[(&str, &str)]) -> Result<Output, String> {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base) = start_run(config, env, dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut stderr = Vec::new();
            if let Some(mut pipe) = child.0.stderr.take() {
                std::io::Read::read_to_end(&mut pipe, &mut stderr).unwrap();
            }
            return Ok(Output {
                status,
                stdout: Vec::new(),
                stderr,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = post_reconcile(&base, None).await;
    Err(format!(
        "driftd run kept running; a POST without Authorization got HTTP {status}"
    ))
}

/// Runs `driftd run` and waits until its admin API answers.
async fn serve_run(config: &str, env: &[(&str, &str)], dir: &std::path::Path) -> (Running, String) {
    let (mut child, base) = start_run(config, env, dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.0.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
            }
            panic!("driftd run exited with {status}: {stderr}");
        }
        assert!(Instant::now() < deadline, "driftd run did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, base)
}

/// Item 1: a blank admin token is refused at start, from the file, from
/// `DRIFTD_ADMIN__TOKEN=` and from an empty `token_env` variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_admin_token_is_refused_at_start() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = |admin: &str| {
        ConfigBuilder {
            tail: tail(dir.path(), "127.0.0.1:0", admin),
            ..ConfigBuilder::default()
        }
        .toml(&db, addr)
    };
    for (admin, env, field) in [
        ("token = \"\"", vec![], "`admin.token`"),
        ("token = \"  \"", vec![], "`admin.token`"),
        ("", vec![("DRIFTD_ADMIN__TOKEN", "")], "`admin.token`"),
        (
            "token_env = \"DRIFTD_TEST_EMPTY_ADMIN_TOKEN\"",
            vec![("DRIFTD_TEST_EMPTY_ADMIN_TOKEN", "")],
            "`admin.token_env`",
        ),
    ] {
        let out = run_expecting_exit(&config(admin), &env)
            .await
            .unwrap_or_else(|e| panic!("{admin:?} {env:?}: {e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{admin:?} {env:?}: {err}");
        assert!(
            err.contains(field) && err.contains("empty"),
            "{admin:?} {env:?}: {err}"
        );
    }
}

/// Item 1, behind validation: should a blank token reach the admin API, it
/// counts as no token (403), never as one an absent header matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_token_in_the_api_is_no_token() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = ConfigBuilder {
        tail: tail(dir.path(), "127.0.0.1:0", ""),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    settings.admin.resolved_token = Some(SecretString::from(""));
    let d = Daemon::start(Arc::new(settings)).await.unwrap();
    let base = format!("http://{}", d.addr);
    assert_eq!(post_reconcile(&base, None).await, 403);
    assert_eq!(post_reconcile(&base, Some("Bearer ")).await, 403);
    assert_eq!(post_reconcile(&base, Some("")).await, 403);
    d.stop().await;
}

/// Serves `app` on an ephemeral loopback port.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The page of `users` (in key order) that the request's `offset` and
/// `limit` ask for, with the total.
fn listing(users: &[Json], uri: &Uri) -> Response {
    let mut items = users.to_vec();
    items.sort_by(|a, b| a["uuid"].as_str().cmp(&b["uuid"].as_str()));
    let total = items.len();
    let param = |name: &str| {
        uri.query().unwrap_or_default().split('&').find_map(|kv| {
            kv.strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .and_then(|v| v.parse::<usize>().ok())
        })
    };
    let offset = param("offset").unwrap_or(0).min(total);
    let end = (offset + param("limit").unwrap_or(total)).min(total);
    axum::Json(json!({"items": &items[offset..end], "total": total})).into_response()
}

/// The headers of every request a server received.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<HeaderMap>>>);

impl Seen {
    fn record(&self, headers: HeaderMap) {
        self.0.lock().unwrap().push(headers);
    }

    /// Requests that carried `secret` in any header.
    fn carrying(&self, secret: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|h| {
                h.values()
                    .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(secret))
            })
            .count()
    }
}

/// A server that answers every request with a `status` redirect to the
/// same path and query on `to`.
async fn redirector(status: StatusCode, to: SocketAddr) -> SocketAddr {
    serve(Router::new().fallback(move |uri: Uri| async move {
        let target = format!(
            "http://{to}{}",
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        (status, [(header::LOCATION, target)]).into_response()
    }))
    .await
}

const UPSTREAM_TOKEN: &str = "upstream-t0ken-never-elsewhere";

/// Item 2: a listing redirected to another origin (another port here)
/// carries no credential there, fails the pass and purges nothing, for
/// 302 and 307 and for both a bearer and a custom token header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_origin_redirect_never_carries_the_token() {
    for status in [StatusCode::FOUND, StatusCode::TEMPORARY_REDIRECT] {
        for token_header in ["X-Auth-Token", "Authorization"] {
            let db = TestDb::new(Backend::Sqlite).await;
            db.create_users().await;
            db.insert_users(&users(10)).await;
            // The other origin lists one user fewer: following it would purge.
            let seen = Seen::default();
            let recorder = seen.clone();
            let elsewhere = serve(Router::new().fallback(move |headers: HeaderMap, uri: Uri| {
                let recorder = recorder.clone();
                async move {
                    recorder.record(headers);
                    listing(&users(9), &uri)
                }
            }))
            .await;
            let upstream = redirector(status, elsewhere).await;
            let settings = ConfigBuilder {
                upstream: format!(
                    "token = \"{UPSTREAM_TOKEN}\"\ntoken_header = \"{token_header}\""
                ),
                ..ConfigBuilder::default()
            }
            .settings(&db, upstream);
            let report = pass(&settings, PassOptions::default()).await;
            let case = format!("{status} {token_header}");
            assert_eq!(seen.carrying(UPSTREAM_TOKEN), 0, "{case}: token leaked");
            assert_eq!(report.outcome, Outcome::Failed, "{case}: {report:?}");
            let error = report.error.unwrap_or_default();
            assert!(
                error.contains("leaves the upstream's origin"),
                "{case}: {error}"
            );
            assert_eq!(db.count("users").await, 10, "{case}: rows purged");
        }
    }
}

/// Item 2: a redirect within the upstream's origin is followed, with the
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_origin_redirect_is_followed() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    let seen = Seen::default();
    let recorder = seen.clone();
    let app = Router::new()
        .route(
            "/0.1/users",
            axum::routing::get(|uri: Uri| async move {
                let query = uri.query().unwrap_or_default();
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("/0.2/users?{query}"))],
                )
            }),
        )
        .route(
            "/0.2/users",
            axum::routing::get(move |headers: HeaderMap, uri: Uri| {
                let recorder = recorder.clone();
                async move {
                    recorder.record(headers);
                    listing(&users(10), &uri)
                }
            }),
        );
    let upstream = serve(app).await;
    let settings = ConfigBuilder {
        upstream: format!("token = \"{UPSTREAM_TOKEN}\"\ntoken_header = \"X-Auth-Token\""),
        ..ConfigBuilder::default()
    }
    .settings(&db, upstream);
    let report = pass(&settings, PassOptions::default()).await;
    assert_eq!(report.outcome, Outcome::InSync, "{report:?}");
    // both list requests (the page, and the one that ends the listing)
    assert_eq!(seen.carrying(UPSTREAM_TOKEN), 2);
}

/// Item 3: a store URL's passwords, in the userinfo and in query
/// parameters of any case, never reach `driftd check`'s output nor a failed
/// connection's stderr, even at `RUST_LOG=trace`.
#[test]
fn store_url_secrets_are_never_printed() {
    let secrets = ["pw1-s3cret", "pw2-s3cret", "pw3-s3cret", "pw4-s3cret"];
    let server = pg_admin_url();
    let base = server
        .rsplit_once('/')
        .map(|(base, _)| base)
        .expect("a database URL");
    let url = format!(
        "{}/driftd_no_such_db?password={}&sslpassword={}&PassWord={}",
        base.replacen("postgres@", &format!("postgres:{}@", secrets[0]), 1),
        secrets[1],
        secrets[2],
        secrets[3]
    );
    assert!(url.contains(secrets[0]), "{url}");
    let config = format!(
        "[store]\nurl = \"{url}\"\n[resources.users]\nupstream = {{ base_url = \"http://127.0.0.1:9\", list_path = \"/u\", key_order = \"asc\" }}\nkey = {{ upstream = \"/uuid\", column = \"uuid\" }}\nlocal = {{ table = \"users\" }}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("driftd.toml");
    std::fs::write(&path, config).unwrap();
    let run = |args: &[&str], log: Option<&str>| {
        let mut cmd = driftd_bin();
        cmd.args(args).arg("--config").arg(&path);
        match log {
            Some(level) => cmd.env("RUST_LOG", level),
            None => cmd.env_remove("RUST_LOG"),
        };
        cmd.output().expect("run driftd")
    };
    let check = run(&["check"], None);
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("store: postgres://postgres:***@") && stdout.contains("PassWord=***"),
        "{stdout}"
    );
    let mut outputs = vec![("check".to_string(), check)];
    for log in [None, Some("trace")] {
        let failed = run(&["reconcile", "users"], log);
        let stderr = String::from_utf8_lossy(&failed.stderr).into_owned();
        assert_eq!(failed.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("driftd_no_such_db") && stderr.contains("postgres:***@"),
            "{stderr}"
        );
        outputs.push((format!("reconcile, RUST_LOG={log:?}"), failed));
    }
    for (what, out) in outputs {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for secret in secrets {
            assert!(!all.contains(secret), "{what}: {secret} leaked:\n{all}");
        }
    }
}

/// Item 4: `DRIFTD_` variables that are not `DRIFTD_<SECTION>__<FIELD>`
/// (the README's own `token_env = "DRIFTD_ADMIN_TOKEN"`, `DRIFTD_LOG`, ...)
/// are ignored instead of failing every command, while the documented form
/// still applies and is still validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_documented_driftd_variables_are_settings() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder {
        tail: tail(
            dir.path(),
            "127.0.0.1:0",
            "token_env = \"DRIFTD_ADMIN_TOKEN\"",
        ),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);
    let token = "env-admin-t0ken";
    let stray = [
        ("DRIFTD_ADMIN_TOKEN", token),
        ("DRIFTD_LOG", "debug"),
        ("DRIFTD_STORE_URL", "nonsense"),
        ("DRIFTD_TEST_SOMETHING", "1"),
        ("DRIFTD_FOO__BAR", "1"),
    ];
    // Not in the schedules folder, which must hold schedules only.
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("driftd.toml");
    std::fs::write(&path, &config).unwrap();
    let check = |extra: &[(&str, &str)]| {
        let mut cmd = driftd_bin();
        cmd.args(["check", "--config"]).arg(&path);
        cmd.envs(stray.iter().chain(extra).copied());
        cmd.output().expect("run driftd check")
    };
    let out = check(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("unknown field"), "{stderr}");

    // The documented form still applies, and is still checked.
    let out = check(&[("DRIFTD_STORE__MAX_CONNECTIONS", "0")]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("store.max_connections"), "{stderr}");
    let out = check(&[("DRIFTD_ADMIN__TOKNE", "x")]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tokne"), "{stderr}");

    // The worker takes its admin token from DRIFTD_ADMIN_TOKEN.
    let (_run, base) = serve_run(&config, &stray, files.path()).await;
    assert_eq!(post_reconcile(&base, None).await, 401);
    assert_eq!(
        post_reconcile(&base, Some(&format!("Bearer {token}"))).await,
        202
    );
}

const ADMIN_TOKEN: &str = "security-admin-token";

/// Calls the admin API with the admin token; returns the status and JSON.
async fn api(method: &str, url: &str, body: Option<&str>) -> (u16, Json) {
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), url)
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"));
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("admin API answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, json)
}

/// Starts a `users` pass through the API and waits for its job to end.
async fn reconcile_job(base: &str, body: &str) -> Json {
    let url = format!("{base}/v1/resources/users/reconcile");
    let (status, started) = api("POST", &url, Some(body)).await;
    assert_eq!(status, 202, "{started}");
    let id = started["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, job) = api("GET", &format!("{base}/v1/jobs/{id}"), None).await;
        if !matches!(job["status"].as_str(), Some("queued" | "running")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a sample in the exposition text, if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

const LAST_SUCCESS: &str = "driftd_last_success_timestamp_seconds{resource=\"users\"}";

/// `last_success_at` of `users` and the last-success metric (None if absent).
async fn last_success(base: &str) -> (Json, Option<f64>) {
    let (_, res) = api("GET", &format!("{base}/v1/resources"), None).await;
    let (_, metrics) = api("GET", &format!("{base}/metrics"), None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    (
        res["resources"][0]["last_success_at"].clone(),
        sample(&metrics, LAST_SUCCESS),
    )
}

/// Item 5: a dry run that found drift ends `drift_found`, not `succeeded`,
/// and moves neither `last_success_at` nor the last-success metric; nor does
/// a purge-only dry run that finds only missing rows, nor a job recorded
/// `succeeded` for a dry run with drift before `drift_found` existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_that_found_drift_is_not_a_success() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let mut local = users(20);
    local.push(ghost(1));
    db.insert_users(&local).await;
    let (_up, addr) = upstream(users(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = ConfigBuilder {
        tail: tail(
            dir.path(),
            "127.0.0.1:0",
            &format!("token = \"{ADMIN_TOKEN}\""),
        ),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let d = Daemon::start(Arc::new(settings)).await.unwrap();
    let base = format!("http://{}", d.addr);

    let dry = reconcile_job(&base, r#"{"dry_run": true}"#).await;
    assert_eq!(dry["status"], "drift_found", "{dry}");
    assert_eq!(dry["report"]["outcome"], "dry_run", "{dry}");
    let (at, metric) = last_success(&base).await;
    assert!(at.is_null(), "{at}");
    assert_eq!(metric.unwrap_or(0.0), 0.0);
    let (_, found) = api("GET", &format!("{base}/v1/jobs?status=drift_found"), None).await;
    assert_eq!(found["jobs"][0]["id"], dry["id"], "{found}");

    let real = reconcile_job(&base, "{}").await;
    assert_eq!(real["status"], "succeeded", "{real}");
    let (at, metric) = last_success(&base).await;
    assert_eq!(at, real["finished_at"]);
    let repaired_at = metric.expect("the metric moved");
    assert!(repaired_at > 0.0);

    // A row goes missing; a purge-only dry run has nothing to purge, but
    // the table is not upstream's.
    let gone = users(1)[0]["uuid"].as_str().unwrap().to_string();
    db.exec(&format!("DELETE FROM users WHERE uuid = '{gone}'"))
        .await;
    let purge_only = reconcile_job(&base, r#"{"dry_run": true, "mode": "purge-only"}"#).await;
    assert_eq!(purge_only["status"], "drift_found", "{purge_only}");
    assert_eq!(last_success(&base).await, (at.clone(), Some(repaired_at)));

    // A dry run with drift recorded `succeeded` by an older driftd.
    let store = driftd::store::AnyStore::open(&d.runner.settings().store.url, 1)
        .await
        .unwrap();
    let mut legacy = driftd::jobs::Job::queued(
        "users",
        driftd::jobs::Trigger::Http,
        driftd::pass::Mode::Full,
        true,
        false,
    );
    legacy.report = Some(dry["report"].clone());
    legacy.finish(driftd::jobs::JobStatus::Succeeded, None);
    driftd::store::Ledger::save_job(&store, &legacy)
        .await
        .unwrap();
    assert_eq!(last_success(&base).await.0, at);
    d.stop().await;
}

/// Item 6: `driftd run` starts with the last-success metric of each
/// resource taken from the job history (the last real success, not a later
/// dry run that found drift), and `0` for one that never succeeded, so the
/// "no recent success" alert can fire before any pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_success_metric_is_seeded_from_history() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    let mut local = users(20);
    local.push(ghost(1));
    db.insert_users(&local).await;
    let (_up, addr) = upstream(users(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = Arc::new(
        ConfigBuilder {
            tail: tail(
                dir.path(),
                "127.0.0.1:0",
                &format!("token = \"{ADMIN_TOKEN}\""),
            ),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );

    // Never succeeded: present, at 0.
    let d = Daemon::start(settings.clone()).await.unwrap();
    let base = format!("http://{}", d.addr);
    assert_eq!(last_success(&base).await, (Json::Null, Some(0.0)));
    let real = reconcile_job(&base, "{}").await;
    assert_eq!(real["status"], "succeeded", "{real}");
    db.insert_users(&[ghost(2)]).await;
    let dry = reconcile_job(&base, r#"{"dry_run": true}"#).await;
    assert_eq!(dry["status"], "drift_found", "{dry}");
    d.stop().await;

    // After a restart: the end of the last real success.
    let d = Daemon::start(settings).await.unwrap();
    let base = format!("http://{}", d.addr);
    let finished = real["finished_at"].as_str().unwrap();
    let want = humantime::parse_rfc3339(finished)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (at, metric) = last_success(&base).await;
    assert_eq!(at, real["finished_at"]);
    let metric = metric.expect("seeded at start");
    assert!((metric - want).abs() < 0.001, "{metric} != {want}");
    d.stop().await;
}

/// An upstream whose first list request gets `status` with `Retry-After:
/// retry_after` and every later one the listing of `users(10)`; returns its
/// address and the arrival time of each request.
async fn busy_upstream(
    status: StatusCode,
    retry_after: String,
) -> (SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let app = Router::new().route(
        "/0.1/users",
        axum::routing::get(move |uri: Uri| {
            let seen = seen.clone();
            let retry_after = retry_after.clone();
            async move {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len() == 1
                };
                if first {
                    (status, [(header::RETRY_AFTER, retry_after)], "busy").into_response()
                } else {
                    listing(&users(10), &uri)
                }
            }
        }),
    );
    (serve(app).await, arrivals)
}

/// Item 7: a 429 or 503 with `Retry-After` (seconds, or an HTTP date) is
/// retried no sooner than asked, measured at the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    // An HTTP date has whole seconds: 3 s ahead is at least 2 s ahead.
    let in_three_seconds = || {
        (chrono::Utc::now() + chrono::Duration::seconds(3))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
    };
    for (status, as_date) in [
        (StatusCode::TOO_MANY_REQUESTS, false),
        (StatusCode::SERVICE_UNAVAILABLE, true),
    ] {
        let retry_after = if as_date {
            in_three_seconds()
        } else {
            "1".to_string()
        };
        let db = TestDb::new(Backend::Sqlite).await;
        db.create_users().await;
        db.insert_users(&users(10)).await;
        let (addr, arrivals) = busy_upstream(status, retry_after.clone()).await;
        // retries = 1 and backoff_ms = 1: only Retry-After can make it wait.
        let settings = ConfigBuilder::default().settings(&db, addr);
        let report = pass(&settings, PassOptions::default()).await;
        assert_eq!(report.outcome, Outcome::InSync, "{status}: {report:?}");
        let arrivals = arrivals.lock().unwrap().clone();
        // the refused request, its retry, and the page that ends the listing
        assert_eq!(arrivals.len(), 3, "{status}");
        let waited = arrivals[1] - arrivals[0];
        assert!(
            waited >= Duration::from_secs(1),
            "{status} Retry-After {retry_after}: retried after {waited:?}"
        );
    }
}

/// Item 7: asked to wait longer than driftd's limit (60 s), the client
/// gives up at once rather than retry sooner than asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_limit_fails_without_retrying() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    let (addr, arrivals) = busy_upstream(StatusCode::SERVICE_UNAVAILABLE, "3600".into()).await;
    let settings = ConfigBuilder::default().settings(&db, addr);
    let started = Instant::now();
    let report = pass(&settings, PassOptions::default()).await;
    assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
    assert!(report.error.unwrap_or_default().contains("503"));
    assert_eq!(arrivals.lock().unwrap().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(db.count("users").await, 10);
}

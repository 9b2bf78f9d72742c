//! Checks `dashboards/driftd.json` and `dashboards/alerts.yml` against the
//! real thing: a private Prometheus (the Debian binary named by
//! `DRIFTD_TEST_PROMETHEUS`, which `scripts/test.sh` installs with
//! `ensure_prometheus`) scrapes a running driftd every second with the alert
//! rules loaded, and must answer every panel's query; promtool must accept
//! the rules; and every `driftd_*` metric the dashboard or the rules name
//! must be in driftd's exposition.
//!
//! Prometheus listens on a free loopback port (never the packaged service's
//! :9090) and keeps its data in a temporary directory; it is killed when the
//! check ends, panicking or not.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// How long Prometheus may take to start, see the target up, and collect
/// enough samples for `rate()`.
const WAIT: Duration = Duration::from_secs(30);
/// Samples of `driftd_build_info` to wait for before querying, so every
/// `rate()` over `1m` has at least two points.
const MIN_SAMPLES: u32 = 3;
/// Metrics labelled by event source rather than resource.
const SOURCE_METRICS: &[&str] = &[
    "driftd_events_total",
    "driftd_event_lag_seconds",
    "driftd_dead_letters",
    "driftd_source_connected",
    "driftd_events_lost_total",
];
/// Grafana's variables, as Prometheus sees them in the check. Longer names
/// first, so `$__interval` does not eat the start of `$__interval_ms`.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("${resource}", ".*"),
    ("$resource", ".*"),
    ("${source}", ".*"),
    ("$source", ".*"),
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${__interval_ms}", "15000"),
    ("$__interval_ms", "15000"),
    ("${__interval}", "15s"),
    ("$__interval", "15s"),
    ("${__range_ms}", "300000"),
    ("$__range_ms", "300000"),
    ("${__range_s}", "300"),
    ("$__range_s", "300"),
    ("${__range}", "5m"),
    ("$__range", "5m"),
];

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set: run the suite with ./scripts/test.sh, which installs \
             Prometheus and promtool (ensure_prometheus in scripts/services.sh)"
        ),
    }
}

/// Runs every check (see the module doc) against the driftd whose metrics
/// are at `metrics_url` (e.g. `http://127.0.0.1:43210/metrics`).
///
/// Every panel query must succeed and return at least one series, except the
/// queries of panels whose title contains one of `may_be_empty` (e.g.
/// `"Guard trips"` when the test tripped no guard); the `resource` template
/// variable counts as a panel titled `variable resource`. An entry of
/// `may_be_empty` that matches no title is an error (a stale allowance).
/// Panics naming the panel and the query on any failure.
#[allow(dead_code)]
pub async fn check_dashboard(metrics_url: &str, may_be_empty: &[&str]) {
    check_dashboard_report(metrics_url, may_be_empty).await;
}

/// [`check_dashboard`], returning the allowed-empty queries (as
/// `panel title: expr`, with Grafana variables substituted) for a test that
/// wants to assert on them.
#[allow(dead_code)]
pub async fn check_dashboard_report(metrics_url: &str, may_be_empty: &[&str]) -> Vec<String> {
    let dashboard_path = dashboards_dir().join("driftd.json");
    let rules_path = dashboards_dir().join("alerts.yml");
    let dashboard = load_dashboard(&dashboard_path);
    let queries = dashboard_queries(&dashboard);
    assert!(
        !queries.is_empty(),
        "{}: no panel has a query",
        dashboard_path.display()
    );
    check_static(&dashboard, &queries);
    let variables = label_values_variables(&dashboard);
    for allowed in may_be_empty {
        let known = queries.iter().any(|q| q.title.contains(allowed))
            || variables.iter().any(|v| v.title.contains(allowed));
        assert!(
            known,
            "may_be_empty entry {allowed:?} matches no panel title of {}",
            dashboard_path.display()
        );
    }
    let allowed_empty = |title: &str| may_be_empty.iter().any(|a| title.contains(a));

    promtool_check_rules(&rules_path).await;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("http client");

    let rules_text = std::fs::read_to_string(&rules_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", rules_path.display()));
    check_exposition(&client, metrics_url, &queries, &variables, &rules_text).await;

    let prom = Prometheus::start(metrics_url, &rules_path).await;
    prom.wait_target_up(&client).await;
    prom.wait_samples(&client).await;
    prom.check_rules_healthy(&client).await;

    let mut failures = Vec::new();
    let mut empty = Vec::new();
    for q in &queries {
        let expr = to_promql(&q.expr);
        match prom.query(&client, &expr).await {
            Err(e) => failures.push(format!(
                "panel {:?} (refId {}): query failed: {e}\n    expr: {expr}",
                q.title, q.ref_id
            )),
            Ok(0) if allowed_empty(&q.title) => empty.push(format!("{}: {expr}", q.title)),
            Ok(0) => failures.push(format!(
                "panel {:?} (refId {}): no series (add a substring of the title to \
                 may_be_empty if that is expected)\n    expr: {expr}",
                q.title, q.ref_id
            )),
            Ok(_) => {}
        }
    }
    for v in &variables {
        match prom.label_values(&client, &v.metric, &v.label).await {
            Err(e) => failures.push(format!(
                "{:?}: label_values({}, {}) failed: {e}",
                v.title, v.metric, v.label
            )),
            Ok(0) if allowed_empty(&v.title) => empty.push(format!(
                "{}: label_values({}, {})",
                v.title, v.metric, v.label
            )),
            Ok(0) => failures.push(format!(
                "{:?}: label_values({}, {}) has no values",
                v.title, v.metric, v.label
            )),
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed against Prometheus scraping {metrics_url}:\n  {}",
        failures.len(),
        queries.len() + variables.len(),
        failures.join("\n  ")
    );
    eprintln!(
        "dashboard check: {} queries answered, {} allowed empty{}",
        queries.len() + variables.len(),
        empty.len(),
        if empty.is_empty() {
            String::new()
        } else {
            format!(":\n  {}", empty.join("\n  "))
        }
    );
    empty
}

// ---------------------------------------------------------------------------
// The dashboard JSON.

/// One target of one panel.
struct PanelQuery {
    title: String,
    ref_id: String,
    expr: String,
}

/// A `label_values(metric, label)` template variable.
struct Variable {
    title: String,
    metric: String,
    label: String,
}

fn load_dashboard(path: &Path) -> Json {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// Every target's expr of every panel, rows' nested panels included.
fn dashboard_queries(dashboard: &Json) -> Vec<PanelQuery> {
    fn walk(panels: &Json, out: &mut Vec<PanelQuery>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "panel {title:?}: a target has no expr: {target}"
                );
                out.push(PanelQuery {
                    title: title.clone(),
                    ref_id: target["refId"].as_str().unwrap_or("?").to_string(),
                    expr: expr.to_string(),
                });
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The query variables of the form `label_values(metric, label)`.
fn label_values_variables(dashboard: &Json) -> Vec<Variable> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .or_else(|| var["definition"].as_str())
            .unwrap_or_default();
        let inner = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!(
                    "variable {name}: only label_values(metric, label) is checked, got {query:?}"
                )
            });
        let (metric, label) = inner.split_once(',').unwrap_or_else(|| {
            panic!("variable {name}: expected label_values(metric, label), got {query:?}")
        });
        out.push(Variable {
            title: format!("variable {name}"),
            metric: metric.trim().to_string(),
            label: label.trim().to_string(),
        });
    }
    out
}

/// What can be checked without Prometheus: the template variables exist,
/// every panel uses the `${datasource}` variable, every driftd selector is
/// filtered by `resource=~"$resource"`, and panel ids are unique.
fn check_static(dashboard: &Json, queries: &[PanelQuery]) {
    let mut problems = Vec::new();
    let vars: BTreeMap<&str, &Json> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    match vars.get("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => problems.push("no `datasource` variable of type datasource, query prometheus".into()),
    }
    match vars.get("resource") {
        Some(v)
            if v["type"] == "query"
                && v["multi"] == true
                && v["includeAll"] == true
                && v["allValue"] == ".*" => {}
        _ => problems.push(
            "no `resource` variable of type query with multi, includeAll and allValue \".*\""
                .into(),
        ),
    }

    let mut ids = BTreeSet::new();
    fn panels(list: &Json) -> Vec<&Json> {
        let mut out = Vec::new();
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            out.extend(panels(&p["panels"]));
        }
        out
    }
    for panel in panels(&dashboard["panels"]) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if let Some(id) = panel["id"].as_u64() {
            if !ids.insert(id) {
                problems.push(format!("panel {title:?}: duplicate id {id}"));
            }
        }
        if panel["gridPos"].get("w").is_none() {
            problems.push(format!("panel {title:?}: no gridPos"));
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let uid = target["datasource"]["uid"]
                .as_str()
                .or_else(|| panel["datasource"]["uid"].as_str());
            if uid != Some("${datasource}") {
                problems.push(format!(
                    "panel {title:?}: target {} does not use the ${{datasource}} variable",
                    target["refId"]
                ));
            }
        }
    }

    for q in queries {
        for (at, name) in metric_names(&q.expr) {
            let rest = &q.expr[at + name.len()..];
            let filtered = rest
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
                .is_some_and(|(matchers, _)| {
                    // Event metrics are per source; the others per resource.
                    let wanted = if SOURCE_METRICS.iter().any(|m| name.starts_with(m)) {
                        r#"source=~"$source""#
                    } else {
                        r#"resource=~"$resource""#
                    };
                    matchers.contains(wanted)
                });
            if !filtered {
                problems.push(format!(
                    "panel {:?}: {name} is not filtered with resource=~\"$resource\" (source=~\"$source\" for event metrics)\n    expr: {}",
                    q.title, q.expr
                ));
            }
        }
        let promql = to_promql(&q.expr);
        let leftover = promql.match_indices('$').any(|(i, _)| {
            promql[i + 1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '{')
        });
        if leftover {
            problems.push(format!(
                "panel {:?}: a Grafana variable the check does not know remains\n    expr: {promql}",
                q.title
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboards/driftd.json:\n  {}",
        problems.join("\n  ")
    );
}

/// The expr as Prometheus should see it when Grafana runs it with every
/// resource selected.
fn to_promql(expr: &str) -> String {
    SUBSTITUTIONS
        .iter()
        .fold(expr.to_string(), |s, (from, to)| s.replace(from, to))
}

/// `driftd_*` metric names in a text, with their byte offsets.
fn metric_names(text: &str) -> Vec<(usize, String)> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for (at, _) in text.match_indices("driftd_") {
        if text[..at].chars().next_back().is_some_and(word) {
            continue;
        }
        let len = text[at..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(text.len() - at);
        out.push((at, text[at..at + len].to_string()));
    }
    out
}

// ---------------------------------------------------------------------------
// promtool and the exposition.

async fn promtool_check_rules(rules: &Path) {
    let promtool = env_path("DRIFTD_TEST_PROMTOOL");
    let rules = rules.to_path_buf();
    let out = tokio::task::spawn_blocking({
        let promtool = promtool.clone();
        move || {
            Command::new(promtool)
                .arg("check")
                .arg("rules")
                .arg(&rules)
                .output()
        }
    })
    .await
    .expect("promtool task")
    .unwrap_or_else(|e| panic!("run {} check rules: {e}", promtool.display()));
    assert!(
        out.status.success(),
        "promtool check rules dashboards/alerts.yml failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `driftd_*` name in the dashboard's exprs and variables and in the
/// rules must have a `# TYPE` line in driftd's exposition (a histogram's
/// `_bucket`, `_sum` and `_count` are checked by their base name).
async fn check_exposition(
    client: &reqwest::Client,
    metrics_url: &str,
    queries: &[PanelQuery],
    variables: &[Variable],
    rules_text: &str,
) {
    let resp = client
        .get(metrics_url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {metrics_url}: {e}"));
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {metrics_url}: reading the body: {e}"));
    let text = String::from_utf8_lossy(&body);
    assert!(status.is_success(), "GET {metrics_url}: {status}\n{text}");
    let types: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?, w.next()?))
        })
        .collect();
    let exposed = |name: &str| {
        if types.contains_key(name) {
            return true;
        }
        let base_is = |suffix: &str, kinds: &[&str]| {
            name.strip_suffix(suffix)
                .and_then(|base| types.get(base))
                .is_some_and(|t| kinds.contains(t))
        };
        base_is("_bucket", &["histogram"])
            || base_is("_sum", &["histogram", "summary"])
            || base_is("_count", &["histogram", "summary"])
            // OpenMetrics writes a counter's TYPE without `_total`.
            || base_is("_total", &["counter"])
    };

    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for q in queries {
        for (_, name) in metric_names(&q.expr) {
            wanted
                .entry(name)
                .or_default()
                .insert(format!("panel {:?}", q.title));
        }
    }
    for v in variables {
        for (_, name) in metric_names(&v.metric) {
            wanted.entry(name).or_default().insert(v.title.clone());
        }
    }
    for (_, name) in metric_names(rules_text) {
        wanted
            .entry(name)
            .or_default()
            .insert("dashboards/alerts.yml".into());
    }
    let mut missing = String::new();
    for (name, used_by) in &wanted {
        if !exposed(name) {
            let used_by: Vec<&str> = used_by.iter().map(String::as_str).collect();
            let _ = write!(missing, "\n  {name} (used by {})", used_by.join(", "));
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the dashboard or the alert rules use have no `# TYPE` line in {metrics_url} \
         (a labelled metric with no series yet is not exposed at all):{missing}\n--- exposition ---\n{text}"
    );
}

// ---------------------------------------------------------------------------
// The private Prometheus.

/// A running Prometheus; killed on drop, before its data directory goes.
pub struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A Prometheus scraping `metrics_url` every second with the shipped
/// alert rules, evaluated every second.
pub async fn with_alert_rules(metrics_url: &str) -> Prometheus {
    Prometheus::start(metrics_url, &dashboards_dir().join("alerts.yml")).await
}

impl Prometheus {
    /// Waits up to `within` for alert `name` to be firing; returns the
    /// alerts Prometheus reports if it is not.
    pub async fn wait_firing(&self, name: &str, within: Duration) -> Result<(), Json> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            let data = self
                .api(&client, "/api/v1/alerts", &[])
                .await
                .unwrap_or_else(|e| panic!("GET /api/v1/alerts: {e}"));
            let firing = data["alerts"].as_array().is_some_and(|alerts| {
                alerts
                    .iter()
                    .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
            });
            if firing {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(data);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts Prometheus scraping `metrics_url` every second with `rules`
    /// loaded, and waits until it is ready.
    async fn start(metrics_url: &str, rules: &Path) -> Prometheus {
        let binary = env_path("DRIFTD_TEST_PROMETHEUS");
        let url = reqwest::Url::parse(metrics_url)
            .unwrap_or_else(|e| panic!("metrics url {metrics_url:?}: {e}"));
        assert!(
            url.query().is_none() && url.username().is_empty(),
            "metrics url {metrics_url:?}: query strings and credentials are not supported"
        );
        let host = url
            .host_str()
            .unwrap_or_else(|| panic!("metrics url {metrics_url:?} has no host"));
        let port = url
            .port_or_known_default()
            .unwrap_or_else(|| panic!("metrics url {metrics_url:?} has no port"));
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: driftd\n    scheme: {scheme}\n    metrics_path: {path}\n    \
             static_configs:\n      - targets: [{target}]\n",
            rules = yaml_str(&rules.display().to_string()),
            scheme = url.scheme(),
            path = yaml_str(url.path()),
            target = yaml_str(&format!("{host}:{port}")),
        );

        let mut last_log = String::new();
        // A port found free can be taken before Prometheus binds it: retry.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, &config).expect("write prometheus.yml");
            let log = dir.path().join("prometheus.log");
            let log_file = std::fs::File::create(&log).expect("create prometheus.log");
            let listen = format!("127.0.0.1:{}", free_port());
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={listen}"))
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log file"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            let mut prom = Prometheus {
                child,
                base: format!("http://{listen}"),
                log,
                _dir: dir,
            };
            match prom.wait_ready().await {
                Ok(()) => return prom,
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!(
                    "Prometheus ({}) did not start with config\n{config}\n--- log ---\n{log}",
                    binary.display()
                ),
            }
        }
        panic!("Prometheus could not bind a free port three times:\n{last_log}");
    }

    /// Waits for `/-/ready`; on exit or timeout returns the log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("http client");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exited: {status})\n{}", self.log_tail()));
            }
            if let Ok(resp) = client.get(format!("{}/-/ready", self.base)).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("(not ready after {WAIT:?})\n{}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GETs an API path; Ok(data) when Prometheus says `status: success`.
    async fn api(
        &self,
        client: &reqwest::Client,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Json, String> {
        let resp = client
            .get(format!("{}{path}", self.base))
            .query(params)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("GET {path}: reading the body: {e}"))?;
        let json: Json = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "GET {path}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        if json["status"] != "success" {
            return Err(format!(
                "{status} {}: {}",
                json["errorType"].as_str().unwrap_or("?"),
                json["error"].as_str().unwrap_or("?")
            ));
        }
        Ok(json["data"].clone())
    }

    /// Runs an instant query; Ok(number of series, or 1 for a scalar).
    async fn query(&self, client: &reqwest::Client, expr: &str) -> Result<usize, String> {
        let data = self
            .api(client, "/api/v1/query", &[("query", expr)])
            .await?;
        match data["resultType"].as_str() {
            Some("vector" | "matrix") => Ok(data["result"].as_array().map_or(0, Vec::len)),
            Some("scalar" | "string") => Ok(1),
            other => Err(format!("unexpected resultType {other:?}: {data}")),
        }
    }

    async fn label_values(
        &self,
        client: &reqwest::Client,
        metric: &str,
        label: &str,
    ) -> Result<usize, String> {
        let data = self
            .api(
                client,
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", metric)],
            )
            .await?;
        Ok(data.as_array().map_or(0, Vec::len))
    }

    /// Waits until the scrape target is up; on timeout panics with the
    /// target's last scrape error.
    async fn wait_target_up(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(n) = self.query(client, r#"up{job="driftd"} == 1"#).await {
                if n > 0 {
                    return;
                }
            }
            if Instant::now() > deadline {
                let targets = self
                    .api(client, "/api/v1/targets", &[])
                    .await
                    .map(|d| {
                        d["activeTargets"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|t| {
                                format!(
                                    "{} health={} lastError={}",
                                    t["scrapeUrl"], t["health"], t["lastError"]
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n  ")
                    })
                    .unwrap_or_else(|e| e);
                panic!(
                    "Prometheus did not see the driftd target up within {WAIT:?}:\n  {targets}\n--- log ---\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until a few scrapes are stored, so `rate()` has points.
    async fn wait_samples(&self, client: &reqwest::Client) {
        let expr = format!("count_over_time(driftd_build_info[1m]) >= {MIN_SAMPLES}");
        let deadline = Instant::now() + WAIT;
        loop {
            match self.query(client, &expr).await {
                Ok(n) if n > 0 => return,
                Ok(_) => {}
                Err(e) => panic!("Prometheus rejected {expr}: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus did not store {MIN_SAMPLES} samples of driftd_build_info within \
                 {WAIT:?} ({expr} stayed empty): is driftd_build_info exposed?"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The alert rules are loaded and, once evaluated, none is in error.
    async fn check_rules_healthy(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + WAIT;
        loop {
            let data = self
                .api(client, "/api/v1/rules", &[])
                .await
                .unwrap_or_else(|e| panic!("GET /api/v1/rules: {e}"));
            let rules: Vec<&Json> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            assert!(
                !rules.is_empty(),
                "Prometheus loaded no rules from dashboards/alerts.yml\n--- log ---\n{}",
                self.log_tail()
            );
            let broken: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] == "err")
                .map(|r| {
                    format!(
                        "{}: {}\n    expr: {}",
                        r["name"], r["lastError"], r["query"]
                    )
                })
                .collect();
            assert!(
                broken.is_empty(),
                "alert rules in error in Prometheus:\n  {}",
                broken.join("\n  ")
            );
            if rules.iter().all(|r| r["health"] == "ok") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "alert rules not evaluated within {WAIT:?}: {data}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

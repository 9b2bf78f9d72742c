//! The admin HTTP API of `driftd run` (axum), on loopback by default.
//!
//! Read endpoints are open; mutating ones (start and cancel jobs) need the
//! bearer token from `admin.token`, compared in constant time. Without a
//! configured token they are refused, unless `admin.allow_unauthenticated`
//! says otherwise for local use. Every error is JSON
//! `{"error": {"code", "message"}}` with a 4xx status (5xx only when the
//! database fails); bad input never panics. The routes are documented in
//! `openapi.json` (served at `/openapi.json`), which a test checks against
//! [`ROUTES`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;

mod events;

use crate::jobs::{JobFilter, JobId, JobStatus, Trigger};
use crate::runner::{JobRequest, Runner, RunnerError, Submitted};
use crate::scheduler::Schedules;
use crate::store::Ledger;
use crate::vocab::Mode;

/// The OpenAPI document, kept in the repository.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route: method and path template, as in `openapi.json`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/resources"),
    ("POST", "/v1/resources/{name}/reconcile"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("POST", "/v1/events/{source}"),
    ("GET", "/v1/sources"),
    ("GET", "/v1/dead-letters"),
    ("DELETE", "/v1/dead-letters/{id}"),
    ("POST", "/v1/dead-letters/{id}/replay"),
];

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub runner: Runner,
    pub schedules: Arc<Schedules>,
    pub events: Arc<crate::engine::events::Events>,
    pub sources: crate::sources::Sources,
}

/// A JSON error with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<RunnerError> for ApiError {
    fn from(e: RunnerError) -> Self {
        match e {
            RunnerError::UnknownResource(_) => ApiError::not_found(e.to_string()),
            RunnerError::NoSuchJob(_) => ApiError::not_found(e.to_string()),
            RunnerError::AlreadyEnded(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_ended", e.to_string())
            }
            RunnerError::ElsewhereRunning(_) => {
                ApiError::new(StatusCode::CONFLICT, "elsewhere", e.to_string())
            }
            RunnerError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            RunnerError::Store(e) => store_error(e),
        }
    }
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %crate::pass::error_chain(&e), "admin API: database error");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
        "the database did not answer; see driftd's log",
    )
}

/// The router with all routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/v1/resources", get(resources))
        .route("/v1/resources/{name}/reconcile", post(reconcile))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/events/{source}", post(events::webhook))
        .route("/v1/sources", get(events::sources))
        .route("/v1/dead-letters", get(events::list_dead_letters))
        .route("/v1/dead-letters/{id}", delete(events::delete_dead_letter))
        .route("/v1/dead-letters/{id}/replay", post(events::replay))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn fallback(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.runner.metrics().render(),
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// How long `/readyz` waits for the database before answering 503.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

async fn readyz(State(s): State<AppState>) -> Response {
    let ping = tokio::time::timeout(READY_TIMEOUT, s.runner.store().ping()).await;
    let ping = ping.unwrap_or_else(|_| {
        Err(crate::store::StoreError::Unavailable(format!(
            "no answer within {} ms",
            READY_TIMEOUT.as_millis()
        )))
    });
    let sources = s.sources.list();
    let down: Vec<String> = sources
        .iter()
        .filter(|src| !src.connected)
        .map(|src| format!("source {}: {}", src.name, src.state))
        .collect();
    match ping {
        Ok(()) if down.is_empty() => Json(json!({
            "status": "ready",
            "schedules": s.schedules.entries.len(),
            "sources": sources,
        }))
        .into_response(),
        Ok(()) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "problem": down.join("; "), "sources": sources})),
        )
            .into_response(),
        Err(e) => {
            let url = s.runner.settings().store.url.expose_secret();
            let problem = crate::redact::scrub(&format!("database: {e}"), url);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "not_ready", "problem": problem})),
            )
                .into_response()
        }
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Checks the bearer token of a mutating request.
fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let admin = &s.runner.settings().admin;
    // Config validation refuses a blank token; should one get here anyway,
    // it counts as no token, never as a token that a request without
    // `Authorization` (an empty one) would match.
    let token = admin
        .resolved_token
        .as_ref()
        .filter(|t| !t.expose_secret().trim().is_empty());
    let Some(token) = token else {
        if admin.allow_unauthenticated {
            return Ok(());
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "no_token_configured",
            "mutating endpoints need admin.token (DRIFTD_ADMIN__TOKEN), or admin.allow_unauthenticated = true for local use",
        ));
    };
    // The scheme is case-insensitive (RFC 7235): `bearer` is `Bearer`.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start())
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose_secret().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        ))
    }
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReconcileBody {
    mode: Mode,
    dry_run: bool,
    force: bool,
}

async fn reconcile(
    State(s): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(path_rejected)?;
    let body = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    authorize(&s, &headers)?;
    if !s.runner.settings().resources.contains_key(&name) {
        return Err(ApiError::not_found(format!("unknown resource `{name}`")));
    }
    let body: ReconcileBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReconcileBody::default()
    } else {
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::bad_request(
                "request body: must be a JSON object such as {\"mode\": \"full\"}",
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
    };
    let submitted = s
        .runner
        .submit(JobRequest {
            resource: name,
            trigger: Trigger::Http,
            mode: body.mode,
            dry_run: body.dry_run,
            force: body.force,
        })
        .await?;
    let reply = match submitted {
        Submitted::Started(id) => json!({"job_id": id, "coalesced": false}),
        Submitted::Coalesced { running, skipped } => {
            json!({"job_id": running, "coalesced": true, "skipped_job_id": skipped})
        }
    };
    Ok((StatusCode::ACCEPTED, Json(reply)).into_response())
}

async fn list_jobs(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))?;
    let mut filter = JobFilter {
        limit: 50,
        ..JobFilter::default()
    };
    for (k, v) in &q {
        match k.as_str() {
            "resource" => {
                if !s.runner.settings().resources.contains_key(v) {
                    return Err(ApiError::not_found(format!("unknown resource `{v}`")));
                }
                filter.resource = Some(v.clone());
            }
            "status" => {
                filter.status = Some(JobStatus::parse(v).ok_or_else(|| {
                    let known: Vec<&str> = JobStatus::ALL.iter().map(|st| st.as_str()).collect();
                    ApiError::bad_request(format!(
                        "status `{v}`: expected one of {}",
                        known.join(", ")
                    ))
                })?)
            }
            "limit" => filter.limit = parse_limit(v)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{other}`"
                )))
            }
        }
    }
    let jobs = s
        .runner
        .store()
        .list_jobs(&filter)
        .await
        .map_err(store_error)?;
    Ok(Json(json!({"jobs": jobs})).into_response())
}

/// A list's `limit` parameter: 1 to 1000.
fn parse_limit<N: std::str::FromStr + PartialOrd + From<u16>>(v: &str) -> Result<N, ApiError> {
    v.parse()
        .ok()
        .filter(|n| (N::from(1)..=N::from(1000)).contains(n))
        .ok_or_else(|| ApiError::bad_request(format!("limit `{v}`: expected 1 to 1000")))
}

fn parse_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("`{raw}` is not a job id (a UUID)")))
}

/// A path that does not decode (`/v1/jobs/%ff`) is a JSON 400 too.
fn path_rejected(e: PathRejection) -> ApiError {
    ApiError::bad_request(format!("path: {}", e.body_text()))
}

async fn get_job(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(path_rejected)?;
    let id = parse_id(&id)?;
    match s.runner.store().get_job(id).await.map_err(store_error)? {
        Some(job) => Ok(Json(job).into_response()),
        None => Err(ApiError::not_found(format!("no job {id}"))),
    }
}

async fn cancel_job(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(path_rejected)?;
    authorize(&s, &headers)?;
    let id = parse_id(&id)?;
    let job = s.runner.cancel(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": job.id, "status": "cancelling"})),
    )
        .into_response())
}

async fn resources(State(s): State<AppState>) -> Result<Response, ApiError> {
    let now = chrono::Utc::now();
    let mut out = Vec::new();
    for (name, res) in &s.runner.settings().resources {
        let last = JobFilter {
            resource: Some(name.clone()),
            status: None,
            limit: 1,
        };
        let last_job = s
            .runner
            .store()
            .list_jobs(&last)
            .await
            .map_err(store_error)?;
        let last_success = s.runner.last_success(name).await.map_err(store_error)?;
        let mut running = s.runner.running(name);
        if running.is_none() {
            // Another process (a CLI pass, a replica) may run it: its job
            // is the latest running one, if the resource's lock is held.
            if let Some(j) = last_job.first().filter(|j| j.status == JobStatus::Running) {
                match s.runner.store().try_lock(name).await.map_err(store_error)? {
                    None => running = Some(j.id),
                    Some(lock) => lock.release().await,
                }
            }
        }
        out.push(json!({
            "name": name,
            "table": res.local.table,
            "running_job": running,
            "last_job": last_job.first().map(|j| json!({
                "id": j.id, "status": j.status, "trigger": j.trigger,
                "created_at": j.created_at, "finished_at": j.finished_at,
            })),
            "last_success_at": last_success.and_then(|j| j.finished_at),
            "next_run_at": s.schedules.next_run(name, now).map(|t| t.to_rfc3339()),
        }));
    }
    Ok(Json(json!({"resources": out})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn openapi_documents_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(documented, routes);
    }
}

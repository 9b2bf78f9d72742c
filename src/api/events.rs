//! The live half's routes: the webhook source, the sources' status, and
//! the dead letters.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{authorize, parse_limit, path_rejected, store_error, ApiError, AppState};
use crate::config::SourceKind;
use crate::engine::events::{Envelope, ReplayError};
use crate::store::Ledger;

/// Request headers that are credentials, never kept with a message.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-auth-token",
    "x-api-key",
];

/// `POST /v1/events/{source}`: one message for a webhook source. Answers
/// once the event is committed or kept as a dead letter (200), or 503 when
/// the database cannot be used (nothing kept: send it again).
pub(super) async fn webhook(
    State(s): State<AppState>,
    source: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(source) = source.map_err(path_rejected)?;
    let body = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    authorize(&s, &headers)?;
    match s.runner.settings().sources.get(&source) {
        Some(cfg) if cfg.kind == SourceKind::Webhook => {}
        Some(_) => {
            return Err(ApiError::not_found(format!(
                "source `{source}` is not a webhook source"
            )))
        }
        None => return Err(ApiError::not_found(format!("unknown source `{source}`"))),
    }
    let mut fields = BTreeMap::new();
    for (name, value) in &headers {
        // Credentials never reach the dead-letter table.
        if SECRET_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            fields.insert(name.as_str().to_string(), v.to_string());
        }
    }
    let envelope = Envelope::new(fields, body.to_vec());
    let verdicts = s
        .events
        .deliver(&source, std::slice::from_ref(&envelope))
        .await
        .map_err(store_error)?;
    if let Some(h) = s.sources.handle(&source) {
        h.settled(1);
    }
    let verdict = verdicts.into_iter().next();
    Ok(Json(json!({ "event": verdict })).into_response())
}

/// `GET /v1/sources`.
pub(super) async fn sources(State(s): State<AppState>) -> Response {
    Json(json!({ "sources": s.sources.list() })).into_response()
}

/// `GET /v1/dead-letters?source=&limit=`.
/// Their bodies and headers are other services' data (users' names,
/// emails): like the mutating routes, it needs the admin token.
pub(super) async fn list_dead_letters(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))?;
    authorize(&s, &headers)?;
    let mut source = None;
    let mut limit: i64 = 100;
    for (k, v) in &q {
        match k.as_str() {
            "source" => {
                if !s.runner.settings().sources.contains_key(v) {
                    return Err(ApiError::not_found(format!("unknown source `{v}`")));
                }
                source = Some(v.clone());
            }
            "limit" => limit = parse_limit(v)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{other}`"
                )))
            }
        }
    }
    let letters = s
        .runner
        .store()
        .list_dead_letters(source.as_deref(), limit)
        .await
        .map_err(store_error)?;
    Ok(Json(json!({ "dead_letters": letters })).into_response())
}

/// `POST /v1/dead-letters/{id}/replay`.
pub(super) async fn replay(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(path_rejected)?;
    authorize(&s, &headers)?;
    match s.events.replay(&id).await {
        Ok(verdict) => Ok(Json(json!({ "event": verdict })).into_response()),
        Err(ReplayError::NotFound(_)) => Err(ApiError::not_found(format!("no dead letter `{id}`"))),
        Err(e @ ReplayError::UnknownSource { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "unknown_source",
            e.to_string(),
        )),
        Err(ReplayError::Store(e)) => Err(store_error(e)),
    }
}

/// `DELETE /v1/dead-letters/{id}`.
pub(super) async fn delete_dead_letter(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(path_rejected)?;
    authorize(&s, &headers)?;
    let existed = s
        .runner
        .store()
        .delete_dead_letter(&id)
        .await
        .map_err(store_error)?;
    s.events.refresh_dead_letters().await;
    if existed {
        Ok(Json(json!({ "deleted": id })).into_response())
    } else {
        Err(ApiError::not_found(format!("no dead letter `{id}`")))
    }
}

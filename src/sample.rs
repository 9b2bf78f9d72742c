//! A bundled sample upstream, Wazo-shaped, for the quickstart, the tests and
//! the benchmark: `GET /0.1/{collection}?limit&offset` (also `page`/`per_page`
//! and an opaque `cursor`) answering `{"items": [...], "total": N,
//! "filtered": N, "next": cursor|null}` with an RFC 8288 `Link: rel="next"`
//! header, and `GET /0.1/{collection}/{key}` answering the item or 404.
//!
//! Items are kept serialized, ordered by key, so a million-row collection
//! costs a few hundred bytes a row. Tests can inject [`Fault`]s to play a
//! misbehaving upstream.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;

/// One stored item: its key and its JSON text.
#[derive(Debug, Clone)]
struct Item {
    key: String,
    /// The key, when it is a JSON integer.
    number: Option<i64>,
    json: String,
}

/// A way to misbehave, applied to the list requests whose page covers the
/// fault's `offset` (the request's offset ≤ `offset` < its offset + limit).
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status, `times` times (then behave).
    Status {
        offset: u64,
        status: u16,
        times: u32,
    },
    /// Answer with a body that is not JSON.
    Malformed { offset: u64 },
    /// Answer JSON without the `items` field.
    NoItems { offset: u64 },
    /// Serve only the first `keep` items of the page.
    Truncate { offset: u64, keep: usize },
    /// Leave the `count` items from index `from` out of every listing
    /// (get-by-key still finds them): an upstream whose list endpoint
    /// silently misses rows. `counted`: the announced total still counts
    /// them.
    Unlisted {
        from: usize,
        count: usize,
        counted: bool,
    },
    /// Serve at most `max` items per page, whatever the limit asked (for
    /// every request).
    CapLimit { max: u64 },
    /// Sleep before answering a get-by-key request.
    SlowGet { ms: u64 },
    /// Serve the page at `from` instead (a repeated page).
    Repeat { offset: u64, from: u64 },
    /// Before serving, delete the first `count` items, but keep announcing
    /// the old total (offsets shift under the reader).
    ShiftKeepTotal { offset: u64, count: usize },
    /// Before serving, delete the first `count` items (total changes too).
    Shift { offset: u64, count: usize },
    /// Serve the page in reverse key order.
    Reverse { offset: u64 },
    /// Sleep before answering.
    Delay { offset: u64, ms: u64 },
    /// The `next` cursor and Link always point back to the first page.
    CursorLoop,
    /// Every listing is empty.
    Empty,
}

impl Fault {
    fn offset(&self) -> Option<u64> {
        match self {
            Fault::Status { offset, .. }
            | Fault::Malformed { offset }
            | Fault::NoItems { offset }
            | Fault::Truncate { offset, .. }
            | Fault::Repeat { offset, .. }
            | Fault::ShiftKeepTotal { offset, .. }
            | Fault::Shift { offset, .. }
            | Fault::Reverse { offset }
            | Fault::Delay { offset, .. } => Some(*offset),
            Fault::CursorLoop
            | Fault::Empty
            | Fault::CapLimit { .. }
            | Fault::SlowGet { .. }
            | Fault::Unlisted { .. } => None,
        }
    }
}

/// A change a test makes to a collection between list requests, to play a
/// busy upstream. Called with the number of the list request about to be
/// served (1-based) and the collection.
pub type ChurnHook = Box<dyn FnMut(u64, &mut Churn<'_>) + Send>;

/// A collection, as a [`ChurnHook`] may change it. Items stay ordered by key.
pub struct Churn<'a> {
    items: &'a mut Vec<Item>,
    key_field: &'a str,
}

impl Churn<'_> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The key of the item at `index`.
    pub fn key(&self, index: usize) -> &str {
        &self.items[index].key
    }

    /// Removes the item at `index`; returns its key.
    pub fn remove(&mut self, index: usize) -> String {
        self.items.remove(index).key
    }

    /// Adds or replaces an item, in key order.
    pub fn put(&mut self, item: Json) {
        let item = Item::new(item, self.key_field);
        match self.items.binary_search_by(|i| by_key(i, &item)) {
            Ok(at) => self.items[at] = item,
            Err(at) => self.items.insert(at, item),
        }
    }
}

/// The listing's order: keys that are JSON integers numerically, then
/// string keys bytewise (a total order, whatever a collection mixes).
fn by_key(a: &Item, b: &Item) -> std::cmp::Ordering {
    let rank = |i: &Item| match i.number {
        Some(n) => (false, n),
        None => (true, 0),
    };
    rank(a).cmp(&rank(b)).then_with(|| a.key.cmp(&b.key))
}

impl Item {
    fn new(j: Json, key: &str) -> Item {
        Item {
            key: match &j[key] {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            },
            number: j[key].as_i64(),
            json: j.to_string(),
        }
    }
}

/// The sample upstream's data and faults, shared with its handlers.
#[derive(Default)]
pub struct SampleUpstream {
    collections: RwLock<HashMap<String, Vec<Item>>>,
    faults: Mutex<Vec<Fault>>,
    /// List requests served, for tests.
    requests: Mutex<u64>,
    /// A total announced instead of the real one, after `ShiftKeepTotal`.
    stale_total: Mutex<Option<usize>>,
    /// Changes made before each list request, per collection.
    churn: Mutex<HashMap<String, (String, ChurnHook)>>,
    /// Collections whose get-by-key looks items up by another field than
    /// the one they are ordered by.
    get_by: Mutex<HashMap<String, String>>,
    /// Get-by-key requests being answered now, and the most at once, for
    /// tests of an upstream that takes one request at a time.
    gets: Mutex<(u64, u64)>,
}

impl SampleUpstream {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces a collection; `key` is the field holding each item's key.
    pub fn set(&self, collection: &str, key: &str, items: Vec<Json>) {
        let mut items: Vec<Item> = items.into_iter().map(|j| Item::new(j, key)).collect();
        items.sort_by(by_key);
        self.collections
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(collection.to_string(), items);
    }

    /// Adds or replaces one item, in key order (`key`: the field holding
    /// each item's key).
    pub fn upsert(&self, collection: &str, key: &str, item: Json) {
        let mut all = self.collections.write().unwrap_or_else(|p| p.into_inner());
        let items = all.entry(collection.to_string()).or_default();
        Churn {
            items,
            key_field: key,
        }
        .put(item);
    }

    /// The most get-by-key requests answered at once so far.
    pub fn max_concurrent_gets(&self) -> u64 {
        self.gets.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Removes one item by key.
    pub fn remove(&self, collection: &str, key: &str) {
        let mut all = self.collections.write().unwrap_or_else(|p| p.into_inner());
        if let Some(items) = all.get_mut(collection) {
            items.retain(|i| i.key != key);
        }
    }

    /// Calls `hook` before each list request of `collection` is served
    /// (`key` is the field holding each item's key).
    pub fn on_list(&self, collection: &str, key: &str, hook: ChurnHook) {
        self.churn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(collection.to_string(), (key.to_string(), hook));
    }

    /// Makes get-by-key of `collection` look items up by `field` (a list
    /// ordered by something else than its key).
    pub fn get_by(&self, collection: &str, field: &str) {
        self.get_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(collection.to_string(), field.to_string());
    }

    /// Stops calling the hooks set by [`SampleUpstream::on_list`].
    pub fn quiet(&self) {
        self.churn.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The keys of a collection now, in order.
    pub fn keys(&self, collection: &str) -> Vec<String> {
        let all = self.collections.read().unwrap_or_else(|p| p.into_inner());
        all.get(collection)
            .map(|items| items.iter().map(|i| i.key.clone()).collect())
            .unwrap_or_default()
    }

    /// The items of a collection now, in key order.
    pub fn items(&self, collection: &str) -> Vec<Json> {
        let all = self.collections.read().unwrap_or_else(|p| p.into_inner());
        all.get(collection)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| serde_json::from_str(&i.json).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Adds a fault for the following requests.
    pub fn inject(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// List requests served so far.
    pub fn list_requests(&self) -> u64 {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let app = Router::new()
            .route("/0.1/{collection}", get(list))
            .route("/0.1/{collection}/{key}", get(get_one))
            .with_state(self);
        axum::serve(listener, app).await
    }

    /// Binds `addr` and serves in a background task; returns the address.
    pub async fn spawn(self: &Arc<Self>, addr: &str) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.serve(listener).await {
                tracing::error!(error = %e, "sample upstream stopped");
            }
        });
        Ok(local)
    }

    /// Takes the faults that apply to a list request of `limit` rows at
    /// `offset`.
    fn faults_for(&self, offset: u64, limit: u64) -> Vec<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let mut hit = Vec::new();
        let covers = |o: u64| o >= offset && o < offset.saturating_add(limit);
        for f in faults.iter_mut() {
            if f.offset().is_some_and(|o| !covers(o)) {
                continue;
            }
            if let Fault::Status { times, .. } = f {
                if *times == 0 {
                    continue;
                }
                *times -= 1;
            }
            hit.push(f.clone());
        }
        // Shifts happen once.
        faults.retain(|f| !matches!(f, Fault::Shift { offset: o, .. } | Fault::ShiftKeepTotal { offset: o, .. } if covers(*o)));
        hit
    }
}

async fn list(
    State(up): State<Arc<SampleUpstream>>,
    Path(collection): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let request = {
        let mut n = up.requests.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    };
    if let Some((key_field, hook)) = up
        .churn
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&collection)
    {
        let mut all = up.collections.write().unwrap_or_else(|p| p.into_inner());
        if let Some(items) = all.get_mut(&collection) {
            hook(
                request,
                &mut Churn {
                    items,
                    key_field: key_field.as_str(),
                },
            );
        }
    }
    let num = |name: &str| q.get(name).and_then(|v| v.parse::<u64>().ok());
    let limit = num("limit")
        .or(num("per_page"))
        .unwrap_or(100)
        .clamp(1, 100_000);
    let offset = match (num("offset"), num("page"), q.get("cursor")) {
        (Some(o), _, _) => o,
        (_, Some(p), _) => p.saturating_sub(1) * limit,
        (_, _, Some(c)) => match c.strip_prefix("c").and_then(|n| n.parse().ok()) {
            Some(o) => o,
            None => return (StatusCode::BAD_REQUEST, "bad cursor").into_response(),
        },
        _ => 0,
    };
    let faults = up.faults_for(offset, limit);
    let limit = faults
        .iter()
        .find_map(|f| match f {
            Fault::CapLimit { max } => Some(limit.min(*max).max(1)),
            _ => None,
        })
        .unwrap_or(limit);
    let mut serve_offset = offset;
    for f in &faults {
        match f {
            Fault::Status { status, .. } => {
                let code =
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return (code, "injected failure").into_response();
            }
            Fault::Malformed { .. } => return (StatusCode::OK, "{\"items\": [").into_response(),
            Fault::NoItems { .. } => return axum::Json(json!({"total": 1})).into_response(),
            Fault::Delay { ms, .. } => tokio::time::sleep(Duration::from_millis(*ms)).await,
            Fault::Repeat { from, .. } => serve_offset = *from,
            Fault::ShiftKeepTotal { count, .. } | Fault::Shift { count, .. } => {
                let mut all = up.collections.write().unwrap_or_else(|p| p.into_inner());
                if let Some(items) = all.get_mut(&collection) {
                    let before = items.len();
                    let n = (*count).min(before);
                    items.drain(..n);
                    if matches!(f, Fault::ShiftKeepTotal { .. }) {
                        *up.stale_total.lock().unwrap_or_else(|p| p.into_inner()) = Some(before);
                    }
                }
            }
            _ => {}
        }
    }
    let all = up.collections.read().unwrap_or_else(|p| p.into_inner());
    let Some(items) = all.get(&collection) else {
        return (StatusCode::NOT_FOUND, "no such collection").into_response();
    };
    let empty = faults.iter().any(|f| matches!(f, Fault::Empty));
    let mut listed: Vec<&Item> = if empty {
        Vec::new()
    } else {
        items.iter().collect()
    };
    let mut announced = None;
    for f in &faults {
        if let Fault::Unlisted {
            from,
            count,
            counted,
        } = f
        {
            let from = (*from).min(listed.len());
            let end = (from + count).min(listed.len());
            if *counted {
                announced = Some(listed.len());
            }
            listed.drain(from..end);
        }
    }
    let total = listed.len();
    let start = (serve_offset as usize).min(total);
    let end = (start + limit as usize).min(total);
    let mut page: Vec<&Item> = listed[start..end].to_vec();
    for f in &faults {
        match f {
            Fault::Truncate { keep, .. } => page.truncate(*keep),
            Fault::Reverse { .. } => page.reverse(),
            _ => {}
        }
    }
    let looping = faults.iter().any(|f| matches!(f, Fault::CursorLoop));
    let next = if looping {
        Some(0)
    } else if (offset as usize) + (limit as usize) < total {
        Some(offset + limit)
    } else {
        None
    };
    let total = up
        .stale_total
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .or(announced)
        .unwrap_or(total);
    let mut body = String::with_capacity(64 + page.iter().map(|i| i.json.len() + 1).sum::<usize>());
    body.push_str("{\"items\":[");
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&item.json);
    }
    body.push_str(&format!(
        "],\"total\":{total},\"filtered\":{total},\"next\":{}}}",
        next.map_or("null".to_string(), |n| format!("\"c{n}\""))
    ));
    drop(all);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(n) = next {
        // The comma in the target is legal RFC 8288 and trips naive parsers.
        let link = format!(
            "</0.1/{collection}?limit={limit}&offset={n}&fields=uuid,name>; rel=\"next\"; title=\"next, please\""
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            headers.insert(header::LINK, v);
        }
    }
    (StatusCode::OK, headers, body).into_response()
}

async fn get_one(
    State(up): State<Arc<SampleUpstream>>,
    Path((collection, key)): Path<(String, String)>,
) -> Response {
    let slow = up
        .faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find_map(|f| match f {
            Fault::SlowGet { ms } => Some(*ms),
            _ => None,
        });
    {
        let mut gets = up.gets.lock().unwrap_or_else(|p| p.into_inner());
        gets.0 += 1;
        gets.1 = gets.1.max(gets.0);
    }
    if let Some(ms) = slow {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    up.gets.lock().unwrap_or_else(|p| p.into_inner()).0 -= 1;
    let field = up
        .get_by
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&collection)
        .cloned();
    let all = up.collections.read().unwrap_or_else(|p| p.into_inner());
    let found = all.get(&collection).and_then(|items| match &field {
        None => items.iter().find(|i| i.key == key).map(|i| i.json.clone()),
        Some(field) => items
            .iter()
            .find(|i| {
                serde_json::from_str::<Json>(&i.json)
                    .is_ok_and(|j| j[field.as_str()].as_str() == Some(key.as_str()))
            })
            .map(|i| i.json.clone()),
    });
    match found {
        Some(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

/// A UUID-shaped key whose text order follows `i`.
pub fn sample_uuid(tag: u16, i: u64) -> String {
    format!("{:08x}-{tag:04x}-4000-8000-{:012x}", i, i)
}

/// The `i`-th sample tenant.
pub fn tenant(i: u64) -> Json {
    json!({
        "uuid": sample_uuid(0x7e, i),
        "name": format!("Tenant {i}"),
        "slug": format!("tenant{i}"),
    })
}

/// The `i`-th sample user, spread over `tenants` tenants.
pub fn user(i: u64, tenants: u64) -> Json {
    json!({
        "uuid": sample_uuid(0x05, i),
        "tenant_uuid": sample_uuid(0x7e, i % tenants.max(1)),
        "firstname": format!("First{i}"),
        "lastname": format!("Last{}", i % 997),
        "email": format!("user{i}@example.com"),
        "enabled": !i.is_multiple_of(10),
        "extension": 1000 + (i % 9000) as i64,
    })
}

/// Fills `up` with `tenants` tenants and `users` users.
pub fn populate(up: &SampleUpstream, tenants: u64, users: u64) {
    up.set("tenants", "uuid", (0..tenants).map(tenant).collect());
    up.set(
        "users",
        "uuid",
        (0..users).map(|i| user(i, tenants)).collect(),
    );
}

/// Publishes an event the way the sample "bus" does: wazo-bus's body (the
/// name, an origin, a time, and `data`) posted to a driftd webhook source,
/// e.g. `http://127.0.0.1:9750/v1/events/sample_bus`. Returns driftd's
/// answer.
pub async fn publish(
    url: &str,
    token: Option<&str>,
    name: &str,
    data: Json,
) -> anyhow::Result<Json> {
    let body = json!({
        "name": name,
        "origin_uuid": sample_uuid(0x0b, 1),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": data,
    });
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    let answer: Json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
    anyhow::ensure!(status.is_success(), "{url} answered {status}: {answer}");
    Ok(answer)
}

//! The upstream REST API: one HTTP client per resource (connect and total
//! timeouts, jittered retries on transient errors only), a pager that lists
//! the collection page by page under any of the supported pagination
//! schemes, and the get-by-key check used to confirm purge candidates.
//!
//! Invariant: the pager either yields every page of a listing it believes
//! complete, or ends with an error. Loops (a cursor or link seen twice, more
//! pages than `max_pages`), a total that changes while listing or disagrees
//! with the rows listed, and malformed pages are all errors, so nothing
//! downstream can mistake a partial listing for the whole.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LINK, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use secrecy::ExposeSecret;
use serde_json::Value as Json;

use crate::config::{Pagination, UpstreamConfig};
use crate::decode::{Decoded, PageDecoder};
use crate::metrics::Metrics;

/// What can go wrong talking to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: malformed page: {problem}")]
    Malformed { url: String, problem: String },
    #[error("pagination loop: {0}")]
    Loop(String),
    #[error("incomplete listing: {0}")]
    Incomplete(String),
    /// The list changed while it was being paged; listing again may work.
    #[error("incomplete listing: the list moved while it was paged: {0}")]
    Moved(String),
    #[error("bad upstream configuration: {0}")]
    Config(String),
}

impl UpstreamError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            UpstreamError::Transport { .. } => true,
            UpstreamError::Incomplete(_) | UpstreamError::Moved(_) => true,
            _ => false,
        }
    }
}

/// A configured HTTP client for one resource's upstream.
pub struct Client {
    http: reqwest::Client,
    list_url: Url,
    get_template: Option<String>,
    base: Url,
    retries: u32,
    backoff: Duration,
    /// Where request counts and durations go, with the resource name.
    observer: Option<(String, Arc<Metrics>)>,
}

/// What the get-by-key endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Gone,
    /// 2xx, with the body.
    Present(bytes::Bytes),
    /// The key does not survive as a URL path segment.
    Unverifiable,
}

/// What the get-by-key endpoint says of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// 404: the row is gone upstream.
    Gone,
    /// 2xx: the row still exists.
    Present,
    /// The key cannot be put in `get_path` faithfully (`.` and `..` are
    /// resolved away by URL parsing): nothing can be learnt, so the
    /// candidate is kept.
    Unverifiable,
}

impl Client {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            headers.insert(header_name(name)?, header_value(value)?);
        }
        if let Some(token) = &cfg.resolved_token {
            let secret = token.expose_secret();
            let text = if cfg.token_header.eq_ignore_ascii_case("authorization") {
                format!("Bearer {secret}")
            } else {
                secret.to_string()
            };
            let mut value = header_value(&text)?;
            value.set_sensitive(true);
            headers.insert(header_name(&cfg.token_header)?, value);
        }
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(cfg.connect_timeout())
            .timeout(cfg.timeout())
            .user_agent(concat!("driftd/", env!("CARGO_PKG_VERSION")))
            .redirect(same_origin_redirects())
            .build()
            .map_err(|e| UpstreamError::Config(e.to_string()))?;
        let root = cfg.base_url.trim_end_matches('/');
        let list_url = Url::parse(&format!("{root}{}", cfg.list_path))
            .map_err(|e| UpstreamError::Config(format!("list url: {e}")))?;
        let mut list_url = list_url;
        if !cfg.query.is_empty() {
            let mut q = list_url.query_pairs_mut();
            for (k, v) in &cfg.query {
                q.append_pair(k, v);
            }
        }
        let base = Url::parse(&cfg.base_url).map_err(|e| UpstreamError::Config(e.to_string()))?;
        Ok(Self {
            http,
            list_url,
            get_template: cfg.get_path.as_ref().map(|p| format!("{root}{p}")),
            base,
            retries: cfg.retries,
            backoff: Duration::from_millis(cfg.backoff_ms),
            observer: None,
        })
    }

    /// Reports every request to `metrics` under `resource`.
    pub fn observed(mut self, resource: &str, metrics: Arc<Metrics>) -> Self {
        self.observer = Some((resource.to_string(), metrics));
        self
    }

    /// GET with retries on transient failures. Returns the final response's
    /// status, headers and body for any non-transient status.
    async fn get(&self, url: &Url) -> Result<(StatusCode, HeaderMap, bytes::Bytes), UpstreamError> {
        let mut attempt = 0u32;
        loop {
            let outcome = self.try_get(url).await;
            let retry = match &outcome {
                Ok((status, _, _)) => is_transient_status(*status),
                // A refused redirect is refused again: not transient.
                Err(e) => !e.is_redirect(),
            };
            // The wait a response worth retrying asks for with `Retry-After`.
            let asked = match &outcome {
                Ok((_, headers, _)) if retry => retry_after(headers, SystemTime::now()),
                _ => None,
            };
            let too_long = asked.is_some_and(|wait| wait > MAX_RETRY_AFTER);
            if let Some(wait) = asked.filter(|_| too_long) {
                tracing::warn!(%url, retry_after_secs = wait.as_secs(), limit_secs = MAX_RETRY_AFTER.as_secs(), "upstream asks to wait longer than driftd waits; not retrying");
            }
            if !retry || attempt >= self.retries || too_long {
                return match outcome {
                    Ok((status, _, body)) if is_transient_status(status) => {
                        Err(UpstreamError::Status {
                            url: url.to_string(),
                            status: status.as_u16(),
                            body: snippet(&body),
                        })
                    }
                    Ok(ok) => Ok(ok),
                    Err(source) => Err(UpstreamError::Transport {
                        url: url.to_string(),
                        source,
                    }),
                };
            }
            let backoff = backoff_delay(self.backoff, attempt);
            // Never sooner than the upstream asked; a little jitter on top
            // keeps replicas from returning at the same instant.
            let delay = match asked {
                Some(wait) => wait.max(backoff) + wait.mul_f64(0.1 * fastrand::f64()),
                None => backoff,
            };
            tracing::warn!(%url, attempt = attempt + 1, delay_ms = delay.as_millis() as u64, "transient upstream failure, retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn try_get(
        &self,
        url: &Url,
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), reqwest::Error> {
        let started = Instant::now();
        let result = self.fetch(url).await;
        if let Some((resource, metrics)) = &self.observer {
            let status = result.as_ref().ok().map(|(s, _, _)| s.as_u16());
            metrics.upstream_request(resource, status, started.elapsed().as_secs_f64());
        }
        result
    }

    async fn fetch(
        &self,
        url: &Url,
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), reqwest::Error> {
        let resp = self.http.get(url.clone()).send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?;
        Ok((status, headers, body))
    }

    /// GETs `path` (under the base URL) with `params`, retrying transient
    /// failures; the body of a 2xx answer, an error for any other.
    pub async fn get_path(
        &self,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<bytes::Bytes, UpstreamError> {
        let root = self.base.as_str().trim_end_matches('/');
        let mut url = Url::parse(&format!("{root}{path}"))
            .map_err(|e| UpstreamError::Config(format!("url of `{path}`: {e}")))?;
        if !params.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
        }
        let (status, _, body) = self.get(&url).await?;
        if !status.is_success() {
            return Err(UpstreamError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        Ok(body)
    }

    /// Checks one key with the get-by-key endpoint: 404 is gone, 2xx is
    /// present, anything else is an error (and the candidate is kept).
    pub async fn confirm(&self, key: &str) -> Result<Presence, UpstreamError> {
        Ok(match self.fetch_key(key).await? {
            Fetched::Gone => Presence::Gone,
            Fetched::Present(_) => Presence::Present,
            Fetched::Unverifiable => Presence::Unverifiable,
        })
    }

    /// GETs one item by key from `get_path`.
    pub async fn fetch_key(&self, key: &str) -> Result<Fetched, UpstreamError> {
        let template = self
            .get_template
            .as_ref()
            .ok_or_else(|| UpstreamError::Config("no get_path configured".into()))?;
        let encoded = encode_path_segment(key);
        let url = Url::parse(&template.replace("{key}", &encoded))
            .map_err(|e| UpstreamError::Config(format!("get url: {e}")))?;
        // The path must hold the key as given: URL parsing resolves dot
        // segments, which would ask about another resource.
        const PLACEHOLDER: &str = "driftd-key-placeholder";
        let expected = Url::parse(&template.replace("{key}", PLACEHOLDER))
            .map(|u| u.path().replace(PLACEHOLDER, &encoded))
            .map_err(|e| UpstreamError::Config(format!("get url: {e}")))?;
        if url.path() != expected {
            return Ok(Fetched::Unverifiable);
        }
        let (status, _, body) = self.get(&url).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(Fetched::Gone),
            s if s.is_success() => Ok(Fetched::Present(body)),
            s => Err(UpstreamError::Status {
                url: url.to_string(),
                status: s.as_u16(),
                body: snippet(&body),
            }),
        }
    }
}

/// The longest `Retry-After` driftd waits for; asked for longer, it stops
/// retrying and the request fails, rather than come back sooner than asked.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a response's `Retry-After` asks to wait from `now`: delay
/// seconds, or an HTTP date (zero once past). `None` without a readable one.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::from(date.with_timezone(&chrono::Utc));
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Redirects followed in one request, at most.
const MAX_REDIRECTS: usize = 10;

/// Follows redirects within the origin (scheme, host and port) of the
/// request that started the chain, and refuses any other with an error.
/// The token and the configured headers are default headers, sent with
/// every request of the chain; reqwest strips only `Authorization` and
/// cookies on a cross-host hop, so a custom header like `X-Auth-Token`
/// would reach another server. The refusal fails the request, and with it
/// the pass: nothing is purged from a listing that went elsewhere.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.stop();
        };
        if attempt.url().origin() != first.origin() {
            let problem = format!(
                "redirect to `{}` leaves the upstream's origin `{}`; not following it, so credentials stay there",
                attempt.url(),
                first.origin().ascii_serialization()
            );
            return attempt.error(problem);
        }
        if attempt.previous().len() > MAX_REDIRECTS {
            let problem = format!("more than {MAX_REDIRECTS} redirects");
            return attempt.error(problem);
        }
        attempt.follow()
    })
}

fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// `base * 2^attempt`, scaled by a random factor in [0.5, 1.5).
fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(10));
    exp.mul_f64(0.5 + fastrand::f64())
}

fn header_name(name: &str) -> Result<HeaderName, UpstreamError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| UpstreamError::Config(format!("bad header name `{name}`")))
}

fn header_value(value: &str) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_str(value).map_err(|_| UpstreamError::Config("bad header value".into()))
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.replace('\n', " ")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_path_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page<T> {
    /// 1-based position of the page in the listing.
    pub number: u64,
    pub url: String,
    pub items: Vec<T>,
}

/// Where the pager is in the listing.
enum Cursor {
    /// Offset paging. `at` is the next offset to ask for; `anchor` is the
    /// key of the last row listed, which the next page must start with
    /// (each request overlaps the previous page by one row).
    Offset {
        at: u64,
        anchor: Option<Box<str>>,
    },
    /// The first offset page held a single row where more were asked:
    /// either the whole list, or an upstream serving one row per page,
    /// where repeating the last row would make no progress. The page at
    /// offset 1 must be empty.
    OffsetAfterOne,
    /// Page-number paging. `short` remembers a page that held fewer rows
    /// than asked for: a later page with rows means the upstream caps
    /// `per_page` and numbers pages by its own size.
    PageNo {
        page: u64,
        short: Option<(u64, u64)>,
    },
    Token(Option<String>),
    Link(Url),
    Done,
}

/// Lists one upstream collection page by page. See the module doc for the
/// completeness checks.
pub struct Pager {
    client: Arc<Client>,
    cfg: UpstreamConfig,
    at: Cursor,
    pages: u64,
    rows: u64,
    total: Option<u64>,
    /// Cursor tokens and link URLs already followed, to catch loops.
    followed: HashSet<String>,
    started: Instant,
    /// The page after the one being read, asked for and decoded in its own
    /// task meanwhile (offset and page-number paging, where its URL is
    /// known if this page comes back full), so that two pages decode at
    /// once. Used only if the next page turns out to be that URL; it is
    /// then checked as any page is. Asked for only while the pages come
    /// back full (the one before this one was): a short listing asks for
    /// nothing more than without it, and at most two requests are out at
    /// once; the listing's end costs one request more.
    ahead: Option<Fetch>,
    /// Whether the last page held as many rows as asked.
    last_full: bool,
}

/// A page fetched and decoded in its own task (its result boxed: the
/// pager is not generic over the decoder), stopped when dropped unused.
struct Fetch {
    url: Url,
    task: tokio::task::JoinHandle<Box<dyn Any + Send>>,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A page's answer, and its decoding when the status is a success.
type PageAnswer<T> = Result<
    (
        StatusCode,
        HeaderMap,
        bytes::Bytes,
        Option<Result<Decoded<T>, String>>,
    ),
    UpstreamError,
>;

impl Fetch {
    fn start<D: PageDecoder + 'static>(client: &Arc<Client>, url: Url, decoder: &Arc<D>) -> Self {
        let (client, decoder, asked) = (client.clone(), decoder.clone(), url.clone());
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let fetched: PageAnswer<D::Item> = match client.get(&asked).await {
                Ok((status, headers, body)) => {
                    let decoded = status.is_success().then(|| decoder.decode(&body));
                    Ok((status, headers, body, decoded))
                }
                Err(e) => Err(e),
            };
            Box::new(fetched) as Box<dyn Any + Send>
        }));
        Fetch { url, task }
    }

    async fn finish<D: PageDecoder + 'static>(mut self) -> PageAnswer<D::Item> {
        match (&mut self.task).await {
            Ok(done) => match done.downcast::<PageAnswer<D::Item>>() {
                Ok(fetched) => *fetched,
                Err(_) => Err(UpstreamError::Config("page task of another decoder".into())),
            },
            Err(e) => Err(UpstreamError::Config(format!("page task stopped: {e}"))),
        }
    }
}

impl Pager {
    pub fn new(client: Arc<Client>, cfg: UpstreamConfig) -> Self {
        let at = match &cfg.pagination {
            Pagination::Offset { .. } => Cursor::Offset {
                at: 0,
                anchor: None,
            },
            Pagination::Page { first_page, .. } => Cursor::PageNo {
                page: *first_page,
                short: None,
            },
            Pagination::Cursor { .. } => Cursor::Token(None),
            Pagination::Link { .. } => Cursor::Link(client.list_url.clone()),
        };
        Self {
            client,
            cfg,
            at,
            pages: 0,
            rows: 0,
            total: None,
            followed: HashSet::new(),
            started: Instant::now(),
            ahead: None,
            last_full: false,
        }
    }

    /// The URL of the page after this one if this one comes back full.
    fn predicted_next(&self) -> Option<Url> {
        let size = u64::from(self.cfg.page_size);
        let at = match &self.at {
            Cursor::Offset { at, .. } if size > 1 => Cursor::Offset {
                at: at + size - 1,
                anchor: None,
            },
            Cursor::PageNo { page, short: None } => Cursor::PageNo {
                page: page + 1,
                short: None,
            },
            _ => return None,
        };
        Some(self.url_at(&at))
    }

    /// Rows listed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The total the upstream announced, if any.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The next page, or `None` once the listing is complete and checked.
    /// With offset paging, the row a page repeats from the previous one is
    /// checked and dropped here: the items returned are new rows only.
    pub async fn next_page<D: PageDecoder + 'static>(
        &mut self,
        decoder: &Arc<D>,
    ) -> Result<Option<Page<D::Item>>, UpstreamError> {
        if matches!(self.at, Cursor::Done) {
            return Ok(None);
        }
        if self.pages >= self.cfg.max_pages {
            return Err(UpstreamError::Loop(format!(
                "more than {} pages (upstream.max_pages)",
                self.cfg.max_pages
            )));
        }
        let url = self.page_url();
        let this = match self.ahead.take() {
            Some(fetch) if fetch.url == url => fetch,
            _ => Fetch::start(&self.client, url.clone(), decoder),
        };
        if self.cfg.look_ahead && self.last_full && self.pages + 1 < self.cfg.max_pages {
            self.ahead = self
                .predicted_next()
                .map(|next| Fetch::start(&self.client, next, decoder));
        }
        // The page task decodes the body of a success, and only of one.
        let (status, headers, body, decoded) = this.finish::<D>().await?;
        let Some(decoded) = decoded else {
            return Err(UpstreamError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            });
        };
        let malformed = |problem: String| UpstreamError::Malformed {
            url: url.to_string(),
            problem,
        };
        let page = decoded.map_err(malformed)?;
        drop(body);
        self.check_total(page.total.as_ref(), &url)?;
        let next_token = self.next_token(page.next.as_ref()).map_err(malformed)?;
        let mut items = page.items;
        self.last_full = items.len() as u64 == u64::from(self.cfg.page_size);
        self.pages += 1;
        self.advance::<D>(&mut items, next_token, &headers, &url)?;
        self.rows += items.len() as u64;
        if matches!(self.at, Cursor::Done) {
            self.check_complete()?;
        }
        Ok(Some(Page {
            number: self.pages,
            url: url.to_string(),
            items,
        }))
    }

    fn page_url(&self) -> Url {
        self.url_at(&self.at)
    }

    /// The URL of the page at `at`.
    fn url_at(&self, at: &Cursor) -> Url {
        let size = self.cfg.page_size.to_string();
        let mut url = self.client.list_url.clone();
        match (at, &self.cfg.pagination) {
            (
                Cursor::Offset { at, .. },
                Pagination::Offset {
                    limit_param,
                    offset_param,
                },
            ) => {
                url.query_pairs_mut()
                    .append_pair(limit_param, &size)
                    .append_pair(offset_param, &at.to_string());
            }
            (
                Cursor::OffsetAfterOne,
                Pagination::Offset {
                    limit_param,
                    offset_param,
                },
            ) => {
                url.query_pairs_mut()
                    .append_pair(limit_param, &size)
                    .append_pair(offset_param, "1");
            }
            (
                Cursor::PageNo { page, .. },
                Pagination::Page {
                    page_param,
                    per_page_param,
                    ..
                },
            ) => {
                url.query_pairs_mut()
                    .append_pair(per_page_param, &size)
                    .append_pair(page_param, &page.to_string());
            }
            (
                Cursor::Token(token),
                Pagination::Cursor {
                    cursor_param,
                    limit_param,
                    ..
                },
            ) => {
                let mut q = url.query_pairs_mut();
                q.append_pair(limit_param, &size);
                if let Some(t) = token {
                    q.append_pair(cursor_param, t);
                }
            }
            (Cursor::Link(next), Pagination::Link { limit_param }) => {
                url = next.clone();
                if self.pages == 0 {
                    url.query_pairs_mut().append_pair(limit_param, &size);
                }
            }
            _ => {}
        }
        url
    }

    fn check_total(&mut self, total: Option<&Json>, url: &Url) -> Result<(), UpstreamError> {
        let Some(pointer) = &self.cfg.total_pointer else {
            return Ok(());
        };
        let malformed = |problem: String| UpstreamError::Malformed {
            url: url.to_string(),
            problem,
        };
        let total = match total {
            Some(Json::Number(n)) => n
                .as_u64()
                .ok_or_else(|| malformed(format!("total at `{pointer}` is not a count")))?,
            Some(_) => return Err(malformed(format!("total at `{pointer}` is not a number"))),
            None => return Err(malformed(format!("no total at `{pointer}`"))),
        };
        match self.total {
            None => self.total = Some(total),
            Some(first) if first != total => {
                return Err(UpstreamError::Moved(format!(
                    "announced total changed from {first} to {total} while listing"
                )))
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn next_token(&self, next: Option<&Json>) -> Result<Option<String>, String> {
        let Pagination::Cursor { next_pointer, .. } = &self.cfg.pagination else {
            return Ok(None);
        };
        match next {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) if s.is_empty() => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(Json::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(format!("next cursor at `{next_pointer}` is not a string")),
        }
    }

    /// Moves the cursor past the page just read. A listing ends on an empty
    /// page (offset: a page holding only the overlap row; page numbers: a
    /// page with no rows) or when no next cursor or link is given; a short
    /// page never ends it.
    fn advance<D: PageDecoder>(
        &mut self,
        items: &mut Vec<D::Item>,
        token: Option<String>,
        headers: &HeaderMap,
        url: &Url,
    ) -> Result<(), UpstreamError> {
        let asked = u64::from(self.cfg.page_size);
        self.at = match std::mem::replace(&mut self.at, Cursor::Done) {
            Cursor::Offset { at, anchor } => {
                let served = items.len() as u64;
                if let Some(anchor) = anchor {
                    match items.first().map(D::key_of) {
                        Some(first) if first == &*anchor => {
                            items.remove(0);
                        }
                        Some(first) => {
                            return Err(UpstreamError::Moved(format!(
                                "the page at offset {at} starts with `{first}`, not with `{anchor}`, the last row of the previous page"
                            )))
                        }
                        None => {
                            return Err(UpstreamError::Moved(format!(
                                "the page at offset {at} is empty, but `{anchor}`, the last row of the previous page, was there"
                            )))
                        }
                    }
                }
                match items.last() {
                    None => Cursor::Done,
                    Some(_) if at == 0 && served == 1 && asked > 1 => Cursor::OffsetAfterOne,
                    Some(last) => Cursor::Offset {
                        // Ask again from the last row listed: it must come back first.
                        at: at + served - 1,
                        anchor: Some(D::key_of(last).into()),
                    },
                }
            }
            Cursor::OffsetAfterOne if items.is_empty() => Cursor::Done,
            Cursor::OffsetAfterOne => {
                return Err(UpstreamError::Incomplete(format!(
                    "the first page held one row where {asked} were asked, yet more rows follow: the upstream serves one row per page, which offset paging cannot check for a moving list"
                )))
            }
            Cursor::PageNo { page, short } => {
                let n = items.len() as u64;
                if n == 0 {
                    Cursor::Done
                } else {
                    if let Some((short_page, had)) = short {
                        return Err(UpstreamError::Incomplete(format!(
                            "page {short_page} held {had} rows, fewer than the {asked} asked for, yet page {page} has rows: \
                             the upstream caps its page size and its page numbers do not follow ours (set upstream.page_size to at most {had})"
                        )));
                    }
                    Cursor::PageNo {
                        page: page + 1,
                        short: (n < asked).then_some((page, n)),
                    }
                }
            }
            Cursor::Token(_) => match token {
                None => Cursor::Done,
                Some(t) => {
                    if !self.followed.insert(t.clone()) {
                        return Err(UpstreamError::Loop(format!("cursor `{t}` returned twice")));
                    }
                    Cursor::Token(Some(t))
                }
            },
            Cursor::Link(_) => match next_link(headers, url)? {
                None => Cursor::Done,
                Some(next) => {
                    if !same_origin(&next, &self.client.base) {
                        return Err(UpstreamError::Malformed {
                            url: url.to_string(),
                            problem: format!(
                                "next link `{next}` leaves the upstream's origin; not following it"
                            ),
                        });
                    }
                    if !self.followed.insert(next.to_string()) {
                        return Err(UpstreamError::Loop(format!(
                            "next link `{next}` returned twice"
                        )));
                    }
                    Cursor::Link(next)
                }
            },
            Cursor::Done => Cursor::Done,
        };
        Ok(())
    }

    fn check_complete(&self) -> Result<(), UpstreamError> {
        if let Some(total) = self.total {
            if total != self.rows {
                return Err(UpstreamError::Incomplete(format!(
                    "listed {} rows but upstream announced {total}",
                    self.rows
                )));
            }
        }
        Ok(())
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// One link of an RFC 8288 `Link` header: its target and its parameters
/// (names lower-cased, quoted values unquoted).
#[derive(Debug, PartialEq)]
struct LinkValue {
    target: String,
    params: Vec<(String, String)>,
}

/// Parses a `Link` header value. Commas separate links only outside `<...>`
/// and quoted strings, so a target such as `?fields=uuid,name` stays whole.
/// Returns `None` for a value that does not follow the grammar.
fn parse_links(text: &str) -> Option<Vec<LinkValue>> {
    let mut links = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if rest.is_empty() {
            return Some(links);
        }
        let inner = rest.strip_prefix('<')?;
        let close = inner.find('>')?;
        let mut link = LinkValue {
            target: inner[..close].to_string(),
            params: Vec::new(),
        };
        rest = &inner[close + 1..];
        loop {
            rest = rest.trim_start();
            let Some(after) = rest.strip_prefix(';') else {
                break;
            };
            rest = after.trim_start();
            let name_end = rest
                .find(|c: char| c == '=' || c == ';' || c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            let name = rest[..name_end].to_ascii_lowercase();
            rest = rest[name_end..].trim_start();
            let mut value = String::new();
            if let Some(after) = rest.strip_prefix('=') {
                rest = after.trim_start();
                if let Some(quoted) = rest.strip_prefix('"') {
                    let mut chars = quoted.char_indices();
                    let mut end = None;
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                value.extend(chars.next().map(|(_, c)| c));
                            }
                            '"' => {
                                end = Some(i + 1);
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    rest = &quoted[end?..];
                } else {
                    let end = rest
                        .find(|c: char| c == ';' || c == ',' || c.is_whitespace())
                        .unwrap_or(rest.len());
                    value = rest[..end].to_string();
                    rest = &rest[end..];
                }
            }
            if !name.is_empty() {
                link.params.push((name, value));
            }
        }
        links.push(link);
        rest = rest.trim_start();
        if !rest.is_empty() && !rest.starts_with(',') {
            return None;
        }
    }
}

/// Finds the `rel="next"` target in RFC 8288 `Link` headers. A header that
/// cannot be parsed is an error, never "no next page".
fn next_link(headers: &HeaderMap, base: &Url) -> Result<Option<Url>, UpstreamError> {
    let malformed = |problem: String| UpstreamError::Malformed {
        url: base.to_string(),
        problem,
    };
    for value in headers.get_all(LINK) {
        let text = value
            .to_str()
            .map_err(|_| malformed("a Link header is not visible ASCII".into()))?;
        let links = parse_links(text)
            .ok_or_else(|| malformed(format!("unparsable Link header `{text}`")))?;
        for link in links {
            let is_next = link.params.iter().any(|(name, value)| {
                name == "rel"
                    && value
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return base
                    .join(&link.target)
                    .map(Some)
                    .map_err(|e| malformed(format!("bad next link `{}`: {e}", link.target)));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any text as a `Link` header: parsed or refused, never a panic, and
    /// what parses keeps its targets whole.
    #[test]
    fn link_headers_of_any_text_parse_or_are_refused() {
        let pieces = [
            "<",
            ">",
            ";",
            ",",
            "\"",
            "=",
            " ",
            "rel",
            "next",
            "\\",
            "<https://h/p?a=1,2>",
            "rel=\"next\"",
            "é",
            "\u{0}",
            "title*=UTF-8''x",
        ];
        let base = Url::parse("https://h/list").unwrap();
        for seed in 0..20_000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let text: String = (0..rng.usize(0..12))
                .map(|_| pieces[rng.usize(..pieces.len())])
                .collect();
            if let Some(links) = parse_links(&text) {
                for l in &links {
                    assert!(
                        !l.target.contains('>'),
                        "seed {seed}: {text:?} -> {}",
                        l.target
                    );
                }
            }
            if let Ok(v) = HeaderValue::from_str(&text) {
                let mut headers = HeaderMap::new();
                headers.insert(LINK, v);
                let _ = next_link(&headers, &base);
            }
        }
    }

    #[test]
    fn parses_next_links() {
        let base = Url::parse("http://h:1/users?limit=2").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            HeaderValue::from_static(
                r#"<http://h:1/users?page=1>; rel="prev", </users?page=3>; rel="next""#,
            ),
        );
        assert_eq!(
            next_link(&headers, &base).unwrap().unwrap().as_str(),
            "http://h:1/users?page=3"
        );
        assert_eq!(next_link(&HeaderMap::new(), &base).unwrap(), None);
    }

    #[test]
    fn link_targets_may_hold_commas_and_params_may_be_quoted() {
        let base = Url::parse("http://h:1/users").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            HeaderValue::from_static(
                r#"</users?fields=uuid,name&offset=0>; rel="prev first", </users?fields=uuid,name&offset=2>; title="a, b; c"; rel="next""#,
            ),
        );
        assert_eq!(
            next_link(&headers, &base).unwrap().unwrap().as_str(),
            "http://h:1/users?fields=uuid,name&offset=2"
        );
        let links = parse_links(r#"<a>; rel=next, <b>;rel="x \"y\"""#).unwrap();
        assert_eq!(links[0].params, vec![("rel".into(), "next".into())]);
        assert_eq!(links[1].target, "b");
        assert_eq!(links[1].params, vec![("rel".into(), "x \"y\"".into())]);
        assert!(parse_links("a; rel=next").is_none());
        assert!(parse_links(r#"<a>; rel="next"#).is_none());
        let mut bad = HeaderMap::new();
        bad.insert(LINK, HeaderValue::from_static("<a; rel=next"));
        assert!(next_link(&bad, &base).is_err());
    }

    #[test]
    fn encodes_keys_for_paths() {
        assert_eq!(encode_path_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_path_segment("uuid-1_2.3~"), "uuid-1_2.3~");
    }

    #[test]
    fn reads_retry_after_in_seconds_and_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 UTC
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
            retry_after(&headers, now)
        };
        assert_eq!(with("3"), Some(Duration::from_secs(3)));
        assert_eq!(with(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            with("Wed, 21 Oct 2015 07:28:05 GMT"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(with("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(with("-1"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_grows_with_jitter() {
        let base = Duration::from_millis(100);
        let d0 = backoff_delay(base, 0);
        let d3 = backoff_delay(base, 3);
        assert!(d0 >= Duration::from_millis(50) && d0 < Duration::from_millis(150));
        assert!(d3 >= Duration::from_millis(400) && d3 < Duration::from_millis(1200));
    }
}

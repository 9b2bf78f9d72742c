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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LINK, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use secrecy::ExposeSecret;
use serde_json::Value as Json;

use crate::config::{Pagination, UpstreamConfig};
use crate::decode::PageDecoder;
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
            UpstreamError::Incomplete(_) => true,
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

/// The result of a get-by-key confirmation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// 404: the row is gone upstream.
    Gone,
    /// 2xx: the row still exists.
    Present,
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

    /// Checks one key with the get-by-key endpoint: 404 is gone, 2xx is
    /// present, anything else is an error (and the candidate is kept).
    pub async fn confirm(&self, key: &str) -> Result<Presence, UpstreamError> {
        let template = self
            .get_template
            .as_ref()
            .ok_or_else(|| UpstreamError::Config("no get_path configured".into()))?;
        let url = Url::parse(&template.replace("{key}", &encode_path_segment(key)))
            .map_err(|e| UpstreamError::Config(format!("get url: {e}")))?;
        let (status, _, body) = self.get(&url).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(Presence::Gone),
            s if s.is_success() => Ok(Presence::Present),
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
    Offset(u64),
    PageNo(u64),
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
}

impl Pager {
    pub fn new(client: Arc<Client>, cfg: UpstreamConfig) -> Self {
        let at = match &cfg.pagination {
            Pagination::Offset { .. } => Cursor::Offset(0),
            Pagination::Page { first_page, .. } => Cursor::PageNo(*first_page),
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
        }
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
    pub async fn next_page<D: PageDecoder>(
        &mut self,
        decoder: &D,
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
        let (status, headers, body) = self.client.get(&url).await?;
        if !status.is_success() {
            return Err(UpstreamError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        let malformed = |problem: String| UpstreamError::Malformed {
            url: url.to_string(),
            problem,
        };
        let page = decoder.decode(&body).map_err(malformed)?;
        drop(body);
        self.check_total(page.total.as_ref()).map_err(malformed)?;
        let next_token = self.next_token(page.next.as_ref()).map_err(malformed)?;
        let items = page.items;
        let n = items.len() as u64;
        self.pages += 1;
        self.rows += n;
        self.advance(n, next_token, &headers, &url)?;
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
        let size = self.cfg.page_size.to_string();
        let mut url = self.client.list_url.clone();
        match (&self.at, &self.cfg.pagination) {
            (
                Cursor::Offset(off),
                Pagination::Offset {
                    limit_param,
                    offset_param,
                },
            ) => {
                url.query_pairs_mut()
                    .append_pair(limit_param, &size)
                    .append_pair(offset_param, &off.to_string());
            }
            (
                Cursor::PageNo(p),
                Pagination::Page {
                    page_param,
                    per_page_param,
                    ..
                },
            ) => {
                url.query_pairs_mut()
                    .append_pair(per_page_param, &size)
                    .append_pair(page_param, &p.to_string());
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

    fn check_total(&mut self, total: Option<&Json>) -> Result<(), String> {
        let Some(pointer) = &self.cfg.total_pointer else {
            return Ok(());
        };
        let total = match total {
            Some(Json::Number(n)) => n
                .as_u64()
                .ok_or_else(|| format!("total at `{pointer}` is not a count"))?,
            Some(_) => return Err(format!("total at `{pointer}` is not a number")),
            None => return Err(format!("no total at `{pointer}`")),
        };
        match self.total {
            None => self.total = Some(total),
            Some(first) if first != total => {
                return Err(format!(
                    "announced total changed from {first} to {total} while listing; the list changed under the pager"
                ))
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

    fn advance(
        &mut self,
        n: u64,
        token: Option<String>,
        headers: &HeaderMap,
        url: &Url,
    ) -> Result<(), UpstreamError> {
        let full = n >= u64::from(self.cfg.page_size);
        self.at = match &self.at {
            Cursor::Offset(off) if full => Cursor::Offset(off + n),
            Cursor::PageNo(p) if full => Cursor::PageNo(p + 1),
            Cursor::Offset(_) | Cursor::PageNo(_) => Cursor::Done,
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

/// Finds the `rel="next"` target in RFC 8288 `Link` headers.
fn next_link(headers: &HeaderMap, base: &Url) -> Result<Option<Url>, UpstreamError> {
    for value in headers.get_all(LINK) {
        let Ok(text) = value.to_str() else { continue };
        for link in text.split(",") {
            let link = link.trim();
            let Some(end) = link.find('>') else { continue };
            if !link.starts_with('<') {
                continue;
            }
            let target = &link[1..end];
            let is_next = link[end + 1..].split(';').any(|param| {
                let param = param.trim();
                param
                    .strip_prefix("rel=")
                    .map(|v| {
                        v.trim_matches('"')
                            .split_whitespace()
                            .any(|r| r.eq_ignore_ascii_case("next"))
                    })
                    .unwrap_or(false)
            });
            if is_next {
                return base
                    .join(target)
                    .map(Some)
                    .map_err(|e| UpstreamError::Malformed {
                        url: base.to_string(),
                        problem: format!("bad next link `{target}`: {e}"),
                    });
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

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

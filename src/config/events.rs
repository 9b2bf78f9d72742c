//! The live half's settings: event sources (a RabbitMQ queue, a Redis
//! stream, a webhook) and how their messages map onto resources.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Deserialize;

use super::{check_pointer, problem, FieldProblem};

/// One event source, `[sources.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `rabbitmq`, `redis` or `webhook`.
    pub kind: SourceKind,
    /// The message header (for a Redis stream: the entry's field) holding
    /// the event name (default `name`, as wazo-bus sends it), unless
    /// `name_pointer` is set.
    #[serde(default)]
    pub name_header: Option<String>,
    /// A JSON pointer to the event name in the body, instead of a header.
    #[serde(default)]
    pub name_pointer: Option<String>,
    /// A JSON pointer to the event's own time (RFC 3339, or seconds since
    /// the epoch), for the lag metric.
    #[serde(default)]
    pub time_pointer: Option<String>,
    /// Events applied in one transaction at most.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// How long the refetches of one batch may take, retries included:
    /// those still waiting then become dead letters and the rest of the
    /// batch applies, so a hung upstream never holds other events longer.
    #[serde(default = "default_refetch_budget")]
    pub refetch_budget_secs: f64,
    /// Event name → what it does.
    #[serde(default)]
    pub events: BTreeMap<String, EventMapping>,
    #[serde(default)]
    pub rabbitmq: Option<RabbitConfig>,
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Control events marking a producer re-sending everything.
    #[serde(default)]
    pub reprovision: Option<ReprovisionConfig>,
}

/// `[sources.<name>.reprovision]`: a producer re-sends every row between a
/// start and a completion event; what it did not re-send is purged then.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReprovisionConfig {
    /// The event name that starts a reprovision.
    pub started: String,
    /// The event name that completes it; without one, `quiet_secs` does.
    #[serde(default)]
    pub completed: Option<String>,
    /// A JSON pointer to the reprovision's id in both events' bodies: a
    /// completion must carry the id of the open reprovision.
    #[serde(default)]
    pub id_pointer: Option<String>,
    /// ... or the header (a stream entry's field) holding it, for control
    /// events that carry no body.
    #[serde(default)]
    pub id_header: Option<String>,
    /// The resources it re-sends (default: every resource the source maps).
    #[serde(default)]
    pub resources: Vec<String>,
    /// Completes after this long without any event from the source (for
    /// producers that send no completion event).
    #[serde(default)]
    pub quiet_secs: Option<f64>,
    /// Abandoned (nothing purged) when not complete this long after it
    /// started.
    #[serde(default = "default_reprovision_timeout")]
    pub timeout_secs: f64,
}

fn default_reprovision_timeout() -> f64 {
    86_400.0
}

fn default_batch() -> usize {
    500
}

fn default_refetch_budget() -> f64 {
    30.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Rabbitmq,
    Redis,
    Webhook,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Rabbitmq => "rabbitmq",
            SourceKind::Redis => "redis",
            SourceKind::Webhook => "webhook",
        }
    }
}

/// The broker side of a `rabbitmq` source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:5672/vhost`; a secret, never logged.
    #[serde(default)]
    pub url: Option<SecretString>,
    /// Or the variable holding it.
    #[serde(default)]
    pub url_env: Option<String>,
    /// The exchange to bind to (declared durable if missing).
    pub exchange: String,
    /// `headers` (wazo-bus), `topic`, `direct` or `fanout`.
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    /// driftd's own queue: durable, never auto-deleted, so nothing
    /// published while driftd is down is lost.
    pub queue: String,
    /// Routing keys to bind with (topic and direct exchanges).
    #[serde(default)]
    pub routing_keys: Vec<String>,
    /// Header matches to bind with (headers exchanges), one binding each;
    /// `x-match` defaults to `all`.
    #[serde(default)]
    pub bind_headers: Vec<BTreeMap<String, String>>,
    /// Unacknowledged messages in flight.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// The longest pause between reconnection attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: f64,
}

impl RabbitConfig {
    /// The broker URL, from `url` or the variable `url_env` names.
    pub fn resolve_url(&self) -> Result<SecretString, String> {
        resolve_url("rabbitmq", &self.url, &self.url_env)
    }

    /// The broker bindings, as `check` prints them.
    pub fn bindings(&self) -> Vec<String> {
        match self.exchange_type.as_str() {
            "headers" if self.bind_headers.is_empty() => vec!["every message".into()],
            "headers" => self
                .bind_headers
                .iter()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect(),
            "fanout" => vec!["every message".into()],
            _ if self.routing_keys.is_empty() => vec!["#".into()],
            _ => self.routing_keys.clone(),
        }
    }
}

/// A URL from the config or from the variable it names; `section` prefixes
/// the error.
fn resolve_url(
    section: &str,
    url: &Option<SecretString>,
    url_env: &Option<String>,
) -> Result<SecretString, String> {
    match (url, url_env) {
        (Some(u), _) => Ok(u.clone()),
        (None, Some(var)) => std::env::var(var)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(SecretString::from)
            .ok_or_else(|| format!("{section}.url_env: environment variable {var} is not set")),
        (None, None) => Err(format!("{section}.url is missing")),
    }
}

/// The server side of a `redis` source: a stream read through a consumer
/// group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:6379/db`; a secret, never logged.
    #[serde(default)]
    pub url: Option<SecretString>,
    /// Or the variable holding it.
    #[serde(default)]
    pub url_env: Option<String>,
    /// The stream's key.
    pub stream: String,
    /// The consumer group (created if absent).
    #[serde(default = "default_group")]
    pub group: String,
    /// This consumer's name in the group. Keep it stable across restarts:
    /// entries read but not acknowledged before a crash are read again
    /// under the same name at start. Default: `driftd-<hostname>`.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Where a group created by driftd starts: `0`, the whole stream (a
    /// mirror wants every entry still kept), or `$`, only new entries.
    #[serde(default = "default_group_start")]
    pub group_start: String,
    /// The entry field holding the JSON body; the other fields are the
    /// message's headers (the event name among them, `name_header`).
    #[serde(default = "default_body_field")]
    pub body_field: String,
    /// How long one XREADGROUP waits for entries.
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// Entries pending this long on another consumer are taken over
    /// (XAUTOCLAIM): that consumer is taken for dead.
    #[serde(default = "default_claim_idle")]
    pub claim_idle_secs: f64,
    /// How often to look for such entries.
    #[serde(default = "default_claim_every")]
    pub claim_every_secs: f64,
    /// An entry delivered more times than this without being settled (it
    /// crashed or hung every consumer that took it) becomes a dead letter.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u64,
    /// The longest pause between reconnection attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: f64,
}

impl RedisConfig {
    /// The server URL, from `url` or the variable `url_env` names.
    pub fn resolve_url(&self) -> Result<SecretString, String> {
        resolve_url("redis", &self.url, &self.url_env)
    }

    /// This consumer's name in the group.
    pub fn consumer_name(&self) -> String {
        if let Some(c) = &self.consumer {
            return c.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "local".into());
        format!("driftd-{host}")
    }
}

fn default_group() -> String {
    "driftd".into()
}

fn default_group_start() -> String {
    "0".into()
}

fn default_body_field() -> String {
    "payload".into()
}

fn default_block_ms() -> u64 {
    2000
}

fn default_claim_idle() -> f64 {
    60.0
}

fn default_claim_every() -> f64 {
    15.0
}

fn default_max_deliveries() -> u64 {
    5
}

fn default_exchange_type() -> String {
    "headers".into()
}

fn default_prefetch() -> u16 {
    1000
}

fn default_max_backoff() -> f64 {
    30.0
}

/// What an event does to a resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMapping {
    pub resource: String,
    pub op: EventOp,
    /// JSON pointer to the key, e.g. `/data/uuid`.
    pub key: String,
    /// JSON pointer to the item that the resource's column mapping reads
    /// (`upsert`), e.g. `/data`.
    #[serde(default)]
    pub payload: String,
    /// JSON pointer to a version or updated-at field: an event older than
    /// the last one applied to the key is skipped as stale.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub version_kind: VersionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventOp {
    /// Columns from the payload.
    Upsert,
    /// By key.
    Delete,
    /// GET the key from upstream, then upsert, or delete on 404.
    Refetch,
}

impl EventOp {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOp::Upsert => "upsert",
            EventOp::Delete => "delete",
            EventOp::Refetch => "refetch",
        }
    }
}

/// How versions compare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// A whole number (JSON number or digits).
    #[default]
    Integer,
    /// An RFC 3339 time.
    Timestamp,
}

impl VersionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionKind::Integer => "integer",
            VersionKind::Timestamp => "timestamp",
        }
    }

    /// The version as text that sorts like the version.
    pub fn sortable(self, json: &serde_json::Value) -> Result<String, String> {
        match self {
            VersionKind::Integer => {
                let n: i64 = match json {
                    serde_json::Value::Number(n) => n.to_string().parse().ok(),
                    serde_json::Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                }
                .ok_or_else(|| format!("version `{json}` is not a whole number"))?;
                // Flip the sign bit: negative numbers sort below positive.
                Ok(format!("{:020}", (n as u64) ^ (1 << 63)))
            }
            VersionKind::Timestamp => match json {
                serde_json::Value::String(s) => version_timestamp(s),
                other => Err(format!("version `{other}` is not an RFC 3339 time")),
            },
        }
    }
}

/// A timestamp version as UTC text that sorts like the time, to the
/// nanosecond: two edits within a microsecond still order (a version is
/// compared, never stored in a column).
fn version_timestamp(raw: &str) -> Result<String, String> {
    let mut t = chrono::DateTime::parse_from_rfc3339(raw)
        .map_err(|e| format!("version `{raw}` is not an RFC 3339 time: {e}"))?
        .with_timezone(&chrono::Utc);
    let nanos = t.timestamp_subsec_nanos();
    if nanos >= 1_000_000_000 {
        // A leap second (`23:59:60`) sorts as the next second.
        t = chrono::DateTime::from_timestamp(t.timestamp() + 1, nanos - 1_000_000_000)
            .ok_or_else(|| format!("version `{raw}` is out of range"))?;
    }
    let year = chrono::Datelike::year(&t);
    if !(1..=9999).contains(&year) {
        return Err(format!("version `{raw}` is outside the years 1 to 9999"));
    }
    Ok(t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string())
}

/// Events the source maps but that its header bindings keep out of the
/// queue (every binding matching on the name header, none on this name).
pub fn unbound_events(src: &SourceConfig) -> Vec<String> {
    let Some(r) = &src.rabbitmq else {
        return Vec::new();
    };
    let header = src.name_header.as_deref().unwrap_or("name");
    if r.exchange_type != "headers"
        || r.bind_headers.is_empty()
        || src.name_pointer.is_some()
        || !r.bind_headers.iter().all(|b| b.contains_key(header))
        || r.bind_headers
            .iter()
            .any(|b| b.get("x-match").is_some_and(|m| m.starts_with("any")))
    {
        return Vec::new();
    }
    src.events
        .keys()
        .filter(|name| !r.bind_headers.iter().any(|b| b.get(header) == Some(*name)))
        .cloned()
        .collect()
}

/// Checks a source against the resources it maps onto.
pub(super) fn validate_source(
    src: &mut SourceConfig,
    resources: &BTreeMap<String, super::ResourceConfig>,
) -> Result<(), FieldProblem> {
    if src.name_header.is_some() && src.name_pointer.is_some() {
        return Err(problem(
            "name_pointer",
            "set either name_header or name_pointer, not both",
        ));
    }
    if let Some(p) = &src.name_pointer {
        check_pointer("name_pointer", p)?;
    }
    if let Some(p) = &src.time_pointer {
        check_pointer("time_pointer", p)?;
    }
    if src.batch_size == 0 || src.batch_size > 10_000 {
        return Err(problem("batch_size", "must be between 1 and 10000"));
    }
    if !(src.refetch_budget_secs > 0.0 && src.refetch_budget_secs <= 3600.0) {
        return Err(problem(
            "refetch_budget_secs",
            "must be more than 0 and at most 3600",
        ));
    }
    if src.events.is_empty() {
        return Err(problem(
            "events",
            "maps no event name to a resource; add [sources.<name>.events.<event>]",
        ));
    }
    let mut kinds: BTreeMap<&str, (VersionKind, &str)> = BTreeMap::new();
    for (name, ev) in &src.events {
        let field = |f: &str| format!("events.{name}.{f}");
        if ev.version.is_some() {
            // One journal of versions per key: kinds cannot mix (every
            // timestamp would sort after every integer).
            match kinds.get(ev.resource.as_str()) {
                Some((kind, other)) if *kind != ev.version_kind => {
                    return Err(problem(
                        &field("version_kind"),
                        format!(
                            "`{}` versions of resource `{}` are {}, but event `{other}` gives it {} versions: one kind per resource",
                            name,
                            ev.resource,
                            ev.version_kind.as_str(),
                            kind.as_str()
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    kinds.insert(ev.resource.as_str(), (ev.version_kind, name.as_str()));
                }
            }
        }
        let Some(res) = resources.get(&ev.resource) else {
            let known: Vec<&str> = resources.keys().map(String::as_str).collect();
            return Err(problem(
                &field("resource"),
                format!(
                    "unknown resource `{}` (known: {})",
                    ev.resource,
                    known.join(", ")
                ),
            ));
        };
        check_pointer(&field("key"), &ev.key)?;
        if ev.key.is_empty() {
            return Err(problem(
                &field("key"),
                "must point at the key in the message",
            ));
        }
        check_pointer(&field("payload"), &ev.payload)?;
        if let Some(v) = &ev.version {
            check_pointer(&field("version"), v)?;
        }
        if ev.op == EventOp::Refetch && res.upstream.get_path.is_none() {
            return Err(problem(
                &field("op"),
                format!(
                    "`refetch` GETs the key from upstream: set resources.{}.upstream.get_path",
                    ev.resource
                ),
            ));
        }
    }
    match (src.kind, &mut src.rabbitmq) {
        (SourceKind::Rabbitmq, None) => {
            return Err(problem(
                "rabbitmq",
                "a rabbitmq source needs [sources.<name>.rabbitmq] with url, exchange and queue",
            ))
        }
        (SourceKind::Webhook | SourceKind::Redis, Some(_)) => {
            return Err(problem("rabbitmq", "is only for kind = \"rabbitmq\""))
        }
        (SourceKind::Rabbitmq, Some(r)) => {
            if r.queue.trim().is_empty() {
                return Err(problem("rabbitmq.queue", "must name driftd's own queue"));
            }
            if !["headers", "topic", "direct", "fanout"].contains(&r.exchange_type.as_str()) {
                return Err(problem(
                    "rabbitmq.exchange_type",
                    "must be headers, topic, direct or fanout",
                ));
            }
            if r.prefetch == 0 {
                return Err(problem("rabbitmq.prefetch", "must be at least 1"));
            }
            if !(r.max_backoff_secs > 0.0 && r.max_backoff_secs <= 3600.0) {
                return Err(problem(
                    "rabbitmq.max_backoff_secs",
                    "must be between 0 and 3600 seconds",
                ));
            }
            match (&r.url, &r.url_env) {
                (Some(_), Some(_)) => {
                    return Err(problem("rabbitmq.url_env", "set url or url_env, not both"))
                }
                (None, None) => {
                    return Err(problem(
                        "rabbitmq.url",
                        "missing: set url (amqp://user:password@host:5672/vhost) or url_env",
                    ))
                }
                // A variable is read when the source starts (`driftd run`),
                // so that `check` and `reconcile` work without it.
                _ => {}
            }
        }
        (SourceKind::Webhook, None) | (SourceKind::Redis, None) => {}
    }
    if let Some(r) = &mut src.reprovision {
        validate_reprovision(r, &src.events)?;
        // A stream entry's id tells a redelivered control event from a new
        // one; other sources' messages have no place: only the id can.
        if src.kind != SourceKind::Redis && r.id_pointer.is_none() && r.id_header.is_none() {
            return Err(problem(
                "reprovision.id_pointer",
                "is needed on a source other than redis: without it, a start or completion delivered again cannot be told from a new one",
            ));
        }
    }
    match (src.kind, &src.redis) {
        (SourceKind::Redis, None) => {
            return Err(problem(
                "redis",
                "a redis source needs [sources.<name>.redis] with url and stream",
            ))
        }
        (SourceKind::Redis, Some(r)) => validate_redis(r)?,
        (_, Some(_)) => return Err(problem("redis", "is only for kind = \"redis\"")),
        (_, None) => {}
    }
    Ok(())
}

fn validate_reprovision(
    r: &mut ReprovisionConfig,
    events: &BTreeMap<String, EventMapping>,
) -> Result<(), FieldProblem> {
    if r.started.trim().is_empty() {
        return Err(problem("reprovision.started", "must name the start event"));
    }
    for (field, name) in [
        ("reprovision.started", Some(&r.started)),
        ("reprovision.completed", r.completed.as_ref()),
    ] {
        if let Some(name) = name {
            if events.contains_key(name) {
                return Err(problem(
                    field,
                    format!("`{name}` is also mapped in events: a control event changes no row"),
                ));
            }
        }
    }
    if r.completed.as_ref() == Some(&r.started) {
        return Err(problem(
            "reprovision.completed",
            "must differ from `started`",
        ));
    }
    if r.completed.is_none() && r.quiet_secs.is_none() {
        return Err(problem(
            "reprovision.completed",
            "set the completion event, or quiet_secs for producers that send none",
        ));
    }
    if let Some(p) = &r.id_pointer {
        check_pointer("reprovision.id_pointer", p)?;
    }
    if r.id_pointer.is_some() && r.id_header.is_some() {
        return Err(problem(
            "reprovision.id_header",
            "set id_pointer (in the body) or id_header, not both",
        ));
    }
    if r.id_header.as_deref().is_some_and(|h| h.trim().is_empty()) {
        return Err(problem("reprovision.id_header", "must not be empty"));
    }
    if let Some(q) = r.quiet_secs {
        if !(q > 0.0 && q <= 86_400.0) {
            return Err(problem(
                "reprovision.quiet_secs",
                "must be between 0 and 86400 seconds",
            ));
        }
    }
    if !(r.timeout_secs > 0.0 && r.timeout_secs <= 7.0 * 86_400.0) {
        return Err(problem(
            "reprovision.timeout_secs",
            "must be between 0 and 604800 seconds (a week)",
        ));
    }
    let mapped: std::collections::BTreeSet<&str> =
        events.values().map(|e| e.resource.as_str()).collect();
    if r.resources.is_empty() {
        r.resources = mapped.iter().map(|s| s.to_string()).collect();
    }
    for res in &r.resources {
        if !mapped.contains(res.as_str()) {
            return Err(problem(
                "reprovision.resources",
                format!("`{res}` is not a resource this source's events map"),
            ));
        }
    }
    Ok(())
}

fn validate_redis(r: &RedisConfig) -> Result<(), FieldProblem> {
    if r.stream.trim().is_empty() {
        return Err(problem("redis.stream", "must name the stream's key"));
    }
    if r.group.trim().is_empty() {
        return Err(problem("redis.group", "must name the consumer group"));
    }
    if r.consumer.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(problem("redis.consumer", "must not be empty"));
    }
    if r.group_start != "0" && r.group_start != "$" {
        return Err(problem(
            "redis.group_start",
            "must be \"0\" (the whole stream) or \"$\" (new entries only)",
        ));
    }
    if r.body_field.is_empty() {
        return Err(problem(
            "redis.body_field",
            "must name the entry's JSON field",
        ));
    }
    if !(1..=60_000).contains(&r.block_ms) {
        return Err(problem("redis.block_ms", "must be between 1 and 60000"));
    }
    for (field, v) in [
        ("redis.claim_idle_secs", r.claim_idle_secs),
        ("redis.claim_every_secs", r.claim_every_secs),
        ("redis.max_backoff_secs", r.max_backoff_secs),
    ] {
        if !(v > 0.0 && v <= 86_400.0) {
            return Err(problem(field, "must be between 0 and 86400 seconds"));
        }
    }
    if r.max_deliveries == 0 {
        return Err(problem("redis.max_deliveries", "must be at least 1"));
    }
    match (&r.url, &r.url_env) {
        (Some(_), Some(_)) => Err(problem("redis.url_env", "set url or url_env, not both")),
        (None, None) => Err(problem(
            "redis.url",
            "missing: set url (redis://host:6379/0) or url_env",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_as_text() {
        let i = |v: serde_json::Value| VersionKind::Integer.sortable(&v).unwrap();
        assert!(i(serde_json::json!(-5)) < i(serde_json::json!(3)));
        assert!(i(serde_json::json!(9)) < i(serde_json::json!(10)));
        assert_eq!(i(serde_json::json!("10")), i(serde_json::json!(10)));
        assert!(VersionKind::Integer
            .sortable(&serde_json::json!(1.5))
            .is_err());
        let t = |v: &str| {
            VersionKind::Timestamp
                .sortable(&serde_json::json!(v))
                .unwrap()
        };
        assert!(t("2026-01-01T10:00:00+02:00") < t("2026-01-01T09:00:00Z"));
        // Nanoseconds are compared, not refused.
        assert!(t("2026-01-01T09:00:00.000000001Z") < t("2026-01-01T09:00:00.000000002Z"));
        assert!(t("2026-01-01T09:00:00.9999999999Z") < t("2026-01-01T09:00:01Z"));
        assert_eq!(
            t("2026-01-01T09:00:00.5Z"),
            t("2026-01-01T09:00:00.500000000Z")
        );
    }
}

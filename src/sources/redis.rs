//! A Redis Streams source: the stream is read through a consumer group
//! (created if absent). An entry is acknowledged (XACK) only after the
//! event engine settled it, so entries read before a crash stay pending
//! and are read again: at start, this consumer first re-reads its own
//! pending entries, in stream order; periodically, it takes over
//! (XAUTOCLAIM) entries left pending too long by a consumer taken for dead.
//! An entry delivered more than `max_deliveries` times without being
//! settled becomes a dead letter instead of being applied again. When the
//! database cannot be used, the batch in hand is retried, in order, until
//! it settles: a database outage does not count as a delivery.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use secrecy::ExposeSecret;
use tracing::Instrument;

use super::SourceContext;
use crate::config::RedisConfig;
use crate::engine::events::Envelope;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause after the database refused a batch; it doubles.
const STORE_PAUSE: Duration = Duration::from_millis(500);

/// One stream entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    /// `None` for an entry still pending whose data was deleted from the
    /// stream (XDEL, trimming).
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

impl Entry {
    /// The message this entry carries: `body_field` as the body, every
    /// other field a header.
    pub fn envelope(&self, body_field: &str) -> Envelope {
        let mut headers = BTreeMap::new();
        let mut body = Vec::new();
        for (k, v) in self.fields.iter().flatten() {
            if k == body_field {
                body = v.clone();
            } else {
                headers.insert(k.clone(), String::from_utf8_lossy(v).into_owned());
            }
        }
        let mut env = Envelope::new(headers, body);
        env.position = Some(self.id.clone());
        env
    }

    /// When the entry was added, seconds since the epoch (from its id).
    pub fn added_at(&self) -> Option<f64> {
        let ms: u64 = self.id.split('-').next()?.parse().ok()?;
        Some(ms as f64 / 1000.0)
    }
}

/// Consumes until shutdown, reconnecting as needed.
pub async fn run(ctx: SourceContext) {
    let span = tracing::info_span!("source", source = %ctx.name, kind = "redis");
    async {
        let Some(redis) = ctx.config.redis.clone() else {
            return;
        };
        let ctx = &ctx;
        let redis = &redis;
        super::keep_consuming(
            ctx,
            redis.resolve_url(),
            redis.max_backoff_secs,
            |url, backoff| async move { consume(ctx, redis, url.expose_secret(), &backoff).await },
        )
        .await
    }
    .instrument(span)
    .await
}

/// Connects to `url` with a response timeout that outlasts a blocking read.
pub async fn connect(url: &str, block: Duration) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(block + Duration::from_secs(10)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// One connection's life. `Ok` on shutdown.
async fn consume(
    ctx: &SourceContext,
    redis: &RedisConfig,
    url: &str,
    backoff: &super::Backoff,
) -> anyhow::Result<()> {
    let block = Duration::from_millis(redis.block_ms);
    let mut con = connect(url, block).await?;
    create_group(&mut con, redis).await?;
    backoff.reset();
    let consumer = redis.consumer_name();
    ctx.status.connected();
    ctx.events.metrics().source_connected(&ctx.name, true);
    tracing::info!(stream = %redis.stream, group = %redis.group, consumer = %consumer, "consuming");
    let count = ctx.config.batch_size;
    // This consumer's own pending entries first (read before a crash, not
    // acknowledged), in stream order.
    let mut cursor = "0".to_string();
    loop {
        let entries = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            r = read_group(&mut con, redis, &consumer, count, None, &cursor) => r?,
        };
        let Some(last) = entries.last() else { break };
        cursor = last.id.clone();
        if !settle(ctx, redis, &mut con, &consumer, entries, true).await? {
            return Ok(());
        }
    }
    let claim_every = Duration::from_secs_f64(redis.claim_every_secs);
    let mut next_claim = Instant::now();
    loop {
        if Instant::now() >= next_claim {
            if !claim(ctx, redis, &mut con, &consumer).await? {
                return Ok(());
            }
            next_claim = Instant::now() + claim_every;
        }
        let wait = block.min(next_claim.saturating_duration_since(Instant::now()));
        let entries = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            r = read_group(&mut con, redis, &consumer, count, Some(wait), ">") => r?,
        };
        if entries.is_empty() {
            // Caught up. Entries still pending on another consumer may
            // re-send rows: a reprovision is not quiet while they wait.
            if ctx.events.reprovisions_of(&ctx.name)
                && others_hold(&mut con, redis, &consumer, "+").await?
            {
                ctx.events.touch(&ctx.name);
            }
        } else if !settle(ctx, redis, &mut con, &consumer, entries, false).await? {
            return Ok(());
        }
    }
}

/// What `driftd replay` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Replayed {
    pub source: String,
    pub from: String,
    pub entries: u64,
    /// Messages per outcome (applied, stale, ignored, dead_lettered).
    pub outcomes: BTreeMap<String, u64>,
}

/// Re-reads `source`'s stream from `from` (default: the start event of its
/// last reprovision) to its end and applies every entry again, outside
/// the consumer group (nothing is acknowledged or claimed): rebuilds a
/// table emptied or damaged by hand. Idempotent: control events already
/// seen are stale, and what cannot be applied is reported, not stored as
/// a dead letter again.
pub async fn replay(
    events: &crate::engine::events::Events,
    source: &str,
    from: Option<String>,
) -> anyhow::Result<Replayed> {
    use crate::store::Ledger;
    let cfg = events
        .settings()
        .sources
        .get(source)
        .ok_or_else(|| anyhow::anyhow!("unknown source `{source}`"))?;
    let Some(redis) = &cfg.redis else {
        anyhow::bail!("source `{source}` is not a redis source: only a stream can be read again");
    };
    let from = match from {
        Some(f) => f,
        None => events
            .store()
            .reprovisions(source, 1)
            .await?
            .pop()
            .and_then(|r| r.position)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no reprovision of source `{source}` has been recorded: give --from (0 reads the whole stream)"
                )
            })?,
    };
    let url = redis
        .resolve_url()
        .map_err(|e| anyhow::anyhow!("sources.{source}.{e}"))?;
    let mut con = connect(url.expose_secret(), Duration::from_secs(1)).await?;
    let mut out = Replayed {
        source: source.to_string(),
        from: from.clone(),
        ..Replayed::default()
    };
    let mut start = from;
    loop {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&redis.stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(cfg.batch_size)
            .query_async(&mut con)
            .await
            .map_err(|e| anyhow::anyhow!("XRANGE on `{}` from {start}: {e}", redis.stream))?;
        let entries = entries(reply)?;
        let Some(last) = entries.last() else { break };
        start = format!("({}", last.id);
        let batch: Vec<Envelope> = entries
            .iter()
            .map(|e| e.envelope(&redis.body_field))
            .collect();
        for v in events.redeliver(source, &batch).await? {
            *out.outcomes.entry(v.outcome.to_string()).or_default() += 1;
        }
        out.entries += entries.len() as u64;
    }
    Ok(out)
}

/// Creates the group (and the stream) unless it exists.
async fn create_group(con: &mut MultiplexedConnection, redis: &RedisConfig) -> anyhow::Result<()> {
    let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&redis.stream)
        .arg(&redis.group)
        .arg(&redis.group_start)
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match created {
        Ok(_) => {
            tracing::info!(stream = %redis.stream, group = %redis.group, start = %redis.group_start, "consumer group created");
            Ok(())
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(anyhow::anyhow!(
            "create group `{}` on stream `{}`: {e}",
            redis.group,
            redis.stream
        )),
    }
}

/// XREADGROUP: new entries (`>`, waiting up to `block`) or this
/// consumer's pending ones after `from`.
async fn read_group(
    con: &mut MultiplexedConnection,
    redis: &RedisConfig,
    consumer: &str,
    count: usize,
    block: Option<Duration>,
    from: &str,
) -> anyhow::Result<Vec<Entry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(&redis.group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(b) = block {
        cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
    }
    cmd.arg("STREAMS").arg(&redis.stream).arg(from);
    let reply: Value = cmd.query_async(con).await.map_err(|e| {
        if e.code() == Some("NOGROUP") {
            anyhow::anyhow!(
                "group `{}` of stream `{}` is gone (the stream was deleted?); it is created again",
                redis.group,
                redis.stream
            )
        } else {
            anyhow::anyhow!("XREADGROUP on `{}`: {e}", redis.stream)
        }
    })?;
    read_reply(reply)
}

/// Takes over entries idle too long on other consumers, and settles them.
/// `false` on shutdown.
async fn claim(
    ctx: &SourceContext,
    redis: &RedisConfig,
    con: &mut MultiplexedConnection,
    consumer: &str,
) -> anyhow::Result<bool> {
    let min_idle = (redis.claim_idle_secs * 1000.0) as u64;
    let mut cursor = "0-0".to_string();
    loop {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&redis.stream)
            .arg(&redis.group)
            .arg(consumer)
            .arg(min_idle)
            .arg(&cursor)
            .arg("COUNT")
            .arg(ctx.config.batch_size)
            .query_async(con)
            .await
            .map_err(|e| anyhow::anyhow!("XAUTOCLAIM on `{}`: {e}", redis.stream))?;
        let (next, entries) = autoclaim_reply(reply)?;
        if !entries.is_empty() {
            tracing::warn!(entries = entries.len(), first = %entries[0].id, "took over entries left pending by another consumer");
            if !settle_now(ctx, redis, con, consumer, entries, true).await? {
                return Ok(false);
            }
        }
        if next == "0-0" {
            return Ok(true);
        }
        cursor = next;
    }
}

/// Settles entries ([`settle_now`]), but holds a reprovision's completion
/// back while another consumer of the group holds entries from before it:
/// they may re-send rows, which the completion would purge. They are
/// taken over (and applied) once idle `claim_idle_secs`. `false` on
/// shutdown.
async fn settle(
    ctx: &SourceContext,
    redis: &RedisConfig,
    con: &mut MultiplexedConnection,
    consumer: &str,
    mut entries: Vec<Entry>,
    redelivered: bool,
) -> anyhow::Result<bool> {
    let completion = ctx
        .events
        .reprovisions_of(&ctx.name)
        .then(|| {
            entries.iter().position(|e| {
                ctx.events
                    .is_completion(&ctx.name, &e.envelope(&redis.body_field))
            })
        })
        .flatten();
    let Some(at) = completion else {
        return settle_now(ctx, redis, con, consumer, entries, redelivered).await;
    };
    let before = format!("({}", entries[at].id);
    if !others_hold(con, redis, consumer, &before).await? {
        return settle_now(ctx, redis, con, consumer, entries, redelivered).await;
    }
    let rest = entries.split_off(at);
    if !entries.is_empty() && !settle_now(ctx, redis, con, consumer, entries, redelivered).await? {
        return Ok(false);
    }
    tracing::warn!(entry = %rest[0].id, "reprovision completion held back: another consumer holds entries from before it; they are taken over once idle claim_idle_secs");
    let pause = Duration::from_secs_f64(redis.claim_every_secs.min(1.0));
    while others_hold(con, redis, consumer, &before).await? {
        if !claim(ctx, redis, con, consumer).await? {
            return Ok(false);
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
    }
    settle_now(ctx, redis, con, consumer, rest, redelivered).await
}

/// Whether a consumer of the group other than `consumer` holds pending
/// entries up to `end` (an XPENDING range end: `+`, or `(id`).
async fn others_hold(
    con: &mut MultiplexedConnection,
    redis: &RedisConfig,
    consumer: &str,
    end: &str,
) -> anyhow::Result<bool> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(&redis.stream)
        .arg(&redis.group)
        .arg("-")
        .arg(end)
        .arg(1000)
        .query_async(con)
        .await
        .map_err(|e| anyhow::anyhow!("XPENDING on `{}`: {e}", redis.stream))?;
    for row in array(reply)? {
        let row = array(row)?;
        if let Some(c) = row.get(1) {
            if text(c)? != consumer {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Hands entries to the event engine and acknowledges them once settled;
/// entries read before (`redelivered`) and delivered too often become
/// dead letters. `false` on shutdown.
async fn settle_now(
    ctx: &SourceContext,
    redis: &RedisConfig,
    con: &mut MultiplexedConnection,
    consumer: &str,
    entries: Vec<Entry>,
    redelivered: bool,
) -> anyhow::Result<bool> {
    let counts = if redelivered {
        delivery_counts(con, redis, consumer, &entries).await?
    } else {
        BTreeMap::new()
    };
    let mut apply = Vec::with_capacity(entries.len());
    let mut buried = 0;
    for entry in &entries {
        let env = entry.envelope(&redis.body_field);
        if entry.fields.is_none() {
            tracing::warn!(id = %entry.id, "a pending entry was deleted from the stream; acknowledged without applying");
            continue;
        }
        match counts.get(&entry.id) {
            Some(&n) if n > redis.max_deliveries => {
                let error = format!(
                    "stream entry {} was delivered {n} times without being settled (max_deliveries = {})",
                    entry.id, redis.max_deliveries
                );
                let mut pause = STORE_PAUSE;
                while let Err(e) = ctx.events.bury(&ctx.name, &env, &error).await {
                    if !wait_for_store(ctx, &e, &mut pause).await {
                        return Ok(false);
                    }
                }
                buried += 1;
            }
            _ => apply.push(env),
        }
    }
    if buried > 0 {
        ctx.events.refresh_dead_letters().await;
    }
    let mut pause = STORE_PAUSE;
    while let Err(e) = ctx.events.deliver(&ctx.name, &apply).await {
        if !wait_for_store(ctx, &e, &mut pause).await {
            return Ok(false);
        }
    }
    ctx.status.recovered();
    ctx.events.metrics().source_connected(&ctx.name, true);
    if let Some(t) = entries.last().and_then(Entry::added_at) {
        if ctx.config.time_pointer.is_none() {
            ctx.events.metrics().event_lag(&ctx.name, unix_now() - t);
        }
    }
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let _: i64 = redis::cmd("XACK")
        .arg(&redis.stream)
        .arg(&redis.group)
        .arg(&ids)
        .query_async(con)
        .await
        .map_err(|e| anyhow::anyhow!("XACK on `{}`: {e}", redis.stream))?;
    ctx.status.settled(entries.len());
    Ok(true)
}

/// Reports the database outage, then sleeps (doubling `pause`, up to 30 s).
/// `false` on shutdown.
async fn wait_for_store(
    ctx: &SourceContext,
    error: &crate::store::StoreError,
    pause: &mut Duration,
) -> bool {
    tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "database unavailable; the batch stays pending and is retried");
    ctx.status.down(&format!("database: {error}"));
    let wait = *pause;
    *pause = (*pause * 2).min(Duration::from_secs(30));
    tokio::select! {
        _ = ctx.shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// How many times each entry was delivered (XPENDING).
async fn delivery_counts(
    con: &mut MultiplexedConnection,
    redis: &RedisConfig,
    consumer: &str,
    entries: &[Entry],
) -> anyhow::Result<BTreeMap<String, u64>> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(BTreeMap::new());
    };
    let reply: Value = redis::cmd("XPENDING")
        .arg(&redis.stream)
        .arg(&redis.group)
        .arg(&first.id)
        .arg(&last.id)
        .arg(entries.len())
        .arg(consumer)
        .query_async(con)
        .await
        .map_err(|e| anyhow::anyhow!("XPENDING on `{}`: {e}", redis.stream))?;
    let mut out = BTreeMap::new();
    for row in array(reply)? {
        let row = array(row)?;
        if let (Some(id), Some(Value::Int(n))) = (row.first(), row.get(3)) {
            out.insert(text(id)?, *n as u64);
        }
    }
    Ok(out)
}

/// Entries of an XREADGROUP/XRANGE-style reply (`Nil` when none came).
pub fn read_reply(reply: Value) -> anyhow::Result<Vec<Entry>> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => array(other)?
            .into_iter()
            .map(|s| {
                let mut pair = array(s)?;
                pair.pop()
                    .ok_or_else(|| anyhow::anyhow!("empty stream reply"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    let mut out = Vec::new();
    for s in streams {
        out.extend(entries(s)?);
    }
    Ok(out)
}

/// A list of `[id, [field, value, ...]]` entries; a deleted one has no
/// field list.
pub fn entries(v: Value) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for e in array(v)? {
        let mut parts = array(e)?.into_iter();
        let id = text(
            &parts
                .next()
                .ok_or_else(|| anyhow::anyhow!("a stream entry without an id"))?,
        )?;
        let fields = match parts.next() {
            None | Some(Value::Nil) => None,
            Some(f) => {
                let flat = array(f)?;
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    fields.push((text(&k)?, bytes(v)?));
                }
                Some(fields)
            }
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

/// The next cursor and the claimed entries of an XAUTOCLAIM reply.
fn autoclaim_reply(v: Value) -> anyhow::Result<(String, Vec<Entry>)> {
    let mut parts = array(v)?.into_iter();
    let next = text(
        &parts
            .next()
            .ok_or_else(|| anyhow::anyhow!("XAUTOCLAIM gave no cursor"))?,
    )?;
    let claimed = match parts.next() {
        Some(v) => entries(v)?,
        None => Vec::new(),
    };
    Ok((next, claimed))
}

fn array(v: Value) -> anyhow::Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => anyhow::bail!("unexpected reply from Redis: {other:?}"),
    }
}

fn text(v: &Value) -> anyhow::Result<String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => anyhow::bail!("unexpected reply from Redis: {other:?}"),
    }
}

fn bytes(v: Value) -> anyhow::Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => anyhow::bail!("unexpected reply from Redis: {other:?}"),
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_with_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("5-1"),
                    Value::Array(vec![bulk("name"), bulk("e"), bulk("payload"), bulk("{}")]),
                ]),
                Value::Array(vec![bulk("6-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_reply(reply).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].fields, None);
        let env = got[0].envelope("payload");
        assert_eq!(env.body, b"{}");
        assert_eq!(env.headers.get("name").map(String::as_str), Some("e"));
        assert_eq!(env.position.as_deref(), Some("5-1"));
        assert_eq!(got[0].added_at(), Some(0.005));
        assert!(read_reply(Value::Nil).unwrap().is_empty());
        assert!(read_reply(Value::Int(3)).is_err());
    }
}

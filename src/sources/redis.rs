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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use secrecy::ExposeSecret;
use tracing::Instrument;

use super::SourceContext;
use crate::config::RedisConfig;
use crate::engine::events::Envelope;
use crate::store::Ledger;
use crate::vocab::LossReason;

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
        let watch = &std::sync::Mutex::new(Watch::default());
        // This source's lease token, for every connection it makes.
        let token = &format!("{}:{}", std::process::id(), uuid::Uuid::new_v4().simple());
        super::keep_consuming(
            ctx,
            redis.resolve_url(),
            redis.max_backoff_secs,
            |url, backoff| async move {
                consume(ctx, redis, url.expose_secret(), &backoff, watch, token).await
            },
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

/// What a source knows of its stream across connections, to tell a loss.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Watch {
    /// The group was read on an earlier connection of this process.
    pub consumed: bool,
    /// The group's `last-delivered-id` at the last check.
    pub last_delivered: Option<(u64, u64)>,
    /// The highest entry this source has read through the group.
    pub read_upto: Option<(u64, u64)>,
    /// The stream's `entries-added` at the last check.
    pub entries_added: Option<u64>,
    /// The stream's `max-deleted-entry-id` at the last check.
    pub max_deleted: Option<(u64, u64)>,
    /// The `max-deleted-entry-id` last reported as a loss.
    pub reported: Option<(u64, u64)>,
    /// Entries of the group known lost (its lag that no entry left in the
    /// stream accounts for), as recorded in the ledger; `None` until read.
    pub lost_total: Option<u64>,
    /// The next count of the lag is a baseline, not a loss: a loss was
    /// reported while Redis could not count it, or the group started anew.
    pub resync: bool,
}

impl Watch {
    /// Whether deleting up to `max_deleted`, seen with the group delivered
    /// up to `last_delivered`, lost entries the group never read (when
    /// Redis cannot count the lag). Certain when a deleted entry lies beyond
    /// what the group was ever given; likely when the deletions moved since
    /// the last check past what the group had been given then (an entry
    /// deleted unread, and read around since). The second may also be an
    /// entry read in between and deleted after: counted too, so a
    /// reprovision never purges on a doubt.
    pub fn lost(&self, max_deleted: (u64, u64), last_delivered: (u64, u64)) -> bool {
        if self.reported == Some(max_deleted) || max_deleted == (0, 0) {
            return false;
        }
        let moved = self.max_deleted.is_some_and(|m| m != max_deleted);
        max_deleted > last_delivered
            || (moved && self.last_delivered.is_some_and(|l| max_deleted > l))
    }

    /// Whether the stream went back in time since the last check: the
    /// group's last delivered entry, or the count of entries ever added,
    /// is lower (Redis restarted from an older snapshot). What was added
    /// after that snapshot is gone, read or not.
    pub fn rolled_back(&self, state: &StreamState) -> bool {
        let delivered_back = matches!(
            (self.last_delivered.max(self.read_upto), state.last_delivered),
            (Some(was), Some(now)) if now < was
        );
        let added_back = matches!(
            (self.entries_added, state.entries_added),
            (Some(was), Some(now)) if now < was
        );
        delivered_back || added_back
    }

    /// Entries trimmed before the group read them and not yet reported:
    /// `(new, total)`, from the group's `lag` (entries added that it has
    /// not read: a trimmed one stays in it, never read) and the entries
    /// left after its last delivered one.
    pub fn trimmed(&self, lag: u64, present: u64) -> Option<(u64, u64)> {
        let total = lag.saturating_sub(present);
        let known = self.lost_total.unwrap_or(0);
        (!self.resync && total > known).then(|| (total - known, total))
    }
}

/// One connection's life. `Ok` on shutdown.
async fn consume(
    ctx: &SourceContext,
    redis: &RedisConfig,
    url: &str,
    backoff: &super::Backoff,
    watch: &std::sync::Mutex<Watch>,
    token: &str,
) -> anyhow::Result<()> {
    let block = Duration::from_millis(redis.block_ms);
    let mut con = connect(url, block).await?;
    let created = create_group(&mut con, redis).await?;
    let consumed_before = lock(watch).consumed;
    if created {
        if consumed_before || ctx.events.reprovision_open(&ctx.name).await? {
            let detail = format!(
                "group `{}` of stream `{}` was created anew at `{}` (Redis restarted without persistence, or the group or stream was deleted): entries added while it was gone were never read",
                redis.group, redis.stream, redis.group_start
            );
            report_loss(ctx, LossReason::GroupRecreated, &detail, 1, None).await?;
            *lock(watch) = Watch::default();
            lock(watch).resync = true;
        } else {
            // A first start: what the stream lost before the group existed
            // is not a loss of driftd's.
            let state = stream_state(&mut con, redis).await?;
            let mut w = lock(watch);
            w.reported = state.max_deleted;
            w.resync = true;
        }
    }
    let consumer = redis.consumer_name();
    // Two processes under one name would take each other's pending
    // entries for their own (and a completion would not wait for re-sends
    // the other holds): the name is leased, and the lease renewed by a
    // task of its own, however long a batch takes to settle.
    let lease = Lease::take(&mut con, redis, &consumer, token).await?;
    let lost = Arc::new(AtomicBool::new(false));
    let _renewal = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        lease.clone().renew(con.clone(), lost.clone()),
    ));
    let result = read_loop(ctx, redis, &mut con, backoff, watch, &consumer, &lost).await;
    if result.is_ok() {
        lease.release(&mut con).await;
    }
    result
}

/// A consumer name's lease: a key holding this process's token, expiring
/// unless renewed.
#[derive(Clone)]
struct Lease {
    key: String,
    token: String,
    ttl: Duration,
}

impl Lease {
    /// Takes the lease of `consumer` for `token` (this source's, the same
    /// across its reconnections, so a lost connection does not lock the
    /// name out until the lease expires), or fails naming who holds it.
    async fn take(
        con: &mut MultiplexedConnection,
        redis: &RedisConfig,
        consumer: &str,
        token: &str,
    ) -> anyhow::Result<Lease> {
        let lease = Lease {
            key: format!(
                "driftd:consumer:{}:{}:{consumer}",
                redis.stream, redis.group
            ),
            token: token.to_string(),
            // A process that died frees its name after this.
            ttl: Duration::from_millis(redis.block_ms + 1_000).max(Duration::from_secs(1)),
        };
        let taken: Value = redis::cmd("SET")
            .arg(&lease.key)
            .arg(&lease.token)
            .arg("NX")
            .arg("PX")
            .arg(lease.ttl.as_millis() as u64)
            .query_async(con)
            .await
            .map_err(|e| anyhow::anyhow!("SET {}: {e}", lease.key))?;
        // Held already: by this source (a connection before this one)?
        let ours = taken != Value::Nil || {
            let held: Option<String> = redis::cmd("GET")
                .arg(&lease.key)
                .query_async(con)
                .await
                .ok()
                .flatten();
            held.as_deref() == Some(token)
        };
        if !ours {
            anyhow::bail!(
                "consumer `{consumer}` of group `{}` is in use by another process (lease `{}`): give each replica its own redis.consumer, or leave it unset (driftd-<host>); retrying",
                redis.group,
                lease.key
            );
        }
        Ok(lease)
    }

    /// Renews the lease a third of its time apart until aborted; sets
    /// `lost` if another process holds it now.
    async fn renew(self, mut con: MultiplexedConnection, lost: Arc<AtomicBool>) {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let renewed: redis::RedisResult<i64> = redis::cmd("EVAL")
                .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
                .arg(1)
                .arg(&self.key)
                .arg(&self.token)
                .arg(self.ttl.as_millis() as u64)
                .query_async(&mut con)
                .await;
            match renewed {
                Ok(1) => {}
                Ok(_) => {
                    tracing::error!(lease = %self.key, "the consumer name's lease was lost (another process holds it): stopping this connection");
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                // The read loop sees a broken connection itself.
                Err(e) => {
                    tracing::warn!(lease = %self.key, error = %e, "cannot renew the consumer name's lease; retrying")
                }
            }
        }
    }

    /// Frees the name for the next process at once (a clean stop).
    async fn release(&self, con: &mut MultiplexedConnection) {
        let freed: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .query_async(con)
            .await;
        if let Err(e) = freed {
            tracing::warn!(lease = %self.key, error = %e, "cannot free the consumer name's lease; it expires by itself");
        }
    }
}

/// Reads the group until shutdown (`Ok`) or a failure, the name leased.
async fn read_loop(
    ctx: &SourceContext,
    redis: &RedisConfig,
    con: &mut MultiplexedConnection,
    backoff: &super::Backoff,
    watch: &std::sync::Mutex<Watch>,
    consumer: &str,
    lost: &AtomicBool,
) -> anyhow::Result<()> {
    let block = Duration::from_millis(redis.block_ms);
    let consumer = consumer.to_string();
    let lease_lost = || {
        if lost.load(Ordering::SeqCst) {
            Err(anyhow::anyhow!(
                "consumer `{consumer}`: another process took its lease"
            ))
        } else {
            Ok(())
        }
    };
    lock(watch).consumed = true;
    check_deletions(ctx, redis, con, watch, false).await?;
    backoff.reset();
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
            r = read_group(con, redis, &consumer, count, None, &cursor) => r?,
        };
        let Some(last) = entries.last() else { break };
        cursor = last.id.clone();
        if !settle(ctx, redis, con, &consumer, entries, true, watch).await? {
            return Ok(());
        }
    }
    let claim_every = Duration::from_secs_f64(redis.claim_every_secs);
    let mut next_claim = Instant::now();
    let reprovisions = ctx.events.reprovisions_of(&ctx.name);
    let mut next_check = Instant::now();
    loop {
        if Instant::now() >= next_claim {
            if !claim(ctx, redis, con, &consumer).await? {
                return Ok(());
            }
            next_claim = Instant::now() + claim_every;
        }
        let wait = block.min(next_claim.saturating_duration_since(Instant::now()));
        // Before reading on: entries deleted unread since the last read
        // are lost, before whatever comes next is settled (under a
        // reprovision at every read, else once a second).
        if reprovisions || Instant::now() >= next_check {
            check_deletions(ctx, redis, con, watch, false).await?;
            next_check = Instant::now() + Duration::from_secs(1);
        }
        lease_lost()?;
        let entries = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            r = read_group(con, redis, &consumer, count, Some(wait), ">") => r?,
        };
        ctx.events.heard(&ctx.name);
        if let Some(last) = entries.last().and_then(|e| stream_id(&e.id)) {
            let mut w = lock(watch);
            w.read_upto = w.read_upto.max(Some(last));
        }
        if entries.is_empty() {
            // Caught up. Entries still pending on another consumer may
            // re-send rows: a reprovision is not quiet while they wait.
            if ctx.events.reprovisions_of(&ctx.name)
                && others_hold(con, redis, &consumer, "+").await?
            {
                ctx.events.touch(&ctx.name);
            }
        } else if !settle(ctx, redis, con, &consumer, entries, false, watch).await? {
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
    /// Entries that could not be read: the stream was trimmed past `from`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
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
    // Entries from `from` on that are gone (trimmed) cannot be applied.
    // (Only if the stream ever lost an entry: it holds fewer than were
    // added.)
    let first = stream_state(&mut con, redis)
        .await
        .ok()
        .filter(|s| s.entries_added.is_some_and(|added| added > s.length))
        .and_then(|s| s.first);
    let asked = from.trim_start_matches('(');
    let asked = stream_id(asked).or_else(|| asked.parse::<u64>().ok().map(|ms| (ms, 0)));
    if let (Some(asked), Some(first)) = (asked, first) {
        if asked > (0, 0) && first > asked {
            out.unreadable = Some(format!(
                "the stream now starts at {}-{}: entries from {from} up to it were trimmed and could not be read",
                first.0, first.1
            ));
        }
    }
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

/// Creates the group (and the stream) unless it exists; `true` when it
/// created it.
async fn create_group(
    con: &mut MultiplexedConnection,
    redis: &RedisConfig,
) -> anyhow::Result<bool> {
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
            Ok(true)
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
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
        let (next, entries, deleted) = autoclaim_reply(reply)?;
        if !deleted.is_empty() {
            let detail = format!(
                "entries pending on another consumer deleted from the stream before they were settled: {}",
                deleted.join(", ")
            );
            report_loss(
                ctx,
                LossReason::DeletedPending,
                &detail,
                deleted.len() as u64,
                deleted
                    .iter()
                    .max_by_key(|d| stream_id(d))
                    .map(String::as_str),
            )
            .await?;
        }
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
    watch: &std::sync::Mutex<Watch>,
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
    // An entry before the completion deleted unread since the last check
    // (even while this batch was read) is a loss of this reprovision.
    check_deletions(ctx, redis, con, watch, true).await?;
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
    let gone: Vec<&str> = entries
        .iter()
        .filter(|e| e.fields.is_none())
        .map(|e| e.id.as_str())
        .collect();
    if !gone.is_empty() {
        let detail = format!(
            "pending entries deleted from the stream before they were settled: {}",
            gone.join(", ")
        );
        report_loss(
            ctx,
            LossReason::DeletedPending,
            &detail,
            gone.len() as u64,
            gone.last().copied(),
        )
        .await?;
    }
    let mut apply = Vec::with_capacity(entries.len());
    let mut buried = 0;
    for entry in &entries {
        let env = entry.envelope(&redis.body_field);
        if entry.fields.is_none() {
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

/// The next cursor, the claimed entries and the ids of pending entries
/// found deleted (Redis 7's third field) of an XAUTOCLAIM reply.
fn autoclaim_reply(v: Value) -> anyhow::Result<(String, Vec<Entry>, Vec<String>)> {
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
    let deleted = match parts.next() {
        Some(v) => array(v)?.iter().map(text).collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    Ok((next, claimed, deleted))
}

/// A stream entry id (`<ms>-<seq>`) as a pair that sorts like the stream.
pub fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn lock(watch: &std::sync::Mutex<Watch>) -> std::sync::MutexGuard<'_, Watch> {
    watch.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tells the engine (metric, log, open reprovision) and the status of a
/// loss.
async fn report_loss(
    ctx: &SourceContext,
    reason: LossReason,
    detail: &str,
    n: u64,
    upto: Option<&str>,
) -> anyhow::Result<()> {
    ctx.status
        .lost(n, &format!("{}: {detail}", reason.as_str()));
    ctx.events.lost(&ctx.name, reason, detail, n, upto).await?;
    Ok(())
}

/// What XINFO says of the stream and the group, to tell a loss.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamState {
    /// `max-deleted-entry-id` (Redis 7): the highest id XDEL removed.
    pub max_deleted: Option<(u64, u64)>,
    /// The group's `last-delivered-id`.
    pub last_delivered: Option<(u64, u64)>,
    /// The group's `lag` (entries added minus entries it read), when Redis
    /// can tell: entries trimmed unread stay in it, as they are never read.
    pub lag: Option<u64>,
    /// Entries in the stream now.
    pub length: u64,
    /// The stream's first entry, if any.
    pub first: Option<(u64, u64)>,
    /// `entries-added`: every entry ever added (Redis 7).
    pub entries_added: Option<u64>,
    /// `last-generated-id`.
    pub last_generated: Option<(u64, u64)>,
}

/// The stream's and the group's state (XINFO STREAM, XINFO GROUPS).
async fn stream_state(
    con: &mut MultiplexedConnection,
    redis: &RedisConfig,
) -> anyhow::Result<StreamState> {
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(&redis.stream)
        .query_async(con)
        .await
        .map_err(|e| anyhow::anyhow!("XINFO STREAM `{}`: {e}", redis.stream))?;
    let info = pairs(info)?;
    let get = |name: &str| info.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let id_of = |v: Option<&Value>| -> Option<(u64, u64)> {
        v.and_then(|v| text(v).ok()).and_then(|t| stream_id(&t))
    };
    let mut state = StreamState {
        max_deleted: id_of(get("max-deleted-entry-id")),
        length: match get("length") {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        },
        first: match get("first-entry") {
            Some(Value::Array(e)) => id_of(e.first()),
            _ => None,
        },
        entries_added: match get("entries-added") {
            Some(Value::Int(n)) if *n >= 0 => Some(*n as u64),
            _ => None,
        },
        last_generated: id_of(get("last-generated-id")),
        ..StreamState::default()
    };
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&redis.stream)
        .query_async(con)
        .await
        .map_err(|e| anyhow::anyhow!("XINFO GROUPS `{}`: {e}", redis.stream))?;
    for g in array(groups)? {
        let g = pairs(g)?;
        let get = |name: &str| g.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if get("name").and_then(|v| text(v).ok()).as_deref() == Some(redis.group.as_str()) {
            state.last_delivered = id_of(get("last-delivered-id"));
            state.lag = match get("lag") {
                Some(Value::Int(n)) if *n >= 0 => Some(*n as u64),
                _ => None,
            };
        }
    }
    Ok(state)
}

/// Entries the stream holds after `after`, and the first of them; `None`
/// past `cap` entries (too far behind to count them now).
async fn present_after(
    con: &mut MultiplexedConnection,
    redis: &RedisConfig,
    after: (u64, u64),
    cap: u64,
) -> anyhow::Result<Option<(u64, Option<(u64, u64)>)>> {
    let mut from = format!("({}-{}", after.0, after.1);
    let (mut n, mut first) = (0u64, None);
    loop {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&redis.stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(cap.clamp(1, 1000) + 1)
            .query_async(con)
            .await
            .map_err(|e| anyhow::anyhow!("XRANGE on `{}`: {e}", redis.stream))?;
        let page = entries(reply)?;
        let Some(last) = page.last() else {
            return Ok(Some((n, first)));
        };
        if first.is_none() {
            first = page.first().and_then(|e| stream_id(&e.id));
        }
        n += page.len() as u64;
        if n > cap {
            return Ok(None);
        }
        from = format!("({}", last.id);
    }
}

/// Entries counted after the last delivered one: at most this many at a
/// routine check (further behind, it waits until driftd caught up); a
/// completion's check counts up to [`EXACT_CAP`].
const ROUTINE_CAP: u64 = 1_000;
const EXACT_CAP: u64 = 500_000;

/// Reports entries the group will never read: trimmed (`MAXLEN`, `MINID`)
/// or deleted (`XDEL`) before it read them, or gone with a Redis that came
/// back from an older snapshot. `exact`: a completion waits on this check,
/// so the entries after the group's position are counted however many.
async fn check_deletions(
    ctx: &SourceContext,
    redis: &RedisConfig,
    con: &mut MultiplexedConnection,
    watch: &std::sync::Mutex<Watch>,
    exact: bool,
) -> anyhow::Result<()> {
    if lock(watch).lost_total.is_none() {
        let known = ctx.events.store().stream_losses(&ctx.name).await?;
        lock(watch).lost_total = Some(known);
    }
    let state = stream_state(con, redis).await?;
    let Some(delivered) = state.last_delivered else {
        return Ok(());
    };
    let read_to = format!("{}-{}", delivered.0, delivered.1);
    if lock(watch).rolled_back(&state) {
        let detail = format!(
            "stream `{}` went back in time (Redis restarted from an older snapshot): group `{}` is back at {read_to}, entries added after the snapshot are gone",
            redis.stream, redis.group
        );
        let upto = lock(watch).last_delivered.map(|(a, b)| format!("{a}-{b}"));
        report_loss(ctx, LossReason::RolledBack, &detail, 1, upto.as_deref()).await?;
        lock(watch).resync = true;
    }
    let known = lock(watch).lost_total.unwrap_or(0);
    // An entry deleted after what the group was given, before it read it.
    let deleted = state.max_deleted.unwrap_or((0, 0));
    if lock(watch).lost(deleted, delivered) {
        let detail = format!(
            "entries of stream `{}` deleted (XDEL) before group `{}` read them: up to {}-{}, the group having read to {read_to}",
            redis.stream, redis.group, deleted.0, deleted.1
        );
        let upto = format!("{}-{}", deleted.0, deleted.1);
        report_loss(ctx, LossReason::Trimmed, &detail, 1, Some(&upto)).await?;
        let mut w = lock(watch);
        w.reported = Some(deleted);
        // The lag may count the same entries: the next count is a baseline.
        w.resync = true;
    }
    match state.lag {
        // Nothing unread beyond what is known lost: nothing to count.
        Some(lag) if lag <= known && !lock(watch).resync => {}
        // Behind: counted once caught up, or when a completion waits on it.
        Some(lag) if !exact && lag - known > ROUTINE_CAP => {}
        Some(lag) => {
            let cap = if exact { EXACT_CAP } else { ROUTINE_CAP };
            match present_after(con, redis, delivered, cap).await? {
                Some((present, first)) => {
                    let trimmed = lock(watch).trimmed(lag, present);
                    let total = lag.saturating_sub(present);
                    if let Some((n, _)) = trimmed {
                        let next = first
                            .or(state.last_generated)
                            .map_or(read_to.clone(), |(a, b)| format!("{a}-{b}"));
                        let detail = format!(
                            "{n} entries of stream `{}` trimmed or deleted before group `{}` read them (it read to {read_to}; the next entry left is {next})",
                            redis.stream, redis.group
                        );
                        // Every entry lost comes before the next one left.
                        report_loss(ctx, LossReason::Trimmed, &detail, n, Some(&next)).await?;
                    }
                    let changed = lock(watch).lost_total != Some(total);
                    if changed {
                        ctx.events
                            .store()
                            .save_stream_losses(&ctx.name, total)
                            .await?;
                    }
                    let mut w = lock(watch);
                    w.lost_total = Some(total);
                    w.resync = false;
                }
                None if exact => {
                    let detail = format!(
                        "more than {EXACT_CAP} entries of stream `{}` wait after group `{}`'s position: what was lost cannot be counted",
                        redis.stream, redis.group
                    );
                    report_loss(ctx, LossReason::Trimmed, &detail, 0, Some(&read_to)).await?;
                }
                None => {}
            }
        }
        // Redis cannot count the lag (after an XDEL past the group's
        // position): the deleted id above is all that tells.
        None => {}
    }
    let mut w = lock(watch);
    w.max_deleted = state.max_deleted;
    w.last_delivered = Some(delivered);
    w.entries_added = state.entries_added;
    Ok(())
}

/// The field/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: Value) -> anyhow::Result<Vec<(String, Value)>> {
    match v {
        Value::Map(m) => m.into_iter().map(|(k, v)| Ok((text(&k)?, v))).collect(),
        other => {
            let flat = array(other)?;
            let mut out = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((text(&k)?, v));
            }
            Ok(out)
        }
    }
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
    fn a_deletion_past_what_the_group_read_is_a_loss() {
        let fresh = Watch::default();
        // Nothing deleted, or only what the group had read.
        assert!(!fresh.lost((0, 0), (0, 0)));
        assert!(!fresh.lost((5, 0), (9, 0)));
        // Deleted beyond what the group was ever given: certain.
        assert!(fresh.lost((12, 0), (9, 0)));
        // Reported once.
        let reported = Watch {
            reported: Some((12, 0)),
            ..Watch::default()
        };
        assert!(!reported.lost((12, 0), (9, 0)));
        // Deleted unread since the last check, and read around since: the
        // group is past it now, but was not at the last check.
        let seen = Watch {
            consumed: true,
            last_delivered: Some((9, 0)),
            max_deleted: Some((5, 0)),
            ..Watch::default()
        };
        assert!(seen.lost((11, 0), (20, 0)));
        // Deletions that did not move, or stayed behind the group.
        assert!(!seen.lost((5, 0), (20, 0)));
        assert!(!seen.lost((8, 0), (20, 0)));
    }

    #[test]
    fn a_lag_no_entry_left_accounts_for_is_trimmed() {
        let mut w = Watch::default();
        // 11 unread by Redis's count, 1 entry left after the group: 10 lost.
        assert_eq!(w.trimmed(11, 1), Some((10, 10)));
        w.lost_total = Some(10);
        assert_eq!(w.trimmed(11, 1), None, "reported once");
        assert_eq!(w.trimmed(13, 1), Some((2, 12)), "two more since");
        // Entries waiting are not lost.
        assert_eq!(Watch::default().trimmed(5, 5), None);
        // A baseline to take, not a loss to report.
        let resync = Watch {
            resync: true,
            ..Watch::default()
        };
        assert_eq!(resync.trimmed(11, 1), None);
    }

    #[test]
    fn a_stream_back_in_time_is_rolled_back() {
        let w = Watch {
            last_delivered: Some((10, 0)),
            read_upto: Some((12, 0)),
            entries_added: Some(40),
            ..Watch::default()
        };
        let now = |delivered: (u64, u64), added: u64| StreamState {
            last_delivered: Some(delivered),
            entries_added: Some(added),
            ..StreamState::default()
        };
        assert!(!w.rolled_back(&now((12, 0), 40)));
        assert!(!w.rolled_back(&now((15, 0), 45)));
        // Behind what this source read, or fewer entries ever added.
        assert!(w.rolled_back(&now((11, 0), 40)));
        assert!(w.rolled_back(&now((12, 0), 39)));
    }

    #[test]
    fn autoclaim_replies_carry_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![bulk("name"), bulk("e")]),
            ])]),
            Value::Array(vec![bulk("3-0"), bulk("4-1")]),
        ]);
        let (next, claimed, deleted) = autoclaim_reply(reply).unwrap();
        assert_eq!(next, "0-0");
        assert_eq!(claimed.len(), 1);
        assert_eq!(deleted, ["3-0", "4-1"]);
        assert_eq!(stream_id("4-1"), Some((4, 1)));
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

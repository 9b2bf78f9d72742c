//! A RabbitMQ source (lapin): driftd's own durable queue (single active
//! consumer, so replicas stand by rather than compete and reorder), bound
//! to the configured exchange, consumed with a prefetch window. Messages are taken
//! in batches (what has arrived, up to `batch_size`), settled by the event
//! engine in one transaction per resource, then acknowledged together. When
//! the database cannot be used, the connection is closed, which hands every
//! unacknowledged message back to the broker in queue order, and nothing is
//! lost or reordered. A lost connection is retried
//! with a growing, jittered pause.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use tracing::Instrument;

use super::SourceContext;
use crate::config::RabbitConfig;
use crate::engine::events::Envelope;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after the database refused a batch, before consuming again.
const STORE_PAUSE: Duration = Duration::from_secs(1);

/// Consumes until shutdown, reconnecting as needed.
pub async fn run(ctx: SourceContext) {
    let span = tracing::info_span!("source", source = %ctx.name, kind = "rabbitmq");
    async {
        let Some(rabbit) = ctx.config.rabbitmq.clone() else {
            return;
        };
        let ctx = &ctx;
        let rabbit = &rabbit;
        super::keep_consuming(
            ctx,
            rabbit.resolve_url(),
            rabbit.max_backoff_secs,
            |url, backoff| async move { consume(ctx, rabbit, url.expose_secret(), &backoff).await },
        )
        .await
    }
    .instrument(span)
    .await
}

/// One connection's life: declare, bind, consume. `Ok` on shutdown.
async fn consume(
    ctx: &SourceContext,
    rabbit: &RabbitConfig,
    url: &str,
    backoff: &super::Backoff,
) -> anyhow::Result<()> {
    let conn = tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer from the broker within {CONNECT_TIMEOUT:?}"))??;
    let channel = conn.create_channel().await?;
    declare(&channel, rabbit).await?;
    channel
        .basic_qos(rabbit.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            rabbit.queue.as_str().into(),
            format!("driftd-{}", ctx.name).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    backoff.reset();
    ctx.status.connected();
    ctx.events.metrics().source_connected(&ctx.name, true);
    tracing::info!(queue = %rabbit.queue, exchange = %rabbit.exchange, "consuming");
    let batch_size = ctx.config.batch_size;
    loop {
        let first = tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                let _ = conn.close(200, "driftd stopping".into()).await;
                return Ok(());
            }
            next = consumer.next() => next,
        };
        let Some(first) = first else {
            anyhow::bail!("the broker ended the consumer");
        };
        let mut deliveries = vec![first?];
        // Whatever else has already arrived joins the batch.
        while deliveries.len() < batch_size {
            match consumer.next().now_or_never() {
                Some(Some(d)) => deliveries.push(d?),
                Some(None) | None => break,
            }
        }
        let envelopes: Vec<Envelope> = deliveries
            .iter()
            .map(|d| Envelope::new(headers(d.properties.headers().as_ref()), d.data.clone()))
            .collect();
        let last = deliveries.last().map(|d| &d.acker);
        let Some(last) = last else { continue };
        match ctx.events.deliver(&ctx.name, &envelopes).await {
            Ok(_) => {
                last.ack(BasicAckOptions { multiple: true }).await?;
                ctx.status.settled(envelopes.len());
            }
            Err(e) => {
                // Not settled. A nack would requeue this batch behind the
                // messages already prefetched after it, which would then
                // apply first (a delete before its create). Closing the
                // channel hands back every unacknowledged message in queue
                // order instead; consuming starts again after a pause.
                tracing::warn!(error = %e, messages = envelopes.len(), "database unavailable; unacknowledged events handed back to the broker in order");
                let _ = channel
                    .close(200, "driftd: database unavailable".into())
                    .await;
                let _ = conn.close(200, "driftd: database unavailable".into()).await;
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(STORE_PAUSE) => {}
                }
                anyhow::bail!("database: {e}");
            }
        }
    }
}

/// Declares the exchange (durable), driftd's own durable queue, and the
/// bindings.
async fn declare(channel: &lapin::Channel, rabbit: &RabbitConfig) -> anyhow::Result<()> {
    let kind = match rabbit.exchange_type.as_str() {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        _ => ExchangeKind::Headers,
    };
    channel
        .exchange_declare(
            rabbit.exchange.as_str().into(),
            kind.clone(),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("declare exchange `{}`: {e}", rabbit.exchange))?;
    // Single active consumer: replicas sharing the queue stand by while
    // one consumes, so events are applied in the order they were queued
    // (two competing consumers could apply a create after its delete).
    let mut queue_args = FieldTable::default();
    queue_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(
            rabbit.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                auto_delete: false,
                exclusive: false,
                ..Default::default()
            },
            queue_args,
        )
        .await
        .map_err(|e| anyhow::anyhow!("declare queue `{}`: {e}", rabbit.queue))?;
    let mut bindings: Vec<(String, FieldTable)> = Vec::new();
    match kind {
        ExchangeKind::Headers => {
            if rabbit.bind_headers.is_empty() {
                // No header to match: every message.
                bindings.push((String::new(), FieldTable::default()));
            }
            for matches in &rabbit.bind_headers {
                let mut args = FieldTable::default();
                if !matches.contains_key("x-match") {
                    args.insert("x-match".into(), AMQPValue::LongString("all".into()));
                }
                for (k, v) in matches {
                    args.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
                }
                bindings.push((String::new(), args));
            }
        }
        ExchangeKind::Fanout => bindings.push((String::new(), FieldTable::default())),
        _ => {
            let keys = if rabbit.routing_keys.is_empty() {
                vec!["#".to_string()]
            } else {
                rabbit.routing_keys.clone()
            };
            for k in keys {
                bindings.push((k, FieldTable::default()));
            }
        }
    }
    for (key, args) in bindings {
        channel
            .queue_bind(
                rabbit.queue.as_str().into(),
                rabbit.exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "bind queue `{}` to `{}`: {e}",
                    rabbit.queue,
                    rabbit.exchange
                )
            })?;
    }
    Ok(())
}

/// A message's headers as text.
fn headers(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(table) = table else {
        return out;
    };
    for (k, v) in table {
        out.insert(k.as_str().to_string(), text(v));
    }
    out
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::Void => String::new(),
        other => format!("{other:?}"),
    }
}

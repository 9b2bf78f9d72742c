//! Events applied per second from RabbitMQ into PostgreSQL, against the
//! floor measured in the same run: a consumer that only acknowledges,
//! draining an identical queue with the same prefetch and batch size.
//!
//! `./scripts/bench.sh events` (starts PostgreSQL and RabbitMQ, then
//! `cargo bench --bench events`). Three queues are bound to one fanout
//! exchange, so they hold the same messages; an ack-only consumer drains
//! one before driftd and one after (the faster is the floor), driftd the
//! third. The messages: wazo-bus-shaped `user_created`
//! events (headers `name`, `origin_uuid`, `timestamp`, `tenant_uuid`, and
//! the body repeating them plus the whole user in `data`), persistent,
//! published with confirms before either consumer starts. Events:
//! `DRIFTD_BENCH_EVENTS` (default 100,000; 2,000 when `cargo test` runs it
//! as a smoke test). Needs `DRIFTD_TEST_AMQP_URL` and `DRIFTD_TEST_PG_URL`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use driftd::sample::user;

mod common;

const PREFETCH: u16 = 1000;
const BATCH: usize = 500;

fn main() {
    let events = common::messages();
    let amqp = common::server("DRIFTD_TEST_AMQP_URL", "events");
    let pg = common::server("DRIFTD_TEST_PG_URL", "events");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(events, &amqp, &pg));
}

async fn run(events: usize, amqp: &str, pg_admin: &str) {
    let tag = format!("{:x}", fastrand::u32(..));
    let exchange = format!("bench-{tag}");
    let floor_queue = format!("bench-ack-only-{tag}");
    let floor_after = format!("bench-ack-only-after-{tag}");
    let driftd_queue = format!("bench-driftd-{tag}");
    let conn = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .expect("connect RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    // As driftd declares its queue: durable, single active consumer.
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    for q in [&floor_queue, &driftd_queue, &floor_after] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .expect("queue");
        ch.queue_bind(
            q.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
    let published = Instant::now();
    publish(&ch, &exchange, events).await;
    println!(
        "driftd events benchmark: {events} wazo-shaped user_created events in each of three queues (published in {:.2} s); prefetch {PREFETCH}, batches of {BATCH}",
        published.elapsed().as_secs_f64()
    );

    // Let the broker finish persisting what it confirmed: a drain that
    // overlaps that work runs slower, whichever consumer it is.
    if events >= 10_000 {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // The floor: a consumer that only acknowledges, once before driftd and
    // once after it (the broker may serve a queue faster or slower for
    // coming first); the faster of the two counts.
    let started = Instant::now();
    ack_only(&conn, &floor_queue, events).await;
    let floor_before = started.elapsed().as_secs_f64();

    // driftd: the worker's RabbitMQ source into PostgreSQL.
    let db = common::fresh_pg_db(pg_admin, "driftd_bench_events").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = Arc::new(
        driftd::config::Settings::from_toml_str(
            &config(&db, amqp, &exchange, &driftd_queue, dir.path()),
            "bench.toml",
        )
        .expect("bench config"),
    );
    // From the moment the worker is up (its database opened, migrated and
    // checked), as the ack-only consumer's clock starts once it is
    // connected.
    let daemon = driftd::daemon::Daemon::start(settings)
        .await
        .expect("driftd starts");
    let started = Instant::now();
    // Done when every event is a row: a counter of applied events could
    // count a redelivered batch twice.
    let pool = sqlx::PgPool::connect(&db).await.expect("bench db");
    let applied_in = until_rows(&pool, events, started).await;
    let sources = reqwest::get(format!("http://{}/v1/sources", daemon.addr))
        .await
        .expect("sources")
        .text()
        .await
        .expect("sources body");
    daemon.stop().await;
    let started = Instant::now();
    ack_only(&conn, &floor_after, events).await;
    let floor_after_s = started.elapsed().as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, events as i64, "every event became a row");
    println!("driftd's source at the end: {sources}");
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    for q in [&floor_queue, &driftd_queue, &floor_after] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }

    common::print_rates("events", events, floor_before, floor_after_s, applied_in);
}

/// Publishes `n` events with confirms, a window at a time.
async fn publish(ch: &lapin::Channel, exchange: &str, n: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut pending = Vec::new();
    for i in 0..n {
        let u = user(i as u64, 100);
        let now = chrono::Utc::now().to_rfc3339();
        let body = serde_json::json!({
            "name": "user_created",
            "origin_uuid": "c0ffee00-0000-4000-8000-000000000001",
            "timestamp": now,
            "data": u,
        });
        let mut headers = BTreeMap::new();
        for (k, v) in [
            ("name", "user_created".to_string()),
            ("origin_uuid", "c0ffee00-0000-4000-8000-000000000001".into()),
            ("timestamp", now),
            (
                "tenant_uuid",
                u["tenant_uuid"].as_str().unwrap_or("").into(),
            ),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default()
                    .with_headers(FieldTable::from(headers))
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == 1000 {
            for c in pending.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
}

/// Drains `queue` acknowledging only, the way driftd's source batches.
async fn ack_only(conn: &Connection, queue: &str, n: usize) {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-ack-only".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut seen = 0;
    while seen < n {
        let first = consumer.next().await.expect("delivery").expect("delivery");
        let mut last = first;
        let mut batch = 1;
        while batch < BATCH {
            match consumer.next().now_or_never() {
                Some(Some(d)) => {
                    last = d.expect("delivery");
                    batch += 1;
                }
                _ => break,
            }
        }
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .expect("ack");
        seen += batch;
    }
    let _ = ch.close(200, "done".into()).await;
}

fn config(db: &str, amqp: &str, exchange: &str, queue: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
{head}
[sources.wazo]
kind = "rabbitmq"
name_header = "name"
time_pointer = "/timestamp"
batch_size = {BATCH}
[sources.wazo.rabbitmq]
url = "{amqp}"
exchange = "{exchange}"
exchange_type = "fanout"
queue = "{queue}"
prefetch = {PREFETCH}
[sources.wazo.events]
user_created = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
"#,
        head = common::worker_config(db, dir)
    )
}

/// Waits until `users` holds `n` rows (every message became a row: a
/// counter of applied messages could count a redelivered batch twice);
/// the seconds since `started`.
pub async fn until_rows(pool: &sqlx::PgPool, n: usize, started: std::time::Instant) -> f64 {
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(pool)
            .await
            .expect("count");
        if rows >= n as i64 {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(600),
            "driftd applied only {rows} of {n} messages in 10 minutes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

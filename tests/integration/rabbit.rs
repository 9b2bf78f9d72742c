//! The RabbitMQ source against a real broker (Debian's rabbitmq-server,
//! started by the test script on loopback): events published as wazo-bus
//! publishes them reach the table within a second; stopping the broker and
//! driftd while events flow loses none; poison is dead-lettered and the
//! queue keeps moving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftd::config::Settings;
use driftd::daemon::Daemon;
use driftd::store::Ledger;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;

/// One broker for the whole suite, and one test uses it at a time: a test
/// that stops it must not fail another's one-second promise.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The broker the test script started. Missing is a failure, not a skip.
fn amqp_url() -> String {
    std::env::var("DRIFTD_TEST_AMQP_URL").unwrap_or_else(|_| {
        panic!("DRIFTD_TEST_AMQP_URL is not set: run the suite with ./scripts/test.sh, which starts RabbitMQ")
    })
}

/// Runs the broker control script (`stop_app`, `start_app`).
fn broker(action: &str) {
    let ctl = std::env::var("DRIFTD_TEST_RABBITMQ_CTL")
        .expect("DRIFTD_TEST_RABBITMQ_CTL is not set: run the suite with ./scripts/test.sh");
    let out = std::process::Command::new(&ctl)
        .arg(action)
        .output()
        .unwrap_or_else(|e| panic!("{ctl} {action}: {e}"));
    assert!(
        out.status.success(),
        "{ctl} {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A unique exchange and queue per test: tests share one broker.
struct Names {
    exchange: String,
    queue: String,
}

fn names() -> Names {
    let n = fastrand::u64(..);
    Names {
        exchange: format!("wazo-headers-{n:x}"),
        queue: format!("driftd-test-{n:x}"),
    }
}

fn source(n: &Names, prefetch: u16) -> String {
    format!(
        r#"
[sources.wazo]
kind = "rabbitmq"
name_header = "name"
time_pointer = "/timestamp"
batch_size = 200
[sources.wazo.rabbitmq]
url = "{url}"
exchange = "{exchange}"
exchange_type = "headers"
queue = "{queue}"
prefetch = {prefetch}
max_backoff_secs = 1
bind_headers = [{{ name = "user_created" }}, {{ name = "user_edited" }}, {{ name = "user_deleted" }}]
[sources.wazo.events]
user_created = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
user_edited = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
user_deleted = {{ resource = "users", op = "delete", key = "/data/uuid" }}
"#,
        url = amqp_url(),
        exchange = n.exchange,
        queue = n.queue,
    )
}

fn settings(
    db: &TestDb,
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    n: &Names,
) -> Arc<Settings> {
    let cfg = ConfigBuilder {
        tail: format!("{}{}", open_worker_tail(dir), source(n, 500)),
        ..ConfigBuilder::default()
    };
    Arc::new(cfg.settings(db, addr))
}

/// Publishes with confirms, as wazo-bus does: headers `name`,
/// `origin_uuid`, `timestamp`, `tenant_uuid`, and the body repeating them
/// plus `data`. Survives the broker going away: a message counts as
/// published once the broker confirmed it.
struct Publisher {
    url: String,
    exchange: String,
    channel: Option<(Connection, lapin::Channel)>,
}

impl Publisher {
    fn new(exchange: &str) -> Self {
        Publisher {
            url: amqp_url(),
            exchange: exchange.to_string(),
            channel: None,
        }
    }

    async fn channel(&mut self) -> Result<&lapin::Channel, lapin::Error> {
        if self
            .channel
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            self.channel = Some((conn, ch));
        }
        Ok(&self.channel.as_ref().expect("set above").1)
    }

    /// Publishes until the broker confirms (retrying while it is down).
    async fn publish(&mut self, name: &str, data: Json) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_publish(name, &data).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot publish {name}: {e}");
                    self.channel = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn try_publish(&mut self, name: &str, data: &Json) -> Result<(), String> {
        let tenant = data["tenant_uuid"].as_str().unwrap_or_default().to_string();
        let body = json!({
            "name": name,
            "origin_uuid": "c0ffee00-0000-4000-8000-000000000001",
            "timestamp": chrono::Utc::now().to_rfc3339(),
            "data": data,
        });
        let mut headers = BTreeMap::new();
        for (k, v) in [
            ("name", name.to_string()),
            (
                "origin_uuid",
                "c0ffee00-0000-4000-8000-000000000001".to_string(),
            ),
            ("timestamp", chrono::Utc::now().to_rfc3339()),
            ("tenant_uuid", tenant),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        headers.insert(
            format!("user_uuid:{}", data["uuid"].as_str().unwrap_or_default()).into(),
            AMQPValue::Boolean(true),
        );
        let exchange = self.exchange.clone();
        let ch = self.channel().await.map_err(|e| e.to_string())?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default()
                    .with_headers(FieldTable::from(headers))
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => Err(format!("not confirmed: {other:?}")),
        }
    }
}

/// Deletes a test's queue and exchange from the shared broker.
async fn drop_queue(n: &Names) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(n.queue.as_str().into(), Default::default())
        .await
        .unwrap();
    ch.exchange_delete(n.exchange.as_str().into(), Default::default())
        .await
        .unwrap();
}

async fn events_on_the_bus_show_up_within_a_second(backend: Backend) {
    let _broker = BROKER.lock().await;
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let n = names();
    let (d, base) = start_connected(settings(&db, addr, dir.path(), &n)).await;
    let mut publisher = Publisher::new(&n.exchange);
    for (i, u) in users(5).into_iter().enumerate() {
        let key = u["uuid"].as_str().unwrap().to_string();
        let published = Instant::now();
        publisher.publish("user_created", u).await;
        eventually(
            Duration::from_secs(1),
            "a published user reaches the table within a second",
            || {
                let db = &db;
                let key = key.clone();
                async move {
                    (db.keys("users").await.contains(&key))
                        .then_some(())
                        .ok_or(format!("event {i} not applied yet"))
                }
            },
        )
        .await;
        assert!(published.elapsed() < Duration::from_secs(1));
    }
    // An event whose name is not bound never reaches driftd's queue; one
    // bound but unmapped would be counted as ignored. A delete applies.
    publisher
        .publish("user_deleted", json!({"uuid": users(1)[0]["uuid"]}))
        .await;
    eventually(Duration::from_secs(2), "the delete applies", || async {
        (db.count("users").await == 4)
            .then_some(())
            .ok_or("not yet".into())
    })
    .await;
    let (_, readyz) = crate::daemon::api("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(readyz["status"], "ready", "{readyz}");
    assert!(d.stop().await);
    drop_queue(&n).await;
}

/// Stopping and restarting the broker, and driftd, while events flow loses
/// none: each published event is applied exactly once in effect.
async fn restarts_of_the_broker_and_driftd_lose_no_event(backend: Backend) {
    let _broker = BROKER.lock().await;
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let n = names();
    let s = settings(&db, addr, dir.path(), &n);
    let (d, _) = start_connected(s.clone()).await;
    let all = users(300);
    let mut expected: BTreeMap<String, Json> = BTreeMap::new();
    let mut publisher = Publisher::new(&n.exchange);
    let mut daemon = Some(d);
    for (i, u) in all.iter().enumerate() {
        let mut u = u.clone();
        // Every third user is edited after its creation.
        publisher.publish("user_created", u.clone()).await;
        if i % 3 == 0 {
            u["firstname"] = json!(format!("Edited{i}"));
            publisher.publish("user_edited", u.clone()).await;
        }
        // Every tenth is deleted again.
        if i % 10 == 9 {
            publisher
                .publish("user_deleted", json!({"uuid": u["uuid"]}))
                .await;
        } else {
            expected.insert(u["uuid"].as_str().unwrap().to_string(), u);
        }
        match i {
            // The broker goes away while events are published (the
            // publisher waits for it) and comes back two seconds later.
            60 | 250 => {
                broker("stop_app");
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    tokio::task::spawn_blocking(|| broker("start_app"))
                        .await
                        .unwrap();
                });
            }
            150 => {
                // driftd stops while events keep coming: they wait in its
                // durable queue.
                if let Some(d) = daemon.take() {
                    assert!(d.stop().await);
                }
            }
            220 => daemon = Some(Daemon::start(s.clone()).await.unwrap()),
            _ => {}
        }
    }
    let d = daemon.expect("running");
    eventually(Duration::from_secs(30), "every event applied", || {
        let db = &db;
        let want = expected.len() as i64;
        async move {
            let n = db.count("users").await;
            (n == want)
                .then_some(())
                .ok_or(format!("{n} rows, want {want}"))
        }
    })
    .await;
    // Settled: wait a little more for stragglers, then compare exactly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_users(&db, &expected, 7).await;
    assert!(d.stop().await);
    // Nothing left in the queue.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            n.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    drop_queue(&n).await;
}

async fn poison_on_the_bus_is_dead_lettered_and_the_queue_moves_on(backend: Backend) {
    let _broker = BROKER.lock().await;
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let n = names();
    let s = settings(&db, addr, dir.path(), &n);
    let (d, _) = start_connected(s.clone()).await;
    let mut publisher = Publisher::new(&n.exchange);
    let all = users(4);
    publisher.publish("user_created", all[0].clone()).await;
    publisher
        .publish("user_created", json!({"firstname": "no uuid"}))
        .await;
    let mut bad = all[1].clone();
    bad["enabled"] = json!("maybe");
    publisher.publish("user_created", bad).await;
    publisher.publish("user_created", all[2].clone()).await;
    eventually(Duration::from_secs(5), "good events applied", || async {
        (db.count("users").await == 2)
            .then_some(())
            .ok_or("not yet".into())
    })
    .await;
    let store = driftd::store::AnyStore::open(&s.store.url, 1)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "poison dead-lettered", || async {
        let n = store
            .list_dead_letters(Some("wazo"), 10)
            .await
            .unwrap()
            .len();
        (n == 2).then_some(()).ok_or(format!("{n} dead letters"))
    })
    .await;
    let letters = store.list_dead_letters(Some("wazo"), 10).await.unwrap();
    assert!(letters
        .iter()
        .all(|l| l.headers.get("name").map(String::as_str) == Some("user_created")));
    assert!(
        letters.iter().any(|l| l.error.contains("enabled")),
        "{letters:?}"
    );
    assert!(d.stop().await);
}

/// Replicas sharing driftd's queue stand by while one consumes (a single
/// active consumer): events are never applied by two consumers racing each
/// other out of order. When the active one stops, another takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_queue_take_turns_in_order() {
    let _broker = BROKER.lock().await;
    let db = TestDb::new(Backend::Postgres).await;
    db.create_users().await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let n = names();
    let s = settings(&db, addr, dir.path(), &n);
    let (a, base_a) = start_connected(s.clone()).await;
    let (b, base_b) = start_connected(s.clone()).await;
    let mut publisher = Publisher::new(&n.exchange);
    // Each user created then deleted: out of order, a create would land
    // after its delete and leave a ghost.
    for u in users(100) {
        publisher.publish("user_created", u.clone()).await;
        publisher
            .publish("user_deleted", json!({"uuid": u["uuid"]}))
            .await;
    }
    let settled = |base: String| async move {
        let (_, v) = crate::daemon::api("GET", &format!("{base}/v1/sources"), None, None).await;
        v["sources"][0]["events"].as_u64().unwrap_or(0)
    };
    eventually(Duration::from_secs(10), "all 200 events settled", || {
        let (a, b) = (base_a.clone(), base_b.clone());
        async move {
            let total = settled(a).await + settled(b).await;
            (total == 200)
                .then_some(())
                .ok_or(format!("{total} settled"))
        }
    })
    .await;
    let (ea, eb) = (settled(base_a.clone()).await, settled(base_b.clone()).await);
    assert!(ea == 0 || eb == 0, "both replicas consumed: {ea} and {eb}");
    assert_eq!(
        db.count("users").await,
        0,
        "a create applied after its delete"
    );
    // The active one stops; the standby takes over.
    let (active, standby, standby_base) = if ea > 0 {
        (a, b, base_b)
    } else {
        (b, a, base_a)
    };
    assert!(active.stop().await);
    publisher.publish("user_created", users(1)[0].clone()).await;
    eventually(Duration::from_secs(10), "the standby applies", || async {
        (db.count("users").await == 1)
            .then_some(())
            .ok_or("not yet".into())
    })
    .await;
    assert_eq!(settled(standby_base).await, 1);
    assert!(standby.stop().await);
    drop_queue(&n).await;
}

both_backends!(
    events_on_the_bus_show_up_within_a_second,
    restarts_of_the_broker_and_driftd_lose_no_event,
    poison_on_the_bus_is_dead_lettered_and_the_queue_moves_on,
);

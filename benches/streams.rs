//! Entries applied per second from a Redis stream into PostgreSQL, against
//! the floor measured in the same run: a consumer group that only reads
//! (XREADGROUP) and acknowledges (XACK), in batches of the same size.
//!
//! `./scripts/bench.sh streams` (starts PostgreSQL and Redis, then
//! `cargo bench --bench streams`). One stream holds the entries; three
//! consumer groups read it from the start: an ack-only one before driftd
//! and one after (the faster is the floor), driftd's own. The entries:
//! wazo-shaped `user_created` events (field `name`, field `payload` with
//! the JSON body: name, origin, timestamp and the whole user in `data`),
//! added before either consumer starts. Entries: `DRIFTD_BENCH_EVENTS`
//! (default 100,000; 2,000 when `cargo test` runs it as a smoke test).
//! Needs `DRIFTD_TEST_REDIS_URL` and `DRIFTD_TEST_PG_URL`.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::Value;

use driftd::sample::user;

mod common;

const BATCH: usize = 500;

fn main() {
    let entries = common::messages();
    let redis_url = common::server("DRIFTD_TEST_REDIS_URL", "streams");
    let pg = common::server("DRIFTD_TEST_PG_URL", "streams");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(entries, &redis_url, &pg));
}

async fn run(n: usize, redis_url: &str, pg_admin: &str) {
    let stream = format!("bench-{:x}", fastrand::u32(..));
    let mut con = redis::Client::open(redis_url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect Redis");
    let added = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let u = user(i as u64, 100);
            let body = serde_json::json!({
                "name": "user_created",
                "origin_uuid": "c0ffee00-0000-4000-8000-000000000001",
                "timestamp": chrono::Utc::now().to_rfc3339(),
                "data": u,
            });
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("name")
                .arg("user_created")
                .arg("payload")
                .arg(body.to_string())
                .ignore();
        }
        let _: () = pipe.query_async(&mut con).await.expect("XADD");
    }
    println!(
        "driftd streams benchmark: {n} wazo-shaped user_created entries in one stream (added in {:.2} s), read by three groups; batches of {BATCH}",
        added.elapsed().as_secs_f64()
    );

    let floor_before = ack_only(&mut con, &stream, "ack-only-before", n).await;

    let db = common::fresh_pg_db(pg_admin, "driftd_bench_streams").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"{head}
[sources.feed]
kind = "redis"
name_header = "name"
time_pointer = "/timestamp"
batch_size = {BATCH}
[sources.feed.redis]
url = "{redis_url}"
stream = "{stream}"
group = "driftd"
consumer = "bench"
[sources.feed.events]
user_created = {{ resource = "users", op = "upsert", key = "/data/uuid", payload = "/data" }}
"#,
        head = common::worker_config(&db, dir.path())
    );
    let settings = Arc::new(
        driftd::config::Settings::from_toml_str(&config, "bench.toml").expect("bench config"),
    );
    // From the moment the worker is up (its database opened, migrated and
    // checked), as the ack-only clock starts once it is connected.
    let daemon = driftd::daemon::Daemon::start(settings)
        .await
        .expect("driftd starts");
    let started = Instant::now();
    // Done when the group has read every entry and holds none unacknowledged
    // (driftd acknowledges after its commit): asked of Redis, so that the
    // wait takes no time from the database it measures. The rows are
    // counted once after.
    let applied_in = until_acked(&mut con, &stream, started).await;
    let pool = sqlx::PgPool::connect(&db).await.expect("bench db");
    daemon.stop().await;
    let pending: Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("driftd")
        .query_async(&mut con)
        .await
        .expect("XPENDING");
    let floor_after = ack_only(&mut con, &stream, "ack-only-after", n).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, n as i64, "every entry became a row");
    if let Value::Array(p) = &pending {
        assert_eq!(
            p.first(),
            Some(&Value::Int(0)),
            "driftd acknowledged every entry: {pending:?}"
        );
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .expect("DEL");

    common::print_rates("entries", n, floor_before, floor_after, applied_in);
}

/// Waits until group `driftd` has read all of `stream` (lag 0) and
/// acknowledged all of it (pending 0); the seconds since `started`.
async fn until_acked(con: &mut MultiplexedConnection, stream: &str, started: Instant) -> f64 {
    loop {
        let groups: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(con)
            .await
            .expect("XINFO GROUPS");
        if group_done(&groups, "driftd") {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(600),
            "driftd did not acknowledge the stream in 10 minutes: {groups:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Whether `group` in an XINFO GROUPS reply has lag 0 and pending 0.
fn group_done(groups: &Value, group: &str) -> bool {
    let Value::Array(groups) = groups else {
        return false;
    };
    groups.iter().any(|g| {
        let fields: Vec<&Value> = match g {
            Value::Array(f) => f.iter().collect(),
            Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => return false,
        };
        let field = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| matches!(kv[0], Value::BulkString(b) if b == name.as_bytes()))
                .map(|kv| kv[1])
        };
        matches!(field("name"), Some(Value::BulkString(b)) if b == group.as_bytes())
            && field("pending") == Some(&Value::Int(0))
            && field("lag") == Some(&Value::Int(0))
    })
}

/// Reads the whole stream through a new group, acknowledging each batch
/// as driftd's source does; the seconds it took.
async fn ack_only(con: &mut MultiplexedConnection, stream: &str, group: &str, n: usize) -> f64 {
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(con)
        .await
        .expect("XGROUP CREATE");
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("ack-only")
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(con)
            .await
            .expect("XREADGROUP");
        let entries = driftd::sources::redis::read_reply(reply).expect("entries");
        assert!(!entries.is_empty(), "the stream ended after {seen} of {n}");
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&ids)
            .query_async(con)
            .await
            .expect("XACK");
        seen += entries.len();
    }
    started.elapsed().as_secs_f64()
}

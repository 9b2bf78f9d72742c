//! What a reprovision counts as re-sent: a completion or start delivered
//! again, re-sends pending on a dead consumer, re-sends that fail, two
//! sources writing one table, and replays that would store dead letters
//! again.

use std::time::Duration;

use driftd::config::Settings;
use driftd::engine::events::Envelope;
use driftd::store::Ledger;
use serde_json::{json, Value as Json};

use crate::both_backends;
use crate::common::*;
use crate::streams::{add, key, redis, settings, setup, source, stream_name, Setup};

/// A message as the Redis source hands it over: name header, JSON body,
/// the stream entry id as its position.
fn entry(pos: u64, name: &str, data: &Json) -> Envelope {
    let mut env = Envelope::new(
        [("name".to_string(), name.to_string())].into(),
        json!({"name": name, "data": data}).to_string().into_bytes(),
    );
    env.position = Some(format!("1700000000000-{pos}"));
    env
}

async fn reprovisions(settings: &Settings, source: &str) -> Vec<driftd::store::Reprovision> {
    let store = driftd::store::AnyStore::open(&settings.store.url, 2)
        .await
        .unwrap();
    store.reprovisions(source, 10).await.unwrap()
}

/// A batch [Completed r1, Started r2, re-send u0] settled but not acked
/// (crash / XACK failure / lost connection) is delivered again. The
/// Completed, read again, completes r2 (no id_pointer), which has re-sent
/// one row so far: every other row is purged, although upstream has them.
async fn redelivered_completion_completes_the_next_reprovision(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\n",
        source(&stream, "")
    );
    let s = settings(&db, addr, dir.path(), &src);
    let events = crate::events::engine(&s).await;
    let all = users(10);
    let mut pos = 0;
    let mut next = || {
        pos += 1;
        pos
    };
    let mut first: Vec<Envelope> = all
        .iter()
        .map(|u| entry(next(), "user_created", u))
        .collect();
    first.push(entry(next(), "ReprovisionStarted", &json!({})));
    first.extend(all.iter().map(|u| entry(next(), "user_created", u)));
    events.deliver("bus", &first).await.unwrap();
    let second = vec![
        entry(next(), "ReprovisionCompleted", &json!({})),
        entry(next(), "ReprovisionStarted", &json!({})),
        entry(next(), "user_created", &all[0]),
    ];
    events.deliver("bus", &second).await.unwrap();
    assert_eq!(db.count("users").await, 10, "r1 re-sent everything");
    // The same batch again, as after a crash before XACK.
    events.deliver("bus", &second).await.unwrap();
    let r = reprovisions(&s, "bus").await;
    let states: Vec<&str> = r.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(
        db.count("users").await,
        10,
        "a redelivered batch purged rows upstream has; reprovisions: {states:?}"
    );
}

/// A row re-sent during a reprovision through a refetch event whose GET
/// fails (upstream briefly unreachable) becomes a dead letter, is not
/// counted as re-sent, and is purged at the completion.
async fn a_resent_row_whose_refetch_failed_is_purged(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    // An upstream that is not there: refetches fail.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_name();
    let src = format!(
        "{}user_touched = {{ resource = \"users\", op = \"refetch\", key = \"/data/uuid\" }}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\nid_pointer = \"/data/id\"\n",
        source(&stream, "")
    );
    let s = settings(&db, dead, dir.path(), &src);
    let events = crate::events::engine(&s).await;
    let all = users(10);
    let mut batch: Vec<Envelope> = all
        .iter()
        .enumerate()
        .map(|(i, u)| entry(i as u64 + 1, "user_created", u))
        .collect();
    batch.push(entry(20, "ReprovisionStarted", &json!({"id": "r1"})));
    for (i, u) in all[..9].iter().enumerate() {
        batch.push(entry(21 + i as u64, "user_created", u));
    }
    batch.push(entry(40, "user_touched", &json!({"uuid": all[9]["uuid"]})));
    batch.push(entry(41, "ReprovisionCompleted", &json!({"id": "r1"})));
    let v = events.deliver("bus", &batch).await.unwrap();
    assert_eq!(v[20].outcome, "dead_lettered", "{:?}", v[20]);
    assert!(
        db.keys("users").await.contains(&key(&all[9])),
        "the row re-sent (as a refetch that failed) was purged; reprovision {:?}",
        reprovisions(&s, "bus")
            .await
            .first()
            .map(|r| r.state.clone())
    );
}

/// Two sources feed `users`; the reprovision of one purges every row the
/// other wrote (config accepts it).
async fn a_reprovision_purges_rows_of_another_source(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (_up, addr) = upstream(users(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_name();
    let src = format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\nid_pointer = \"/data/id\"\n\n[sources.other]\nkind = \"webhook\"\nname_header = \"name\"\n[sources.other.events]\nuser_created = {{ resource = \"users\", op = \"upsert\", key = \"/data/uuid\", payload = \"/data\" }}\n",
        source(&stream, "")
    );
    let cfg = ConfigBuilder {
        tail: format!("{}{}", open_worker_tail(dir.path()), src),
        ..ConfigBuilder::default()
    };
    // Refused at load: `bus`'s reprovision would purge what `other` wrote.
    let err = Settings::from_toml_str(&cfg.toml(&db, addr), "t.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sources.bus.reprovision.resources") && err.contains("`other`"),
        "{err}"
    );
}

async fn resent_entries_pending_on_a_dead_consumer_are_purged(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\nid_pointer = \"/data/id\"\n",
        source(&stream, "claim_idle_secs = 1\nclaim_every_secs = 0.2")
    );
    let s = settings(&db, addr, dir.path(), &src);
    let mut con = redis().await;
    let all = users(10);
    for u in &all {
        add(&mut con, &stream, "user_created", u).await;
    }
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "r1"}),
    )
    .await;
    let (d, _) = start_connected(s.clone()).await;
    eventually(Duration::from_secs(10), "seeded, r1 open", || {
        let (db, s) = (&db, s.clone());
        async move {
            let n = db.count("users").await;
            let r = reprovisions(&s, "bus").await;
            (n == 10 && r.first().is_some_and(|r| r.state == "open"))
                .then_some(())
                .ok_or(format!("{n} rows, {} reprovisions", r.len()))
        }
    })
    .await;
    assert!(d.stop().await);
    // A replica reads the re-sends of 1..10 and dies.
    for u in &all[1..] {
        add(&mut con, &stream, "user_created", u).await;
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("driftd")
        .arg("ghost")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    add(&mut con, &stream, "user_created", &all[0]).await;
    add(
        &mut con,
        &stream,
        "ReprovisionCompleted",
        &json!({"id": "r1"}),
    )
    .await;
    let (d, _) = start_connected(s.clone()).await;
    eventually(Duration::from_secs(10), "r1 ends", || {
        let s = s.clone();
        async move {
            let r = reprovisions(&s, "bus").await;
            (r.first().is_some_and(|r| r.state != "open"))
                .then_some(())
                .ok_or("open".to_string())
        }
    })
    .await;
    let n = db.count("users").await;
    assert!(d.stop().await);
    assert_eq!(
        n, 10,
        "rows re-sent (pending on another consumer) were purged"
    );
}

/// `driftd replay SOURCE` (from the last start) settles entries that were
/// dead letters again: each replay adds another dead letter of the same
/// entry; replaying the letters applies the event twice.
async fn replay_duplicates_dead_letters(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\nid_pointer = \"/data/id\"\n",
        source(&stream, "")
    );
    let s = settings(&db, addr, dir.path(), &src);
    let events = crate::events::engine(&s).await;
    let mut con = redis().await;
    add(
        &mut con,
        &stream,
        "ReprovisionStarted",
        &json!({"id": "r1"}),
    )
    .await;
    // An event that cannot apply: no key.
    let u = users(2);
    add(
        &mut con,
        &stream,
        "user_created",
        &json!({"firstname": "nokey"}),
    )
    .await;
    add(&mut con, &stream, "user_created", &u[1]).await;
    // The live delivery stores the dead letter once.
    let live: Vec<Envelope> = {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .unwrap();
        driftd::sources::redis::entries(reply)
            .unwrap()
            .iter()
            .map(|e| e.envelope("payload"))
            .collect()
    };
    events.deliver("bus", &live).await.unwrap();
    let store = driftd::store::AnyStore::open(&s.store.url, 2)
        .await
        .unwrap();
    let before = store.count_dead_letters().await.unwrap();
    driftd::sources::redis::replay(&events, "bus", None)
        .await
        .unwrap();
    let after = store.count_dead_letters().await.unwrap();
    assert_eq!(before, vec![("bus".to_string(), 1)]);
    assert_eq!(before, after, "a replay added dead letters again");
}

/// A message during a reprovision that cannot be read (not JSON) may have
/// re-sent any row: the completion purges nothing and says why.
async fn an_unreadable_resend_stops_the_purge(backend: Backend) {
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let src = format!(
        "{}\n[sources.bus.reprovision]\nstarted = \"ReprovisionStarted\"\ncompleted = \"ReprovisionCompleted\"\n",
        source(&stream, "")
    );
    let s = settings(&db, addr, dir.path(), &src);
    let events = crate::events::engine(&s).await;
    let all = users(10);
    let mut batch: Vec<Envelope> = all
        .iter()
        .enumerate()
        .map(|(i, u)| entry(i as u64 + 1, "user_created", u))
        .collect();
    batch.push(entry(20, "ReprovisionStarted", &json!({})));
    for (i, u) in all[..8].iter().enumerate() {
        batch.push(entry(21 + i as u64, "user_created", u));
    }
    let mut garbled = entry(30, "user_created", &json!({}));
    garbled.body = b"{not json".to_vec();
    batch.push(garbled);
    batch.push(entry(31, "ReprovisionCompleted", &json!({})));
    let v = events.deliver("bus", &batch).await.unwrap();
    assert_eq!(v[19].outcome, "dead_lettered", "{:?}", v[19]);
    assert_eq!(db.count("users").await, 10, "nothing purged");
    let r = reprovisions(&s, "bus").await;
    assert_eq!(r[0].state, "incomplete", "{r:?}");
}

both_backends!(
    an_unreadable_resend_stops_the_purge,
    redelivered_completion_completes_the_next_reprovision,
    a_resent_row_whose_refetch_failed_is_purged,
    a_reprovision_purges_rows_of_another_source,
    resent_entries_pending_on_a_dead_consumer_are_purged,
    replay_duplicates_dead_letters,
);

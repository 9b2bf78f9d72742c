//! Crash trials: `driftd reconcile` killed with SIGKILL at seeded random
//! moments of a pass over a drifted table (while it lists, while it writes
//! inserts, updates and purges). After each kill the table holds no
//! wrongful deletion (every row upstream still has is there), no row
//! half-written and nothing upstream never had; the next run marks the
//! killed job abandoned and converges to exactly the upstream rows.
//!
//! And `driftd run` killed the same way while it applies events from a
//! Redis stream: after each kill the table is what the stream's entries
//! up to some point make of it (whole batches, in order, never behind
//! what it was), and the next run applies the rest.
//!
//! `DRIFTD_CRASH_TRIALS` kills inside a pass, and inside the applying of
//! events, per backend (default 6, the suite's short run), from seed
//! `DRIFTD_CRASH_SEED` (default: random, printed). The full run:
//! `DRIFTD_CRASH_TRIALS=50 ./scripts/test.sh --test integration crash`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use driftd::sample::user;
use serde_json::Value as Json;

use crate::both_backends;
use crate::common::*;

const USERS: u64 = 3000;

/// What the local table holds before a trial: upstream minus a tenth
/// (missing), a tenth stale, plus a tenth upstream does not have (extra).
fn drifted(rng: &mut fastrand::Rng, upstream: &[Json]) -> Vec<Json> {
    let mut local = Vec::new();
    for u in upstream {
        match rng.u8(..10) {
            0 => {}
            1 => {
                let mut stale = u.clone();
                stale["email"] = Json::String("stale@example.com".into());
                local.push(stale);
            }
            _ => local.push(u.clone()),
        }
    }
    for _ in 0..USERS / 10 {
        local.push(ghost(rng.u64(..1_000_000)));
    }
    local.sort_by(|a, b| a["uuid"].as_str().cmp(&b["uuid"].as_str()));
    local.dedup_by(|a, b| a["uuid"] == b["uuid"]);
    local
}

/// uuid → email of the table now.
async fn emails(db: &TestDb) -> BTreeMap<String, Option<String>> {
    let rows = db
        .text("SELECT CAST(uuid AS TEXT) || '|' || COALESCE(email, '<null>') FROM users")
        .await;
    rows.into_iter()
        .flatten()
        .map(|r| {
            let (k, e) = r.split_once('|').expect("row");
            (k.to_string(), (e != "<null>").then(|| e.to_string()))
        })
        .collect()
}

fn reconcile(config: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["reconcile", "users", "--json", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run driftd")
}

/// Trials per backend and the seed, from `DRIFTD_CRASH_TRIALS` and
/// `DRIFTD_CRASH_SEED`.
fn trials_and_seed(what: &str, backend: Backend) -> (usize, u64) {
    let trials: usize = std::env::var("DRIFTD_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("DRIFTD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("{what} on {backend:?}: {trials}, seed {seed} (DRIFTD_CRASH_SEED)");
    (trials, seed)
}

async fn crash_trials(backend: Backend) {
    let (trials, seed) = trials_and_seed("crash trials", backend);
    let mut rng = fastrand::Rng::with_seed(seed);
    let users: Vec<Json> = (0..USERS).map(|i| user(i, TENANTS)).collect();
    let wanted: BTreeMap<String, Option<String>> = users
        .iter()
        .map(|u| {
            (
                u["uuid"].as_str().unwrap().to_string(),
                u["email"].as_str().map(str::to_string),
            )
        })
        .collect();
    let (_up, addr) = upstream(users.clone()).await;
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driftd.toml");
    let toml = ConfigBuilder {
        policy: "max_purge_fraction = 1.0\nmax_purge_count = 1000000\nmax_update_fraction = 1.0\nbatch_size = 10".into(),
        ..ConfigBuilder::default()
    }
    .toml(&db, addr);
    std::fs::write(&config, toml).unwrap();

    // How long one pass takes here: kills land anywhere in it.
    db.insert_users(&drifted(&mut rng, &users)).await;
    let started = Instant::now();
    let out = reconcile(&config).wait_with_output().unwrap();
    let mut wall = started.elapsed();
    assert!(out.status.success(), "calibration pass");
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    let apply = Duration::from_millis(report["timings"]["apply_ms"].as_u64().unwrap());
    // Half the kills anywhere in the pass, half while it writes.
    let mut writes_from = wall.saturating_sub(apply.mul_f64(1.2));
    println!("one pass takes {wall:?}, its writes the last {apply:?}");

    // Which writes each kill interrupted: (inserted, updated, purged) > 0.
    let mut hit: BTreeMap<&str, usize> = BTreeMap::new();
    // `trials` kills that land inside a pass; a pass that ended before its
    // kill does not count (at most 3 x trials runs).
    let mut killed = 0;
    for trial in 0..trials * 3 {
        if killed == trials {
            break;
        }
        db.exec("DELETE FROM users").await;
        let local = drifted(&mut rng, &users);
        db.insert_users(&local).await;
        let before = emails(&db).await;
        let delay = if rng.bool() {
            wall.mul_f64(1.1 * rng.f64())
        } else {
            writes_from + apply.mul_f64(1.4 * rng.f64())
        };
        let mut child = reconcile(&config);
        tokio::time::sleep(delay).await;
        let _ = child.kill(); // SIGKILL: no chance to clean up
        let status = child.wait().unwrap();
        let after = emails(&db).await;

        let what = format!("{backend:?} trial {trial} (seed {seed}), killed after {delay:?}");
        // No wrongful deletion: every row upstream has is still there.
        for key in before.keys().filter(|k| wanted.contains_key(*k)) {
            assert!(after.contains_key(key), "{what}: {key} was deleted");
        }
        // Nothing invented, nothing half-written: each row is as it was
        // or as upstream has it.
        for (key, email) in &after {
            let ok = before.get(key) == Some(email) || wanted.get(key) == Some(email);
            assert!(ok, "{what}: {key} holds {email:?}");
        }
        let inserted = after.keys().filter(|k| !before.contains_key(*k)).count();
        let purged = before.keys().filter(|k| !after.contains_key(*k)).count();
        let updated = after
            .iter()
            .filter(|(k, e)| before.get(*k).is_some_and(|b| b != *e))
            .count();
        let phase = if status.success() {
            "finished before the kill"
        } else {
            match (inserted > 0, updated > 0, purged > 0) {
                (false, false, false) => "listing (nothing written yet)",
                (true, false, false) => "writing inserts",
                (_, true, false) => "writing updates",
                _ => "writing purges",
            }
        };
        *hit.entry(phase).or_default() += 1;
        if status.success() {
            // The calibration ran slower than this pass did (a machine busy
            // then): aim earlier from now on.
            wall = wall.mul_f64(0.8);
            writes_from = writes_from.mul_f64(0.8);
        } else {
            killed += 1;
        }

        // The next run converges and marks the killed job abandoned.
        let out = reconcile(&config).wait_with_output().unwrap();
        let report: Json = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(out.status.success(), "{what}: next run: {report}");
        assert!(
            matches!(report["outcome"].as_str(), Some("repaired" | "in_sync")),
            "{what}: next run: {report}"
        );
        assert_eq!(emails(&db).await, wanted, "{what}: next run converges");
        let store = driftd::store::AnyStore::open(&db.url.clone().into(), 1)
            .await
            .unwrap();
        let unfinished = driftd::store::Ledger::unfinished_jobs(&store)
            .await
            .unwrap();
        assert!(
            unfinished.is_empty(),
            "{what}: jobs left running: {unfinished:?}"
        );
        // Every job either succeeded or shows as abandoned.
        for job in db
            .text("SELECT status || ': ' || COALESCE(reason, '') FROM driftd_jobs")
            .await
            .into_iter()
            .flatten()
        {
            assert!(
                job == "succeeded: " || job.starts_with("failed: abandoned"),
                "{what}: a job ended {job}"
            );
        }
    }
    println!("{backend:?}: kills by phase: {hit:?}");
    assert_eq!(
        killed, trials,
        "too few kills landed inside a pass: {hit:?}"
    );
    let phases: BTreeSet<&str> = hit.keys().copied().collect();
    if trials >= 20 {
        assert!(
            phases.iter().filter(|p| p.starts_with("writing")).count() >= 2,
            "the kills should land in the writes too: {hit:?}"
        );
    }
}

/// A job killed before it started (recorded `queued`) shows as abandoned
/// once the resource's next pass runs, like one killed while running.
async fn a_job_killed_while_queued_is_abandoned(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let (_up, addr) = upstream((0..10).map(|i| user(i, TENANTS)).collect()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driftd.toml");
    std::fs::write(&config, ConfigBuilder::default().toml(&db, addr)).unwrap();
    let out = reconcile(&config).wait_with_output().unwrap();
    assert!(out.status.success());
    let store = driftd::store::AnyStore::open(&db.url.clone().into(), 1)
        .await
        .unwrap();
    let dead = driftd::jobs::Job::queued(
        "users",
        driftd::jobs::Trigger::Cli,
        driftd::vocab::Mode::Full,
        false,
        false,
    );
    driftd::store::Ledger::save_job(&store, &dead)
        .await
        .unwrap();
    let out = reconcile(&config).wait_with_output().unwrap();
    assert!(out.status.success());
    let dead = driftd::store::Ledger::get_job(&store, dead.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.status, driftd::jobs::JobStatus::Failed, "{dead:?}");
    assert!(
        dead.reason
            .as_deref()
            .unwrap_or("")
            .starts_with("abandoned"),
        "{dead:?}"
    );
}

both_backends!(
    event_crash_trials,
    crash_trials,
    a_job_killed_while_queued_is_abandoned
);

/// uuid → `email|firstname` of the table now.
async fn user_states(db: &TestDb) -> BTreeMap<String, String> {
    db.text("SELECT CAST(uuid AS TEXT) || '|' || COALESCE(email, '') || '|' || COALESCE(firstname, '') FROM users")
        .await
        .into_iter()
        .flatten()
        .map(|r| {
            let (k, state) = r.split_once('|').expect("row");
            (k.to_string(), state.to_string())
        })
        .collect()
}

/// `driftd run` applying a Redis stream of upserts and deletes over 200
/// users, SIGKILLed at seeded random moments while it holds entries it
/// read and has not acknowledged. Entries are applied in batches, each
/// committed before it is acknowledged, in stream order; so after each
/// kill the table must be exactly what the first `j` entries make of an
/// empty table, for some `j` no smaller than after the previous kill:
/// nothing half-applied, nothing applied out of order, no row deleted
/// that its entries left standing. At the end, one more run applies the
/// rest and acknowledges everything.
async fn event_crash_trials(backend: Backend) {
    use crate::streams::{pending, redis, setup, source, spawn_run, Setup};
    let (trials, seed) = trials_and_seed("event crash trials", backend);
    let mut rng = fastrand::Rng::with_seed(seed);
    let Setup {
        db,
        _up,
        addr,
        dir,
        stream,
    } = setup(backend).await;
    let schedules = dir.path().join("schedules");
    std::fs::create_dir(&schedules).unwrap();
    let config = dir.path().join("driftd.toml");
    let cfg = ConfigBuilder {
        tail: format!("{}{}", open_worker_tail(&schedules), source(&stream, "")),
        ..ConfigBuilder::default()
    };
    std::fs::write(&config, cfg.toml(&db, addr)).unwrap();
    let people = users(200);
    let mut con = redis().await;
    // Every entry in stream order: the key and the state it leaves (None:
    // deleted).
    let mut entries: Vec<(String, Option<String>)> = Vec::new();
    // The table after the first `at` entries.
    let mut folded: BTreeMap<String, String> = BTreeMap::new();
    let mut at = 0usize;
    // Entries applied when each kill landed, of those written.
    let mut landed = Vec::new();
    let mut killed = 0;
    let mut attempts = 0;
    while killed < trials {
        attempts += 1;
        assert!(
            attempts <= trials * 5,
            "only {killed} of {attempts} kills landed while entries were held"
        );
        // A burst of entries, written before the worker starts.
        let mut pipe = redis::pipe();
        for _ in 0..rng.usize(200..600) {
            let n = entries.len();
            let mut u = people[rng.usize(..people.len())].clone();
            let key = u["uuid"].as_str().unwrap().to_string();
            let (name, body, state) = if rng.u8(..5) == 0 {
                let body = serde_json::json!({"name": "user_deleted", "data": {"uuid": key}});
                ("user_deleted", body, None)
            } else {
                u["email"] = Json::String(format!("e{n}@example.com"));
                u["firstname"] = Json::String(format!("F{n}"));
                let state = format!("e{n}@example.com|F{n}");
                let body = serde_json::json!({"name": "user_edited", "data": u});
                ("user_edited", body, Some(state))
            };
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("name")
                .arg(name)
                .arg("payload")
                .arg(body.to_string())
                .ignore();
            entries.push((key, state));
        }
        let _: () = pipe.query_async(&mut con).await.unwrap();
        let mut run = spawn_run(&config);
        // Half the kills: a random moment after the start (while it
        // starts, re-applies what the last run held, or reads on). The
        // other half: once it has read entries past what any run read
        // before, a random moment more.
        if rng.bool() {
            std::thread::sleep(Duration::from_micros(rng.u64(..300_000)));
        } else {
            let before = last_delivered(&mut con, &stream).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                assert!(
                    run.0.try_wait().unwrap().is_none(),
                    "driftd run exited by itself"
                );
                if last_delivered(&mut con, &stream).await != before {
                    break;
                }
                assert!(Instant::now() < deadline, "driftd never read the burst");
            }
        }
        std::thread::sleep(Duration::from_micros(rng.u64(..30_000)));
        run.0.kill().unwrap();
        run.0.wait().unwrap();
        if pending(&mut con, &stream)
            .await
            .get("driftd-test")
            .is_some_and(|n| *n > 0)
        {
            killed += 1;
        }
        let table = user_states(&db).await;
        let from = at;
        loop {
            if folded == table {
                break;
            }
            assert!(
                at < entries.len(),
                "trial {attempts}: the table is what no prefix of the stream from entry {from} makes"
            );
            apply(&mut folded, &entries[at]);
            at += 1;
        }
        landed.push(format!("{at}/{}", entries.len()));
    }
    println!(
        "{backend:?}: {killed} kills while entries were held, in {attempts} runs; entries applied at each kill: {}",
        landed.join(" ")
    );
    // The next run applies the rest and acknowledges every entry.
    let mut run = spawn_run(&config);
    while at < entries.len() {
        apply(&mut folded, &entries[at]);
        at += 1;
    }
    let folded = &folded;
    eventually(Duration::from_secs(30), "every entry applied", || {
        let db = &db;
        async move {
            let table = user_states(db).await;
            (&table == folded).then_some(()).ok_or(format!(
                "{} rows, want {}",
                table.len(),
                folded.len()
            ))
        }
    })
    .await;
    eventually(Duration::from_secs(10), "every entry acknowledged", || {
        let mut con = con.clone();
        let stream = stream.clone();
        async move {
            let p = pending(&mut con, &stream).await;
            p.values()
                .all(|n| *n == 0)
                .then_some(())
                .ok_or(format!("pending: {p:?}"))
        }
    })
    .await;
    run.0.kill().unwrap();
    run.0.wait().unwrap();
}

/// The id of the last entry the group was handed ("" before it exists).
async fn last_delivered(con: &mut redis::aio::MultiplexedConnection, stream: &str) -> String {
    let Ok(redis::Value::Array(groups)) = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(con)
        .await
    else {
        return String::new();
    };
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    for group in &groups {
        if let redis::Value::Array(fields) = group {
            for pair in fields.chunks(2) {
                if let [k, v] = pair {
                    if text(k) == "last-delivered-id" {
                        return text(v);
                    }
                }
            }
        }
    }
    String::new()
}

/// One entry applied to a model of the table.
fn apply(table: &mut BTreeMap<String, String>, (key, state): &(String, Option<String>)) {
    match state {
        Some(s) => table.insert(key.clone(), s.clone()),
        None => table.remove(key),
    };
}

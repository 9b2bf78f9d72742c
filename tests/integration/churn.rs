//! A busy upstream, played at random: between page requests rows are
//! inserted, deleted and edited, over many seeds and page sizes. Whatever
//! happens, no key that upstream had during the whole pass is deleted
//! locally; once the upstream is quiet, a pass converges exactly.
//!
//! Over listings sorted by the key, purge candidates are not confirmed
//! (`confirm_purge = false`), so the pager's own checks are what is tested;
//! unordered listings need confirmation, and get it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use driftd::pass::{Outcome, PassOptions};
use driftd::sample::{sample_uuid, user};
use serde_json::Value as Json;

use crate::both_backends;
use crate::common::*;

/// `uuid|firstname` per local row.
async fn local_rows(db: &TestDb) -> BTreeMap<String, String> {
    db.text("SELECT CAST(uuid AS TEXT) || '|' || COALESCE(firstname, '') FROM users")
        .await
        .into_iter()
        .flatten()
        .filter_map(|r| {
            r.split_once('|')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn upstream_rows(items: &[Json]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|u| {
            (
                u["uuid"].as_str().unwrap_or_default().to_string(),
                u["firstname"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// One seeded run; returns whether the pass under churn succeeded.
async fn one_seed(backend: Backend, seed: u64) -> bool {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = rng.u64(20..200);
    let page_size = rng.u32(2..40);
    let ordered = rng.bool();
    let churn_chance = rng.f64() * 0.6;

    let db = TestDb::new(backend).await;
    db.create_users().await;
    let mut local = users(n);
    // some drift of every kind before the pass
    local.retain(|_| rng.u8(..10) != 0);
    local.extend((0..rng.u64(0..5)).map(ghost));
    for u in local.iter_mut() {
        if rng.u8(..10) == 0 {
            u["firstname"] = Json::String("stale".into());
        }
    }
    db.insert_users(&local).await;
    let local_before = db.keys("users").await;

    let (up, addr) = upstream(users(n)).await;
    let removed: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let gone = removed.clone();
    let mut churn_rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    up.on_list(
        "users",
        "uuid",
        Box::new(move |_, churn| {
            if churn_rng.f64() >= churn_chance {
                return;
            }
            for _ in 0..churn_rng.usize(1..4) {
                match churn_rng.u8(..3) {
                    0 if !churn.is_empty() => {
                        let key = churn.remove(churn_rng.usize(..churn.len()));
                        gone.lock().unwrap().insert(key);
                    }
                    1 => {
                        let mut u = user(churn_rng.u64(1_000..1_000_000), TENANTS);
                        u["uuid"] = Json::String(sample_uuid(0x05, churn_rng.u64(0..1_000_000)));
                        churn.put(u);
                    }
                    _ if !churn.is_empty() => {
                        let at = churn_rng.usize(..churn.len());
                        let key = churn.key(at).to_string();
                        let mut u = user(0, TENANTS);
                        u["uuid"] = Json::String(key);
                        u["firstname"] = Json::String(format!("edited{}", churn_rng.u32(..)));
                        churn.put(u);
                    }
                    _ => {}
                }
            }
        }),
    );
    let settings = ConfigBuilder {
        page_size,
        ordered,
        // Unordered listings cannot prove themselves whole: their purge
        // candidates are confirmed (get_path); ordered ones are not.
        policy: format!(
            "max_purge_fraction = 1.0\nmax_purge_count = 1000000\nmax_update_fraction = 1.0\nconfirm_purge = {}",
            !ordered
        ),
        ..ConfigBuilder::default()
    }
    .settings(&db, addr);
    let r = pass(&settings, PassOptions::default()).await;
    let ctx = format!("seed {seed} n {n} page {page_size} ordered {ordered}: {r:?}");
    assert!(
        matches!(
            r.outcome,
            Outcome::Repaired | Outcome::InSync | Outcome::Failed
        ),
        "{ctx}"
    );
    if r.outcome == Outcome::Failed {
        let err = r.error.as_deref().unwrap_or("");
        assert!(err.contains("incomplete listing"), "{ctx}");
    }

    // The invariant: a key upstream had from start to end is still here.
    let initial: BTreeSet<String> = users(n)
        .iter()
        .map(|u| u["uuid"].as_str().unwrap().to_string())
        .collect();
    let removed = removed.lock().unwrap().clone();
    let after = db.keys("users").await;
    for key in initial.difference(&removed) {
        if local_before.contains(key) {
            assert!(
                after.contains(key),
                "{ctx}: deleted `{key}`, which upstream always had"
            );
        }
    }

    // Quiet upstream: the next pass converges exactly, the one after finds
    // nothing to do.
    up.quiet();
    let r2 = pass(&settings, PassOptions::default()).await;
    assert!(
        matches!(r2.outcome, Outcome::Repaired | Outcome::InSync),
        "{ctx}: quiet pass {r2:?}"
    );
    assert_eq!(
        local_rows(&db).await,
        upstream_rows(&up.items("users")),
        "{ctx}: quiet pass did not converge"
    );
    let r3 = pass(&settings, PassOptions::default()).await;
    assert_eq!(r3.outcome, Outcome::InSync, "{ctx}: {r3:?}");
    r.outcome != Outcome::Failed
}

async fn random_churn_never_deletes_a_row_upstream_kept(backend: Backend) {
    let seeds: u64 = match backend {
        Backend::Sqlite => 60,
        Backend::Postgres => 25,
    };
    let mut succeeded = 0;
    for seed in 0..seeds {
        if one_seed(backend, seed).await {
            succeeded += 1;
        }
    }
    // Not vacuous: most passes under churn still end complete.
    assert!(
        succeeded * 3 >= seeds,
        "only {succeeded} of {seeds} passes under churn succeeded"
    );
}

both_backends!(random_churn_never_deletes_a_row_upstream_kept);

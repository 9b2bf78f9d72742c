//! Versions decide between edits of one key, whatever the journal kept
//! from before: a timestamp journaled to the microsecond compares as its
//! nanoseconds, and a version of another kind than the journaled one (the
//! resource's `version_kind` changed) applies instead of being dropped as
//! stale forever.

use std::net::SocketAddr;
use std::sync::Arc;

use driftd::config::Settings;
use serde_json::json;

use crate::both_backends;
use crate::common::*;
use crate::events::{engine, message, BUS};

/// The users' `user_edited` event versioned by a time (`/data/updated_at`).
fn timestamp_config(db: &TestDb, addr: SocketAddr, kind: &str) -> Arc<Settings> {
    let tail = BUS.replace(
        "version = \"/data/version\"",
        &format!("version = \"/data/updated_at\"\nversion_kind = \"{kind}\""),
    );
    Arc::new(
        ConfigBuilder {
            tail,
            ..ConfigBuilder::default()
        }
        .settings(db, addr),
    )
}

async fn firstname(db: &TestDb, key: &str) -> Option<String> {
    db.text(&format!(
        "SELECT firstname FROM users WHERE CAST(uuid AS TEXT) = '{key}'"
    ))
    .await
    .into_iter()
    .next()
    .flatten()
}

/// A timestamp version journaled to the microsecond (before versions
/// kept nanoseconds) is compared as its nanoseconds: an edit 400 ns newer
/// applies.
async fn a_microsecond_journaled_version_compares_as_nanoseconds(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(1);
    let (_up, addr) = upstream(all.clone()).await;
    let s = timestamp_config(&db, addr, "timestamp");
    let events = engine(&s).await;
    let key = uuid(&all[0]);
    let mut first = all[0].clone();
    first["firstname"] = json!("Before");
    first["updated_at"] = json!("2026-01-01T09:00:00.5Z");
    let out = events
        .deliver("bus", &[message("user_edited", first)])
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "applied");
    // What driftd before the upgrade journaled for that version.
    db.exec(&format!(
        "UPDATE driftd_key_journal SET version = '2026-01-01T09:00:00.500000Z' WHERE key = '{key}'"
    ))
    .await;
    let mut newer = all[0].clone();
    newer["firstname"] = json!("After");
    newer["updated_at"] = json!("2026-01-01T09:00:00.500000400Z");
    let out = events
        .deliver("bus", &[message("user_edited", newer)])
        .await
        .unwrap();
    assert_eq!(
        (out[0].outcome, firstname(&db, &key).await.as_deref()),
        ("applied", Some("After")),
        "an edit newer than the journaled (pre-upgrade) version was dropped: {out:?}"
    );
}

/// A resource versioned by time, then (config changed, same database) by
/// revision number: the journaled time cannot be compared with a number,
/// so the new kind's first edit applies and is journaled in its place.
async fn a_changed_version_kind_applies_the_next_edit(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(1);
    let (_up, addr) = upstream(all.clone()).await;
    let key = uuid(&all[0]);
    {
        let events = engine(&timestamp_config(&db, addr, "timestamp")).await;
        let mut e = all[0].clone();
        e["updated_at"] = json!("2026-01-01T09:00:00Z");
        let out = events
            .deliver("bus", &[message("user_edited", e)])
            .await
            .unwrap();
        assert_eq!(out[0].outcome, "applied");
    }
    let events = engine(&timestamp_config(&db, addr, "integer")).await;
    let mut e = all[0].clone();
    e["firstname"] = json!("Revision 7");
    e["updated_at"] = json!(7);
    let out = events
        .deliver("bus", &[message("user_edited", e)])
        .await
        .unwrap();
    assert_eq!(
        (out[0].outcome, firstname(&db, &key).await.as_deref()),
        ("applied", Some("Revision 7")),
        "after a version_kind change the first edit was dropped as stale (no letter, no error at start): {out:?}"
    );
}

both_backends!(
    a_microsecond_journaled_version_compares_as_nanoseconds,
    a_changed_version_kind_applies_the_next_edit,
);

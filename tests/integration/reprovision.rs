//! Reprovision control markers as producers send them: a marker may carry
//! no body at all (its name and id in headers, or stream fields), and a
//! message driftd does not map, body or not, is `ignored`: it never makes
//! a reprovision's re-sends unknown.

use std::collections::BTreeMap;
use std::sync::Arc;

use driftd::engine::events::Envelope;

use crate::both_backends;
use crate::common::*;
use crate::events::engine;

fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Markers with only headers (`name`, `reprovision_id`): the reprovision
/// opens and completes on them; an unmapped message without a body
/// between is ignored; the rows not re-sent are purged.
async fn body_less_markers_carry_their_id_in_a_header(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.create_users().await;
    let all = users(10);
    db.insert_users(&all).await;
    let (_up, addr) = upstream(users(0)).await;
    let tail = r#"
[sources.feed]
kind = "webhook"
name_header = "name"
[sources.feed.events]
user_created = { resource = "users", op = "upsert", key = "/uuid", payload = "" }
[sources.feed.reprovision]
started = "ReprovisionStarted"
completed = "ReprovisionCompleted"
id_header = "reprovision_id"
"#;
    let s = Arc::new(
        ConfigBuilder {
            tail: tail.into(),
            ..ConfigBuilder::default()
        }
        .settings(&db, addr),
    );
    let events = engine(&s).await;
    let mut batch = vec![
        Envelope::new(
            headers(&[("name", "ReprovisionStarted"), ("reprovision_id", "r9")]),
            Vec::new(),
        ),
        Envelope::new(headers(&[("name", "heartbeat")]), Vec::new()),
    ];
    batch.extend(all[..6].iter().map(|u| {
        Envelope::new(
            headers(&[("name", "user_created")]),
            u.to_string().into_bytes(),
        )
    }));
    batch.push(Envelope::new(
        headers(&[("name", "ReprovisionCompleted"), ("reprovision_id", "r9")]),
        Vec::new(),
    ));
    let out = events.deliver("feed", &batch).await.unwrap();
    let outcomes: Vec<&str> = out.iter().map(|v| v.outcome).collect();
    assert_eq!(outcomes[0], "applied", "{out:#?}");
    assert_eq!(outcomes[1], "ignored", "{out:#?}");
    assert_eq!(outcomes[8], "applied", "{out:#?}");
    assert_eq!(db.count("users").await, 6, "{out:#?}");
    let store = driftd::store::AnyStore::open(&s.store.url, 2)
        .await
        .unwrap();
    let r = driftd::store::Ledger::reprovisions(&store, "feed", 10)
        .await
        .unwrap();
    assert_eq!(r[0].state, "completed", "{r:?}");
    assert_eq!(r[0].event_id.as_deref(), Some("r9"));
    // A marker without its id header is a dead letter naming it.
    let out = events
        .deliver(
            "feed",
            &[Envelope::new(
                headers(&[("name", "ReprovisionStarted")]),
                Vec::new(),
            )],
        )
        .await
        .unwrap();
    assert_eq!(out[0].outcome, "dead_lettered");
    assert!(
        out[0].error.as_deref().unwrap().contains("reprovision_id"),
        "{out:?}"
    );
}

both_backends!(body_less_markers_carry_their_id_in_a_header);

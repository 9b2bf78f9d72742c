//! Reprovision markers as the events engine reads them: a start or
//! completion [`Control`] event, and the [`Tracker`] of each source's open
//! reprovision and activity. Below both the events engine (which reads
//! markers) and the reprovision logic (which acts on them).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::Value as Json;

use crate::config::ReprovisionConfig;
use crate::decode::resolve;
use crate::store::Reprovision;

/// A control event, read.
#[derive(Debug, Clone)]
pub enum Control {
    Started { id: Option<String> },
    Completed { id: Option<String> },
}

impl Control {
    /// The control event `name` is, if any; an error when it lacks the id
    /// the config asks for.
    pub fn read(
        cfg: &ReprovisionConfig,
        name: &str,
        body: &Json,
        headers: &BTreeMap<String, String>,
    ) -> Result<Option<Control>, String> {
        let started = name == cfg.started;
        if !started && cfg.completed.as_deref() != Some(name) {
            return Ok(None);
        }
        let id = match (&cfg.id_pointer, &cfg.id_header) {
            (Some(p), _) => match resolve(body, p) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Number(n)) => Some(n.to_string()),
                _ => return Err(format!("no reprovision id (a string or number) at `{p}`")),
            },
            (None, Some(h)) => match headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(h))
                .map(|(_, v)| v.trim())
            {
                Some(v) if !v.is_empty() => Some(v.to_string()),
                _ => return Err(format!("no reprovision id in header `{h}`")),
            },
            (None, None) => None,
        };
        Ok(Some(if started {
            Control::Started { id }
        } else {
            Control::Completed { id }
        }))
    }
}

/// What the events engine keeps of reprovisions: each source's open one
/// (read once), and when each source last delivered.
#[derive(Default)]
pub struct Tracker {
    pub(super) open: tokio::sync::Mutex<HashMap<String, Option<Reprovision>>>,
    pub(super) activity: std::sync::Mutex<HashMap<String, Instant>>,
    /// When each source that reads (a stream) last completed a read: a
    /// quiet time ends only with a read that answered after it, so a hung
    /// connection is never taken for a quiet stream.
    pub(super) heard: std::sync::Mutex<HashMap<String, Instant>>,
    /// The highest stream position known lost per source: a reprovision
    /// starting before it has lost entries already.
    pub(super) lost_upto: std::sync::Mutex<HashMap<String, (u64, u64)>>,
}

pub(super) fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

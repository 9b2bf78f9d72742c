//! Events in, rows out: maps a source's messages onto resources by its
//! config, refetches where the event carries too little, applies a batch
//! per resource in one transaction through the store's journal, purges
//! children of deleted parents, and keeps what cannot be applied as a dead
//! letter. A message is answered (acked) only once this returns `Ok`: its
//! change is committed or its dead letter stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value as Json;
use tracing::Instrument;

use crate::config::{EventOp, ResourceConfig, Settings, SourceConfig, TableSpec};
use crate::decode::{resolve, RowDecoder};
use crate::metrics::Metrics;
use crate::model::{key_from_json, Key};
use crate::store::{AnyStore, Change, ChangeResult, DeadLetter, Ledger, Mirror, StoreError};
use crate::upstream::{Client, Fetched};

/// Refetches in flight at once within a batch.
const REFETCH_CONCURRENCY: usize = 8;
/// How long a check that `get_path` finds listed keys is trusted.
const GET_PATH_TRUSTED: std::time::Duration = std::time::Duration::from_secs(60);

/// One message as a source received it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// RFC 3339.
    pub received_at: String,
    /// Where the message sits in its source, if it has a place (a Redis
    /// stream entry's id).
    pub position: Option<String>,
    /// The order it arrived in, in this process: orders the dead letters
    /// of one millisecond.
    pub arrival: u64,
}

/// Messages received so far by this process.
static ARRIVALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Envelope {
    pub fn new(headers: BTreeMap<String, String>, body: Vec<u8>) -> Self {
        Envelope {
            headers,
            body,
            received_at: crate::store::now_rfc3339(),
            position: None,
            arrival: ARRIVALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verdict {
    /// `applied`, `stale`, `ignored`, `dead_lettered`, or `held` (a
    /// delete whose cascade passes a child's purge guard: nothing deleted,
    /// kept as a dead letter to replay).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Children purged with a deleted parent, by child resource.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cascaded: BTreeMap<String, u64>,
}

impl Verdict {
    fn new(outcome: &'static str) -> Self {
        Verdict {
            outcome,
            event: None,
            resource: None,
            key: None,
            error: None,
            dead_letter: None,
            cascaded: BTreeMap::new(),
        }
    }
}

/// Why a replay did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no dead letter `{0}`")]
    NotFound(String),
    #[error("dead letter `{id}` came from source `{source_name}`, which the config no longer has")]
    UnknownSource { id: String, source_name: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A resource as events write it.
pub(super) struct Target {
    pub(super) spec: TableSpec,
    decoder: Arc<RowDecoder>,
    client: Option<Arc<Client>>,
    /// When `get_path` last found a key the listing has: until then (and
    /// [`GET_PATH_TRUSTED`] after), a refetch's 404 deletes nothing.
    get_path_checked: std::sync::Mutex<Option<std::time::Instant>>,
    /// What the store learnt inspecting the table (PostgreSQL casts values
    /// to the column types it read): the limits the columns put on values.
    /// Read again after a value is refused, so a column widened since
    /// takes the events that did not fit, without a restart.
    shape: std::sync::Mutex<Option<Arc<crate::store::Shape>>>,
}

/// The event side of driftd, shared by every source.
pub struct Events {
    settings: Arc<Settings>,
    store: Arc<AnyStore>,
    metrics: Arc<Metrics>,
    pub(super) targets: HashMap<String, Target>,
    /// Each source's open reprovision, once read (see [`super::markers`]).
    pub(super) reprovisions: super::markers::Tracker,
}

/// A message, understood.
enum Prepared {
    Change {
        name: String,
        resource: String,
        change: Change,
        /// The event's own time, seconds since the epoch.
        time: Option<f64>,
    },
    Ignored {
        name: String,
    },
    /// A reprovision's start or completion.
    Control {
        name: String,
        control: super::markers::Control,
    },
    Invalid {
        name: Option<String>,
        resource: Option<String>,
        error: String,
        /// The key, when it could be read.
        key: Option<Key>,
        resend: Resend,
    },
}

/// Whether a message re-sends a row, as an open reprovision records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    No,
    /// The row of the verdict's key.
    Key,
    /// Perhaps a row, but which one cannot be read.
    Unknown,
}

impl Events {
    /// Builds the HTTP clients refetches use; fails on a bad upstream
    /// config (which config validation has already refused).
    pub fn new(
        settings: Arc<Settings>,
        store: Arc<AnyStore>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let mut targets = HashMap::new();
        for (name, res) in &settings.resources {
            let client = match &res.upstream.get_path {
                Some(_) => Some(Arc::new(
                    Client::new(&res.upstream)?.observed(name, metrics.clone()),
                )),
                None => None,
            };
            targets.insert(
                name.clone(),
                Target {
                    spec: res.table_spec(),
                    decoder: Arc::new(RowDecoder::new(res)),
                    client,
                    get_path_checked: std::sync::Mutex::new(None),
                    shape: std::sync::Mutex::new(None),
                },
            );
        }
        for (name, src) in &settings.sources {
            let resources: Vec<&str> = src.events.values().map(|e| e.resource.as_str()).collect();
            metrics.register_source(name, &resources);
        }
        Ok(Events {
            settings,
            store,
            metrics,
            targets,
            reprovisions: Default::default(),
        })
    }

    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    pub fn store(&self) -> &Arc<AnyStore> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Applies a batch from `source`; each message ends applied, stale,
    /// ignored or dead-lettered. `Err` only when the database cannot be
    /// used: nothing of the batch is settled then, and the source must
    /// deliver it again (never ack it).
    pub async fn deliver(
        &self,
        source: &str,
        batch: &[Envelope],
    ) -> Result<Vec<Verdict>, StoreError> {
        let span = tracing::info_span!("events", source, messages = batch.len());
        let verdicts = self.settle(source, batch, true).instrument(span).await?;
        tracing::debug!(source, messages = batch.len(), "event batch settled");
        if verdicts.iter().any(|v| v.dead_letter.is_some()) {
            self.refresh_dead_letters().await;
        }
        Ok(verdicts)
    }

    /// Applies messages delivered before once more (`driftd replay`): like
    /// [`Events::deliver`], but what cannot be applied is not stored again
    /// as a dead letter (its first delivery stored it), and nothing is
    /// counted in the metrics.
    pub async fn redeliver(
        &self,
        source: &str,
        batch: &[Envelope],
    ) -> Result<Vec<Verdict>, StoreError> {
        self.settle(source, batch, false).await
    }

    /// Applies a dead letter again; deletes it once it applies. A letter
    /// that fails again stays, with the new error.
    pub async fn replay(&self, id: &str) -> Result<Verdict, ReplayError> {
        let letter = self
            .store
            .get_dead_letter(id)
            .await?
            .ok_or_else(|| ReplayError::NotFound(id.to_string()))?;
        if !self.settings.sources.contains_key(&letter.source) {
            return Err(ReplayError::UnknownSource {
                id: id.to_string(),
                source_name: letter.source,
            });
        }
        let envelope = Envelope {
            headers: letter.headers.clone(),
            body: letter.raw.clone(),
            // What an event wrote after the letter last failed is newer
            // than it (its own delivery may have journaled the key before).
            received_at: letter.failed_at.clone(),
            position: None,
            arrival: 0,
        };
        let mut verdicts = self.settle(&letter.source, &[envelope], false).await?;
        let mut verdict = verdicts.pop().unwrap_or_else(|| Verdict::new("ignored"));
        if verdict.outcome == "ignored" {
            // Not applied: the letter is all that is left of the message.
            verdict.outcome = "dead_lettered";
            let why = verdict.error.take().unwrap_or_else(|| {
                format!(
                    "event `{}` is not mapped by source `{}` any more",
                    letter.event.as_deref().unwrap_or("?"),
                    letter.source
                )
            });
            verdict.error = Some(format!(
                "{why}: nothing applied, the letter is kept (map the event again, or delete the letter)"
            ));
        }
        if matches!(verdict.outcome, "dead_lettered" | "held") {
            // One statement: the letter is never lost between two.
            let error = no_nul(verdict.error.as_deref().unwrap_or_default());
            self.store
                .refail_dead_letter(id, &error, &crate::store::now_rfc3339())
                .await?;
        } else {
            self.store.delete_dead_letter(id).await?;
        }
        self.refresh_dead_letters().await;
        Ok(verdict)
    }

    /// Keeps a message as a dead letter without trying it (a source gave up
    /// on it); counted as dead-lettered. Returns the letter's id.
    pub async fn bury(
        &self,
        source: &str,
        env: &Envelope,
        error: &str,
    ) -> Result<String, StoreError> {
        let letter = letter_for(source, None, error, env);
        self.store.add_dead_letter(&letter).await?;
        tracing::warn!(source, dead_letter = %letter.id, error, "message kept as a dead letter");
        self.metrics.event(source, "", "dead_lettered");
        Ok(letter.id)
    }

    /// Sets the dead-letter gauge from the table.
    pub async fn refresh_dead_letters(&self) {
        match self.store.count_dead_letters().await {
            Ok(counts) => {
                for name in self.settings.sources.keys() {
                    let n = counts
                        .iter()
                        .find(|(s, _)| s == name)
                        .map_or(0, |(_, n)| *n);
                    self.metrics.dead_letters(name, n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count dead letters"),
        }
    }

    async fn settle(
        &self,
        source: &str,
        batch: &[Envelope],
        // A live delivery: dead-letters what fails, counts in the metrics,
        // acts on reprovision controls. A replay does none of these.
        dead_letter: bool,
    ) -> Result<Vec<Verdict>, StoreError> {
        let Some(cfg) = self.settings.sources.get(source) else {
            return Err(StoreError::Unavailable(format!(
                "unknown source `{source}`"
            )));
        };
        // In order, a few at a time: a slow refetch holds only itself, and
        // every refetch of the batch ends by the same deadline.
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_secs_f64(cfg.refetch_budget_secs);
        let prepared: Vec<Prepared> = {
            use futures_util::StreamExt;
            let futures: Vec<_> = batch
                .iter()
                .map(|env| self.prepare(cfg, env, deadline))
                .collect();
            futures_util::stream::iter(futures)
                .buffered(REFETCH_CONCURRENCY)
                .collect()
                .await
        };
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(batch.len());
        // Which messages re-send a row (for an open reprovision).
        let mut resends: Vec<Resend> = Vec::with_capacity(batch.len());
        // Control events: their message, and how many groups come before.
        let mut controls: Vec<(usize, usize, super::markers::Control)> = Vec::new();
        // Runs of consecutive changes to one resource, in order of arrival:
        // a batch is applied in the order it was sent, across resources too
        // (a child created before its parent's delete is purged with it; a
        // parent added before its child exists when the child arrives).
        let mut groups: Vec<(String, Group)> = Vec::new();
        for (i, p) in prepared.into_iter().enumerate() {
            resends.push(match &p {
                Prepared::Change { change, .. } if change.row.is_some() => Resend::Key,
                Prepared::Invalid { resend, .. } => *resend,
                _ => Resend::No,
            });
            match p {
                Prepared::Ignored { name } => {
                    let mut v = Verdict::new("ignored");
                    v.event = Some(name);
                    verdicts.push(v);
                }
                Prepared::Control { name, control } => {
                    let mut v = Verdict::new("applied");
                    v.event = Some(name);
                    verdicts.push(v);
                    controls.push((i, groups.len(), control));
                }
                Prepared::Invalid {
                    name,
                    resource,
                    error,
                    key,
                    ..
                } => {
                    let mut v = Verdict::new("dead_lettered");
                    v.event = name;
                    v.resource = resource;
                    v.key = key.map(|k| k.to_string());
                    v.error = Some(error);
                    verdicts.push(v);
                }
                Prepared::Change {
                    name,
                    resource,
                    change,
                    time,
                } => {
                    let mut v = Verdict::new("applied");
                    v.event = Some(name);
                    v.resource = Some(resource.clone());
                    v.key = Some(change.key.to_string());
                    verdicts.push(v);
                    if let Some(t) = time {
                        self.metrics.event_lag(source, unix_now() - t);
                    }
                    // A control event ends the run: what comes after it is
                    // applied after it.
                    let after_control = controls.last().is_some_and(|c| c.1 == groups.len());
                    match groups.last_mut() {
                        Some((r, g)) if *r == resource && !after_control => g.add(i, change),
                        _ => {
                            let mut g = Group::default();
                            g.add(i, change);
                            groups.push((resource, g));
                        }
                    }
                }
            }
        }
        let mut groups = groups.into_iter();
        let mut applied_groups = 0;
        let mut marked = 0;
        for (at, before, control) in controls {
            for (resource, group) in groups.by_ref().take(before - applied_groups) {
                self.apply_group(
                    &resource,
                    group,
                    &mut verdicts,
                    (!dead_letter).then_some(batch),
                )
                .await?;
            }
            applied_groups = before;
            // Only the worker, reading through its group with its loss
            // checks, starts and completes reprovisions and records what
            // they re-sent: a replay (of a stream range or a dead letter)
            // reads outside the group and cannot know what it missed.
            if !dead_letter {
                verdicts[at].outcome = "ignored";
                verdicts[at].error = Some(
                    "a replay does not start or complete reprovisions: the worker does, as it reads the stream".into(),
                );
                continue;
            }
            self.mark_resent(source, &verdicts[marked..at], &resends[marked..at])
                .await?;
            marked = at + 1;
            let position = batch.get(at).and_then(|e| e.position.clone());
            self.control(source, control, position, &mut verdicts[at])
                .await?;
        }
        for (resource, group) in groups {
            self.apply_group(
                &resource,
                group,
                &mut verdicts,
                (!dead_letter).then_some(batch),
            )
            .await?;
        }
        if dead_letter {
            self.mark_resent(source, &verdicts[marked..], &resends[marked..])
                .await?;
        }
        // A message delivered again (a broker redelivering a batch whose
        // acknowledgement was lost) that is a dead letter already keeps
        // that one letter, counted once: one message, one outcome.
        let mut again = vec![false; verdicts.len()];
        for ((v, env), again) in verdicts.iter_mut().zip(batch).zip(again.iter_mut()) {
            if matches!(v.outcome, "dead_lettered" | "held") && dead_letter {
                let letter = letter_for(
                    source,
                    v.event.as_deref(),
                    v.error.as_deref().unwrap_or_default(),
                    env,
                );
                if let Some(id) = self.store.same_dead_letter(&letter).await? {
                    tracing::info!(source, dead_letter = %id, "message delivered again is a dead letter already");
                    v.dead_letter = Some(id);
                    *again = true;
                    continue;
                }
                self.store.add_dead_letter(&letter).await?;
                tracing::warn!(
                    source,
                    event = v.event.as_deref().unwrap_or("?"),
                    dead_letter = %letter.id,
                    error = %letter.error,
                    "event cannot be applied; kept as a dead letter"
                );
                v.dead_letter = Some(letter.id);
            }
        }
        // A replay is not a new event: it is not counted again.
        if dead_letter {
            for (v, _) in verdicts.iter().zip(&again).filter(|(_, again)| !**again) {
                self.metrics
                    .event(source, v.resource.as_deref().unwrap_or(""), v.outcome);
            }
        }
        Ok(verdicts)
    }

    /// Applies one resource's changes in one transaction; when the
    /// database refuses the batch (a constraint, a value), applies them one
    /// by one so that only the refused ones become dead letters.
    async fn apply_group(
        &self,
        resource: &str,
        group: Group,
        verdicts: &mut [Verdict],
        replayed: Option<&[Envelope]>,
    ) -> Result<(), StoreError> {
        let Some(target) = self.targets.get(resource) else {
            return Ok(());
        };
        // A replayed delete is older than what events wrote since it
        // failed: a row written again meanwhile stays (a parent deleted,
        // then created again, is not deleted by the old delete's replay).
        let group = match replayed {
            None => group,
            Some(batch) => {
                self.drop_overtaken(target, resource, group, verdicts, batch)
                    .await?
            }
        };
        // A table driftd cannot mirror is the operator's to fix: the batch
        // goes back to the source, nothing is dead-lettered.
        let mut shape = match self.cached_shape(target) {
            Some(shape) => shape,
            None => self.read_shape(target).await?,
        };
        let misfit = |shape: &crate::store::Shape, change: &Change| {
            change
                .row
                .as_ref()
                .is_some_and(|r| shape.check_row(&target.spec, r).is_err())
        };
        if group.changes.iter().any(|c| misfit(&shape, c)) {
            // The limits may have changed (a column widened): read them again.
            shape = self.read_shape(target).await?;
        }
        // A value the column would change (round, truncate) is refused as a
        // pass refuses it: applied, it would not be what upstream holds.
        let mut group = group;
        let mut fits = Group::default();
        for (change, i) in group.changes.drain(..).zip(group.owners.drain(..)) {
            match change
                .row
                .as_ref()
                .map(|r| shape.check_row(&target.spec, r))
            {
                Some(Err(e)) => {
                    verdicts[i].outcome = "dead_lettered";
                    verdicts[i].error =
                        Some(format!("a value does not fit its column unchanged: {e}"));
                }
                _ => fits.add(i, change),
            }
        }
        let children = self
            .settings
            .resources
            .get(resource)
            .map(|r| r.children.as_slice())
            .unwrap_or_default();
        // A delete whose cascade would pass a child's purge guard is held,
        // parent and children alike (no orphans): kept as a letter an
        // operator can replay once the policy allows it.
        let group = if children.is_empty() {
            fits
        } else {
            // Judged together: the batch's deletes let through so far and
            // this one, against the children there are now.
            let mut deleting: Vec<Key> = Vec::new();
            let mut kept = Group::default();
            for (change, i) in fits.changes.into_iter().zip(fits.owners) {
                let hold = match change.row {
                    Some(_) => None,
                    None => {
                        deleting.push(change.key.clone());
                        let hold =
                            super::cascade_hold(self.store.as_ref(), children, resource, &deleting)
                                .await?;
                        if hold.is_some() {
                            deleting.pop();
                        }
                        hold
                    }
                };
                match hold {
                    Some(why) => {
                        tracing::warn!(resource, key = %change.key, why, "delete held: its cascade passes a child's purge guard");
                        verdicts[i].outcome = "held";
                        verdicts[i].error = Some(format!(
                            "held, nothing deleted: {why}; replay it once the child's policy allows"
                        ));
                    }
                    None => kept.add(i, change),
                }
            }
            kept
        };
        let results = match self
            .store
            .apply_changes(&target.spec, resource, &group.changes, None)
            .await
        {
            Ok(results) => results.into_iter().map(Ok).collect(),
            // The database is unusable (gone, a table missing, a lost
            // connection): not the events' fault, nothing is settled.
            Err(e) if !e.is_refusal() => return Err(e),
            Err(e) => {
                tracing::warn!(resource, error = %e, "event batch refused; applying its events one by one");
                let mut results = Vec::with_capacity(group.changes.len());
                for change in &group.changes {
                    match self
                        .store
                        .apply_changes(&target.spec, resource, std::slice::from_ref(change), None)
                        .await
                    {
                        Ok(mut r) => results.push(Ok(r.pop().unwrap_or(ChangeResult::Applied))),
                        Err(e) if !e.is_refusal() => return Err(e),
                        Err(e) => results.push(Err(e.refusal_text())),
                    }
                }
                results
            }
        };
        // Deletes whose parents may have children to purge: applied ones,
        // and stale ones (a redelivery after a cascade that failed) whose
        // parent is indeed gone.
        let mut deleted: Vec<(Key, usize, bool)> = Vec::new();
        for ((change, i), result) in group.changes.iter().zip(&group.owners).zip(results) {
            match &result {
                Ok(ChangeResult::Applied) => {}
                Ok(ChangeResult::Stale) => verdicts[*i].outcome = "stale",
                Err(e) => {
                    verdicts[*i].outcome = "dead_lettered";
                    verdicts[*i].error = Some(e.clone());
                }
            }
            if change.row.is_none() {
                match result {
                    Ok(ChangeResult::Applied) => deleted.push((change.key.clone(), *i, true)),
                    Ok(ChangeResult::Stale) => deleted.push((change.key.clone(), *i, false)),
                    Err(_) => {}
                }
            }
        }
        if children.is_empty() {
            return Ok(());
        }
        // Parent by parent (deletes of parents are rare), so that each
        // event's answer counts its own children.
        for (key, i, applied) in deleted {
            let parent = std::slice::from_ref(&key);
            if !applied
                && self
                    .store
                    .count_children(&target.spec, &target.spec.key_column, parent)
                    .await?
                    > 0
            {
                continue; // a newer version of the parent lives
            }
            match super::cascade(self.store.as_ref(), children, resource, parent, false).await {
                Ok(done) => {
                    for (child, n) in done {
                        verdicts[i].cascaded.insert(child, n);
                    }
                }
                // The parent is gone; its children stay. The message is kept:
                // replayed, its delete is stale and the cascade runs again.
                Err(e) if e.is_refusal() => {
                    let error = format!(
                        "`{resource}` row `{key}` deleted, but the database refused to purge its children: {}",
                        e.refusal_text()
                    );
                    tracing::warn!(resource, key = %key, error = %error, "cascade refused; the event is kept as a dead letter");
                    verdicts[i].outcome = "dead_lettered";
                    verdicts[i].error = Some(error);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The deletes of `group` (replayed) whose row lives and was written
    /// by an event after the message (of `batch`) last failed become
    /// `stale`; the rest is returned.
    async fn drop_overtaken(
        &self,
        target: &Target,
        resource: &str,
        group: Group,
        verdicts: &mut [Verdict],
        batch: &[Envelope],
    ) -> Result<Group, StoreError> {
        let mut kept = Group::default();
        for (change, i) in group.changes.into_iter().zip(group.owners) {
            if change.row.is_some() {
                kept.add(i, change);
                continue;
            }
            let arrived = batch.get(i).map(|e| e.received_at.as_str()).unwrap_or("");
            let touched = self
                .store
                .journal_touched(resource, change.key.as_str())
                .await?
                .filter(|t| !arrived.is_empty() && t.as_str() > arrived);
            let lives = match &touched {
                Some(_) => {
                    self.store
                        .count_children(
                            &target.spec,
                            &target.spec.key_column,
                            std::slice::from_ref(&change.key),
                        )
                        .await?
                        > 0
                }
                None => false,
            };
            match touched {
                Some(t) if lives => {
                    verdicts[i].outcome = "stale";
                    verdicts[i].error = Some(format!(
                        "an event wrote `{}` at {t}, after this delete last failed ({arrived}): the row written since stays",
                        change.key
                    ));
                }
                _ => kept.add(i, change),
            }
        }
        Ok(kept)
    }

    fn cached_shape(&self, target: &Target) -> Option<Arc<crate::store::Shape>> {
        target
            .shape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Inspects the table (again) and keeps what it learnt.
    async fn read_shape(&self, target: &Target) -> Result<Arc<crate::store::Shape>, StoreError> {
        let shape = Arc::new(self.store.prepare(&target.spec).await?);
        *target.shape.lock().unwrap_or_else(|p| p.into_inner()) = Some(shape.clone());
        Ok(shape)
    }

    /// Reads one message by the source's mapping; refetches if asked, by
    /// `deadline`.
    async fn prepare(
        &self,
        cfg: &SourceConfig,
        env: &Envelope,
        deadline: tokio::time::Instant,
    ) -> Prepared {
        // What cannot be read might have re-sent any row.
        let invalid =
            |name: Option<&str>, resource: Option<&str>, error: String| Prepared::Invalid {
                name: name.map(str::to_string),
                resource: resource.map(str::to_string),
                error,
                key: None,
                resend: Resend::Unknown,
            };
        // A change to a known key that cannot be applied still re-sent it
        // (unless it deletes it).
        let failed =
            |name: &str, resource: &str, key: &Key, op: EventOp, error: String| Prepared::Invalid {
                name: Some(name.to_string()),
                resource: Some(resource.to_string()),
                error,
                key: Some(key.clone()),
                resend: if op == EventOp::Delete {
                    Resend::No
                } else {
                    Resend::Key
                },
            };
        // No body at all: a message that is its name and headers (a
        // control marker, an event driftd does not map) is read as such.
        let body: Json = if env.body.is_empty() {
            Json::Null
        } else {
            match serde_json::from_slice(&env.body) {
                Ok(b) => b,
                Err(e) => return invalid(None, None, format!("the body is not JSON: {e}")),
            }
        };
        let name = name_of(cfg, env, &body);
        let Some(name) = name else {
            let place = match &cfg.name_pointer {
                Some(p) => format!("no event name (a string) at `{p}` in the body"),
                None => format!(
                    "no event name in header `{}`",
                    cfg.name_header.as_deref().unwrap_or("name")
                ),
            };
            return invalid(None, None, place);
        };
        if let Some(r) = &cfg.reprovision {
            match super::markers::Control::read(r, &name, &body, &env.headers) {
                Ok(Some(control)) => return Prepared::Control { name, control },
                Ok(None) => {}
                Err(error) => {
                    return Prepared::Invalid {
                        name: Some(name),
                        resource: None,
                        error,
                        key: None,
                        resend: Resend::No,
                    }
                }
            }
        }
        let Some(mapping) = cfg.events.get(&name) else {
            return Prepared::Ignored { name };
        };
        let resource = mapping.resource.as_str();
        let (Some(res), Some(target)) = (
            self.settings.resources.get(resource),
            self.targets.get(resource),
        ) else {
            return invalid(Some(&name), Some(resource), "unknown resource".into());
        };
        let key = match key_from_json(resolve(&body, &mapping.key), res.key.kind) {
            Ok(k) => k,
            Err(e) => {
                return Prepared::Invalid {
                    name: Some(name),
                    resource: Some(resource.to_string()),
                    error: format!("key at `{}`: {e}", mapping.key),
                    key: None,
                    resend: if mapping.op == EventOp::Delete {
                        Resend::No
                    } else {
                        Resend::Unknown
                    },
                }
            }
        };
        let version = match &mapping.version {
            None => None,
            Some(p) => match resolve(&body, p) {
                None | Some(Json::Null) => None,
                Some(v) => match mapping.version_kind.sortable(v) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        return failed(&name, resource, &key, mapping.op, format!("`{p}`: {e}"))
                    }
                },
            },
        };
        let time = cfg
            .time_pointer
            .as_deref()
            .and_then(|p| resolve(&body, p))
            .and_then(event_time);
        let row = match mapping.op {
            EventOp::Delete => None,
            EventOp::Upsert => {
                let Some(item) = resolve(&body, &mapping.payload) else {
                    return failed(
                        &name,
                        resource,
                        &key,
                        mapping.op,
                        format!("no payload at `{}`", mapping.payload),
                    );
                };
                match row_for(target, res, item, &key) {
                    Ok(row) => Some(row),
                    Err(e) => return failed(&name, resource, &key, mapping.op, e),
                }
            }
            EventOp::Refetch => {
                match tokio::time::timeout_at(deadline, refetch(target, res, &key)).await {
                    Ok(Ok(row)) => row,
                    Ok(Err(e)) => return failed(&name, resource, &key, mapping.op, e),
                    Err(_) => {
                        let e = format!(
                            "refetch of `{key}` still waiting when the batch's refetch budget ran out (refetch_budget_secs = {}); the rest of the batch applied",
                            cfg.refetch_budget_secs
                        );
                        return failed(&name, resource, &key, mapping.op, e);
                    }
                }
            }
        };
        Prepared::Change {
            name,
            resource: resource.to_string(),
            change: Change { key, row, version },
            time,
        }
    }
}

/// The event name of a message: from its header, or from its body.
pub(super) fn event_name(cfg: &SourceConfig, env: &Envelope) -> Option<String> {
    match &cfg.name_pointer {
        Some(_) => {
            let body: Json = serde_json::from_slice(&env.body).ok()?;
            name_of(cfg, env, &body)
        }
        None => name_of(cfg, env, &Json::Null),
    }
}

fn name_of(cfg: &SourceConfig, env: &Envelope, body: &Json) -> Option<String> {
    match &cfg.name_pointer {
        Some(p) => resolve(body, p).and_then(Json::as_str).map(str::to_string),
        None => {
            let header = cfg.name_header.as_deref().unwrap_or("name");
            // HTTP header names arrive lower-cased: match any case.
            env.headers.get(header).cloned().or_else(|| {
                env.headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(header))
                    .map(|(_, v)| v.clone())
            })
        }
    }
}

/// The row an item maps to, which must carry the event's key.
fn row_for(
    target: &Target,
    res: &ResourceConfig,
    item: &Json,
    key: &Key,
) -> Result<crate::model::Row, String> {
    let row = target.decoder.item(item)?;
    if row.key != *key {
        return Err(format!(
            "the payload's key `{}` (at `{}`) is not the event's key `{key}`",
            row.key, res.key.upstream
        ));
    }
    Ok(row)
}

/// GETs the key upstream: its row, or `None` when upstream answers 404.
async fn refetch(
    target: &Target,
    res: &ResourceConfig,
    key: &Key,
) -> Result<Option<crate::model::Row>, String> {
    let Some(client) = &target.client else {
        return Err("refetch needs upstream.get_path".into());
    };
    let mut fetched = client.fetch_key(key.as_str()).await;
    // A uuid key is gone only if both spellings are, as a pass confirms it:
    // an upstream may match keys as it was given them.
    if res.key.kind == crate::config::KeyType::Uuid && matches!(fetched, Ok(Fetched::Gone)) {
        fetched = client.fetch_key(&key.as_str().to_ascii_uppercase()).await;
    }
    match fetched {
        Ok(Fetched::Gone) => match get_path_finds_listed_keys(target, res, client, key).await {
            Ok(()) => Ok(None),
            Err(why) => Err(format!(
                "refetch of `{key}` answered 404, but {why}: nothing deleted"
            )),
        },
        Ok(Fetched::Present(body)) => {
            let item: Json = serde_json::from_slice(&body)
                .map_err(|e| format!("refetch of `{key}`: the answer is not JSON: {e}"))?;
            row_for(target, res, &item, key)
                .map(Some)
                .map_err(|e| format!("refetch of `{key}`: {e}"))
        }
        Ok(Fetched::Unverifiable) => Err(format!(
            "refetch of `{key}`: the key cannot be put in upstream.get_path faithfully"
        )),
        Err(e) => Err(format!(
            "refetch of `{key}` failed after retries: {}",
            crate::pass::error_chain(&e)
        )),
    }
}

/// Checks, as a pass does before trusting confirmations, that the key
/// answered 404 may go: the listing's first page does not have it (a get
/// endpoint scoped narrower than the listing answers 404 for keys the
/// listing has, and a pass never purges a listed key), and `get_path`
/// finds another key of that page (a typo in the path answers 404 for
/// every key); that second check is trusted [`GET_PATH_TRUSTED`].
async fn get_path_finds_listed_keys(
    target: &Target,
    res: &ResourceConfig,
    client: &Arc<Client>,
    gone: &Key,
) -> Result<(), String> {
    let mut cfg = res.upstream.clone();
    cfg.look_ahead = false;
    let mut pager = crate::upstream::Pager::new(client.clone(), cfg);
    let page = pager.next_page(&target.decoder).await.map_err(|e| {
        format!(
            "the listing could not be read to check get_path ({})",
            crate::pass::error_chain(&e)
        )
    })?;
    let keys: Vec<Key> = page
        .into_iter()
        .flat_map(|p| p.items)
        .map(|row| row.key)
        .collect();
    if keys.contains(gone) {
        return Err(format!(
            "the listing has `{gone}` (its first page): get_path answers 404 for a key upstream lists, so a pass would keep it"
        ));
    }
    let checked = *target
        .get_path_checked
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if checked.is_some_and(|t| t.elapsed() < GET_PATH_TRUSTED) {
        return Ok(());
    }
    let Some(canary) = keys.into_iter().next() else {
        return Err("the listing's first page has no other key to check get_path with".to_string());
    };
    match client.confirm(canary.as_str()).await {
        Ok(crate::upstream::Presence::Present) => {
            *target
                .get_path_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
            Ok(())
        }
        Ok(_) => Err(format!(
            "get_path also answers 404 for `{canary}`, which the listing has (check upstream.get_path)"
        )),
        Err(e) => Err(format!(
            "get_path could not be checked with `{canary}`, which the listing has ({})",
            crate::pass::error_chain(&e)
        )),
    }
}

/// The dead letter keeping `env`.
fn letter_for(source: &str, event: Option<&str>, error: &str, env: &Envelope) -> DeadLetter {
    // Text columns cannot hold NUL (PostgreSQL): a message that carries one
    // must still be kept, not block the source.
    DeadLetter {
        id: uuid::Uuid::new_v4().to_string(),
        source: source.to_string(),
        event: event.map(no_nul),
        error: no_nul(error),
        headers: env
            .headers
            .iter()
            .map(|(k, v)| (no_nul(k), no_nul(v)))
            .collect(),
        body: String::new(),
        raw: env.body.clone(),
        received_at: env.received_at.clone(),
        failed_at: crate::store::now_rfc3339(),
        arrival: env.arrival,
    }
}

/// `text` with NUL characters spelled `\0`.
fn no_nul(text: &str) -> String {
    text.replace('\0', "\\0")
}

/// An event time: RFC 3339 text or seconds since the epoch.
fn event_time(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.to_string().parse().ok(),
        Json::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
            .ok()
            .map(|t| t.timestamp_micros() as f64 / 1e6)
            .or_else(|| {
                // wazo-bus sends a naive ISO time in UTC.
                chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                    .ok()
                    .map(|t| t.and_utc().timestamp_micros() as f64 / 1e6)
            }),
        _ => None,
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A run of one resource's changes in a batch, in order of arrival (a key
/// may come more than once: the store applies them in order).
#[derive(Default)]
struct Group {
    changes: Vec<Change>,
    /// The message each change comes from.
    owners: Vec<usize>,
}

impl Group {
    fn add(&mut self, i: usize, change: Change) {
        self.changes.push(change);
        self.owners.push(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_parse() {
        assert_eq!(event_time(&serde_json::json!(12.5)), Some(12.5));
        assert_eq!(
            event_time(&serde_json::json!("1970-01-01T00:00:10Z")),
            Some(10.0)
        );
        assert_eq!(
            event_time(&serde_json::json!("1970-01-01T00:00:10.5")),
            Some(10.5)
        );
        assert_eq!(event_time(&serde_json::json!("soon")), None);
    }
}

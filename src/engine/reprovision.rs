//! Reprovisions: a producer re-sends every row between a start event and a
//! completion event (or, for producers that send none, a quiet time). The
//! table is never cleared: old rows serve until the new generation is
//! complete. At the start, each resource's journal mark is taken; every
//! row re-sent meanwhile is recorded; at completion, the rows that were not
//! re-sent are purged, resource by resource, as a job of its own (trigger
//! `reprovision`) behind the same purge guard as a pass, and fenced like a
//! pass from the mark, so that a row an event wrote after the start is never
//! purged. A new start before the completion, or the timeout, abandons the
//! open reprovision: nothing is purged.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::events::{Events, Resend, Verdict};
use super::markers::{locked, Control};

/// The re-sent key recorded for a message that may have re-sent a row but
/// could not be read: no key is empty.
const UNKNOWN: &str = "";
use crate::diff::Plan;
use crate::jobs::{Job, JobStatus, Trigger};
use crate::model::Key;
use crate::store::{Ledger, Mirror, PassWrite, Reprovision, StoreError};
use crate::vocab::{Actions, Counts, LossReason, Mode, Outcome, PassReport, Samples, Timings};

impl Events {
    /// The source's open reprovision, read from the ledger the first time.
    async fn open_reprovision(
        &self,
        open: &mut HashMap<String, Option<Reprovision>>,
        source: &str,
    ) -> Result<Option<Reprovision>, StoreError> {
        if let Some(r) = open.get(source) {
            return Ok(r.clone());
        }
        let r = self
            .store()
            .reprovisions(source, 1)
            .await?
            .into_iter()
            .find(|r| r.state == "open");
        open.insert(source.to_string(), r.clone());
        Ok(r)
    }

    /// Records the keys `verdicts` re-sent, if a reprovision is open.
    pub(super) async fn mark_resent(
        &self,
        source: &str,
        verdicts: &[Verdict],
        resends: &[Resend],
    ) -> Result<(), StoreError> {
        if !self.reprovisions_of(source) {
            return Ok(());
        }
        self.touch(source);
        let mut open = self.reprovisions.open.lock().await;
        let Some(r) = self.open_reprovision(&mut open, source).await? else {
            return Ok(());
        };
        let mut by_resource: HashMap<&str, Vec<&str>> = HashMap::new();
        for (v, resend) in verdicts.iter().zip(resends) {
            match (resend, &v.resource, &v.key) {
                // A re-sent row counts even when it was stale or refused:
                // its old row must not be purged for it.
                (Resend::Key, Some(res), Some(key)) if r.marks.contains_key(res) => {
                    by_resource.entry(res).or_default().push(key);
                }
                // A message that may have re-sent a row nobody can name:
                // the resource (or every one) cannot be purged.
                (Resend::Unknown, Some(res), _) | (Resend::Key, Some(res), None)
                    if r.marks.contains_key(res) =>
                {
                    by_resource.entry(res).or_default().push(UNKNOWN);
                }
                (Resend::Unknown, None, _) => {
                    for res in r.marks.keys() {
                        by_resource.entry(res).or_default().push(UNKNOWN);
                    }
                }
                _ => {}
            }
        }
        for (res, keys) in by_resource {
            self.store().mark_resent(&r.id, res, &keys).await?;
        }
        Ok(())
    }

    /// Records that `n` messages of `source` were lost before driftd read
    /// them (design rule 11: a counter, a warning naming the entries, and
    /// the source's status, which the source sets). An open reprovision can
    /// no longer know what was re-sent: it ends `incomplete`, purging
    /// nothing. `upto` is the highest stream position lost, when known: a
    /// reprovision that starts before it is incomplete from its start.
    pub async fn lost(
        &self,
        source: &str,
        reason: LossReason,
        detail: &str,
        n: u64,
        upto: Option<&str>,
    ) -> Result<(), StoreError> {
        self.metrics().events_lost(source, reason, n);
        tracing::warn!(
            source,
            reason = reason.as_str(),
            lost = n,
            detail,
            "messages lost before driftd read them"
        );
        if !self.reprovisions_of(source) {
            return Ok(());
        }
        if let Some(p) = upto.and_then(stream_order) {
            let mut l = locked(&self.reprovisions.lost_upto);
            let e = l.entry(source.to_string()).or_insert(p);
            *e = (*e).max(p);
        }
        let mut open = self.reprovisions.open.lock().await;
        if let Some(r) = self.open_reprovision(&mut open, source).await? {
            let r = self
                .taint(r, &format!("{} ({detail})", reason.as_str()))
                .await?;
            open.insert(source.to_string(), Some(r));
        }
        Ok(())
    }

    /// Notes on an open reprovision that messages were lost during it.
    async fn taint(&self, mut r: Reprovision, note: &str) -> Result<Reprovision, StoreError> {
        r.reason = Some(match r.reason.take() {
            Some(old) => format!("{old}; {note}"),
            None => format!("messages were lost during it: {note}"),
        });
        self.store().save_reprovision(&r).await?;
        tracing::warn!(source = %r.source, reprovision = %r.id, note, "the open reprovision lost messages: it will purge nothing");
        Ok(r)
    }

    /// Whether `source` has a reprovision open (read from the ledger).
    pub async fn reprovision_open(&self, source: &str) -> Result<bool, StoreError> {
        if !self.reprovisions_of(source) {
            return Ok(false);
        }
        let mut open = self.reprovisions.open.lock().await;
        Ok(self.open_reprovision(&mut open, source).await?.is_some())
    }

    /// A read of `source` answered (with entries or none).
    pub fn heard(&self, source: &str) {
        locked(&self.reprovisions.heard).insert(source.to_string(), Instant::now());
    }

    /// Whether `source` has reprovisions configured.
    pub fn reprovisions_of(&self, source: &str) -> bool {
        self.settings()
            .sources
            .get(source)
            .is_some_and(|s| s.reprovision.is_some())
    }

    /// Whether `env` is `source`'s reprovision completion event.
    pub fn is_completion(&self, source: &str, env: &super::events::Envelope) -> bool {
        let Some(cfg) = self.settings().sources.get(source) else {
            return false;
        };
        let Some(completed) = cfg
            .reprovision
            .as_ref()
            .and_then(|r| r.completed.as_deref())
        else {
            return false;
        };
        super::events::event_name(cfg, env).as_deref() == Some(completed)
    }

    /// Restarts `source`'s quiet time: something may still come.
    pub fn touch(&self, source: &str) {
        let mut a = self
            .reprovisions
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        a.insert(source.to_string(), Instant::now());
    }

    /// Handles a start or completion event of `source`.
    pub(super) async fn control(
        &self,
        source: &str,
        control: Control,
        position: Option<String>,
        verdict: &mut Verdict,
    ) -> Result<(), StoreError> {
        let Some(cfg) = self
            .settings()
            .sources
            .get(source)
            .and_then(|s| s.reprovision.clone())
        else {
            return Ok(());
        };
        self.touch(source);
        let mut open = self.reprovisions.open.lock().await;
        let current = self.open_reprovision(&mut open, source).await?;
        match control {
            Control::Started { id } => {
                // A start seen before (delivered again after a crash, or
                // re-read by `driftd replay`) changes nothing: on a stream,
                // a start not after the last one's entry; elsewhere, an id
                // already used.
                let recent = self.store().reprovisions(source, 100).await?;
                let seen = match (position.as_deref().and_then(stream_order), recent.first()) {
                    (Some(p), Some(last)) => last
                        .position
                        .as_deref()
                        .and_then(stream_order)
                        .is_some_and(|lp| p <= lp),
                    (None, _) => id.is_some() && recent.iter().any(|r| r.event_id == id),
                    (Some(_), None) => false,
                };
                if seen {
                    verdict.outcome = "stale";
                    return Ok(());
                }
                if let Some(mut old) = current {
                    old.state = "abandoned".into();
                    old.reason = Some("a new reprovision started before it completed".into());
                    old.ended_at = Some(crate::store::now_rfc3339());
                    self.store().save_reprovision(&old).await?;
                    tracing::warn!(source, reprovision = %old.id, "reprovision abandoned: a new one started before it completed; nothing purged");
                }
                let mut marks = std::collections::BTreeMap::new();
                for res in &cfg.resources {
                    marks.insert(res.clone(), self.store().journal_mark(res).await?);
                }
                let lost_after_start = match position.as_deref().and_then(stream_order) {
                    Some(p) => locked(&self.reprovisions.lost_upto)
                        .get(source)
                        .is_some_and(|l| *l > p),
                    None => false,
                };
                let r = Reprovision {
                    id: uuid::Uuid::new_v4().to_string(),
                    source: source.to_string(),
                    event_id: id,
                    position,
                    marks,
                    state: "open".into(),
                    reason: lost_after_start.then(|| {
                        "messages were lost during it: entries after its start were deleted before driftd read them".to_string()
                    }),
                    jobs: Vec::new(),
                    started_at: crate::store::now_rfc3339(),
                    ended_at: None,
                };
                self.store().save_reprovision(&r).await?;
                tracing::info!(source, reprovision = %r.id, event_id = r.event_id.as_deref().unwrap_or(""), position = r.position.as_deref().unwrap_or(""), "reprovision started");
                open.insert(source.to_string(), Some(r));
            }
            Control::Completed { id } => {
                let Some(r) = current else {
                    verdict.outcome = "ignored";
                    verdict.error = Some("no reprovision is open".into());
                    return Ok(());
                };
                // A completion from before the open reprovision's start (one
                // delivered again) is not its completion.
                if let (Some(p), Some(start)) = (
                    position.as_deref().and_then(stream_order),
                    r.position.as_deref().and_then(stream_order),
                ) {
                    if p <= start {
                        verdict.outcome = "stale";
                        return Ok(());
                    }
                }
                if (cfg.id_pointer.is_some() || cfg.id_header.is_some()) && r.event_id != id {
                    verdict.outcome = "ignored";
                    verdict.error = Some(format!(
                        "completes reprovision `{}`, but `{}` is open",
                        id.unwrap_or_default(),
                        r.event_id.clone().unwrap_or_default()
                    ));
                    return Ok(());
                }
                self.complete(r).await?;
                open.insert(source.to_string(), None);
            }
        }
        Ok(())
    }

    /// Completes quiet reprovisions and abandons timed-out ones; run about
    /// every second by `driftd run`. Quiet time only counts while the
    /// source is `connected` (consuming, its database usable): a source
    /// that cannot read may have re-sent rows waiting, which must not be
    /// purged.
    pub async fn tick_reprovisions(
        &self,
        connected: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(), StoreError> {
        for (source, cfg) in &self.settings().sources {
            let Some(rc) = &cfg.reprovision else { continue };
            if !connected(source) {
                self.touch(source);
            }
            let mut open = self.reprovisions.open.lock().await;
            let Some(mut r) = self.open_reprovision(&mut open, source).await? else {
                continue;
            };
            let age = chrono::DateTime::parse_from_rfc3339(&r.started_at)
                .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds())
                .unwrap_or(0)
                .max(0) as f64
                / 1000.0;
            if age > rc.timeout_secs {
                r.state = "abandoned".into();
                r.reason = Some(format!("not complete within {}s", rc.timeout_secs));
                r.ended_at = Some(crate::store::now_rfc3339());
                self.store().save_reprovision(&r).await?;
                tracing::warn!(source, reprovision = %r.id, "reprovision abandoned: timed out; nothing purged");
                open.insert(source.clone(), None);
                continue;
            }
            let Some(quiet) = rc.quiet_secs else { continue };
            let last = {
                let mut a = self
                    .reprovisions
                    .activity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                // Since start (of driftd) at least.
                *a.entry(source.clone()).or_insert_with(Instant::now)
            };
            let quiet = Duration::from_secs_f64(quiet);
            // A source that reads must have read (and found nothing) after
            // the quiet time: a hung read is not a quiet stream.
            let reads = cfg.kind == crate::config::SourceKind::Redis;
            let heard = locked(&self.reprovisions.heard).get(source).copied();
            let read_since = !reads || heard.is_some_and(|h| h >= last + quiet);
            if last.elapsed() >= quiet && read_since {
                tracing::info!(source, reprovision = %r.id, quiet_secs = quiet.as_secs_f64(), "reprovision complete: the source has been quiet");
                self.complete(r).await?;
                open.insert(source.clone(), None);
            }
        }
        Ok(())
    }

    /// Purges, per resource, the rows the reprovision did not re-send.
    async fn complete(&self, mut r: Reprovision) -> Result<(), StoreError> {
        // Another process (`driftd replay`) may have ended it meanwhile.
        let Some(ledger) = self
            .store()
            .reprovisions(&r.source, 100)
            .await?
            .into_iter()
            .find(|x| x.id == r.id && x.state == "open")
        else {
            tracing::info!(source = %r.source, reprovision = %r.id, "reprovision already ended elsewhere");
            return Ok(());
        };
        // Messages lost during it (noted here or by another process): what
        // was re-sent is not known, so nothing is purged.
        if let Some(reason) = ledger.reason.or(r.reason.take()) {
            r.state = "incomplete".into();
            r.reason = Some(reason);
            r.ended_at = Some(crate::store::now_rfc3339());
            self.store().save_reprovision(&r).await?;
            tracing::warn!(source = %r.source, reprovision = %r.id, reason = r.reason.as_deref().unwrap_or(""), "reprovision incomplete: nothing purged");
            return Ok(());
        }
        let mut tripped = Vec::new();
        for (resource, mark) in r.marks.clone() {
            let job = self.purge_unsent(&r, &resource, mark).await?;
            if job.status != JobStatus::Succeeded {
                tripped.push(format!(
                    "{resource}: {}",
                    job.reason
                        .clone()
                        .unwrap_or_else(|| job.status.as_str().into())
                ));
            }
            r.jobs.push(job.id.to_string());
        }
        r.state = if tripped.is_empty() {
            "completed"
        } else {
            "incomplete"
        }
        .into();
        r.reason = (!tripped.is_empty()).then(|| tripped.join("; "));
        r.ended_at = Some(crate::store::now_rfc3339());
        self.store().save_reprovision(&r).await?;
        tracing::info!(source = %r.source, reprovision = %r.id, state = %r.state, jobs = ?r.jobs, "reprovision ended");
        Ok(())
    }

    /// One resource's purge job: the local rows not re-sent, behind the
    /// purge guard, fenced from the start's mark.
    async fn purge_unsent(
        &self,
        r: &Reprovision,
        resource: &str,
        mark: i64,
    ) -> Result<Job, StoreError> {
        let span = tracing::info_span!("reprovision_purge", resource, reprovision = %r.id);
        let mut job = Job::queued(
            resource,
            Trigger::Reprovision,
            Mode::PurgeOnly,
            false,
            false,
        );
        job.status = JobStatus::Running;
        job.started_at = Some(crate::jobs::now());
        self.store().save_job(&job).await?;
        match self
            .purge_unsent_in(r, resource, mark, &mut job)
            .instrument(span)
            .await
        {
            Ok(()) => Ok(job),
            Err(e) => {
                // Never left `running`: the completion is tried again (with
                // a job of its own) once the database answers.
                job.finish(JobStatus::Failed, Some(crate::pass::error_chain(&e)));
                if let Err(save) = self.store().save_job(&job).await {
                    tracing::warn!(job = %job.id, error = %save, "cannot record the failed reprovision purge");
                }
                Err(e)
            }
        }
    }

    async fn purge_unsent_in(
        &self,
        r: &Reprovision,
        resource: &str,
        mark: i64,
        job: &mut Job,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let (Some(res), Some(target)) = (
            self.settings().resources.get(resource),
            self.targets.get(resource),
        ) else {
            job.finish(JobStatus::Failed, Some("unknown resource".into()));
            self.store().save_job(job).await?;
            return Ok(());
        };
        let spec = &target.spec;
        self.store().prepare(spec).await?;
        let local = self.store().scan(spec).await?;
        let resent: HashSet<String> = self
            .store()
            .resent_keys(&r.id, resource)
            .await?
            .into_iter()
            .collect();
        let purge: Vec<Key> = local
            .keys()
            .filter(|k| !resent.contains(*k))
            .map(|k| Key(k.into()))
            .collect();
        let plan = Plan {
            local_rows: local.len() as u64,
            upstream_rows: (local.len() - purge.len()) as u64,
            purge,
            ..Plan::default()
        };
        drop(local);
        let mut report = PassReport {
            resource: resource.to_string(),
            mode: Mode::PurgeOnly,
            dry_run: false,
            forced: false,
            started_at: job.started_at.clone().unwrap_or_default(),
            duration_ms: 0,
            outcome: Outcome::InSync,
            local_rows: plan.local_rows,
            upstream_rows: plan.upstream_rows,
            upstream_pages: 0,
            upstream_relists: 0,
            found: Counts {
                extra: plan.purge.len() as u64,
                ..Counts::default()
            },
            left: Counts::default(),
            actions: Actions {
                purge: plan.purge.len() as u64,
                ..Actions::default()
            },
            keys: Samples {
                purge: plan.purge.iter().take(10).map(|k| k.to_string()).collect(),
                ..Samples::default()
            },
            guard: None,
            error: None,
            timings: Timings::default(),
        };
        if resent.contains(UNKNOWN) {
            report.outcome = Outcome::Failed;
            report.actions.purge = 0;
            report.error = Some(
                "some re-sent messages could not be read (see the dead letters): what was re-sent is not known, so nothing is purged".into(),
            );
            tracing::warn!("reprovision purge refused: some re-sent messages could not be read; nothing purged");
        } else if plan.purge.is_empty() {
            // Everything was re-sent.
        } else if !res.policy.purge_extra {
            report.outcome = Outcome::DriftLeft;
            report.left.extra = plan.purge.len() as u64;
            report.actions.purge = 0;
        } else if let Some(trip) = match crate::guard::judge(&plan, &res.policy) {
            Some(trip) => Some(trip),
            None => {
                super::cascade_hold(self.store().as_ref(), &res.children, resource, &plan.purge)
                    .await?
                    .map(|detail| crate::vocab::GuardTrip::Cascade { detail })
            }
        } {
            tracing::warn!(guard = trip.name(), error = %trip, "reprovision purge refused by a guard; nothing purged");
            report.outcome = Outcome::GuardTripped;
            report.guard = Some(trip);
        } else {
            let (done, refused) = self.purge_keys(spec, resource, mark, &plan.purge).await?;
            report.actions = done;
            report.outcome = Outcome::Repaired;
            if !refused.is_empty() {
                report.outcome = Outcome::Failed;
                report.left.extra = refused.len() as u64;
                let first: Vec<String> = refused.iter().take(3).cloned().collect();
                report.error = Some(format!(
                    "the database refused to purge {} row(s) not re-sent: {}",
                    refused.len(),
                    first.join("; ")
                ));
                tracing::warn!(
                    refused = refused.len(),
                    error = report.error.as_deref().unwrap_or(""),
                    "reprovision purge: rows refused by the database kept"
                );
            }
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        report.timings.apply_ms = report.duration_ms;
        tracing::info!(
            outcome = report.outcome.as_str(),
            local = report.local_rows,
            resent = report.upstream_rows,
            purged = report.actions.purge,
            "reprovision purge done"
        );
        job.finish_with(&report);
        self.metrics().reprovision_purge(&report);
        self.store().save_job(job).await?;
        Ok(())
    }
}

impl Events {
    /// Purges `keys` batch by batch, fenced from `mark`, with their
    /// children. A batch the database refuses (a foreign key from another
    /// table) is purged key by key, and the keys it still refuses are
    /// kept and returned, each with the refusal: one row never stops the
    /// purge of the others, nor the source.
    async fn purge_keys(
        &self,
        spec: &crate::config::TableSpec,
        resource: &str,
        mark: i64,
        keys: &[Key],
    ) -> Result<(Actions, Vec<String>), StoreError> {
        let children = self
            .settings()
            .resources
            .get(resource)
            .map(|r| r.children.as_slice())
            .unwrap_or_default();
        let batch = self
            .settings()
            .resources
            .get(resource)
            .map_or(500, |r| r.policy.batch_size.max(1));
        let mut done = Actions::default();
        let mut refused = Vec::new();
        for chunk in keys.chunks(batch) {
            let written = match self
                .store()
                .write_pass(spec, resource, mark, PassWrite::Purge(chunk))
                .await
            {
                Ok(w) => vec![(chunk, w)],
                Err(e) if e.is_refusal() => {
                    let mut one_by_one = Vec::new();
                    for k in chunk {
                        let one = std::slice::from_ref(k);
                        match self
                            .store()
                            .write_pass(spec, resource, mark, PassWrite::Purge(one))
                            .await
                        {
                            Ok(w) => one_by_one.push((one, w)),
                            Err(e) if e.is_refusal() => {
                                refused.push(format!("`{k}`: {}", e.refusal_text()))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    one_by_one
                }
                Err(e) => return Err(e),
            };
            for (keys, w) in written {
                done.purge += w.done;
                done.yielded += w.yielded.len() as u64;
                let purged: Vec<Key> = keys
                    .iter()
                    .filter(|k| !w.yielded.contains(k))
                    .cloned()
                    .collect();
                match super::cascade(self.store().as_ref(), children, resource, &purged, false)
                    .await
                {
                    Ok(c) => {
                        for (child, n) in c {
                            *done.cascaded.entry(child).or_default() += n;
                        }
                    }
                    Err(e) if e.is_refusal() => refused.push(format!(
                        "children of {} purged row(s): {}",
                        purged.len(),
                        e.refusal_text()
                    )),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok((done, refused))
    }
}

/// A stream entry id (`<ms>-<seq>`) as a pair that sorts like the stream.
fn stream_order(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_sort_by_time_then_sequence() {
        assert!(stream_order("9-5") < stream_order("10-0"));
        assert!(stream_order("10-2") < stream_order("10-10"));
        assert_eq!(stream_order("x"), None);
        assert_eq!(stream_order("1-"), None);
    }
}

//! One reconciliation pass of one resource: list upstream completely, scan
//! local, diff, guard, apply (or only report, in dry-run), record.
//!
//! Safety invariants, in the order the code enforces them:
//! 1. a plan exists only after the pager declared the listing complete and
//!    the differ found no repeated or out-of-order key; any failure before
//!    that ends the pass with nothing applied;
//! 2. the guards judge the plan; a trip stops the pass before any write
//!    unless forced;
//! 3. with `confirm_purge`, each candidate is purged only on a 404 from the
//!    get-by-key endpoint;
//! 4. writes go in batches, one transaction each, inserts and repairs first,
//!    purges last: a crash leaves whole batches and the next pass converges.
//!
//! The upstream side runs in its own task (fetch, parse, map to typed rows),
//! handing over at most [`PAGES_IN_FLIGHT`] pages, while this task diffs
//! them against the local rows: read into an index first, or, when the
//! listing promises key order, read in that order beside it by a task of
//! their own and merged; the sides overlap on two cores.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{KeyOrder, KeyType, ResourceConfig, TableSpec, UpstreamConfig};
use crate::decode::RowDecoder;
use crate::diff::{Differ, Plan};
use crate::guard::{self, GuardTrip};
use crate::model::{Key, Row};
use crate::store::{PassWrite, SortedScan, Store, StoreError};
use crate::upstream::{Client, Pager, Presence, UpstreamError};

/// Pages buffered between the upstream task and the differ.
const PAGES_IN_FLIGHT: usize = 4;
/// Keys listed per kind in a report (all of them in dry-run).
const SAMPLE: usize = 10;
/// Rows read back at a time to check that they fit their columns.
const WRITE_READ: usize = 4096;
/// Get-by-key confirmations in flight at once.
const CONFIRM_CONCURRENCY: usize = 8;

pub use super::run::{Hooks, PassError, Progress};
pub use crate::vocab::error_chain;
pub use crate::vocab::{Actions, Counts, Mode, Outcome, PassReport, Samples, Timings};

/// How a pass is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOptions {
    pub mode: Mode,
    /// Compute and report, change nothing.
    pub dry_run: bool,
    /// Apply even when a guard trips.
    pub force: bool,
}

/// Runs one pass. Never panics on bad input: every failure becomes a
/// report with outcome `failed` and the error's cause chain.
pub async fn run_pass<S: Store>(
    store: &S,
    name: &str,
    res: &ResourceConfig,
    opts: PassOptions,
    hooks: &Hooks<'_>,
) -> PassReport {
    let span = tracing::info_span!("pass", resource = %name, mode = opts.mode.as_str(), dry_run = opts.dry_run);
    async move {
        let started = Instant::now();
        let started_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut report = PassReport {
            resource: name.to_string(),
            mode: opts.mode,
            dry_run: opts.dry_run,
            forced: opts.force,
            started_at,
            duration_ms: 0,
            outcome: Outcome::Failed,
            local_rows: 0,
            upstream_rows: 0,
            upstream_pages: 0,
            upstream_relists: 0,
            found: Counts::default(),
            left: Counts::default(),
            actions: Actions::default(),
            keys: Samples::default(),
            guard: None,
            error: None,
            timings: Timings::default(),
        };
        let done = if opts.mode == Mode::Incremental {
            super::incremental::execute(store, name, res, opts.dry_run, opts.force, hooks, &mut report)
                .await
        } else {
            execute(store, name, res, opts, hooks, &mut report).await
        };
        match done {
            Ok(()) => {}
            Err(PassError::Cancelled) => {
                report.outcome = Outcome::Cancelled;
                report.error = Some("cancelled".into());
                tracing::warn!("pass cancelled at a safe point");
            }
            Err(e) => {
                report.outcome = Outcome::Failed;
                report.error = Some(error_chain(&e));
                tracing::error!(error = %error_chain(&e), transient = e.is_transient(), "pass failed");
            }
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            outcome = report.outcome.as_str(),
            missing = report.found.missing,
            stale = report.found.stale,
            extra = report.found.extra,
            duration_ms = report.duration_ms,
            "pass finished"
        );
        report
    }
    .instrument(span)
    .await
}

async fn execute<S: Store>(
    store: &S,
    name: &str,
    res: &ResourceConfig,
    opts: PassOptions,
    hooks: &Hooks<'_>,
    report: &mut PassReport,
) -> Result<(), PassError> {
    let spec = res.table_spec();
    let shape = store.prepare(&spec).await?;
    let mut client = Client::new(&res.upstream)?;
    if let Some(m) = &hooks.metrics {
        client = client.observed(name, m.clone());
    }
    let client = Arc::new(client);
    // The journal mark before anything is listed: keys an event writes
    // from now on are newer than this listing, and the pass leaves them.
    let since = store.journal_mark(name).await?;
    let plan = list_and_diff(store, res, &spec, client.clone(), hooks, report).await?;

    report.local_rows = plan.local_rows;
    report.upstream_rows = plan.upstream_rows;
    report.found = Counts {
        missing: plan.insert.len() as u64,
        stale: plan.update.len() as u64,
        extra: plan.purge.len() as u64,
    };
    let mut plan = restrict(plan, res, opts.mode);
    for rows in [&mut plan.insert, &mut plan.update] {
        let mut reader = rows.reader().map_err(PassError::Rows)?;
        while let Some(batch) = reader.next_batch(WRITE_READ).map_err(PassError::Rows)? {
            for row in batch.iter() {
                shape.check_row(&spec, row).map_err(PassError::DoesNotFit)?;
            }
        }
    }

    let mut trip = guard::judge(&plan, &res.policy);
    if trip.is_none() && res.policy.purge_extra && !plan.purge.is_empty() {
        trip = crate::engine::cascade_hold(store, &res.children, name, &plan.purge)
            .await?
            .map(|detail| GuardTrip::Cascade { detail });
    }
    if let Some(trip) = trip {
        if !opts.force {
            tracing::warn!(
                guard = trip.name(),
                "{trip}; nothing applied (force to apply: --force, or \"force\": true in the API request)"
            );
            report.guard = Some(trip);
            report.outcome = Outcome::GuardTripped;
            report.left = report.found.clone();
            // A sample of the keys: every one only in a dry run (a guard
            // trips on a large plan, whose keys would swell every report).
            fill_planned(report, &mut plan, opts.dry_run)?;
            return Ok(());
        }
        tracing::warn!(guard = trip.name(), "{trip}; applying anyway (forced)");
        report.guard = Some(trip);
    }

    let applying = Instant::now();
    if res.confirms_purges() && !plan.purge.is_empty() {
        check_canary(&client, plan.canary.as_ref()).await?;
        // An upstream that takes one request at a time (look_ahead = false)
        // gets its confirmations one at a time too.
        let in_flight = if res.upstream.look_ahead {
            CONFIRM_CONCURRENCY
        } else {
            1
        };
        let purge = std::mem::take(&mut plan.purge);
        let (gone, kept) = confirm(&client, purge, res.key.kind, in_flight).await?;
        plan.purge = gone;
        report.actions.purge_kept = kept;
    }

    let drift = !plan.insert.is_empty() || !plan.update.is_empty() || !plan.purge.is_empty();
    if opts.dry_run {
        // Nothing applied: everything found is still there.
        report.left = report.found.clone();
        fill_planned(report, &mut plan, true)?;
        report.outcome = if drift {
            Outcome::DryRun
        } else {
            Outcome::InSync
        };
        return Ok(());
    }
    fill_planned(report, &mut plan, false)?;
    let writer = Writer {
        spec: &spec,
        resource: name,
        since,
        children: &res.children,
    };
    let yielded = apply(
        store,
        &writer,
        &mut plan,
        res.policy.batch_size,
        &hooks.cancel,
        report,
    )
    .await?;
    report.timings.apply_ms = applying.elapsed().as_millis() as u64;
    report.left = left_behind(&report.found, &report.actions, &yielded);
    let found = &report.found;
    let left = &report.left;
    report.outcome = if left.missing + left.stale + left.extra > 0 {
        Outcome::DriftLeft
    } else if found.missing + found.stale + found.extra == 0 {
        Outcome::InSync
    } else {
        Outcome::Repaired
    };
    if report.outcome == Outcome::DriftLeft {
        tracing::info!(
            left_missing = report.left.missing,
            left_stale = report.left.stale,
            left_extra = report.left.extra,
            "drift left in place by the mode or policy"
        );
    }
    Ok(())
}

/// What the upstream task hands the differ.
enum Listed {
    /// The next page's rows.
    Page(Vec<Row>),
    /// The list moved while it was paged: forget what was listed, a new
    /// listing starts from the first page.
    Restart,
}

/// Streams the upstream listing through the differ; returns the plan only
/// for a listing that ended complete. When upstream promises ascending
/// keys, the local rows are read in the same order and merged with the
/// listing, a window at a time; otherwise they are read into an index
/// first (while the first pages arrive).
async fn list_and_diff<S: Store>(
    store: &S,
    res: &ResourceConfig,
    spec: &TableSpec,
    client: Arc<Client>,
    hooks: &Hooks<'_>,
    report: &mut PassReport,
) -> Result<Plan, PassError> {
    let (tx, mut rx) = mpsc::channel::<Listed>(PAGES_IN_FLIGHT);
    let decoder = RowDecoder::new(res);
    // Aborted when the pass leaves early.
    let lister = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        list_upstream(client, res.upstream.clone(), decoder, tx).in_current_span(),
    ));
    let cancel = &hooks.cancel;
    let started = Instant::now();
    let mut local = None;
    if res.upstream.key_order == KeyOrder::Asc {
        local = until_cancelled(cancel, store.scan_sorted(spec)).await??;
        if local.is_none() {
            tracing::debug!(table = %spec.table, "the table does not sort bytewise by its key: reading it into an index");
        }
    }
    let merging = local.is_some();
    let mut differ = if merging {
        Differ::merging(res.key.kind)
    } else {
        let index = until_cancelled(cancel, store.scan(spec)).await??;
        report.timings.scan_ms = started.elapsed().as_millis() as u64;
        Differ::new(index, res.upstream.key_order, res.key.kind)
    };
    // A merge's scan runs beside the listing: its time is the time the
    // differ waited for local rows.
    let mut waited = std::time::Duration::ZERO;
    let mut pages = 0u64;
    let mut rows = 0u64;
    loop {
        let page = match until_cancelled(cancel, rx.recv()).await? {
            None => break,
            Some(Listed::Restart) => {
                differ.restart();
                if merging {
                    // The old scan stops when its receiver is dropped.
                    local = until_cancelled(cancel, store.scan_sorted(spec)).await??;
                    if local.is_none() {
                        return Err(StoreError::Unavailable(format!(
                            "{} could be read in key order, and then not",
                            spec.table
                        ))
                        .into());
                    }
                }
                report.upstream_relists += 1;
                rows = 0;
                continue;
            }
            Some(Listed::Page(page)) => page,
        };
        pages += 1;
        rows += page.len() as u64;
        for row in page {
            if let Some(local) = local.as_mut() {
                while differ.needs_local(&row.key) {
                    pull(&mut differ, local, spec, cancel, &mut waited).await?;
                }
            }
            differ.observe(row)?;
        }
        hooks.progress.listed(pages, rows);
    }
    report.upstream_pages = pages;
    report.timings.list_ms = started.elapsed().as_millis() as u64;
    match lister.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(PassError::Task(e.to_string())),
    }
    // The listing is complete: the local rows after its last key are
    // listed by no one.
    if let Some(local) = local.as_mut() {
        while differ.local_pending() {
            pull(&mut differ, local, spec, cancel, &mut waited).await?;
        }
        report.timings.scan_ms = waited.as_millis() as u64;
    }
    Ok(differ.finish()?)
}

/// `work`, or `Cancelled` if the pass is cancelled first.
async fn until_cancelled<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Result<T, PassError> {
    tokio::select! {
        done = work => Ok(done),
        _ = cancel.cancelled() => Err(PassError::Cancelled),
    }
}

/// Feeds the differ the next batch of a sorted scan. A scan that ends
/// without saying so stopped short: an error, never the end of the table.
async fn pull(
    differ: &mut Differ,
    local: &mut SortedScan,
    spec: &TableSpec,
    cancel: &CancellationToken,
    waited: &mut std::time::Duration,
) -> Result<(), PassError> {
    let from = Instant::now();
    let next = until_cancelled(cancel, local.recv()).await?;
    *waited += from.elapsed();
    let batch = match next {
        Some(Ok(batch)) => batch,
        Some(Err(e)) => return Err(e.into()),
        None => {
            return Err(StoreError::Unavailable(format!(
                "the ordered scan of {} stopped before its end",
                spec.table
            ))
            .into())
        }
    };
    differ.feed(batch).map_err(|source| {
        StoreError::Index {
            table: spec.table.to_string(),
            source,
        }
        .into()
    })
}

/// The upstream task: pages in, typed rows out. Ends with `Ok` only when a
/// listing ended complete. A listing that saw the list move (or whose row
/// count disagrees with the announced total) is started again, up to
/// `upstream.relist_attempts` times.
async fn list_upstream(
    client: Arc<Client>,
    cfg: UpstreamConfig,
    decoder: RowDecoder,
    tx: mpsc::Sender<Listed>,
) -> Result<(), PassError> {
    let decoder = Arc::new(decoder);
    let mut attempt = 0u32;
    loop {
        let mut pager = Pager::new(client.clone(), cfg.clone());
        match list_once(&mut pager, &decoder, &tx).await {
            Ok(()) => {
                tracing::debug!(
                    rows = pager.rows(),
                    total = pager.total().unwrap_or(0),
                    elapsed_ms = pager.elapsed().as_millis() as u64,
                    "listing complete"
                );
                return Ok(());
            }
            Err(e @ (UpstreamError::Moved(_) | UpstreamError::Incomplete(_)))
                if attempt < cfg.relist_attempts =>
            {
                attempt += 1;
                tracing::warn!(error = %e, attempt, of = cfg.relist_attempts, "listing again from the first page");
                if tx.send(Listed::Restart).await.is_err() {
                    return Ok(());
                }
                tokio::time::sleep(relist_delay(&cfg, attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One listing from the first page to the last.
async fn list_once(
    pager: &mut Pager,
    decoder: &Arc<RowDecoder>,
    tx: &mpsc::Sender<Listed>,
) -> Result<(), UpstreamError> {
    while let Some(page) = pager.next_page(decoder).await? {
        if tx.send(Listed::Page(page.items)).await.is_err() {
            // The differ stopped; its error is the one to report.
            return Ok(());
        }
    }
    Ok(())
}

/// The pause before listing again: the upstream's backoff, growing with
/// each attempt, jittered.
fn relist_delay(cfg: &UpstreamConfig, attempt: u32) -> std::time::Duration {
    let base = std::time::Duration::from_millis(cfg.backoff_ms);
    base.saturating_mul(1 << attempt.min(6))
        .mul_f64(0.5 + fastrand::f64())
}

/// What `found` leaves once `done` is applied. Purge candidates that
/// confirmation found still upstream are not drift: the listing missed
/// them, upstream has them. Nor are keys yielded to newer events.
fn left_behind(found: &Counts, done: &Actions, yielded: &Yielded) -> Counts {
    Counts {
        missing: found
            .missing
            .saturating_sub(done.insert)
            .saturating_sub(yielded.insert),
        stale: found
            .stale
            .saturating_sub(done.update)
            .saturating_sub(yielded.update),
        extra: found
            .extra
            .saturating_sub(done.purge)
            .saturating_sub(done.purge_kept)
            .saturating_sub(yielded.purge),
    }
}

/// Drops the actions the mode or the policy does not allow.
fn restrict(mut plan: Plan, res: &ResourceConfig, mode: Mode) -> Plan {
    let p = &res.policy;
    if !p.insert_missing || mode == Mode::PurgeOnly {
        plan.insert.clear();
    }
    if !p.repair_stale || mode == Mode::PurgeOnly {
        plan.update.clear();
    }
    if !p.purge_extra || mode == Mode::RepairOnly {
        plan.purge.clear();
    }
    plan
}

fn fill_planned(report: &mut PassReport, plan: &mut Plan, all_keys: bool) -> Result<(), PassError> {
    let take = if all_keys { usize::MAX } else { SAMPLE };
    report.actions.insert = plan.insert.len() as u64;
    report.actions.update = plan.update.len() as u64;
    report.actions.purge = plan.purge.len() as u64;
    report.keys = Samples {
        insert: plan.insert.keys(take).map_err(PassError::Rows)?,
        update: plan.update.keys(take).map_err(PassError::Rows)?,
        purge: plan.purge.iter().take(take).map(Key::to_string).collect(),
    };
    Ok(())
}

/// Checks that the get-by-key endpoint finds a key the listing has.
async fn check_canary(client: &Client, canary: Option<&Key>) -> Result<(), PassError> {
    let Some(key) = canary else {
        return Ok(());
    };
    match client.confirm(key.as_str()).await? {
        Presence::Present => Ok(()),
        Presence::Gone | Presence::Unverifiable => Err(PassError::Canary(key.clone())),
    }
}

/// Splits candidates into confirmed-gone and kept (still present, or not
/// checkable). A uuid key is gone only if both its lower- and upper-case
/// spellings are: driftd stores the canonical lower case, an upstream may
/// store and match keys as it was given them.
async fn confirm(
    client: &Client,
    candidates: Vec<Key>,
    key_type: KeyType,
    in_flight: usize,
) -> Result<(Vec<Key>, u64), PassError> {
    let checks: Vec<(Key, Result<Presence, UpstreamError>)> = stream::iter(candidates)
        .map(|key| async move {
            let mut presence = client.confirm(key.as_str()).await;
            if key_type == KeyType::Uuid && matches!(presence, Ok(Presence::Gone)) {
                presence = client.confirm(&key.as_str().to_ascii_uppercase()).await;
            }
            (key, presence)
        })
        .buffered(in_flight)
        .collect()
        .await;
    let mut gone = Vec::new();
    let mut kept = 0;
    for (key, presence) in checks {
        match presence? {
            Presence::Gone => gone.push(key),
            Presence::Present => {
                tracing::warn!(%key, "purge candidate still exists upstream; kept (the listing missed it)");
                kept += 1;
            }
            Presence::Unverifiable => {
                tracing::warn!(%key, "purge candidate cannot be checked with get_path (the key does not survive as a URL path segment); kept");
                kept += 1;
            }
        }
    }
    Ok((gone, kept))
}

async fn apply<S: Store>(
    store: &S,
    w: &Writer<'_>,
    plan: &mut Plan,
    batch: usize,
    cancel: &CancellationToken,
    report: &mut PassReport,
) -> Result<Yielded, PassError> {
    let stop = || {
        if cancel.is_cancelled() {
            Err(PassError::Cancelled)
        } else {
            Ok(())
        }
    };
    // Count what is really done, batch by batch, so a failed pass reports
    // what it had applied before the failure.
    let done = &mut report.actions;
    done.insert = 0;
    done.update = 0;
    done.purge = 0;
    let mut yielded = Yielded::default();
    let mut inserts = plan.insert.reader().map_err(PassError::Rows)?;
    while let Some(chunk) = inserts.next_batch(batch).map_err(PassError::Rows)? {
        stop()?;
        let written = w.write(store, PassWrite::Insert(&chunk)).await?;
        done.insert += written.done;
        yielded.insert += written.yielded.len() as u64;
    }
    let mut updates = plan.update.reader().map_err(PassError::Rows)?;
    while let Some(chunk) = updates.next_batch(batch).map_err(PassError::Rows)? {
        stop()?;
        let written = w.write(store, PassWrite::Update(&chunk)).await?;
        done.update += written.done;
        yielded.update += written.yielded.len() as u64;
    }
    for chunk in plan.purge.chunks(batch) {
        stop()?;
        let written = w.write(store, PassWrite::Purge(chunk)).await?;
        done.purge += written.done;
        yielded.purge += written.yielded.len() as u64;
        let purged: Vec<Key> = chunk
            .iter()
            .filter(|k| !written.yielded.contains(k))
            .cloned()
            .collect();
        for (child, n) in
            crate::engine::cascade(store, w.children, w.resource, &purged, false).await?
        {
            *done.cascaded.entry(child).or_default() += n;
        }
    }
    done.yielded = yielded.insert + yielded.update + yielded.purge;
    Ok(yielded)
}

/// Keys each kind of write left to events.
#[derive(Debug, Default)]
struct Yielded {
    insert: u64,
    update: u64,
    purge: u64,
}

/// A pass's writes: fenced by the journal mark taken before listing.
struct Writer<'a> {
    spec: &'a TableSpec,
    resource: &'a str,
    since: i64,
    children: &'a [crate::config::ChildLink],
}

impl Writer<'_> {
    async fn write<S: Store>(
        &self,
        store: &S,
        write: PassWrite<'_>,
    ) -> Result<crate::store::Written, StoreError> {
        store
            .write_pass(self.spec, self.resource, self.since, write)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Ident, KeyType};
    use crate::diff::LocalBatch;

    fn spec() -> TableSpec {
        TableSpec {
            table: Ident::parse("items").unwrap(),
            key_column: Ident::parse("id").unwrap(),
            key_type: KeyType::Text,
            columns: vec![],
            soft_delete: None,
        }
    }

    /// A sorted scan whose task ends without saying the table ended (a
    /// panic, a dropped connection) is an error: the rows after it would
    /// otherwise be taken as absent locally, or the listing's rows after
    /// them as missing, and the local rows the scan never sent as extra.
    #[tokio::test]
    async fn a_scan_that_stops_without_its_end_fails_the_pass() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut batch = LocalBatch::default();
        batch.push("a", 1).unwrap();
        tx.send(Ok(Some(batch))).await.unwrap();
        drop(tx);
        let mut differ = Differ::merging(KeyType::Text);
        let cancel = CancellationToken::new();
        let mut waited = std::time::Duration::ZERO;
        let spec = spec();
        pull(&mut differ, &mut rx, &spec, &cancel, &mut waited)
            .await
            .unwrap();
        let err = pull(&mut differ, &mut rx, &spec, &cancel, &mut waited)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("stopped before its end"), "{err}");
        assert!(differ.local_pending());
        assert!(differ.finish().is_err());
    }
}

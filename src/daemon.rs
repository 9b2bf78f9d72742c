//! `driftd run`: the long-running worker. Start-up order: open the store,
//! fail abandoned jobs, seed the last-success metric from the job history,
//! load schedules, start the event sources, serve the admin API, start the
//! scheduler, submit start-up passes.
//!
//! Shutdown protocol (SIGTERM or SIGINT): stop the scheduler (no new
//! ticks), close the runner (no new jobs; running passes are cancelled and
//! stop at their next safe point, leaving the table consistent), wait for
//! them up to `daemon.shutdown_grace_secs`, stop the event sources (a batch
//! being applied finishes and is acknowledged; the rest stays in the
//! broker), then stop the HTTP server.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_cron_scheduler::JobScheduler;
use tokio_util::sync::CancellationToken;

use crate::admin::{router, AppState};
use crate::config::Settings;
use crate::engine::events::Events;
use crate::jobs::Trigger;
use crate::metrics::Metrics;
use crate::runner::{JobRequest, Runner};
use crate::scheduler::Schedules;
use crate::sources::Sources;
use crate::vocab::Mode;

/// A started worker.
pub struct Daemon {
    pub runner: Runner,
    /// Where the admin API listens.
    pub addr: SocketAddr,
    pub schedules: Arc<Schedules>,
    pub events: Arc<Events>,
    pub sources: Sources,
    source_tasks: Vec<JoinHandle<()>>,
    stop_sources: CancellationToken,
    scheduler: JobScheduler,
    stop_http: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

impl Daemon {
    pub async fn start(settings: Arc<Settings>) -> anyhow::Result<Daemon> {
        let schedules = Arc::new(
            Schedules::load(&settings.schedules_dir(), &settings).map_err(anyhow::Error::new)?,
        );
        let store = Arc::new(open_store(&settings).await?);
        // Refuse to start over a table driftd cannot mirror faithfully.
        for (name, res) in &settings.resources {
            crate::store::Mirror::prepare(store.as_ref(), &res.table_spec())
                .await
                .with_context(|| format!("resource `{name}`"))?;
        }
        // A source's broker URL from a variable must be there to run.
        for (name, src) in &settings.sources {
            let url = match (&src.rabbitmq, &src.redis) {
                (Some(r), _) => Some(r.resolve_url()),
                (None, Some(r)) => Some(r.resolve_url()),
                (None, None) => None,
            };
            if let Some(Err(e)) = url {
                anyhow::bail!("{}: sources.{name}.{e}", settings.source.display());
            }
        }
        let metrics = Arc::new(Metrics::new());
        let events = Arc::new(Events::new(
            settings.clone(),
            store.clone(),
            metrics.clone(),
        )?);
        let runner = Runner::new(settings.clone(), store, metrics);
        let abandoned = runner
            .recover()
            .await
            .context("recovering abandoned jobs")?;
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "jobs left running by a previous crash were marked failed"
            );
        }
        runner
            .seed_last_success()
            .await
            .context("reading the last successes from the job history")?;
        let listen = &settings.admin.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("admin.listen {listen}"))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && settings.admin.resolved_token.is_none() {
            tracing::warn!(%addr, "admin API on a non-loopback address without a token: mutating endpoints are refused");
        }
        let stop_http = CancellationToken::new();
        spawn_pruner(runner.clone(), stop_http.clone());
        events.refresh_dead_letters().await;
        let stop_sources = CancellationToken::new();
        let (sources, source_tasks) = crate::sources::start_all(events.clone(), &stop_sources);
        let app = router(AppState {
            runner: runner.clone(),
            schedules: schedules.clone(),
            events: events.clone(),
            sources: sources.clone(),
        });
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(stop_http.clone().cancelled_owned())
                .into_future(),
        );
        let scheduler = schedules
            .start(runner.clone())
            .await
            .map_err(anyhow::Error::new)?;
        tracing::info!(%addr, schedules = schedules.entries.len(), "driftd running");
        for resource in &settings.daemon.startup {
            let req = JobRequest {
                resource: resource.clone(),
                trigger: Trigger::Startup,
                mode: Mode::Full,
                dry_run: false,
                force: false,
            };
            if let Err(e) = runner.submit(req).await {
                tracing::warn!(%resource, error = %e, "start-up pass not started");
            }
        }
        Ok(Daemon {
            runner,
            addr,
            schedules,
            events,
            sources,
            source_tasks,
            stop_sources,
            scheduler,
            stop_http,
            server,
        })
    }

    /// Runs the shutdown protocol; returns whether every pass ended in time.
    pub async fn stop(mut self) -> bool {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "scheduler did not stop cleanly");
        }
        let grace = self.runner.settings().daemon.shutdown_grace();
        let clean = self.runner.shutdown(grace).await;
        if !clean {
            tracing::warn!(?grace, "passes still running at the deadline; exiting anyway (their open transaction rolls back)");
        }
        self.stop_sources.cancel();
        for task in self.source_tasks.drain(..) {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("an event source did not stop in time");
            }
        }
        self.stop_http.cancel();
        let _ = self.server.await;
        clean
    }
}

/// How often the worker prunes old jobs (also once at start).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prunes `driftd_jobs` at start and every [`PRUNE_EVERY`] until `stop`.
fn spawn_pruner(runner: Runner, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = runner.prune_jobs(std::time::SystemTime::now()).await {
                tracing::warn!(error = %crate::pass::error_chain(&e), "could not prune old jobs");
            }
        }
    });
}

/// `driftd run` until SIGTERM or SIGINT.
pub async fn run(settings: Arc<Settings>) -> anyhow::Result<i32> {
    let daemon = Daemon::start(settings).await?;
    wait_for_signal().await;
    tracing::info!("shutting down; a second SIGTERM or SIGINT exits at once");
    tokio::spawn(async {
        wait_for_signal().await;
        // Open write transactions roll back: the table stays consistent.
        tracing::warn!("second signal: exiting now, without waiting for passes");
        std::process::exit(130);
    });
    let clean = daemon.stop().await;
    Ok(if clean { 0 } else { 1 })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Opens the store. The error names the URL masked, and its text is
/// scrubbed of the URL's secrets should the driver have echoed them.
pub async fn open_store(
    settings: &crate::config::Settings,
) -> anyhow::Result<crate::store::AnyStore> {
    let url = secrecy::ExposeSecret::expose_secret(&settings.store.url);
    crate::store::AnyStore::open(&settings.store.url, settings.store.max_connections)
        .await
        .map_err(|e| {
            let problem = crate::redact::scrub(&crate::pass::error_chain(&e), url);
            anyhow::anyhow!("store {}: {problem}", crate::redact::mask_url(url))
        })
}

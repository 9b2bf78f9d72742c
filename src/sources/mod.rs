//! Event sources started by `driftd run`: a RabbitMQ queue
//! ([`rabbitmq`]), a Redis stream ([`redis`]) and the admin server's webhook
//! (`POST /v1/events/{source}`). Each source gets a [`SourceContext`]: its
//! config, the shared [`Events`] engine it hands messages to, its status
//! slot and the shutdown signal. Delivery is at least once: a source
//! acknowledges a message only after [`Events::deliver`] returned, that is
//! after its change was committed or its dead letter stored.

pub mod rabbitmq;
pub mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{SourceConfig, SourceKind};
use crate::engine::events::Events;

/// What `/v1/sources` and `/readyz` say of a source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub kind: &'static str,
    /// `connected`, `connecting` or `down`.
    pub state: &'static str,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<String>,
    /// Messages settled (applied, stale, ignored or dead-lettered).
    pub events: u64,
    /// Connections made since start.
    pub connects: u64,
    /// Messages (or runs of them) lost before they were read, since start.
    pub lost: u64,
    /// The last loss: its reason and the entries it names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<String>,
}

/// Every source's status, shared with the admin API.
#[derive(Clone, Default)]
pub struct Sources {
    statuses: Arc<Mutex<BTreeMap<String, SourceStatus>>>,
}

impl Sources {
    pub fn list(&self) -> Vec<SourceStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SourceStatus>> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, name: &str, kind: SourceKind) -> StatusHandle {
        let webhook = kind == SourceKind::Webhook;
        self.lock().insert(
            name.to_string(),
            SourceStatus {
                name: name.to_string(),
                kind: kind.as_str(),
                state: if webhook { "connected" } else { "connecting" },
                connected: webhook,
                last_error: None,
                last_event_at: None,
                events: 0,
                connects: 0,
                lost: 0,
                last_loss: None,
            },
        );
        StatusHandle {
            name: name.to_string(),
            sources: self.clone(),
        }
    }

    /// The handle of `name`, if it is a source.
    pub fn handle(&self, name: &str) -> Option<StatusHandle> {
        self.lock().contains_key(name).then(|| StatusHandle {
            name: name.to_string(),
            sources: self.clone(),
        })
    }
}

/// One source's slot in [`Sources`].
#[derive(Clone)]
pub struct StatusHandle {
    name: String,
    sources: Sources,
}

impl StatusHandle {
    fn update(&self, f: impl FnOnce(&mut SourceStatus)) {
        if let Some(s) = self.sources.lock().get_mut(&self.name) {
            f(s);
        }
    }

    pub fn connected(&self) {
        self.update(|s| {
            s.state = "connected";
            s.connected = true;
            s.connects += 1;
        });
    }

    /// Back to `connected` after `down` without a new connection (the
    /// database came back).
    pub fn recovered(&self) {
        self.update(|s| {
            if !s.connected {
                s.state = "connected";
                s.connected = true;
            }
        });
    }

    pub fn down(&self, error: &str) {
        let error = error.to_string();
        self.update(|s| {
            s.state = "down";
            s.connected = false;
            s.last_error = Some(error);
        });
    }

    /// Records `n` messages lost before they were read.
    pub fn lost(&self, n: u64, what: &str) {
        let what = what.to_string();
        self.update(|s| {
            s.lost += n;
            s.last_loss = Some(what);
        });
    }

    pub fn settled(&self, n: usize) {
        self.update(|s| {
            s.events += n as u64;
            s.last_event_at = Some(crate::store::now_rfc3339());
        });
    }
}

/// What a source is handed when it starts.
pub struct SourceContext {
    pub name: String,
    pub config: SourceConfig,
    pub events: Arc<Events>,
    pub status: StatusHandle,
    pub shutdown: CancellationToken,
}

/// Starts every configured source; the webhook ones only get a status
/// (the admin server serves them).
pub fn start_all(
    events: Arc<Events>,
    shutdown: &CancellationToken,
) -> (Sources, Vec<JoinHandle<()>>) {
    let sources = Sources::default();
    let mut tasks = Vec::new();
    for (name, cfg) in &events.settings().sources {
        let status = sources.add(name, cfg.kind);
        match cfg.kind {
            SourceKind::Webhook => events.metrics().source_connected(name, true),
            SourceKind::Rabbitmq | SourceKind::Redis => {
                let ctx = SourceContext {
                    name: name.clone(),
                    config: cfg.clone(),
                    events: events.clone(),
                    status,
                    shutdown: shutdown.child_token(),
                };
                tasks.push(match cfg.kind {
                    SourceKind::Redis => tokio::spawn(redis::run(ctx)),
                    _ => tokio::spawn(rabbitmq::run(ctx)),
                });
            }
        }
    }
    if !events.settings().sources.is_empty() {
        let reprovisions = events
            .settings()
            .sources
            .values()
            .any(|s| s.reprovision.is_some());
        let shutdown = shutdown.child_token();
        let statuses = sources.clone();
        tasks.push(tokio::spawn(async move {
            let connected =
                move |name: &str| statuses.lock().get(name).is_some_and(|s| s.connected);
            let mut tick: u64 = 0;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                tick += 1;
                // Quiet reprovisions complete, timed-out ones are abandoned.
                if reprovisions {
                    if let Err(e) = events.tick_reprovisions(&connected).await {
                        tracing::warn!(error = %e, "cannot check open reprovisions; retrying");
                    }
                }
                // The dead-letter gauge follows the table, whoever changed it
                // (the CLI, the API, another replica).
                if tick.is_multiple_of(5) {
                    events.refresh_dead_letters().await;
                }
            }
        }));
    }
    (sources, tasks)
}

/// The pause before a source reconnects: doubles after each failure up to
/// a limit, back to the minimum once a connection consumes.
pub struct Backoff {
    ms: AtomicU64,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            ms: AtomicU64::new(min.as_millis() as u64),
            min,
            max,
        }
    }

    /// A connection is up: the next failure waits the minimum again.
    pub fn reset(&self) {
        self.ms
            .store(self.min.as_millis() as u64, Ordering::Relaxed);
    }

    fn current(&self) -> Duration {
        Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }

    fn grow(&self) {
        let next = (self.current() * 2).min(self.max);
        self.ms.store(next.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Runs `consume` (one connection's life, `Ok` on shutdown) until
/// shutdown, reconnecting after a failure with a growing, jittered pause;
/// each failure is logged (the URL scrubbed) and shown in the status.
pub(crate) async fn keep_consuming<F, Fut>(
    ctx: &SourceContext,
    url: Result<SecretString, String>,
    max_backoff_secs: f64,
    mut consume: F,
) where
    F: FnMut(SecretString, Arc<Backoff>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let url = match url {
        Ok(u) => u,
        Err(e) => {
            // `driftd run` checks this before starting; a variable unset
            // since is reported, not retried.
            tracing::error!(error = %e, "source not started");
            ctx.status.down(&e);
            return;
        }
    };
    let backoff = Arc::new(Backoff::new(
        Duration::from_millis(250),
        Duration::from_secs_f64(max_backoff_secs),
    ));
    loop {
        let outcome = consume(url.clone(), backoff.clone()).await;
        ctx.events.metrics().source_connected(&ctx.name, false);
        match outcome {
            Ok(()) => {
                tracing::info!("source stopped");
                return;
            }
            Err(e) => {
                let text = crate::redact::scrub(
                    &crate::pass::error_chain(e.as_ref()),
                    url.expose_secret(),
                );
                tracing::warn!(error = %text, retry_in_ms = backoff.current().as_millis() as u64, "source stopped consuming; reconnecting");
                ctx.status.down(&text);
            }
        }
        let pause = backoff.current().mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff.grow();
    }
}

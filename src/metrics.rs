//! Prometheus metrics: one registry in the app state (no global macros).
//! Label values come from closed sets (resource names from the config,
//! kinds, actions, triggers, outcomes, guards, status classes), never ids.
//! Every metric is documented in the README.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::jobs::{JobStatus, Trigger};
use crate::vocab::{Outcome, PassReport};

/// All of driftd's metrics.
pub struct Metrics {
    registry: Registry,
    drift_rows: IntGaugeVec,
    actions: IntCounterVec,
    passes: IntCounterVec,
    pass_duration: HistogramVec,
    last_success: GaugeVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    local_rows: IntGaugeVec,
    upstream_rows: IntGaugeVec,
    guard_trips: IntCounterVec,
    jobs_running: IntGaugeVec,
    skipped: IntCounterVec,
    events: IntCounterVec,
    event_lag: HistogramVec,
    dead_letters: IntGaugeVec,
    source_connected: IntGaugeVec,
    events_lost: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are fixed and distinct, so registration cannot conflict.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets),
                    &["resource"],
                )
                .expect("valid metric"),
            )
        };
        let m = Metrics {
            drift_rows: gauge(
                "driftd_drift_rows",
                "Drift rows found by the last completed listing, by kind.",
                &["resource", "kind"],
            ),
            actions: counter(
                "driftd_actions_total",
                "Rows inserted, updated or purged (or that would have been, in dry runs).",
                &["resource", "action", "dry_run"],
            ),
            passes: counter(
                "driftd_passes_total",
                "Passes run, by trigger and outcome.",
                &["resource", "trigger", "outcome"],
            ),
            pass_duration: histogram(
                "driftd_pass_duration_seconds",
                "Wall time of a pass.",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0],
            ),
            last_success: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "driftd_last_success_timestamp_seconds",
                        "Unix time of the last pass that left the table equal to upstream (in sync or repaired; not a dry run that found drift).",
                    ),
                    &["resource"],
                )
                .expect("valid metric"),
            ),
            upstream_requests: counter(
                "driftd_upstream_requests_total",
                "Upstream HTTP requests, by status class (error = no response).",
                &["resource", "status_class"],
            ),
            upstream_duration: histogram(
                "driftd_upstream_request_duration_seconds",
                "Upstream HTTP request duration, body included.",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            local_rows: gauge(
                "driftd_local_rows",
                "Live rows in the local table at the last pass.",
                &["resource"],
            ),
            upstream_rows: gauge(
                "driftd_upstream_rows",
                "Rows in the last complete upstream listing.",
                &["resource"],
            ),
            guard_trips: counter(
                "driftd_guard_trips_total",
                "Passes stopped (or forced past) by a guard.",
                &["resource", "guard"],
            ),
            jobs_running: gauge(
                "driftd_jobs_running",
                "Jobs running now.",
                &["resource"],
            ),
            skipped: counter(
                "driftd_triggers_skipped_total",
                "Triggers not run: overlap (a pass of the resource was running), locked (another replica holds it).",
                &["resource", "reason"],
            ),
            events: counter(
                "driftd_events_total",
                "Events received, by source, resource (empty when unknown) and outcome: applied, stale (older than what was applied), ignored (unmapped name), dead_lettered, held (a delete whose cascade passes a child's purge guard).",
                &["source", "resource", "outcome"],
            ),
            event_lag: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "driftd_event_lag_seconds",
                        "Now minus the event's own time, when applied (events that carry a time).",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 3600.0]),
                    &["source"],
                )
                .expect("valid metric"),
            ),
            dead_letters: gauge(
                "driftd_dead_letters",
                "Dead letters waiting (for replay or deletion), by source.",
                &["source"],
            ),
            source_connected: gauge(
                "driftd_source_connected",
                "1 while the source is connected and consuming (a webhook always is).",
                &["source"],
            ),
            events_lost: counter(
                "driftd_events_lost_total",
                "Messages lost before driftd read them, by source and reason: trimmed (deleted from the stream unread), deleted_pending (deleted while pending), group_recreated (the consumer group was created anew). A run of entries whose number cannot be known counts one.",
                &["source", "reason"],
            ),
            registry: r,
        };
        let build = IntGaugeVec::new(
            Opts::new("driftd_build_info", "driftd build; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(&m.registry, build);
        m
    }

    /// Makes every resource's series exist from the start, at zero.
    pub fn register_resource(&self, resource: &str) {
        self.jobs_running.with_label_values(&[resource]).set(0);
        for reason in ["overlap", "locked"] {
            self.skipped.with_label_values(&[resource, reason]);
        }
        for guard in crate::guard::GUARD_NAMES {
            self.guard_trips.with_label_values(&[resource, guard]);
        }
        // Failed passes from zero, so `increase()` sees the first one.
        for trigger in Trigger::ALL {
            self.passes
                .with_label_values(&[resource, trigger.as_str(), Outcome::Failed.as_str()]);
        }
    }

    /// Makes a source's series exist from the start.
    pub fn register_source(&self, source: &str, resources: &[&str]) {
        self.source_connected.with_label_values(&[source]).set(0);
        self.dead_letters.with_label_values(&[source]);
        self.event_lag.with_label_values(&[source]);
        for r in resources {
            for outcome in ["applied", "stale", "dead_lettered", "held"] {
                self.events.with_label_values(&[source, r, outcome]);
            }
        }
        self.events
            .with_label_values(&[source, "", "dead_lettered"]);
        self.events.with_label_values(&[source, "", "ignored"]);
        for reason in crate::vocab::LossReason::ALL {
            self.events_lost
                .with_label_values(&[source, reason.as_str()]);
        }
    }

    /// Counts messages of `source` lost before they were read.
    pub fn events_lost(&self, source: &str, reason: crate::vocab::LossReason, n: u64) {
        self.events_lost
            .with_label_values(&[source, reason.as_str()])
            .inc_by(n);
    }

    /// Counts one event's outcome.
    pub fn event(&self, source: &str, resource: &str, outcome: &str) {
        self.events
            .with_label_values(&[source, resource, outcome])
            .inc();
    }

    pub fn event_lag(&self, source: &str, seconds: f64) {
        self.event_lag
            .with_label_values(&[source])
            .observe(seconds.max(0.0));
    }

    pub fn dead_letters(&self, source: &str, waiting: i64) {
        self.dead_letters.with_label_values(&[source]).set(waiting);
    }

    pub fn source_connected(&self, source: &str, connected: bool) {
        self.source_connected
            .with_label_values(&[source])
            .set(i64::from(connected));
    }

    /// Records a reprovision's purge job: as a pass of trigger
    /// `reprovision` (its outcome, a guard it tripped, the rows it purged),
    /// leaving the drift and row gauges to the passes that list upstream.
    pub fn reprovision_purge(&self, report: &PassReport) {
        let r = report.resource.as_str();
        self.passes
            .with_label_values(&[r, Trigger::Reprovision.as_str(), report.outcome.as_str()])
            .inc();
        if let Some(g) = &report.guard {
            self.guard_trips.with_label_values(&[r, g.name()]).inc();
        }
        self.actions
            .with_label_values(&[r, "purge", "false"])
            .inc_by(report.actions.purge);
    }

    /// Records a finished pass.
    pub fn pass(&self, report: &PassReport, trigger: Trigger) {
        let r = report.resource.as_str();
        self.passes
            .with_label_values(&[r, trigger.as_str(), report.outcome.as_str()])
            .inc();
        self.pass_duration
            .with_label_values(&[r])
            .observe(report.duration_ms as f64 / 1000.0);
        if let Some(g) = &report.guard {
            self.guard_trips.with_label_values(&[r, g.name()]).inc();
        }
        if report.outcome == Outcome::Failed || report.outcome == Outcome::Cancelled {
            return;
        }
        // An incremental run sees changes, not the table: the drift and row
        // gauges and the last success stay the full passes'.
        let incremental = report.mode == crate::vocab::Mode::Incremental;
        if incremental {
            if report.outcome != Outcome::GuardTripped {
                let dry = if report.dry_run { "true" } else { "false" };
                for (action, n) in [
                    ("update", report.actions.update),
                    ("purge", report.actions.purge),
                ] {
                    self.actions.with_label_values(&[r, action, dry]).inc_by(n);
                }
            }
            return;
        }
        self.seed_gauges(report);
        if report.outcome != Outcome::GuardTripped {
            let dry = if report.dry_run { "true" } else { "false" };
            for (action, n) in [
                ("insert", report.actions.insert),
                ("update", report.actions.update),
                ("purge", report.actions.purge),
            ] {
                self.actions.with_label_values(&[r, action, dry]).inc_by(n);
            }
        }
        if JobStatus::of_report(report) == JobStatus::Succeeded {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.last_success.with_label_values(&[r]).set(now);
        }
    }

    /// Sets the last success of `resource` from the job history at start
    /// (`0` = none on record), so the series exists, and the "no recent
    /// success" alert can fire, before the next pass. A pass that ended
    /// meanwhile is newer and is kept.
    /// Sets the drift and row gauges from a pass recorded before this
    /// process started.
    pub fn seed_gauges(&self, report: &PassReport) {
        let r = report.resource.as_str();
        for (kind, n) in [
            ("missing", report.found.missing),
            ("stale", report.found.stale),
            ("extra", report.found.extra),
        ] {
            self.drift_rows.with_label_values(&[r, kind]).set(n as i64);
        }
        self.local_rows
            .with_label_values(&[r])
            .set(report.local_rows as i64);
        self.upstream_rows
            .with_label_values(&[r])
            .set(report.upstream_rows as i64);
    }

    pub fn seed_last_success(&self, resource: &str, unix_secs: f64) {
        let gauge = self.last_success.with_label_values(&[resource]);
        gauge.set(gauge.get().max(unix_secs));
    }

    /// Records one upstream request.
    pub fn upstream_request(&self, resource: &str, status: Option<u16>, seconds: f64) {
        let class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            _ => "error",
        };
        self.upstream_requests
            .with_label_values(&[resource, class])
            .inc();
        self.upstream_duration
            .with_label_values(&[resource])
            .observe(seconds);
    }

    pub fn job_started(&self, resource: &str) {
        self.jobs_running.with_label_values(&[resource]).inc();
    }

    pub fn job_ended(&self, resource: &str) {
        self.jobs_running.with_label_values(&[resource]).dec();
    }

    /// A trigger that could not become a pass (its job could not be
    /// recorded: the database is unreachable), counted as a failed pass.
    pub fn pass_not_started(&self, resource: &str, trigger: Trigger) {
        self.passes
            .with_label_values(&[resource, trigger.as_str(), Outcome::Failed.as_str()])
            .inc();
    }

    pub fn skipped(&self, resource: &str, reason: &'static str) {
        self.skipped.with_label_values(&[resource, reason]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

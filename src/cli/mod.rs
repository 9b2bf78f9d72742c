//! The command line: argument types and the subcommands they run. `main`
//! only parses, starts telemetry and calls [`run`].

mod checkpoint;

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::jobs::{JobFilter, Trigger};
use crate::metrics::Metrics;
use crate::pass::{Mode, PassOptions, PassReport, Progress};
use crate::redact;
use crate::report;
use crate::runner::{JobRequest, Runner};
use crate::store::AnyStore;
use crate::store::{Ledger, Mirror};

#[derive(Debug, Parser)]
#[command(
    name = "driftd",
    version,
    about = "Keeps local SQL copies of upstream resources true."
)]
pub struct Cli {
    /// Configuration file (TOML); `DRIFTD_*` variables override it.
    #[arg(
        long,
        global = true,
        env = "DRIFTD_CONFIG",
        default_value = "driftd.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print the resolved resources.
    Check,
    /// Run one reconciliation pass of RESOURCE and print its report.
    Reconcile {
        resource: String,
        /// Compute and print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply even if a guard trips.
        #[arg(long)]
        force: bool,
        /// Which actions to take.
        #[arg(long, value_enum, default_value = "full")]
        mode: ModeArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Trigger through a running driftd's admin API (e.g.
        /// http://127.0.0.1:9750) and wait for the job; the token comes
        /// from DRIFTD_ADMIN__TOKEN.
        #[arg(long)]
        remote: Option<String>,
    },
    /// Run the worker: schedules, admin API, start-up passes.
    Run,
    /// List schedule entries with their next three fire times.
    Schedules,
    /// Show the last recorded passes of RESOURCE.
    History {
        resource: String,
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Events that could not be applied: list, replay or delete them.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// An incremental resource's checkpoint in upstream's change feed:
    /// show it, reset it, or set it (a way back from an expired one).
    Checkpoint {
        #[command(subcommand)]
        action: checkpoint::Action,
    },
    /// Apply a Redis source's stream again from the start of its last
    /// reprovision (or --from an entry id; 0 is the beginning): rebuilds a
    /// table emptied by hand.
    Replay {
        source: String,
        #[arg(long)]
        from: Option<String>,
    },
    /// See drift found and repaired: a sample upstream and a seeded SQLite file.
    Quickstart {
        /// Keep serving the sample upstream afterwards (Ctrl-C to stop).
        #[arg(long)]
        serve: bool,
    },
    /// Serve the bundled sample upstream (Wazo-shaped tenants and users).
    SampleUpstream {
        #[arg(long, default_value = "127.0.0.1:8931")]
        listen: String,
        #[arg(long, default_value_t = 50)]
        tenants: u64,
        #[arg(long, default_value_t = 2000)]
        users: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// One JSON line per dead letter, oldest first.
    List {
        /// Only this source's.
        #[arg(long)]
        source: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Apply a dead letter again; it is deleted once it applies.
    Replay { id: String },
    /// Delete a dead letter.
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Full,
    PurgeOnly,
    RepairOnly,
    Incremental,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Full => Mode::Full,
            ModeArg::PurgeOnly => Mode::PurgeOnly,
            ModeArg::RepairOnly => Mode::RepairOnly,
            ModeArg::Incremental => Mode::Incremental,
        }
    }
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Check => check(&cli.config).await,
        Command::Run => {
            let settings = Arc::new(load_settings(&cli.config)?);
            crate::daemon::run(settings).await
        }
        Command::Schedules => schedules(&cli.config),
        Command::Reconcile {
            resource,
            dry_run,
            force,
            mode,
            json,
            remote,
        } => {
            let mode = Mode::from(mode);
            if let Some(url) = remote {
                let body = serde_json::json!({
                    "mode": mode.as_str(),
                    "dry_run": dry_run,
                    "force": force,
                });
                return crate::remote::reconcile(&url, &resource, body, json).await;
            }
            let settings = Arc::new(load_settings(&cli.config)?);
            let opts = PassOptions {
                mode,
                dry_run,
                force,
            };
            let report = reconcile(&settings, &resource, opts, !json).await?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                emit(&report::human(&report))?;
            }
            Ok(report::exit_code(&report))
        }
        Command::History { resource, limit } => {
            let settings = load_settings(&cli.config)?;
            settings.resource(&resource)?;
            let store = open_store(&settings).await?;
            let filter = JobFilter {
                resource: Some(resource),
                status: None,
                limit,
            };
            let mut out = String::new();
            for job in store.list_jobs(&filter).await? {
                writeln!(out, "{}", serde_json::to_string(&job)?)?;
            }
            emit(&out)?;
            Ok(report::exit::OK)
        }
        Command::DeadLetters { action } => dead_letters(&cli.config, action).await,
        Command::Checkpoint { action } => {
            let settings = load_settings(&cli.config)?;
            checkpoint::run(&settings, action).await
        }
        Command::Replay { source, from } => replay(&cli.config, &source, from).await,
        Command::Quickstart { serve } => crate::quickstart::run(serve).await,
        Command::SampleUpstream {
            listen,
            tenants,
            users,
        } => {
            let up = crate::sample::SampleUpstream::new();
            crate::sample::populate(&up, tenants, users);
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!(
                "sample upstream on http://{} ({tenants} tenants, {users} users); Ctrl-C to stop",
                listener.local_addr()?
            );
            tokio::select! {
                r = up.serve(listener) => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(report::exit::OK)
        }
    }
}

async fn dead_letters(path: &std::path::Path, action: DeadLetterAction) -> anyhow::Result<i32> {
    let settings = Arc::new(load_settings(path)?);
    let store = Arc::new(open_store(&settings).await?);
    let mut out = String::new();
    match action {
        DeadLetterAction::List { source, limit } => {
            if let Some(s) = &source {
                if !settings.sources.contains_key(s) {
                    anyhow::bail!("unknown source `{s}` in {}", path.display());
                }
            }
            if !(1..=100_000).contains(&limit) {
                anyhow::bail!("--limit must be between 1 and 100000");
            }
            for letter in store.list_dead_letters(source.as_deref(), limit).await? {
                writeln!(out, "{}", serde_json::to_string(&letter)?)?;
            }
        }
        DeadLetterAction::Replay { id } => {
            let events = crate::engine::events::Events::new(
                settings.clone(),
                store,
                Arc::new(Metrics::new()),
            )?;
            let verdict = events.replay(&id).await?;
            writeln!(out, "{}", serde_json::to_string(&verdict)?)?;
            if matches!(verdict.outcome, "dead_lettered" | "held") {
                emit(&out)?;
                return Ok(report::exit::ERROR);
            }
        }
        DeadLetterAction::Delete { id } => {
            if !store.delete_dead_letter(&id).await? {
                anyhow::bail!("no dead letter `{id}`");
            }
            writeln!(out, "deleted {id}")?;
        }
    }
    emit(&out)?;
    Ok(report::exit::OK)
}

async fn replay(path: &std::path::Path, source: &str, from: Option<String>) -> anyhow::Result<i32> {
    let settings = Arc::new(load_settings(path)?);
    if !settings.sources.contains_key(source) {
        let known: Vec<&str> = settings.sources.keys().map(String::as_str).collect();
        anyhow::bail!(
            "unknown source `{source}` in {} (known: {})",
            path.display(),
            known.join(", ")
        );
    }
    let store = Arc::new(open_store(&settings).await?);
    let events = crate::engine::events::Events::new(settings, store, Arc::new(Metrics::new()))?;
    let done = crate::sources::redis::replay(&events, source, from).await?;
    emit(&format!("{}\n", serde_json::to_string(&done)?))?;
    if let Some(why) = &done.unreadable {
        eprintln!("driftd replay: {why}");
        return Ok(report::exit::ERROR);
    }
    Ok(report::exit::OK)
}

async fn check(path: &std::path::Path) -> anyhow::Result<i32> {
    use report::config_words;
    let settings = load_settings(path)?;
    let mut out = String::new();
    writeln!(out, "{}: OK", path.display())?;
    writeln!(
        out,
        "store: {}",
        redact::mask_url(settings.store.url.expose_secret())
    )?;
    for (name, r) in &settings.resources {
        let u = &r.upstream;
        writeln!(out, "resource {name}")?;
        writeln!(out, "  upstream  {}{}", u.base_url, u.list_path)?;
        writeln!(
            out,
            "  paging    {}, page size {}",
            config_words(&u.pagination),
            u.page_size
        )?;
        writeln!(
            out,
            "  token     {}",
            if u.resolved_token.is_some() {
                "set (hidden)"
            } else {
                "none"
            }
        )?;
        writeln!(
            out,
            "  key       {} -> {}.{} ({})",
            r.key.upstream,
            r.local.table,
            r.key.column,
            config_words(&r.key.kind)
        )?;
        for (col, c) in &r.columns {
            writeln!(
                out,
                "  column    {} -> {col} ({}{})",
                c.from,
                config_words(&c.kind),
                if c.optional { ", optional" } else { "" }
            )?;
        }
        let p = &r.policy;
        writeln!(
            out,
            "  policy    insert {} repair {} purge {} ({}), confirm {}",
            p.insert_missing,
            p.repair_stale,
            p.purge_extra,
            config_words(&p.purge),
            r.confirms_purges()
        )?;
        writeln!(
            out,
            "  limits    purge {:.0}% / {} rows, update {:.0}% / {} rows",
            p.max_purge_fraction * 100.0,
            p.max_purge_count,
            p.max_update_fraction * 100.0,
            p.max_update_count
        )?;
        if let Some(parent) = &r.parent {
            writeln!(
                out,
                "  parent    {}.{} -> {} (purged with it)",
                r.local.table, parent.column, parent.resource
            )?;
        }
        if let Some(inc) = &r.incremental {
            writeln!(
                out,
                "  feed      {}{}?{}=<checkpoint> (first {}), next checkpoint at {}{}",
                u.base_url.trim_end_matches('/'),
                inc.path.as_deref().unwrap_or(&u.list_path),
                inc.since_param,
                inc.initial,
                inc.cursor_pointer,
                match &inc.deleted_pointer {
                    Some(p) => format!(", deleted when {p} = {}", inc.deleted_value),
                    None => String::new(),
                }
            )?;
        }
    }
    for (name, src) in &settings.sources {
        writeln!(out, "source {name} ({})", src.kind.as_str())?;
        if let Some(r) = &src.rabbitmq {
            writeln!(
                out,
                "  broker    {}",
                source_url(&r.url, &r.url_env, r.resolve_url())
            )?;
            writeln!(
                out,
                "  queue     {} (durable) on {} exchange {}, prefetch {}",
                r.queue, r.exchange_type, r.exchange, r.prefetch
            )?;
            for b in r.bindings() {
                writeln!(out, "  binding   {b}")?;
            }
            for event in crate::config::events::unbound_events(src) {
                writeln!(
                    out,
                    "  warning   event {event} is mapped, but no binding lets it into the queue"
                )?;
            }
        }
        if let Some(r) = &src.redis {
            writeln!(
                out,
                "  server    {}",
                source_url(&r.url, &r.url_env, r.resolve_url())
            )?;
            writeln!(
                out,
                "  stream    {} group {} as consumer {} (new group starts at {}), body in field `{}`",
                r.stream,
                r.group,
                r.consumer_name(),
                r.group_start,
                r.body_field
            )?;
            writeln!(
                out,
                "  claims    entries idle {}s on another consumer; dead letter after {} deliveries",
                r.claim_idle_secs, r.max_deliveries
            )?;
        }
        if let Some(r) = &src.reprovision {
            writeln!(
                out,
                "  reprovision {} .. {} of {}{}; abandoned after {}s",
                r.started,
                match (&r.completed, r.quiet_secs) {
                    (Some(c), _) => c.clone(),
                    (None, Some(q)) => format!("{q}s quiet"),
                    (None, None) => "?".into(),
                },
                r.resources.join(", "),
                match &r.id_pointer {
                    Some(p) => format!(" (id at {p})"),
                    None => String::new(),
                },
                r.timeout_secs
            )?;
        }
        for (event, m) in &src.events {
            writeln!(
                out,
                "  event     {event} -> {} {} (key {})",
                m.op.as_str(),
                m.resource,
                m.key
            )?;
        }
    }
    let code = check_tables(&settings, &mut out).await?;
    emit(&out)?;
    Ok(code)
}

/// Checks, when the database can be opened, that each mirrored table can
/// mirror its resource faithfully (column types, key collation). An
/// unreachable database is reported, not an error: the config itself is
/// valid. Creates and migrates nothing.
async fn check_tables(settings: &Settings, out: &mut String) -> anyhow::Result<i32> {
    let store = match AnyStore::open_existing(&settings.store.url).await {
        Ok(store) => store,
        Err(e) => {
            writeln!(
                out,
                "tables: not checked, {}",
                crate::redact::scrub(
                    &crate::pass::error_chain(&e),
                    settings.store.url.expose_secret()
                )
            )?;
            return Ok(report::exit::OK);
        }
    };
    let mut code = report::exit::OK;
    for (name, r) in &settings.resources {
        match store.prepare(&r.table_spec()).await {
            Ok(_) => writeln!(out, "table {}: OK for resource {name}", r.local.table)?,
            Err(e) => {
                eprintln!("error: resource `{name}`: {}", crate::pass::error_chain(&e));
                code = report::exit::ERROR;
            }
        }
    }
    Ok(code)
}

fn schedules(path: &std::path::Path) -> anyhow::Result<i32> {
    let settings = load_settings(path)?;
    let schedules = crate::scheduler::Schedules::load(&settings.schedules_dir(), &settings)?;
    let mut out = String::new();
    writeln!(out, "schedules from {}", schedules.dir.display())?;
    if schedules.entries.is_empty() {
        writeln!(out, "  (none)")?;
    }
    let now = chrono::Utc::now();
    for e in &schedules.entries {
        writeln!(
            out,
            "{}  resource {}  mode {}  cron \"{}\" ({})  jitter {}s{}",
            e.name,
            e.resource,
            e.mode.as_str(),
            e.cron,
            e.timezone,
            e.jitter.as_secs(),
            if e.dry_run { "  dry run" } else { "" }
        )?;
        for t in e.next_fires(now, 3) {
            writeln!(out, "    next {}", t.to_rfc3339())?;
        }
    }
    emit(&out)?;
    Ok(report::exit::OK)
}

/// Writes a command's output to stdout. A reader that went away early
/// (`driftd history users | head -1`) ends the output quietly; Rust's
/// `println!` would panic with a backtrace instead.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("writing to stdout")?),
    }
}

/// Loads the config, with a way forward when there is none: a newcomer's
/// first `driftd check` runs where no `driftd.toml` exists yet.
fn load_settings(path: &std::path::Path) -> anyhow::Result<Settings> {
    if !path.exists() {
        anyhow::bail!(
            "{}: file not found (pass --config FILE or set DRIFTD_CONFIG; the repository's examples/quickstart/driftd.toml is a ready one)",
            path.display()
        );
    }
    Ok(Settings::load(path)?)
}

pub use crate::daemon::open_store;

/// Runs one pass of `resource` through a runner (so it is recorded as a
/// job), with a progress line on a terminal.
pub async fn reconcile(
    settings: &Arc<Settings>,
    resource: &str,
    opts: PassOptions,
    show_progress: bool,
) -> anyhow::Result<PassReport> {
    settings.resource(resource)?;
    let store = Arc::new(open_store(settings).await?);
    let runner = Runner::new(settings.clone(), store, Arc::new(Metrics::new()));
    let progress = TerminalProgress::new(show_progress && std::io::stderr().is_terminal());
    let (job, report) = runner
        .run(
            JobRequest {
                resource: resource.to_string(),
                trigger: Trigger::Cli,
                mode: opts.mode,
                dry_run: opts.dry_run,
                force: opts.force,
            },
            &progress,
        )
        .await?;
    match report {
        Some(report) => Ok(report),
        None => anyhow::bail!(
            "job {} ended {} without a report: {}",
            job.id,
            job.status.as_str(),
            job.reason.unwrap_or_default()
        ),
    }
}

/// A `\r`-rewritten status line on stderr, at most five times a second.
struct TerminalProgress {
    enabled: bool,
    started: Instant,
    last: Mutex<Option<Instant>>,
}

impl TerminalProgress {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            started: Instant::now(),
            last: Mutex::new(None),
        }
    }
}

impl Progress for TerminalProgress {
    fn listed(&self, pages: u64, rows: u64) {
        if !self.enabled {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed().as_millis() < 2000) {
            return;
        }
        *last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        // Ends with a newline, so a log line never lands glued to it.
        eprintln!(
            "listed {rows} rows in {pages} page{}, {:.0} rows/s",
            if pages == 1 { "" } else { "s" },
            rows as f64 / secs
        );
        let _ = std::io::stderr().flush();
    }
}

/// A source's URL as `check` shows it: masked, or where it comes from.
fn source_url(
    url: &Option<secrecy::SecretString>,
    url_env: &Option<String>,
    resolved: Result<secrecy::SecretString, String>,
) -> String {
    match (url, url_env, resolved) {
        (Some(u), _, _) => redact::mask_url(u.expose_secret()),
        (None, Some(var), Ok(_)) => format!("from {var} (set, hidden)"),
        (None, Some(var), Err(_)) => format!("from {var} (NOT SET: `driftd run` needs it)"),
        (None, None, _) => "none".into(),
    }
}

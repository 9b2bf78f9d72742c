//! Schedules: cron entries in `schedules/*.toml`, validated completely at
//! load, and a tokio-cron-scheduler that only signals — each tick becomes a
//! [`JobRequest`] to the [`Runner`], which owns execution.
//!
//! Cron expressions take 5 fields (`min hour dom month dow`) or 6 with
//! seconds first; a 5-field expression fires at second 0. When both the
//! day of month and the day of week are restricted, both must match (the
//! scheduler's rule). Times are evaluated in the entry's IANA time zone.
//!
//! ```toml
//! [[schedule]]
//! resource = "users"
//! mode = "full"            # full | purge-only | repair-only
//! cron = "*/15 * * * *"
//! timezone = "Europe/Paris" # default UTC
//! jitter_secs = 30          # random delay 0..jitter, spreads replicas
//! dry_run = false
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use serde::Deserialize;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};

use crate::config::Settings;
use crate::jobs::Trigger;
use crate::pass::Mode;
use crate::runner::{JobRequest, Runner};

/// A schedule problem, naming the file, the entry and the field.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{file}: {problem}")]
    File { file: String, problem: String },
    #[error("{file}: schedule #{index}: field `{field}`: {problem}")]
    Entry {
        file: String,
        index: usize,
        field: String,
        problem: String,
    },
    #[error("scheduler: {0}")]
    Scheduler(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    #[serde(default)]
    schedule: Vec<EntryConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryConfig {
    resource: String,
    #[serde(default)]
    mode: Mode,
    cron: String,
    #[serde(default = "default_timezone")]
    timezone: String,
    #[serde(default)]
    jitter_secs: u64,
    #[serde(default)]
    dry_run: bool,
}

fn default_timezone() -> String {
    "UTC".into()
}

/// One validated schedule entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `file.toml#index`, for logs and listings.
    pub name: String,
    pub resource: String,
    pub mode: Mode,
    /// As written.
    pub cron: String,
    /// Normalized to 6 fields (seconds first).
    pub cron6: String,
    pub timezone: Tz,
    pub jitter: Duration,
    pub dry_run: bool,
    parsed: Cron,
}

impl Entry {
    /// The next `n` fire times after `after`, in the entry's time zone.
    pub fn next_fires(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        let after = after.with_nanosecond(0).unwrap_or(after);
        self.parsed
            .iter_after(after.with_timezone(&self.timezone))
            .take(n)
            .collect()
    }
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
}

/// Parses a 5- or 6-field cron expression; returns it as 6 fields.
pub fn parse_cron(expr: &str) -> Result<(String, Cron), String> {
    let fields = expr.split_whitespace().count();
    let six = match fields {
        5 => format!("0 {}", expr.trim()),
        6 => expr.trim().to_string(),
        n => {
            return Err(format!(
                "`{expr}` has {n} fields; use 5 (min hour dom month dow) or 6 (sec min hour dom month dow)"
            ))
        }
    };
    let cron = parser().parse(&six).map_err(|e| format!("`{expr}`: {e}"))?;
    Ok((six, cron))
}

/// All schedule entries, loaded from one folder.
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub entries: Vec<Entry>,
    /// The folder they came from.
    pub dir: PathBuf,
}

impl Schedules {
    /// Loads `*.toml` from `dir` (sorted by name). A missing folder means no
    /// schedules; an unreadable or invalid file is an error.
    pub fn load(dir: &Path, settings: &Settings) -> Result<Schedules, ScheduleError> {
        let mut schedules = Schedules {
            entries: Vec::new(),
            dir: dir.to_path_buf(),
        };
        if !dir.exists() {
            return Ok(schedules);
        }
        let listing = std::fs::read_dir(dir).map_err(|e| ScheduleError::File {
            file: dir.display().to_string(),
            problem: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = listing
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for path in files {
            schedules.entries.extend(load_file(&path, settings)?);
        }
        Ok(schedules)
    }

    /// The earliest next fire of any entry for `resource`.
    pub fn next_run(&self, resource: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.entries
            .iter()
            .filter(|e| e.resource == resource)
            .filter_map(|e| e.next_fires(after, 1).into_iter().next())
            .map(|t| t.with_timezone(&Utc))
            .min()
    }

    /// Starts a scheduler whose ticks submit jobs to `runner`.
    pub async fn start(&self, runner: Runner) -> Result<JobScheduler, ScheduleError> {
        let err =
            |e: tokio_cron_scheduler::JobSchedulerError| ScheduleError::Scheduler(e.to_string());
        let sched = JobScheduler::new().await.map_err(err)?;
        for entry in &self.entries {
            let entry = entry.clone();
            let runner = runner.clone();
            let job = CronJob::new_async_tz(entry.cron6.clone(), entry.timezone, move |_, _| {
                let entry = entry.clone();
                let runner = runner.clone();
                Box::pin(async move {
                    // Only signal: the runner owns the work.
                    tokio::spawn(fire(entry, runner));
                })
            })
            .map_err(err)?;
            sched.add(job).await.map_err(err)?;
        }
        sched.start().await.map_err(err)?;
        Ok(sched)
    }
}

/// One tick: wait the jitter, then ask the runner.
async fn fire(entry: Entry, runner: Runner) {
    if !entry.jitter.is_zero() {
        let ms = fastrand::u64(..=entry.jitter.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let req = JobRequest {
        resource: entry.resource.clone(),
        trigger: Trigger::Schedule,
        mode: entry.mode,
        dry_run: entry.dry_run,
        force: false,
    };
    match runner.submit(req).await {
        Ok(s) => tracing::info!(schedule = %entry.name, job = %s.job_id(), "schedule fired"),
        Err(e) => {
            tracing::warn!(schedule = %entry.name, error = %e, "schedule fired but no job ran")
        }
    }
}

fn load_file(path: &Path, settings: &Settings) -> Result<Vec<Entry>, ScheduleError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ScheduleError::File {
        file: file.clone(),
        problem: e.to_string(),
    })?;
    let parsed: ScheduleFile = toml_parse(&text).map_err(|problem| ScheduleError::File {
        file: file.clone(),
        problem,
    })?;
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut entries = Vec::new();
    for (i, e) in parsed.schedule.into_iter().enumerate() {
        let index = i + 1;
        let bad = |field: &str, problem: String| ScheduleError::Entry {
            file: file.clone(),
            index,
            field: field.into(),
            problem,
        };
        if !settings.resources.contains_key(&e.resource) {
            return Err(bad(
                "resource",
                format!("unknown resource `{}`", e.resource),
            ));
        }
        let (cron6, parsed) = parse_cron(&e.cron).map_err(|p| bad("cron", p))?;
        let timezone: Tz = e.timezone.parse().map_err(|_| {
            bad(
                "timezone",
                format!("`{}` is not an IANA time zone", e.timezone),
            )
        })?;
        if e.jitter_secs > 3600 {
            return Err(bad("jitter_secs", "must be at most 3600".into()));
        }
        entries.push(Entry {
            name: format!("{stem}#{index}"),
            resource: e.resource,
            mode: e.mode,
            cron: e.cron,
            cron6,
            timezone,
            jitter: Duration::from_secs(e.jitter_secs),
            dry_run: e.dry_run,
            parsed,
        });
    }
    Ok(entries)
}

/// Parses TOML through figment, which driftd already uses for config.
fn toml_parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_and_six_fields() {
        assert_eq!(parse_cron("*/5 * * * *").unwrap().0, "0 */5 * * * *");
        assert_eq!(parse_cron("30 0 3 * * *").unwrap().0, "30 0 3 * * *");
        assert!(parse_cron("* * *").unwrap_err().contains("3 fields"));
        assert!(parse_cron("61 * * * *").is_err());
    }

    #[test]
    fn next_fires_follow_the_time_zone() {
        let (cron6, parsed) = parse_cron("0 3 * * *").unwrap();
        let entry = Entry {
            name: "t".into(),
            resource: "r".into(),
            mode: Mode::Full,
            cron: "0 3 * * *".into(),
            cron6,
            timezone: "Europe/Paris".parse().unwrap(),
            jitter: Duration::ZERO,
            dry_run: false,
            parsed,
        };
        let after = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
        let fires = entry.next_fires(after, 3);
        assert_eq!(fires.len(), 3);
        // 03:00 in Paris is 02:00 UTC in winter
        assert_eq!(
            fires[0].with_timezone(&Utc),
            Utc.with_ymd_and_hms(2026, 1, 11, 2, 0, 0).unwrap()
        );
        assert_eq!(
            (fires[1] - fires[0]).num_hours(),
            24,
            "daily schedule fires a day apart"
        );
    }
}

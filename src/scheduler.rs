//! Schedules: cron entries in `schedules/*.toml`, validated completely at
//! load, and a tokio-cron-scheduler that only signals — each tick becomes a
//! [`JobRequest`] to the [`Runner`], which owns execution.
//!
//! Cron expressions take 5 fields (`min hour dom month dow`) or 6 with
//! seconds first; a 5-field expression fires at second 0. When both the
//! day of month and the day of week are restricted, both must match (the
//! scheduler's rule).
//!
//! Times are local wall-clock times in the entry's IANA time zone, across
//! daylight-saving changes, with cron's rules: a time that does not exist
//! (skipped by a spring change, e.g. 02:30 on 2027-03-28 in Paris) fires
//! once, right after the change; a time that occurs twice (a fall change)
//! fires once, at its first occurrence. [`Entry::next_after`] is the one
//! computation behind `driftd schedules`, `next_run_at` and the worker: the
//! worker's tokio-cron-scheduler job ticks every second and fires an entry
//! when the time computed for it has come ([`Due`]), so all three agree.
//!
//! ```toml
//! [[schedule]]
//! resource = "users"
//! mode = "full"            # full | purge-only | repair-only | incremental
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
use crate::runner::{JobRequest, Runner};
use crate::vocab::Mode;

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

/// A schedule that does not fire within this many years never fires
/// (`0 0 30 2 *`).
const HORIZON_YEARS: i32 = 8;

impl Entry {
    /// The next `n` fire times after `after`, in the entry's time zone.
    pub fn next_fires(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        let mut out = Vec::with_capacity(n);
        let mut at = after;
        while out.len() < n {
            let Some(next) = self.next_after(at) else {
                break;
            };
            out.push(next.with_timezone(&self.timezone));
            at = next;
        }
        out
    }

    /// The first fire strictly after `after`, or `None` if the expression
    /// never matches a date (within [`HORIZON_YEARS`]).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Wall-clock times before `after`'s own map to instants before it
        // (a skipped time maps to the end of its gap, a repeated one to its
        // first occurrence), so the search starts there.
        let local = after.with_timezone(&self.timezone).naive_local();
        // whole seconds: fire times are on the second, as the cron says
        let from = local.with_nanosecond(0).unwrap_or(local);
        let horizon = local + chrono::Duration::days(366 * i64::from(HORIZON_YEARS));
        // The expression is matched against wall-clock times (evaluated as
        // if in UTC, which has no daylight saving), then each match is
        // placed on the real time line by the rules in the module doc.
        for wall in self.parsed.iter_after(from.and_utc()) {
            let wall = wall.naive_utc();
            if wall > horizon {
                return None;
            }
            let instant = self.instant_of(wall)?;
            if instant > after {
                return Some(instant);
            }
        }
        None
    }

    /// When the wall-clock time `wall` happens in the entry's time zone.
    fn instant_of(&self, wall: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
        use chrono::offset::LocalResult;
        use chrono::TimeZone;
        match self.timezone.from_local_datetime(&wall) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            // occurs twice: the first occurrence
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            // skipped: the first wall-clock minute after the gap
            LocalResult::None => (1..=24 * 60).find_map(|m| {
                let later = wall.with_second(0)? + chrono::Duration::minutes(m);
                match self.timezone.from_local_datetime(&later) {
                    LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                        Some(t.with_timezone(&Utc))
                    }
                    LocalResult::None => None,
                }
            }),
        }
    }
}

/// When an entry fires next, as the worker's tick sees it.
#[derive(Debug)]
pub struct Due {
    next: Option<DateTime<Utc>>,
}

impl Due {
    /// Starts counting at `now`: a fire time already past is not run.
    pub fn new(entry: &Entry, now: DateTime<Utc>) -> Due {
        Due {
            next: entry.next_after(now),
        }
    }

    /// The time promised next (`next_run_at`).
    pub fn next(&self) -> Option<DateTime<Utc>> {
        self.next
    }

    /// Called on every tick: whether the entry fires now. Ticks missed
    /// (a stalled process) fire once, not once per missed time.
    pub fn poll(&mut self, entry: &Entry, now: DateTime<Utc>) -> bool {
        let fresh = entry.next_after(now);
        let due = self.next.is_some_and(|next| now >= next);
        // After a fire, and when a clock stepped back (NTP) makes an earlier
        // time the next one, keep the promise `next_run_at` makes from the
        // clock as it is now.
        if due || (fresh.is_some() && fresh < self.next) {
            self.next = fresh;
        }
        due
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
    check_ranges(&six).map_err(|p| format!("`{expr}`: {p}"))?;
    let cron = parser().parse(&six).map_err(|e| format!("`{expr}`: {e}"))?;
    Ok((six, cron))
}

/// Names the cron field whose number is out of range (croner only says
/// "Number out of bounds"). Names (`MON`, `JAN`) and specials are left to
/// the parser.
fn check_ranges(six: &str) -> Result<(), String> {
    const FIELDS: [(&str, u32, u32); 6] = [
        ("second", 0, 59),
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 7),
    ];
    for ((name, lo, hi), field) in FIELDS.iter().zip(six.split_whitespace()) {
        for part in field.split(',') {
            let (range, step) = part.split_once('/').unwrap_or((part, ""));
            if !step.is_empty() && step.parse::<u32>().map_or(true, |s| s == 0) {
                return Err(format!(
                    "{name} field `{field}`: step `{step}` must be a positive number"
                ));
            }
            for n in range.split('-') {
                if let Ok(n) = n.parse::<u32>() {
                    if n < *lo || n > *hi {
                        return Err(format!("{name} field `{field}`: {n} is outside {lo}-{hi}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// All schedule entries, loaded from one folder.
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub entries: Vec<Entry>,
    /// The folder they came from.
    pub dir: PathBuf,
}

impl Schedules {
    /// Loads `*.toml` from `dir` (sorted by name). A missing folder is an
    /// error when `daemon.schedules_dir` names it, and means no schedules
    /// when it is the default; an unreadable or invalid file is an error.
    pub fn load(dir: &Path, settings: &Settings) -> Result<Schedules, ScheduleError> {
        let mut schedules = Schedules {
            entries: Vec::new(),
            dir: dir.to_path_buf(),
        };
        if !dir.exists() {
            if settings.daemon.schedules_dir.is_some() {
                return Err(ScheduleError::File {
                    file: dir.display().to_string(),
                    problem: "daemon.schedules_dir names a folder that does not exist".into(),
                });
            }
            tracing::info!(dir = %dir.display(), "no schedules folder; no schedules");
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

    /// Starts a scheduler whose ticks submit jobs to `runner`. One
    /// tokio-cron-scheduler job per entry ticks every second; the entry's
    /// [`Due`] decides whether this tick fires (see the module doc for why
    /// the scheduler's own cron evaluation is not used).
    pub async fn start(&self, runner: Runner) -> Result<JobScheduler, ScheduleError> {
        let err =
            |e: tokio_cron_scheduler::JobSchedulerError| ScheduleError::Scheduler(e.to_string());
        let sched = JobScheduler::new().await.map_err(err)?;
        for entry in &self.entries {
            let entry = entry.clone();
            let runner = runner.clone();
            let due = std::sync::Arc::new(std::sync::Mutex::new(Due::new(&entry, Utc::now())));
            let job = CronJob::new_repeated_async(TICK, move |_, _| {
                let fires = due
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .poll(&entry, Utc::now());
                let (entry, runner) = (entry.clone(), runner.clone());
                Box::pin(async move {
                    if fires {
                        // Only signal: the runner owns the work.
                        tokio::spawn(fire(entry, runner));
                    }
                })
            })
            .map_err(err)?;
            sched.add(job).await.map_err(err)?;
        }
        sched.start().await.map_err(err)?;
        Ok(sched)
    }
}

/// How often each entry checks whether it is due.
const TICK: Duration = Duration::from_secs(1);

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
        if e.mode == Mode::Incremental && settings.resources[&e.resource].incremental.is_none() {
            return Err(bad(
                "mode",
                format!(
                    "incremental runs need [resources.{}.incremental] in the config (the change feed)",
                    e.resource
                ),
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
        let entry = Entry {
            name: format!("{stem}#{index}"),
            resource: e.resource,
            mode: e.mode,
            cron: e.cron,
            cron6,
            timezone,
            jitter: Duration::from_secs(e.jitter_secs),
            dry_run: e.dry_run,
            parsed,
        };
        if entry.next_after(Utc::now()).is_none() {
            return Err(bad(
                "cron",
                format!(
                    "`{}` never fires: no date within {HORIZON_YEARS} years matches it",
                    entry.cron
                ),
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Parses TOML through figment, which driftd already uses for config.
/// Errors name the entry as the file counts it (`schedule #1`) and the
/// field, without figment's profile prefix.
fn toml_parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(text))
        .extract()
        .map_err(|errors| {
            errors
                .into_iter()
                .map(|e| {
                    let mut path = e.path.clone();
                    let mut at = String::new();
                    if path.first().is_some_and(|p| p == "schedule") {
                        if let Some(i) = path.get(1).and_then(|i| i.parse::<usize>().ok()) {
                            at = format!("schedule #{}: ", i + 1);
                            path.drain(..2);
                        }
                    }
                    if !path.is_empty() {
                        at.push_str(&format!("field `{}`: ", path.join(".")));
                    }
                    format!("{at}{}", e.kind)
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
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
        let err = parse_cron("61 * * * *").unwrap_err();
        assert!(
            err.contains("minute field `61`: 61 is outside 0-59"),
            "{err}"
        );
        let err = parse_cron("0 0 32 * *").unwrap_err();
        assert!(err.contains("day of month"), "{err}");
        assert!(parse_cron("*/0 * * * *").unwrap_err().contains("step"));
    }

    fn paris(cron: &str) -> Entry {
        let (cron6, parsed) = parse_cron(cron).unwrap();
        Entry {
            name: "t".into(),
            resource: "r".into(),
            mode: Mode::Full,
            cron: cron.into(),
            cron6,
            timezone: "Europe/Paris".parse().unwrap(),
            jitter: Duration::ZERO,
            dry_run: false,
            parsed,
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn utc_fires(entry: &Entry, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let fires: Vec<DateTime<Utc>> = entry
            .next_fires(after, n)
            .into_iter()
            .map(|t| t.with_timezone(&Utc))
            .collect();
        assert!(
            fires.iter().all(|t| *t > after),
            "{fires:?} not after {after}"
        );
        assert!(
            fires.windows(2).all(|w| w[0] < w[1]),
            "{fires:?} out of order"
        );
        fires
    }

    #[test]
    fn a_skipped_time_fires_once_right_after_the_spring_change() {
        // 2027-03-28, Paris: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        let daily = paris("45 2 * * *");
        assert_eq!(
            utc_fires(&daily, utc(2027, 3, 27, 12, 0), 2),
            vec![utc(2027, 3, 28, 1, 0), utc(2027, 3, 29, 0, 45)]
        );
        // Every 30 minutes: 02:00 and 02:30 do not exist; one fire at 03:00.
        let half = paris("*/30 * * * *");
        assert_eq!(
            utc_fires(&half, utc(2027, 3, 28, 0, 15), 4),
            vec![
                utc(2027, 3, 28, 0, 30),
                utc(2027, 3, 28, 1, 0),
                utc(2027, 3, 28, 1, 30),
                utc(2027, 3, 28, 2, 0)
            ]
        );
    }

    #[test]
    fn a_repeated_time_fires_once_at_its_first_occurrence() {
        // 2027-10-31, Paris: 03:00 CEST falls back to 02:00 CET (01:00 UTC).
        let daily = paris("45 2 * * *");
        assert_eq!(
            utc_fires(&daily, utc(2027, 10, 30, 12, 0), 2),
            vec![utc(2027, 10, 31, 0, 45), utc(2027, 11, 1, 1, 45)]
        );
        // A worker started in the repeated hour (02:50 CET, the second
        // 02:50) does not run the daily 02:45 at once.
        let started = utc(2027, 10, 31, 1, 50);
        let mut due = Due::new(&daily, started);
        assert_eq!(due.next(), Some(utc(2027, 11, 1, 1, 45)));
        assert!(!due.poll(&daily, started + chrono::Duration::seconds(1)));
        // `driftd schedules` in the repeated hour lists future times in order.
        let fires = utc_fires(&paris("*/20 * * * *"), utc(2027, 10, 31, 0, 10), 6);
        assert_eq!(fires[0], utc(2027, 10, 31, 0, 20));
    }

    #[test]
    fn a_running_worker_fires_what_next_run_at_promised() {
        // Tick every second through both changes; the fires must be exactly
        // the times the listing announced from the start.
        for (entry, from) in [
            (paris("*/30 * * * *"), utc(2027, 3, 27, 23, 0)),
            (paris("45 2 * * *"), utc(2027, 3, 27, 23, 0)),
            (paris("*/30 * * * *"), utc(2027, 10, 30, 23, 0)),
            (paris("45 2 * * *"), utc(2027, 10, 30, 23, 0)),
        ] {
            let until = from + chrono::Duration::hours(30);
            let promised: Vec<_> = utc_fires(&entry, from, 200)
                .into_iter()
                .filter(|t| *t <= until)
                .collect();
            let mut due = Due::new(&entry, from);
            let mut fired = Vec::new();
            let mut now = from;
            while now <= until {
                if due.poll(&entry, now) {
                    fired.push(now);
                }
                now += chrono::Duration::seconds(1);
            }
            assert_eq!(fired, promised, "{}", entry.cron);
        }
    }

    #[test]
    fn a_stalled_worker_fires_once_not_per_missed_time() {
        let entry = paris("* * * * *");
        let from = utc(2027, 1, 1, 0, 0);
        let mut due = Due::new(&entry, from);
        assert!(due.poll(&entry, from + chrono::Duration::minutes(10)));
        assert!(!due.poll(&entry, from + chrono::Duration::minutes(10)));
        assert_eq!(due.next(), Some(utc(2027, 1, 1, 0, 11)));
        // fire times are whole seconds whatever the clock's fraction
        let odd = from + chrono::Duration::milliseconds(808);
        assert_eq!(entry.next_after(odd), Some(utc(2027, 1, 1, 0, 1)));
    }

    fn settings(schedules_dir: Option<&Path>) -> Settings {
        let dir = schedules_dir
            .map(|d| format!("[daemon]\nschedules_dir = \"{}\"\n", d.display()))
            .unwrap_or_default();
        let text = format!(
            r#"{dir}
[resources.users]
upstream = {{ base_url = "http://127.0.0.1:9", list_path = "/users", key_order = "asc" }}
key = {{ upstream = "/uuid", column = "uuid" }}
local = {{ table = "users" }}
"#
        );
        Settings::from_toml_str(&text, "t.toml").unwrap()
    }

    #[test]
    fn schedule_files_are_validated_naming_entry_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(Some(dir.path()));
        let load = |text: &str| {
            std::fs::write(dir.path().join("a.toml"), text).unwrap();
            Schedules::load(dir.path(), &s).map(|s| s.entries.len())
        };
        let ok = "[[schedule]]\nresource = \"users\"\ncron = \"0 3 * * *\"\n";
        assert_eq!(load(ok).unwrap(), 1);
        let err = load(&format!("{ok}jiter_secs = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("schedule #1: ")
                && err.contains("jiter_secs")
                && !err.contains("default."),
            "{err}"
        );
        let err = load(&ok.replace("0 3 * * *", "0 0 30 2 *"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("schedule #1: field `cron`") && err.contains("never fires"),
            "{err}"
        );
        // A folder named in the config must exist; the default may not.
        let missing = dir.path().join("schedlues");
        let err = Schedules::load(&missing, &settings(Some(&missing)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert_eq!(
            Schedules::load(&missing, &settings(None))
                .unwrap()
                .entries
                .len(),
            0
        );
    }

    #[test]
    fn an_impossible_date_never_fires() {
        assert_eq!(paris("0 0 30 2 *").next_after(utc(2027, 1, 1, 0, 0)), None);
        assert!(paris("0 0 29 2 *")
            .next_after(utc(2027, 1, 1, 0, 0))
            .is_some());
    }

    #[test]
    fn next_fires_follow_the_time_zone() {
        let entry = paris("0 3 * * *");
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

//! Typed configuration: one `Deserialize` tree, loaded once (defaults → TOML
//! file → `DRIFTD_` environment with `__` between levels) and validated
//! completely before any task starts.
//!
//! Invariants once [`Settings::load`] returns `Ok`:
//! - every SQL identifier is a plain identifier ([`Ident`]), so it can be
//!   quoted and interpolated without risk;
//! - every URL parses and every JSON pointer is well formed;
//! - every secret that a resource names is present (and is never printed:
//!   it lives in a [`SecretString`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub mod events;
pub use events::{
    EventMapping, EventOp, RabbitConfig, RedisConfig, ReprovisionConfig, SourceConfig, SourceKind,
    VersionKind,
};

/// A configuration problem, naming where it is: the file, the resource and
/// the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a field had the wrong
    /// type. `file` names where the bad value came from: the file, or the
    /// `DRIFTD_*` variable.
    #[error("{file}: {problem}")]
    Parse { file: String, problem: String },
    /// A field parsed but its value is not acceptable.
    #[error("{file}: resource `{resource}`, field `{field}`: {problem}")]
    Invalid {
        file: String,
        resource: String,
        field: String,
        problem: String,
    },
    /// A field outside any resource is not acceptable.
    #[error("{file}: field `{field}`: {problem}")]
    InvalidGlobal {
        file: String,
        field: String,
        problem: String,
    },
}

/// The whole configuration tree.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where driftd's own state lives and where the mirrored tables are.
    #[serde(default)]
    pub store: StoreSettings,
    /// Mirrored resources by name; the name is what the CLI and metrics use.
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceConfig>,
    /// The admin HTTP API of `driftd run`.
    #[serde(default)]
    pub admin: AdminSettings,
    /// The long-running worker.
    #[serde(default)]
    pub daemon: DaemonSettings,
    /// Event sources `driftd run` consumes, by name.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// The file this was loaded from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// Database connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://path.db`, `sqlite::memory:` or `postgres://...`. It may hold
    /// a password, so it is a secret and never logged.
    #[serde(default = "default_store_url")]
    pub url: SecretString,
    /// Connections in the pool (PostgreSQL; SQLite keeps one writer).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_store_url() -> SecretString {
    SecretString::from("sqlite://driftd.db")
}
fn default_max_connections() -> u32 {
    4
}

/// The admin HTTP API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address to listen on; loopback by default.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token for mutating endpoints, usually `DRIFTD_ADMIN__TOKEN`.
    pub token: Option<SecretString>,
    /// Name of an environment variable holding the token.
    pub token_env: Option<String>,
    /// Allow mutating endpoints without a token (local use only).
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// The token after resolution.
    #[serde(skip)]
    pub resolved_token: Option<SecretString>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            token_env: None,
            allow_unauthenticated: false,
            resolved_token: None,
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9750".into()
}

impl AdminSettings {
    /// The admin token from `token` or `token_env`. An empty or blank token
    /// is refused, never taken as "no token": compared with an absent
    /// `Authorization` header it would match, and open the mutating
    /// endpoints to anyone.
    fn resolve_token(&self) -> Result<Option<SecretString>, FieldProblem> {
        let token = match (&self.token, &self.token_env) {
            (Some(_), Some(_)) => {
                return Err(problem("admin.token", "give token or token_env, not both"))
            }
            (Some(t), None) => t.clone(),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => SecretString::from(v),
                Err(_) => {
                    return Err(problem(
                        "admin.token_env",
                        format!("environment variable `{var}` is not set"),
                    ))
                }
            },
            (None, None) => return Ok(None),
        };
        if token.expose_secret().trim().is_empty() {
            let (field, source) = match &self.token_env {
                Some(var) => ("admin.token_env", format!("environment variable `{var}`")),
                None => (
                    "admin.token",
                    "the token (or DRIFTD_ADMIN__TOKEN)".to_string(),
                ),
            };
            return Err(problem(
                field,
                format!(
                    "{source} is empty; an empty token is not a token: give a real one, or remove it (mutating endpoints are then refused unless admin.allow_unauthenticated = true)"
                ),
            ));
        }
        Ok(Some(token))
    }
}

/// The long-running worker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// Folder of `*.toml` schedule files, relative to the config file. When
    /// set it must exist (a misspelled folder would mean no schedules);
    /// unset, `schedules` is used if present.
    #[serde(default)]
    pub schedules_dir: Option<PathBuf>,
    /// Resources to pass once at start-up.
    #[serde(default)]
    pub startup: Vec<String>,
    /// How long shutdown waits for running passes to reach a safe point.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: f64,
    /// Days a finished job stays in `driftd_jobs` (each resource's latest
    /// success is kept regardless); 0 keeps every job.
    #[serde(default = "default_job_retention_days")]
    pub job_retention_days: u32,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            schedules_dir: None,
            startup: Vec::new(),
            shutdown_grace_secs: default_shutdown_grace(),
            job_retention_days: default_job_retention_days(),
        }
    }
}

fn default_schedules_dir() -> PathBuf {
    "schedules".into()
}
fn default_shutdown_grace() -> f64 {
    30.0
}
fn default_job_retention_days() -> u32 {
    30
}

impl DaemonSettings {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_secs)
    }
}

/// One mirrored kind of upstream object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub upstream: UpstreamConfig,
    pub key: KeyConfig,
    pub local: LocalConfig,
    /// Local column ← upstream field, for the columns driftd owns.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The resource this one belongs to: a parent deleted (by event or by
    /// pass) purges its children here.
    #[serde(default)]
    pub parent: Option<ParentConfig>,
    /// Resources that name this one as their parent (filled at load).
    #[serde(skip)]
    pub children: Vec<ChildLink>,
    /// Upstream's change feed, for `incremental` runs.
    #[serde(default)]
    pub incremental: Option<IncrementalConfig>,
}

/// `[resources.<name>.incremental]`: an upstream that lists the changes
/// since a revision or time. driftd keeps where it got to (the
/// checkpoint) in its own tables, in the transaction that applied the
/// changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// The change feed's path (default: `upstream.list_path`).
    #[serde(default)]
    pub path: Option<String>,
    /// The query parameter carrying the checkpoint, e.g. `since`.
    pub since_param: String,
    /// Other query parameters, e.g. a page size.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// A JSON pointer to the next checkpoint in each response.
    pub cursor_pointer: String,
    /// A JSON pointer to the changed items (default: `upstream.items_pointer`).
    #[serde(default)]
    pub items_pointer: Option<String>,
    /// A JSON pointer into an item: when it holds `deleted_value`, the item
    /// is a deletion (only its key is read).
    #[serde(default)]
    pub deleted_pointer: Option<String>,
    #[serde(default = "default_deleted_value")]
    pub deleted_value: serde_json::Value,
    /// The checkpoint of the first run.
    #[serde(default = "default_initial_checkpoint")]
    pub initial: String,
    /// Pages in one run, at most.
    #[serde(default = "default_incremental_pages")]
    pub max_pages: u64,
    /// Statuses by which the feed says it no longer serves the stored
    /// checkpoint (it expired): the run fails naming the way back
    /// (`driftd checkpoint reset` or `set`) instead of a bare error.
    #[serde(default = "default_expired_statuses")]
    pub expired_statuses: Vec<u16>,
}

fn default_expired_statuses() -> Vec<u16> {
    vec![410]
}

fn default_deleted_value() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

fn default_initial_checkpoint() -> String {
    "0".into()
}

fn default_incremental_pages() -> u64 {
    100_000
}

impl IncrementalConfig {
    fn validate(&mut self, upstream: &UpstreamConfig) -> Result<(), FieldProblem> {
        if let Some(p) = &self.path {
            if !p.starts_with('/') {
                return Err(problem("incremental.path", "must start with /"));
            }
        }
        if self.since_param.trim().is_empty() {
            return Err(problem(
                "incremental.since_param",
                "must name the query parameter that carries the checkpoint",
            ));
        }
        check_pointer("incremental.cursor_pointer", &self.cursor_pointer)?;
        if self.cursor_pointer.is_empty() {
            return Err(problem(
                "incremental.cursor_pointer",
                "must point at the next checkpoint in the response",
            ));
        }
        if self.items_pointer.is_none() {
            self.items_pointer = Some(upstream.items_pointer.clone());
        }
        if let Some(p) = &self.items_pointer {
            check_pointer("incremental.items_pointer", p)?;
        }
        if let Some(p) = &self.deleted_pointer {
            check_pointer("incremental.deleted_pointer", p)?;
        }
        if self
            .expired_statuses
            .iter()
            .any(|s| !(400..=599).contains(s))
        {
            return Err(problem(
                "incremental.expired_statuses",
                "must be HTTP error statuses (400 to 599)",
            ));
        }
        if self.max_pages == 0 {
            return Err(problem("incremental.max_pages", "must be at least 1"));
        }
        Ok(())
    }
}

/// `parent = { resource = "tenants", column = "tenant_uuid" }`: this
/// table's `column` holds the parent's key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    pub resource: String,
    pub column: String,
}

/// A child resource, as its parent's passes and events purge it.
#[derive(Debug, Clone)]
pub struct ChildLink {
    pub resource: String,
    pub spec: TableSpec,
    /// The child's column holding the parent key.
    pub column: Ident,
    /// The child's own purge guard: at most this many rows at once ...
    pub max_purge_count: u64,
    /// ... and at most this fraction of its live rows.
    pub max_purge_fraction: f64,
    pub purge_extra: bool,
}

/// Where and how to list the upstream collection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub base_url: String,
    /// Path of the list endpoint, joined to `base_url`.
    pub list_path: String,
    /// Path of the get-by-key endpoint with a `{key}` placeholder; needed for
    /// `policy.confirm_purge`.
    pub get_path: Option<String>,
    #[serde(default)]
    pub pagination: Pagination,
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// JSON pointer to the array of items in a page (`""` = the body itself).
    #[serde(default = "default_items_pointer")]
    pub items_pointer: String,
    /// JSON pointer to the announced total row count, if the API gives one.
    /// A listing whose row count disagrees with it is incomplete.
    pub total_pointer: Option<String>,
    /// The order the query asks for (e.g. with `order=uuid`); a page that
    /// breaks it makes the listing incomplete.
    #[serde(default)]
    pub key_order: KeyOrder,
    /// Extra query parameters sent with every list request.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Extra headers sent with every request (e.g. `Wazo-Tenant`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Bearer token, usually given as `DRIFTD_RESOURCES__<NAME>__UPSTREAM__TOKEN`.
    pub token: Option<SecretString>,
    /// Name of an environment variable holding the token.
    pub token_env: Option<String>,
    /// File holding the token (trailing whitespace is trimmed).
    pub token_file: Option<PathBuf>,
    /// Header carrying the token; `Authorization` sends `Bearer <token>`.
    #[serde(default = "default_token_header")]
    pub token_header: String,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
    /// Whole-request timeout, body included.
    #[serde(default = "default_request_timeout")]
    pub timeout_secs: f64,
    /// Attempts after the first on transient errors (connect, timeout, 5xx, 429).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay; doubles each attempt, with jitter.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// A listing needing more pages than this is treated as a pagination loop.
    #[serde(default = "default_max_pages")]
    pub max_pages: u64,
    /// Times a listing starts over when the list moved while it was paged
    /// (or its row count disagreed with the announced total) before the
    /// pass fails.
    #[serde(default = "default_relist_attempts")]
    pub relist_attempts: u32,
    /// Fetch and decode the next page while this one decodes (offset and
    /// page-number paging, while pages come back full): two requests out
    /// at once instead of one.
    #[serde(default = "default_look_ahead")]
    pub look_ahead: bool,
    /// The token after resolution (from `token`, `token_env` or `token_file`).
    #[serde(skip)]
    pub resolved_token: Option<SecretString>,
}

fn default_look_ahead() -> bool {
    true
}
fn default_page_size() -> u32 {
    1000
}
fn default_items_pointer() -> String {
    "/items".into()
}
fn default_token_header() -> String {
    "Authorization".into()
}
fn default_connect_timeout() -> f64 {
    5.0
}
fn default_request_timeout() -> f64 {
    30.0
}
fn default_retries() -> u32 {
    3
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_pages() -> u64 {
    100_000
}
fn default_relist_attempts() -> u32 {
    3
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_secs)
    }
}

/// How the list endpoint pages.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pagination {
    /// `?limit=N&offset=M`.
    Offset {
        #[serde(default = "default_limit_param")]
        limit_param: String,
        #[serde(default = "default_offset_param")]
        offset_param: String,
    },
    /// `?page=P&per_page=N`, pages numbered from `first_page`.
    Page {
        #[serde(default = "default_page_param")]
        page_param: String,
        #[serde(default = "default_per_page_param")]
        per_page_param: String,
        #[serde(default = "default_first_page")]
        first_page: u64,
    },
    /// An opaque next-page token found at a JSON pointer in the body.
    Cursor {
        #[serde(default = "default_cursor_param")]
        cursor_param: String,
        next_pointer: String,
        #[serde(default = "default_limit_param")]
        limit_param: String,
    },
    /// RFC 8288 `Link: <...>; rel="next"` headers.
    Link {
        #[serde(default = "default_limit_param")]
        limit_param: String,
    },
}

impl Pagination {
    /// The config's own name for this kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Pagination::Offset { .. } => "offset",
            Pagination::Page { .. } => "page",
            Pagination::Cursor { .. } => "cursor",
            Pagination::Link { .. } => "link",
        }
    }

    /// Whether a listing can itself show that the list did not move while
    /// it was paged. Offset pages overlap by one row, and the overlap must
    /// match (which proves the listing whole over a list sorted by the key,
    /// `key_order = "asc"`); page numbers, cursors and links give the pager
    /// nothing to check a moved list against.
    pub fn proves_completeness(&self) -> bool {
        matches!(self, Pagination::Offset { .. })
    }
}

impl Default for Pagination {
    fn default() -> Self {
        Pagination::Offset {
            limit_param: default_limit_param(),
            offset_param: default_offset_param(),
        }
    }
}

fn default_limit_param() -> String {
    "limit".into()
}
fn default_offset_param() -> String {
    "offset".into()
}
fn default_page_param() -> String {
    "page".into()
}
fn default_per_page_param() -> String {
    "per_page".into()
}
fn default_first_page() -> u64 {
    1
}
fn default_cursor_param() -> String {
    "cursor".into()
}

/// The order the upstream promises for its listing.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrder {
    /// No promise: no order check.
    #[default]
    None,
    /// Strictly ascending keys (bytewise for text keys, numeric for integers).
    Asc,
}

/// The key that pairs upstream items with local rows.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// JSON pointer to the key in an upstream item, e.g. `/uuid`.
    pub upstream: String,
    /// Local key column.
    pub column: String,
    #[serde(default, rename = "type")]
    pub kind: KeyType,
}

/// Key types; integer keys are compared and stored as integers, uuid keys
/// in their canonical form (lower case, hyphenated) whatever upstream sends.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    #[default]
    Text,
    Integer,
    Uuid,
}

impl KeyType {
    /// The config's own name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Text => "text",
            KeyType::Integer => "integer",
            KeyType::Uuid => "uuid",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The mirrored table, `name` or `schema.name`. It belongs to the user:
    /// driftd reads and writes rows, never alters it.
    pub table: String,
}

/// One owned column: its upstream source and how to compare it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// JSON pointer into the upstream item.
    pub from: String,
    /// Whether upstream may leave the field out of an item (then the column
    /// is set to NULL). Otherwise an absent field is an error: a renamed
    /// field must not NULL the whole column.
    #[serde(default)]
    pub optional: bool,
    #[serde(default, rename = "type")]
    pub kind: ColumnType,
}

/// Column types driftd compares with type awareness. Values of the last
/// four are brought to a canonical text form (see [`crate::canonical`]).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    #[default]
    Text,
    Integer,
    Boolean,
    /// A uuid (PostgreSQL `uuid`, or text holding the canonical form).
    Uuid,
    /// An RFC 3339 timestamp (PostgreSQL `timestamptz`, or text in UTC).
    Timestamp,
    /// An exact decimal (PostgreSQL `numeric`, or text).
    Numeric,
    /// Any JSON value (PostgreSQL `jsonb` or `json`, or text).
    Json,
}

impl ColumnType {
    /// The config's own name.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Boolean => "boolean",
            ColumnType::Uuid => "uuid",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Numeric => "numeric",
            ColumnType::Json => "json",
        }
    }
}

/// What a pass may do, and the limits on purging.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default = "yes")]
    pub insert_missing: bool,
    #[serde(default = "yes")]
    pub repair_stale: bool,
    #[serde(default = "yes")]
    pub purge_extra: bool,
    #[serde(default)]
    pub purge: PurgeMode,
    /// A purge above this fraction of the local rows trips the guard.
    #[serde(default = "default_max_purge_fraction")]
    pub max_purge_fraction: f64,
    /// A purge above this many rows trips the guard.
    #[serde(default = "default_max_purge_count")]
    pub max_purge_count: u64,
    /// An update above this fraction of the local rows trips the guard (a
    /// renamed upstream field would otherwise rewrite every row).
    #[serde(default = "default_max_update_fraction")]
    pub max_update_fraction: f64,
    /// An update above this many rows trips the guard.
    #[serde(default = "default_max_update_count")]
    pub max_update_count: u64,
    /// Check each purge candidate with `upstream.get_path`; purge only on
    /// 404. Defaults to on whenever `get_path` is set; see
    /// [`ResourceConfig::confirms_purges`].
    #[serde(default)]
    pub confirm_purge: Option<bool>,
    /// Rows per write statement/transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            insert_missing: true,
            repair_stale: true,
            purge_extra: true,
            purge: PurgeMode::default(),
            max_purge_fraction: default_max_purge_fraction(),
            max_purge_count: default_max_purge_count(),
            max_update_fraction: default_max_update_fraction(),
            max_update_count: default_max_update_count(),
            confirm_purge: None,
            batch_size: default_batch_size(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_max_purge_fraction() -> f64 {
    0.10
}
fn default_max_purge_count() -> u64 {
    10_000
}
fn default_max_update_fraction() -> f64 {
    0.25
}
fn default_max_update_count() -> u64 {
    100_000
}
fn default_batch_size() -> usize {
    1000
}

/// How an extra row is purged.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PurgeMode {
    /// `DELETE` the row.
    #[default]
    Delete,
    /// Set this timestamp column to the current time instead (rows already
    /// soft-deleted are not scanned).
    SoftDelete { column: String },
}

/// A plain SQL identifier: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes,
/// optionally `schema.name`. Anything else is rejected, never interpolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident(String);

impl Ident {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let parts: Vec<&str> = raw.split('.').collect();
        if parts.len() > 2 {
            return Err(format!("`{raw}` has more than one dot"));
        }
        for part in &parts {
            let ok = !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!(
                    "`{raw}` is not a plain SQL identifier (letters, digits and _; not starting with a digit; at most 63 characters)"
                ));
            }
        }
        Ok(Ident(raw.to_string()))
    }

    /// The identifier double-quoted part by part, safe to interpolate.
    pub fn quoted(&self) -> String {
        self.0
            .split('.')
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(".")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the store needs to know about a mirrored table, validated.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: Ident,
    pub key_column: Ident,
    pub key_type: KeyType,
    /// Owned columns in a fixed order; values travel in this order.
    pub columns: Vec<(Ident, ColumnType)>,
    /// Soft-delete column, if purges are soft.
    pub soft_delete: Option<Ident>,
}

impl Settings {
    /// Loads defaults, then `path`, then `DRIFTD_*` variables, and validates.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let file = path.display().to_string();
        if !path.exists() {
            return Err(ConfigError::InvalidGlobal {
                file,
                field: "--config".into(),
                problem: "file not found".into(),
            });
        }
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env_provider());
        Self::from_figment(figment, &file, path)
    }

    /// Loads from TOML text (tests, the quickstart); environment still applies.
    pub fn from_toml_str(text: &str, name: &str) -> Result<Settings, ConfigError> {
        let figment = Figment::new()
            .merge(Toml::string(text))
            .merge(env_provider());
        Self::from_figment(figment, name, Path::new(name))
    }

    fn from_figment(figment: Figment, file: &str, path: &Path) -> Result<Settings, ConfigError> {
        let mut settings: Settings = figment.extract().map_err(|e| parse_error(e, file))?;
        settings.source = path.to_path_buf();
        settings
            .validate(file)
            .map_err(|e| blame_env(e, &figment))?;
        Ok(settings)
    }

    fn validate(&mut self, file: &str) -> Result<(), ConfigError> {
        if self.store.max_connections == 0 {
            return Err(ConfigError::InvalidGlobal {
                file: file.into(),
                field: "store.max_connections".into(),
                problem: "must be at least 1".into(),
            });
        }
        let url = self.store.url.expose_secret();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::InvalidGlobal {
                file: file.into(),
                field: "store.url".into(),
                problem: "must start with sqlite:, postgres:// or postgresql://".into(),
            });
        }
        let global = |field: &str, problem: String| ConfigError::InvalidGlobal {
            file: file.into(),
            field: field.into(),
            problem,
        };
        if self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(global(
                "admin.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:9750",
                    self.admin.listen
                ),
            ));
        }
        self.admin.resolved_token = self
            .admin
            .resolve_token()
            .map_err(|(field, problem)| global(&field, problem))?;
        if !(self.daemon.shutdown_grace_secs > 0.0 && self.daemon.shutdown_grace_secs <= 3600.0) {
            return Err(global(
                "daemon.shutdown_grace_secs",
                "must be between 0 and 3600 seconds".into(),
            ));
        }
        for name in &self.daemon.startup {
            if !self.resources.contains_key(name) {
                return Err(global(
                    "daemon.startup",
                    format!("unknown resource `{name}`"),
                ));
            }
        }
        for (name, res) in &mut self.resources {
            res.validate(name)
                .map_err(|(field, problem)| ConfigError::Invalid {
                    file: file.into(),
                    resource: name.clone(),
                    field,
                    problem,
                })?;
        }
        self.link_children(file)?;
        for (name, src) in &mut self.sources {
            Ident::parse(name).map_err(|_| {
                global(
                    &format!("sources.{name}"),
                    "source names must be letters, digits and _ (they are metric labels)".into(),
                )
            })?;
            events::validate_source(src, &self.resources)
                .map_err(|(field, problem)| global(&format!("sources.{name}.{field}"), problem))?;
        }
        // One journal of versions per key, whichever source writes it: a
        // timestamp would sort after every integer.
        let mut kinds: BTreeMap<&str, (events::VersionKind, String)> = BTreeMap::new();
        for (name, src) in &self.sources {
            for (event, ev) in src.events.iter().filter(|(_, e)| e.version.is_some()) {
                match kinds.get(ev.resource.as_str()) {
                    Some((kind, other)) if *kind != ev.version_kind => {
                        return Err(global(
                            &format!("sources.{name}.events.{event}.version_kind"),
                            format!(
                                "`{}` versions of resource `{}` are {}, but {other} gives it {} versions: one kind per resource",
                                event,
                                ev.resource,
                                ev.version_kind.as_str(),
                                kind.as_str()
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        kinds.insert(
                            ev.resource.as_str(),
                            (
                                ev.version_kind,
                                format!("event `{event}` of source `{name}`"),
                            ),
                        );
                    }
                }
            }
        }
        // A reprovision purges what its source did not re-send: rows
        // another source wrote would go with them.
        for (name, src) in &self.sources {
            let Some(r) = &src.reprovision else { continue };
            for (other, o) in &self.sources {
                if other == name {
                    continue;
                }
                if let Some(res) = r
                    .resources
                    .iter()
                    .find(|res| o.events.values().any(|e| &e.resource == *res))
                {
                    return Err(global(
                        &format!("sources.{name}.reprovision.resources"),
                        format!(
                            "`{res}` is also written by source `{other}`: a reprovision of `{name}` would purge the rows `{other}` wrote"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Fills each parent's `children` from the resources naming it.
    fn link_children(&mut self, file: &str) -> Result<(), ConfigError> {
        let mut links: Vec<(String, ChildLink)> = Vec::new();
        for (name, res) in &self.resources {
            let Some(parent) = &res.parent else { continue };
            let invalid = |problem: String| ConfigError::Invalid {
                file: file.into(),
                resource: name.clone(),
                field: "parent".into(),
                problem,
            };
            if parent.resource == *name {
                return Err(invalid("a resource cannot be its own parent".into()));
            }
            if !self.resources.contains_key(&parent.resource) {
                return Err(invalid(format!("unknown resource `{}`", parent.resource)));
            }
            let column = Ident::parse(&parent.column).map_err(invalid)?;
            let Some(mapped) = res.columns.get(&parent.column) else {
                return Err(invalid(format!(
                    "column `{}` is not one of this resource's mapped columns",
                    parent.column
                )));
            };
            // The column must hold the parent's keys in the parent key's
            // canonical form, or a cascade would miss children.
            let parent_key = self.resources[&parent.resource].key.kind;
            let wanted = match parent_key {
                KeyType::Text => ColumnType::Text,
                KeyType::Integer => ColumnType::Integer,
                KeyType::Uuid => ColumnType::Uuid,
            };
            if mapped.kind != wanted {
                return Err(invalid(format!(
                    "column `{}` is mapped as {} but holds `{}` keys, which are {}: map it with type = \"{}\"",
                    parent.column,
                    mapped.kind.as_str(),
                    parent.resource,
                    parent_key.as_str(),
                    wanted.as_str()
                )));
            }
            links.push((
                parent.resource.clone(),
                ChildLink {
                    resource: name.clone(),
                    spec: res.table_spec(),
                    column,
                    max_purge_count: res.policy.max_purge_count,
                    max_purge_fraction: res.policy.max_purge_fraction,
                    purge_extra: res.policy.purge_extra,
                },
            ));
        }
        for (parent, link) in links {
            if let Some(p) = self.resources.get_mut(&parent) {
                p.children.push(link);
            }
        }
        Ok(())
    }

    /// The schedules folder, relative to the config file's folder.
    pub fn schedules_dir(&self) -> PathBuf {
        let default = default_schedules_dir();
        let dir = self.daemon.schedules_dir.as_ref().unwrap_or(&default);
        if dir.is_absolute() {
            return dir.clone();
        }
        match self.source.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join(dir),
            _ => dir.clone(),
        }
    }

    /// The resource called `name`, or an error listing the known ones.
    pub fn resource(&self, name: &str) -> anyhow::Result<&ResourceConfig> {
        self.resources.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.resources.keys().map(String::as_str).collect();
            anyhow::anyhow!(
                "unknown resource `{name}` in {} (known: {})",
                self.source.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })
    }
}

/// `DRIFTD_<SECTION>__<FIELD>...` variables, `__` between levels.
fn env_provider() -> Env {
    Env::prefixed("DRIFTD_")
        .filter(|key| is_setting(key.as_str()))
        .split("__")
}

/// The top-level tables of [`Settings`]; a variable naming another is not a
/// setting.
const SECTIONS: &[&str] = &["store", "admin", "daemon", "resources", "sources"];

/// Whether a `DRIFTD_` variable (named without the prefix) is a setting:
/// a section, then at least one `__` and no empty level. Anything else
/// under the prefix belongs to someone else (`DRIFTD_CONFIG` names the
/// file, `DRIFTD_LOG`, `DRIFTD_TEST_*` the test suite, `DRIFTD_ADMIN_TOKEN`
/// a `token_env` target) and is ignored rather than failing every command
/// with "unknown field".
fn is_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let mut levels = key.split("__");
    let section = levels.next().unwrap_or_default();
    let mut rest = levels.peekable();
    SECTIONS.contains(&section) && rest.peek().is_some() && rest.all(|level| !level.is_empty())
}

/// The `DRIFTD_*` variable that sets `key` (a dotted config path).
fn env_name(key: &str) -> String {
    format!("DRIFTD_{}", key.replace('.', "__").to_ascii_uppercase())
}

/// Whether the value at `key` came from the environment, not the file.
fn from_env(figment: &Figment, key: &str) -> bool {
    figment
        .find_metadata(key)
        .is_some_and(|m| m.name.contains("environment"))
}

/// One line per figment error, naming where the value came from (the file
/// or the variable) and the field, without repeating figment's own text.
fn parse_error(errors: figment::Error, file: &str) -> ConfigError {
    let mut origin = file.to_string();
    let problems: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            if e.metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"))
                && !key.is_empty()
            {
                origin = format!("environment variable {}", env_name(&key));
            }
            if key.is_empty() {
                e.kind.to_string()
            } else {
                format!("field `{key}`: {}", e.kind)
            }
        })
        .collect();
    ConfigError::Parse {
        file: origin,
        problem: problems.join("; "),
    }
}

/// Names the variable, not the file, when the refused value came from the
/// environment.
fn blame_env(mut e: ConfigError, figment: &Figment) -> ConfigError {
    let (file, key) = match &mut e {
        ConfigError::Invalid {
            file,
            resource,
            field,
            ..
        } => (file, format!("resources.{resource}.{field}")),
        ConfigError::InvalidGlobal { file, field, .. } => (file, field.clone()),
        ConfigError::Parse { .. } => return e,
    };
    if from_env(figment, &key) {
        *file = format!("environment variable {}", env_name(&key));
    }
    e
}

type FieldProblem = (String, String);

fn problem(field: &str, text: impl Into<String>) -> FieldProblem {
    (field.to_string(), text.into())
}

fn check_pointer(field: &str, pointer: &str) -> Result<(), FieldProblem> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(problem(
            field,
            format!("`{pointer}` is not a JSON pointer (it must be empty or start with `/`)"),
        ))
    }
}

fn check_ident(field: &str, raw: &str) -> Result<Ident, FieldProblem> {
    Ident::parse(raw).map_err(|e| problem(field, e))
}

impl ResourceConfig {
    fn validate(&mut self, name: &str) -> Result<(), FieldProblem> {
        Ident::parse(name).map_err(|_| {
            problem(
                "name",
                "resource names must be letters, digits and _ (they are metric labels)",
            )
        })?;
        self.upstream.validate()?;
        if let Some(inc) = &mut self.incremental {
            inc.validate(&self.upstream)?;
        }
        check_pointer("key.upstream", &self.key.upstream)?;
        if self.key.upstream.is_empty() {
            return Err(problem("key.upstream", "must point into the item"));
        }
        check_ident("key.column", &self.key.column)?;
        check_ident("local.table", &self.local.table)?;
        for (column, spec) in &self.columns {
            check_ident(&format!("columns.{column}"), column)?;
            check_pointer(&format!("columns.{column}.from"), &spec.from)?;
            if column == &self.key.column {
                return Err(problem(
                    &format!("columns.{column}"),
                    "is the key column; the key is mapped by `key`",
                ));
            }
        }
        let p = &self.policy;
        for (field, fraction) in [
            ("policy.max_purge_fraction", p.max_purge_fraction),
            ("policy.max_update_fraction", p.max_update_fraction),
        ] {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(problem(field, "must be between 0.0 and 1.0"));
            }
        }
        if p.batch_size == 0 || p.batch_size > 10_000 {
            return Err(problem("policy.batch_size", "must be between 1 and 10000"));
        }
        if let PurgeMode::SoftDelete { column } = &p.purge {
            check_ident("policy.purge.soft_delete.column", column)?;
            if self.columns.contains_key(column) || *column == self.key.column {
                return Err(problem(
                    "policy.purge.soft_delete.column",
                    format!("`{column}` is also mapped from upstream; the soft-delete column must be driftd's own"),
                ));
            }
        }
        if p.confirm_purge == Some(true) && self.upstream.get_path.is_none() {
            return Err(problem(
                "policy.confirm_purge",
                "needs upstream.get_path to confirm candidates",
            ));
        }
        if p.purge_extra && !self.confirms_purges() {
            let kind = self.upstream.pagination.kind();
            if !self.upstream.pagination.proves_completeness() {
                return Err(problem(
                    "upstream.pagination",
                    format!(
                        "`{kind}` pagination cannot show that the list did not move while it was paged, so purge candidates must be confirmed one by one: set upstream.get_path (and leave policy.confirm_purge on), or set policy.purge_extra = false"
                    ),
                ));
            }
            if self.upstream.key_order != KeyOrder::Asc {
                return Err(problem(
                    "upstream.key_order",
                    "offset pages prove a listing whole only over a list sorted by the key (a row whose sort field changes can jump over the page boundary unseen): sort the listing by the key and set key_order = \"asc\", or set upstream.get_path so purge candidates are confirmed, or set policy.purge_extra = false",
                ));
            }
        }
        Ok(())
    }

    /// Whether purge candidates are checked with the get-by-key endpoint
    /// before they are purged: as configured, else whenever `get_path` is.
    pub fn confirms_purges(&self) -> bool {
        self.policy
            .confirm_purge
            .unwrap_or(self.upstream.get_path.is_some())
    }

    /// The validated table description the store works with.
    pub fn table_spec(&self) -> TableSpec {
        // `validate` has checked every identifier, so these parses succeed;
        // fall back to an impossible name rather than panic if it did not.
        let ident = |s: &str| Ident::parse(s).unwrap_or_else(|_| Ident("invalid".into()));
        TableSpec {
            table: ident(&self.local.table),
            key_column: ident(&self.key.column),
            key_type: self.key.kind,
            columns: self
                .columns
                .iter()
                .map(|(name, c)| (ident(name), c.kind))
                .collect(),
            soft_delete: match &self.policy.purge {
                PurgeMode::Delete => None,
                PurgeMode::SoftDelete { column } => Some(ident(column)),
            },
        }
    }
}

impl UpstreamConfig {
    fn validate(&mut self) -> Result<(), FieldProblem> {
        let base = Url::parse(&self.base_url)
            .map_err(|e| problem("upstream.base_url", format!("`{}`: {e}", self.base_url)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(problem("upstream.base_url", "must be http or https"));
        }
        if !self.list_path.starts_with('/') {
            return Err(problem("upstream.list_path", "must start with `/`"));
        }
        if let Some(get) = &self.get_path {
            if !get.starts_with('/') || !get.contains("{key}") {
                return Err(problem(
                    "upstream.get_path",
                    "must start with `/` and contain `{key}`",
                ));
            }
        }
        if self.page_size == 0 || self.page_size > 100_000 {
            return Err(problem(
                "upstream.page_size",
                "must be between 1 and 100000",
            ));
        }
        if self.page_size < 2 && matches!(self.pagination, Pagination::Offset { .. }) {
            return Err(problem(
                "upstream.page_size",
                "must be at least 2 with offset pagination (each page repeats the previous page's last row)",
            ));
        }
        if self.relist_attempts > 20 {
            return Err(problem("upstream.relist_attempts", "must be at most 20"));
        }
        check_pointer("upstream.items_pointer", &self.items_pointer)?;
        if let Some(t) = &self.total_pointer {
            check_pointer("upstream.total_pointer", t)?;
        }
        if let Pagination::Cursor { next_pointer, .. } = &self.pagination {
            check_pointer("upstream.pagination.next_pointer", next_pointer)?;
        }
        for (field, secs) in [
            ("upstream.connect_timeout_secs", self.connect_timeout_secs),
            ("upstream.timeout_secs", self.timeout_secs),
        ] {
            if !(secs > 0.0 && secs <= 3600.0) {
                return Err(problem(field, "must be between 0 and 3600 seconds"));
            }
        }
        if self.retries > 20 {
            return Err(problem("upstream.retries", "must be at most 20"));
        }
        if self.max_pages == 0 {
            return Err(problem("upstream.max_pages", "must be at least 1"));
        }
        for name in self
            .headers
            .keys()
            .chain(std::iter::once(&self.token_header))
        {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(problem(
                    "upstream.headers",
                    format!("`{name}` is not a valid header name"),
                ));
            }
        }
        for (name, value) in &self.headers {
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err(problem(
                    &format!("upstream.headers.{name}"),
                    "is not a valid header value",
                ));
            }
        }
        self.resolved_token = self.resolve_token()?;
        Ok(())
    }

    fn resolve_token(&self) -> Result<Option<SecretString>, FieldProblem> {
        let given = [
            self.token.is_some(),
            self.token_env.is_some(),
            self.token_file.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(problem(
                "upstream.token",
                "give at most one of token, token_env and token_file",
            ));
        }
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        if let Some(var) = &self.token_env {
            return match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Some(SecretString::from(v))),
                _ => Err(problem(
                    "upstream.token_env",
                    format!("environment variable `{var}` is not set"),
                )),
            };
        }
        if let Some(path) = &self.token_file {
            return match std::fs::read_to_string(path) {
                Ok(v) if !v.trim().is_empty() => {
                    Ok(Some(SecretString::from(v.trim_end().to_string())))
                }
                Ok(_) => Err(problem(
                    "upstream.token_file",
                    format!("`{}` is empty", path.display()),
                )),
                Err(e) => Err(problem(
                    "upstream.token_file",
                    format!("`{}`: {e}", path.display()),
                )),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped examples, cut, spliced and with lines swapped at
    /// random: the loader answers with settings or an error, never panics.
    #[test]
    fn mangled_configs_load_or_fail_without_panic() {
        let examples = [
            include_str!("../../examples/quickstart/driftd.toml"),
            include_str!("../../examples/wazo-postgres/driftd.toml"),
            include_str!("../../examples/data-service-redis/driftd.toml"),
        ];
        let tokens = [
            "=", "\"", "[", "]", "{", "}", "0", "-1", "1e309", "\"\"", "\"/\"", "true", "\n",
        ];
        for seed in 0..3000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut lines: Vec<String> = examples[rng.usize(..examples.len())]
                .lines()
                .map(str::to_string)
                .collect();
            for _ in 0..rng.usize(1..6) {
                if lines.is_empty() {
                    break;
                }
                let at = rng.usize(..lines.len());
                match rng.u8(..4) {
                    0 => {
                        lines.remove(at);
                    }
                    1 => {
                        let other = lines[rng.usize(..lines.len())].clone();
                        lines.insert(at, other);
                    }
                    2 => {
                        let line = &mut lines[at];
                        let cut = (0..=line.len())
                            .filter(|&i| line.is_char_boundary(i))
                            .nth(rng.usize(..=line.chars().count()))
                            .unwrap_or(0);
                        line.insert_str(cut, tokens[rng.usize(..tokens.len())]);
                    }
                    _ => {
                        let b = rng.usize(..lines.len());
                        lines.swap(at, b);
                    }
                }
            }
            let text = lines.join("\n");
            let _ = Settings::from_toml_str(&text, "mangled.toml");
        }
    }

    const MINIMAL: &str = r#"
[resources.users]
upstream = { base_url = "http://127.0.0.1:9", list_path = "/users", key_order = "asc" }
key = { upstream = "/uuid", column = "uuid" }
local = { table = "users" }
columns = { name = { from = "/name" } }
"#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let s = Settings::from_toml_str(MINIMAL, "t.toml").expect("loads");
        let r = &s.resources["users"];
        assert_eq!(r.upstream.page_size, 1000);
        assert_eq!(r.policy.max_purge_fraction, 0.10);
        assert_eq!(r.upstream.pagination, Pagination::default());
    }

    #[test]
    fn bad_identifier_is_rejected_naming_the_field() {
        let text = MINIMAL.replace("table = \"users\"", "table = \"users; DROP TABLE x\"");
        let err = Settings::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.toml"), "{err}");
        assert!(err.contains("`users`"), "{err}");
        assert!(err.contains("local.table"), "{err}");
    }

    #[test]
    fn unprovable_listings_need_confirmed_purges() {
        let unordered = MINIMAL.replace(", key_order = \"asc\"", "");
        let err = Settings::from_toml_str(&unordered, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.key_order"), "{err}");
        let confirmed = unordered.replace(
            "list_path = \"/users\"",
            "list_path = \"/users\", get_path = \"/users/{key}\"",
        );
        let s = Settings::from_toml_str(&confirmed, "t.toml").unwrap();
        assert!(s.resources["users"].confirms_purges());
        let paged = MINIMAL.replace("key_order", "pagination = { kind = \"page\" }, key_order");
        let err = Settings::from_toml_str(&paged, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`page` pagination cannot show"), "{err}");
        let no_purge = format!("{paged}\n[resources.users.policy]\npurge_extra = false\n");
        assert!(Settings::from_toml_str(&no_purge, "t.toml").is_ok());
    }

    #[test]
    fn unknown_field_is_rejected() {
        let text = MINIMAL.replace("[resources.users]", "[resources.users]\nbogus = 1");
        let err = Settings::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_pointer_and_url_are_rejected() {
        let text = MINIMAL.replace("\"/name\"", "\"name\"");
        let err = Settings::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("columns.name.from"), "{err}");
        let text = MINIMAL.replace("http://127.0.0.1:9", "not a url");
        let err = Settings::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.base_url"), "{err}");
    }

    #[test]
    fn two_sources_versioning_one_resource_differently_are_refused() {
        let config = format!(
            "{MINIMAL}\n[sources.a]\nkind = \"webhook\"\n[sources.a.events]\nuser_edited = {{ resource = \"users\", op = \"upsert\", key = \"/id\", version = \"/rev\" }}\n\
             [sources.b]\nkind = \"webhook\"\n[sources.b.events]\nuser_changed = {{ resource = \"users\", op = \"upsert\", key = \"/id\", version = \"/at\", version_kind = \"timestamp\" }}\n"
        );
        let err = Settings::from_toml_str(&config, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version_kind") && err.contains("source `a`"),
            "{err}"
        );
        // The same kind in both: fine.
        let same = config.replace(", version_kind = \"timestamp\"", "");
        Settings::from_toml_str(&same, "t.toml").unwrap();
    }

    #[test]
    fn bad_redis_sources_are_refused_naming_the_field() {
        let source = |redis: &str| {
            format!(
                "{MINIMAL}\n[sources.bus]\nkind = \"redis\"\n[sources.bus.events]\nuser_created = {{ resource = \"users\", op = \"upsert\", key = \"/id\" }}\n{redis}"
            )
        };
        let ok = source("[sources.bus.redis]\nurl = \"redis://127.0.0.1/\"\nstream = \"s\"\n");
        let s = Settings::from_toml_str(&ok, "t.toml").unwrap();
        assert_eq!(s.sources["bus"].redis.as_ref().unwrap().group, "driftd");
        for (redis, field) in [
            ("", "sources.bus.redis"),
            (
                "[sources.bus.redis]\nurl = \"redis://h/\"\nstream = \" \"\n",
                "redis.stream",
            ),
            ("[sources.bus.redis]\nstream = \"s\"\n", "redis.url"),
            (
                "[sources.bus.redis]\nurl = \"redis://h/\"\nstream = \"s\"\ngroup_start = \"1\"\n",
                "redis.group_start",
            ),
            (
                "[sources.bus.redis]\nurl = \"redis://h/\"\nstream = \"s\"\nmax_deliveries = 0\n",
                "redis.max_deliveries",
            ),
            (
                "[sources.bus.redis]\nurl = \"redis://h/\"\nstream = \"s\"\nclaim_idle_secs = -1\n",
                "redis.claim_idle_secs",
            ),
        ] {
            let err = Settings::from_toml_str(&source(redis), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(field) && err.contains("t.toml"),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn missing_secret_is_rejected() {
        let text = MINIMAL.replace(
            "list_path = \"/users\"",
            "list_path = \"/users\", token_env = \"DRIFTD_TEST_SURELY_UNSET\"",
        );
        let err = Settings::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("DRIFTD_TEST_SURELY_UNSET"), "{err}");
    }

    #[test]
    fn token_from_a_file_is_trimmed_and_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let text = MINIMAL.replace(
            "list_path = \"/users\"",
            &format!(
                "list_path = \"/users\", token_file = \"{}\"",
                path.display()
            ),
        );
        let s = Settings::from_toml_str(&text, "t.toml").unwrap();
        let token = s.resources["users"]
            .upstream
            .resolved_token
            .as_ref()
            .unwrap();
        assert_eq!(token.expose_secret(), "s3cret");
        assert!(!format!("{:?}", s.resources["users"].upstream).contains("s3cret"));
        std::fs::write(&path, "  ").unwrap();
        let err = Settings::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream.token_file") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn blank_admin_token_is_refused_naming_the_field() {
        for token in ["", "   ", "\t"] {
            let text = format!("{MINIMAL}\n[admin]\ntoken = \"{token}\"\n");
            let err = Settings::from_toml_str(&text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("t.toml") && err.contains("`admin.token`") && err.contains("empty"),
                "{token:?}: {err}"
            );
        }
        let text = format!("{MINIMAL}\n[admin]\ntoken = \"tok\"\n");
        let s = Settings::from_toml_str(&text, "t.toml").unwrap();
        let token = s.admin.resolved_token.as_ref().unwrap();
        assert_eq!(token.expose_secret(), "tok");
    }

    #[test]
    fn only_section_variables_are_settings() {
        for key in [
            "STORE__URL",
            "admin__token",
            "DAEMON__SHUTDOWN_GRACE_SECS",
            "RESOURCES__USERS__UPSTREAM__TOKEN",
            "ADMIN__TOKNE",
        ] {
            assert!(is_setting(key), "{key}");
        }
        for key in [
            "CONFIG",
            "LOG",
            "ADMIN_TOKEN",
            "STORE_URL",
            "TEST_PG_URL",
            "TEST__PG_URL",
            "FOO__BAR",
            "ADMIN",
            "ADMIN__",
            "RESOURCES____TOKEN",
            "",
        ] {
            assert!(!is_setting(key), "{key}");
        }
    }

    #[test]
    fn ident_quoting() {
        assert_eq!(Ident::parse("a.b").unwrap().quoted(), "\"a\".\"b\"");
        assert!(Ident::parse("1abc").is_err());
        assert!(Ident::parse("a\"b").is_err());
        assert!(Ident::parse("").is_err());
    }
}

//! driftd keeps a service's local SQL copies of upstream resources true: it
//! applies live bus events, and pages through the upstream list API, diffs
//! against the local table, and inserts, repairs or purges what drifted,
//! behind guards that make a wrong purge impossible without an explicit
//! force.
//!
//! Layers, bottom up: vocabulary ([`config`], [`model`], [`canonical`],
//! [`jobs`], [`vocab`]); [`store`] (the mirrored tables and driftd's own
//! ledger, SQLite and PostgreSQL); [`engine`] (a pass: [`upstream`] pager,
//! [`decode`], [`diff`], [`guard`], [`pass`]; and the events engine);
//! sources of work ([`runner`], [`scheduler`], [`sources`], [`daemon`]);
//! edges ([`api`], [`cli`], [`remote`], [`report`], [`redact`],
//! [`metrics`], [`telemetry`], [`sample`], [`quickstart`]).

pub mod api;
pub use api as admin;
pub mod canonical;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
// The engine's modules keep their short paths (`driftd::pass`, ...).
pub use engine::{decode, diff, guard, pass, rows, upstream};
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod quickstart;
pub mod redact;
pub mod remote;
pub mod report;
pub mod runner;
pub mod sample;
pub mod scheduler;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod vocab;

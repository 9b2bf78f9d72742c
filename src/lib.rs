//! driftd keeps a service's local SQL copies of upstream resources true: it
//! pages through the upstream list API, diffs against the local table, and
//! inserts, repairs or purges what drifted, behind guards that make a wrong
//! purge impossible without an explicit force.
//!
//! Module map: [`config`] (typed settings), [`upstream`] (HTTP client and
//! pager), [`decode`] (pages to typed rows), [`store`] (SQLite and PostgreSQL), [`model`] (typed values),
//! [`diff`] (pure plan), [`guard`] (judging plans), [`pass`] (one
//! reconciliation), [`report`] (rendering), [`redact`] (secrets of store URLs), [`cli`] (commands),
//! [`sample`] (bundled sample upstream), [`quickstart`].

pub mod api;
pub use api as admin;
pub mod canonical;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod diff;
pub mod engine;
pub mod guard;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod pass;
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
pub mod upstream;
pub mod vocab;

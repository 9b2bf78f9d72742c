//! Integration tests against real SQLite and PostgreSQL and a real HTTP
//! upstream (the bundled sample, in process, on an ephemeral port).

mod cli;
mod common;
mod daemon;
mod guards;
mod prometheus;
mod repair;
mod security;

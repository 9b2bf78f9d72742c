//! Integration tests against real SQLite and PostgreSQL and a real HTTP
//! upstream (the bundled sample, in process, on an ephemeral port).

mod cascade;
mod change_feed;
mod churn;
mod cli;
mod common;
mod crash;
mod daemon;
mod dead_letters;
mod equality;
mod event_order;
mod events;
mod guards;
mod incremental;
mod layers;
mod live;
mod merge;
mod outage;
mod pass_faults;
mod prometheus;
mod rabbit;
mod refetch;
mod refused;
mod repair;
mod reprovision;
mod resends;
mod retention;
mod scan_edges;
mod security;
mod sqlite_file;
mod stream_consumers;
mod stream_loss;
mod streams;
mod versions;
mod worker_truth;

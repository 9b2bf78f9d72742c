//! Integration tests against real SQLite and PostgreSQL and a real HTTP
//! upstream (the bundled sample, in process, on an ephemeral port).

mod cascade;
mod churn;
mod cli;
mod common;
mod crash;
mod daemon;
mod dead_letters;
mod equality;
mod events;
mod guards;
mod incremental;
mod live;
mod merge;
mod outage;
mod prometheus;
mod rabbit;
mod refetch;
mod refused;
mod repair;
mod reprovision;
mod retention;
mod review;
mod review2;
mod review3;
mod review4;
mod review5;
mod review6;
mod security;
mod sqlite_file;
mod stream_consumers;
mod stream_loss;
mod streams;

//! Integration tests of the write side against real PostgreSQL and NATS
//! JetStream. Every test has its own database and JetStream stream (see
//! `neurectomy_commands::testkit`), so they run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_reads;
mod erasure;
mod gap_safety;
mod group_commit;
mod handler;
mod relay;
mod seal;
mod store;
mod support;

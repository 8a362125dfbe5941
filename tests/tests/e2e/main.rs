//! The end-to-end tests, in one binary: linking the whole workspace once
//! instead of once per file. Each module holds the tests of one area (the
//! README's "Tests" section says what each checks); [`support`] holds what
//! several of them share.
//!
//! The tests run in parallel threads of this one process, each on resources
//! of its own (database, JetStream stream and subject prefix, Redis key
//! prefix, graph database, private servers, child processes on ports the
//! OS picks), so nothing a test asserts depends on another. What is
//! process-wide is installed once and only read or added to:
//!
//! - the Prometheus recorder (`api::metrics::install`, a `OnceLock`): tests
//!   that read it in-process take counters as lower bounds, since every
//!   test's projectors add to the same series;
//! - the `TEST_LOG` log subscriber (`api_subscriptions`, `try_init`: the
//!   first call installs it, later ones change nothing).
//!
//! No test sets environment variables or changes the working directory:
//! child processes get theirs through `Command::env`.
//!
//! `tests/traces.rs` is not here: it installs the production telemetry as
//! the process's global subscriber and checks what it exports, which needs
//! a process of its own.

mod api;
mod api_audit;
mod api_hardening;
mod api_subscriptions;
mod browser;
mod causes;
mod config;
mod e2e;
mod erasure;
mod faults;
mod graph_projection;
mod js_clients;
mod js_cluster;
mod leases;
mod nats_permissions;
mod ops;
mod partitions;
mod projections;
mod sealed_log;
mod support;
mod verify;

//! # The `neurectomy` binary
//!
//! Every Neurectomy process role — the outbox relay, the projectors, the
//! GraphQL API, the workload simulator — and the one-shot sub-commands
//! around them. `main.rs` only calls [`main`]. The benchmarks are not here:
//! they are the `neurectomy-bench` binary (`benches/neurectomy-bench`).
//!
//! ## Layout, top-down
//!
//! Each floor imports only the floors below it; no module imports one that
//! imports it back.
//!
//! | floor | what it holds |
//! |---|---|
//! | [`cli`] | the command line, `main`, one small file per sub-command |
//! | [`startup`] | [`startup::Application`]: connects pools and clients once ([`startup::connect`]), starts the roles a process runs, stops them within the deadline |
//! | [`simulate`] | the realistic orchestration workload, through the real command handler |
//! | [`http`] | the router and its state, the GraphQL endpoints, the WebSocket protocols ([`http::ws`]), health and readiness ([`http::health`]), the GraphiQL page ([`http::graphiql`]) |
//! | [`graphql`] | the schema: queries, mutations, subscriptions (and their change feed), audit, the document limits |
//! | [`error`] | every error a client sees, mapped in one place |
//! | [`auth`] | bearer tokens: verification, roles, the principal |
//! | [`shutdown`] | signals, what is in flight, the shutdown deadline |
//! | [`telemetry`] | logs, traces (OTLP), Prometheus metrics, dependency probes |
//! | [`settings`] | the settings and their configuration (flags, environment, TOML file), secrets; imports nothing above |
//! | [`sync`] | the one lock helper |

pub mod auth;
pub mod cli;
pub mod error;
pub mod graphql;
pub mod http;
pub mod settings;
pub mod shutdown;
pub mod simulate;
pub mod startup;
pub mod sync;
pub mod telemetry;

pub use cli::main;

#[cfg(test)]
mod layout_tests;

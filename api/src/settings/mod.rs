//! # Settings: the floor everything else stands on
//!
//! The one settings struct, [`Settings`], flattened into every command line.
//! Every setting is a flag with an environment variable and a local default,
//! documented in `neurectomy --help`; it can also be set in the TOML file
//! named by `--config`. [`config`] layers flag, then environment variable,
//! then file, then default, and validates the result (parse with
//! `cli::load`, not `Cli::parse`). [`secret`] holds what must never be
//! printed.
//!
//! This module imports nothing of the server: the types that settings
//! describe (limits, HTTP settings, the token verifier) are built from them
//! where they live (`ApiLimits::from_settings`, `ServerConfig::from_settings`,
//! `Authenticator::from_settings`).

pub mod config;
pub mod secret;

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Settings of the GraphQL API (`serve`, `all`).
#[derive(Debug, Clone, Args)]
pub struct ApiSettings {
    /// Address the API listens on.
    #[arg(
        long,
        env = "NEURECTOMY_API_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub api_listen: String,
    /// HS256 secret for bearer tokens (32+ bytes).
    #[arg(
        long,
        env = "NEURECTOMY_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub jwt_secret: Option<crate::settings::secret::Secret>,
    /// PEM file with an RS256 public key for bearer tokens (optional).
    #[arg(long, env = "NEURECTOMY_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// Longest wait (ms) of a read for `atLeastPosition` before `STALE`.
    #[arg(
        long,
        env = "NEURECTOMY_API_CONSISTENCY_TIMEOUT_MS",
        default_value_t = 5_000,
        global = true
    )]
    pub api_consistency_timeout_ms: u64,
    /// Deepest nesting of fields in a query (introspection does not count).
    #[arg(
        long,
        env = "NEURECTOMY_API_MAX_DEPTH",
        default_value_t = 12,
        global = true
    )]
    pub api_max_depth: usize,
    /// Query complexity limit: a field counts 1, a field with `first: n`
    /// counts n times its selection (introspection does not count); must
    /// allow a full page (`api.max_page`) of agents with every field.
    #[arg(
        long,
        env = "NEURECTOMY_API_MAX_COMPLEXITY",
        default_value_t = 20_000,
        global = true
    )]
    pub api_max_complexity: usize,
    /// Most field selections a GraphQL document may have once its fragment
    /// spreads are expanded (refused before validation otherwise).
    #[arg(
        long,
        env = "NEURECTOMY_API_MAX_FIELDS",
        default_value_t = 2_000,
        global = true
    )]
    pub api_max_fields: usize,
    /// Largest page (`first`) of a connection or the event log.
    #[arg(
        long,
        env = "NEURECTOMY_API_MAX_PAGE",
        default_value_t = 500,
        global = true
    )]
    pub api_max_page: usize,
    /// Allow introspection (`true`/`false`).
    #[arg(long, env = "NEURECTOMY_API_INTROSPECTION", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub api_introspection: bool,
    /// Largest request body, bytes.
    #[arg(
        long,
        env = "NEURECTOMY_API_BODY_LIMIT",
        default_value_t = 262_144,
        global = true
    )]
    pub api_body_limit: usize,
    /// Largest WebSocket message, bytes.
    #[arg(
        long,
        env = "NEURECTOMY_API_WS_MESSAGE_LIMIT",
        default_value_t = 65_536,
        global = true
    )]
    pub api_ws_message_limit: usize,
    /// Time (ms) a WebSocket client has to send `connection_init`.
    #[arg(
        long,
        env = "NEURECTOMY_API_WS_INIT_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub api_ws_init_timeout_ms: u64,
    /// Most subscriptions one WebSocket may hold at once (more are refused
    /// with the protocol's `error` message).
    #[arg(
        long,
        env = "NEURECTOMY_API_WS_MAX_SUBSCRIPTIONS",
        default_value_t = 200,
        global = true
    )]
    pub api_ws_max_subscriptions: usize,
    /// Origins allowed by CORS, comma-separated (`*` for any; empty: none).
    #[arg(
        long,
        env = "NEURECTOMY_API_CORS_ORIGINS",
        value_delimiter = ',',
        global = true
    )]
    pub api_cors_origins: Vec<String>,
    /// Messages buffered per subscriber before a slow one is cut off.
    #[arg(
        long,
        env = "NEURECTOMY_API_SUBSCRIBER_BUFFER",
        default_value_t = 1_024,
        global = true
    )]
    pub api_subscriber_buffer: usize,
    /// Agents `agent(id)` keeps in the API process, kept current by the
    /// change feed (0: none; always read from Redis).
    #[arg(
        long,
        env = "NEURECTOMY_API_AGENT_CACHE",
        default_value_t = 100_000,
        global = true
    )]
    pub api_agent_cache: usize,
}

/// Which projections to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Projection {
    /// The Redis live-state read model.
    Redis,
    /// The graph read model (Neo4j 5 / a Bolt server).
    Graph,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Args)]
pub struct LogSettings {
    /// Log filter (tracing EnvFilter syntax), e.g. `info,neurectomy_commands=debug`.
    #[arg(
        long = "log",
        env = "NEURECTOMY_LOG",
        default_value = "info",
        global = true
    )]
    pub filter: String,
    /// Log format.
    #[arg(long = "log-format", env = "NEURECTOMY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub format: LogFormat,
    /// The OpenTelemetry SDK's standard variables ([`OTEL_VARIABLES`]), read
    /// by the configuration loader from the same environment as every other
    /// setting; telemetry reads them from here, not from the process.
    #[arg(skip)]
    pub otel: OtelVariables,
}

/// The standard `OTEL_*` variables Neurectomy follows (the trace exporter's
/// endpoint, protocol, timeout and batch queue, and the service name).
pub const OTEL_VARIABLES: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
];

/// The [`OTEL_VARIABLES`] that are set to something (trimmed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtelVariables(std::collections::BTreeMap<String, String>);

impl OtelVariables {
    /// Those of [`OTEL_VARIABLES`] that `env` sets to a non-empty value.
    pub fn read(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        Self(
            OTEL_VARIABLES
                .iter()
                .filter_map(|name| {
                    let value = env(name)?.to_string_lossy().trim().to_owned();
                    (!value.is_empty()).then(|| ((*name).to_owned(), value))
                })
                .collect(),
        )
    }

    /// `name`'s value, if set.
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for OtelVariables {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Settings of every process role.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// PostgreSQL URL of the event store (the database is created by `migrate`).
    #[arg(
        long,
        env = "NEURECTOMY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/neurectomy",
        global = true
    )]
    pub database_url: String,
    /// Most PostgreSQL connections this process opens.
    #[arg(
        long,
        env = "NEURECTOMY_DATABASE_POOL_SIZE",
        default_value_t = 16,
        global = true
    )]
    pub database_pool_size: u32,
    /// Group-commit tasks: at most this many appends are written at once,
    /// each write taking every append queued meanwhile (0: each append
    /// alone). Capped below half the pool's connections.
    #[arg(
        long,
        env = "NEURECTOMY_DATABASE_COMMITTERS",
        default_value_t = commands::event_store::DEFAULT_COMMITTERS,
        global = true
    )]
    pub database_committers: usize,
    /// Longest wait (ms) for a PostgreSQL connection: connecting, or a free
    /// one from the pool; past it the call fails as unavailable.
    #[arg(
        long,
        env = "NEURECTOMY_DATABASE_TIMEOUT_MS",
        default_value_t = 3_000,
        global = true
    )]
    pub database_timeout_ms: u64,
    /// Longest a PostgreSQL statement may run (ms; the server's
    /// `statement_timeout`, 0 for none); `migrate` runs without it.
    #[arg(
        long,
        env = "NEURECTOMY_DATABASE_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true
    )]
    pub database_statement_timeout_ms: u64,
    /// NATS server URL (JetStream must be enabled).
    #[arg(
        long,
        env = "NEURECTOMY_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// Longest wait (ms) for NATS: connecting, and each request or
    /// JetStream acknowledgement; a lost connection is retried every
    /// 100 ms to 1 s.
    #[arg(
        long,
        env = "NEURECTOMY_NATS_TIMEOUT_MS",
        default_value_t = 5_000,
        global = true
    )]
    pub nats_timeout_ms: u64,
    /// JetStream stream the relay publishes to (created if missing).
    #[arg(
        long,
        env = "NEURECTOMY_JETSTREAM_STREAM",
        default_value = "NEURECTOMY_EVENTS",
        global = true
    )]
    pub jetstream_stream: String,
    /// Subject prefix; subjects are `<prefix>.<aggregate>.<EventType>`.
    #[arg(
        long,
        env = "NEURECTOMY_SUBJECT_PREFIX",
        default_value = "neurectomy.events",
        global = true
    )]
    pub subject_prefix: String,
    /// How long the JetStream stream keeps a message, in seconds (0: no
    /// limit; else at least 120, the duplicate window). PostgreSQL is the
    /// log: a consumer that finds its next message gone reads it there.
    #[arg(
        long,
        env = "NEURECTOMY_JETSTREAM_MAX_AGE_S",
        default_value_t = commands::relay::DEFAULT_MAX_AGE.as_secs(),
        global = true
    )]
    pub jetstream_max_age_s: u64,
    /// Most bytes the JetStream stream keeps, the oldest messages going
    /// first (0: no limit).
    #[arg(
        long,
        env = "NEURECTOMY_JETSTREAM_MAX_BYTES",
        default_value_t = commands::relay::DEFAULT_MAX_BYTES,
        global = true
    )]
    pub jetstream_max_bytes: u64,
    /// Copies of the JetStream stream a NATS cluster keeps (1 on a single
    /// server; 3 in a three-node cluster survives the loss of any node,
    /// its leader included). Applied to an existing stream on start.
    #[arg(
        long,
        env = "NEURECTOMY_JETSTREAM_REPLICAS",
        default_value_t = 1,
        global = true
    )]
    pub jetstream_replicas: usize,
    /// Partitions of the JetStream stream by tenant: with more than one,
    /// the relay publishes each event on its tenant's partition subject
    /// (`<prefix>.p<k>.…`) with the previous event of that partition, so
    /// that a projection can be consumed one partition at a time. Fixed
    /// for a stream when it is created: changing it needs a new stream.
    #[arg(
        long,
        env = "NEURECTOMY_JETSTREAM_PARTITIONS",
        default_value_t = 1,
        global = true
    )]
    pub jetstream_partitions: u32,
    /// Snapshot a stream every this many events (0 = never).
    #[arg(
        long,
        env = "NEURECTOMY_SNAPSHOT_EVERY",
        default_value_t = 100,
        global = true
    )]
    pub snapshot_every: u64,
    /// Attempts of load → decide → append when concurrent writers conflict.
    #[arg(
        long,
        env = "NEURECTOMY_COMMAND_ATTEMPTS",
        default_value_t = 5,
        global = true
    )]
    pub command_attempts: u32,
    /// Streams whose folded state each process keeps in memory (0 = none).
    #[arg(
        long,
        env = "NEURECTOMY_STATE_CACHE",
        default_value_t = 100_000,
        global = true
    )]
    pub state_cache: usize,
    /// Most events the relay publishes per batch.
    #[arg(
        long,
        env = "NEURECTOMY_RELAY_BATCH_SIZE",
        default_value_t = 1000,
        global = true
    )]
    pub relay_batch_size: usize,
    /// Ed25519 key the relay leader seals the log with (its 32-byte seed,
    /// base64 or hex; `neurectomy audit keygen` makes one). Unset: the log
    /// is not sealed.
    #[arg(
        long,
        env = "NEURECTOMY_SEAL_KEY",
        global = true,
        hide_env_values = true
    )]
    pub seal_key: Option<crate::settings::secret::Secret>,
    /// Public keys (base64 or hex, comma-separated) whose seals `audit
    /// verify` and the API accept besides the sealing key's: the keys
    /// used before a rotation.
    #[arg(
        long,
        env = "NEURECTOMY_SEAL_TRUSTED_KEYS",
        default_value = "",
        global = true
    )]
    pub seal_trusted_keys: String,
    /// Most events in one sealed block.
    #[arg(
        long,
        env = "NEURECTOMY_SEAL_BLOCK_EVENTS",
        default_value_t = 1000,
        global = true
    )]
    pub seal_block_events: usize,
    /// Longest a block stays open after its first event (ms): the most an
    /// event waits to be sealed, beside the relay's own delay.
    #[arg(
        long,
        env = "NEURECTOMY_SEAL_BLOCK_MS",
        default_value_t = 500,
        global = true
    )]
    pub seal_block_ms: u64,
    /// Relay poll interval in milliseconds when no commit signal arrives.
    #[arg(
        long,
        env = "NEURECTOMY_RELAY_IDLE_POLL_MS",
        default_value_t = 250,
        global = true
    )]
    pub relay_idle_poll_ms: u64,
    /// Redis URL of the live-state read model.
    #[arg(
        long,
        env = "NEURECTOMY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        global = true
    )]
    pub redis_url: String,
    /// `redis.url` names a Redis Cluster: comma-separated seed nodes
    /// (`redis://a:7000,redis://b:7000`); every key is tagged with its
    /// partition's hash slot, batches go to the slot's primary and the
    /// change feeds are read per partition.
    #[arg(long, env = "NEURECTOMY_REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub redis_cluster: bool,
    /// Prefix of every Redis key of the read model.
    #[arg(
        long,
        env = "NEURECTOMY_REDIS_PREFIX",
        default_value = "neurectomy:",
        global = true
    )]
    pub redis_prefix: String,
    /// Longest a connection attempt to Redis may take (ms).
    #[arg(
        long,
        env = "NEURECTOMY_REDIS_CONNECT_TIMEOUT_MS",
        default_value_t = 1_000,
        global = true
    )]
    pub redis_connect_timeout_ms: u64,
    /// Longest a Redis command may wait for its reply (ms).
    #[arg(
        long,
        env = "NEURECTOMY_REDIS_TIMEOUT_MS",
        default_value_t = 2_000,
        global = true
    )]
    pub redis_timeout_ms: u64,
    /// Bolt URI of the graph read model (Neo4j 5, or ArcadeDB's Bolt server in development).
    #[arg(
        long,
        env = "NEURECTOMY_GRAPH_URI",
        default_value = "bolt://127.0.0.1:7687",
        global = true
    )]
    pub graph_uri: String,
    /// Graph user (`neo4j` on Neo4j, `root` on ArcadeDB).
    #[arg(
        long,
        env = "NEURECTOMY_GRAPH_USER",
        default_value = "root",
        global = true
    )]
    pub graph_user: String,
    /// Graph password.
    #[arg(
        long,
        env = "NEURECTOMY_GRAPH_PASSWORD",
        default_value = "neurectomy-dev",
        global = true,
        hide_env_values = true
    )]
    pub graph_password: crate::settings::secret::Secret,
    /// Graph database name.
    #[arg(
        long,
        env = "NEURECTOMY_GRAPH_DATABASE",
        default_value = "neurectomy",
        global = true
    )]
    pub graph_database: String,
    /// Longest a unit of graph work may take (ms): a query, a batch's
    /// transaction, connecting. Past it the call fails as unavailable and
    /// the Bolt connections are replaced (one cut off mid-answer would be
    /// out of step).
    #[arg(
        long,
        env = "NEURECTOMY_GRAPH_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub graph_timeout_ms: u64,
    /// `host:port` of ArcadeDB's HTTP API, used to create and drop databases
    /// (replay) when the server is not Neo4j; default: port 2480 on the
    /// Bolt URI's host.
    #[arg(long, env = "NEURECTOMY_GRAPH_HTTP", global = true)]
    pub graph_http: Option<String>,
    /// Most events a projector applies in one atomic write.
    #[arg(
        long,
        env = "NEURECTOMY_PROJECTOR_BATCH_SIZE",
        default_value_t = 500,
        global = true
    )]
    pub projector_batch_size: usize,
    /// Longest wait (ms) for a projector batch to fill before applying it
    /// (0: apply what has arrived at once; under load batches still form).
    #[arg(
        long,
        env = "NEURECTOMY_PROJECTOR_LINGER_MS",
        default_value_t = 0,
        global = true
    )]
    pub projector_linger_ms: u64,
    /// How long a projector's lease lasts without renewal (ms): a
    /// projection runs in the process holding its lease, any other
    /// `project` process stands by and takes over within about this long
    /// after the holder is killed (at once after a clean stop).
    #[arg(
        long,
        env = "NEURECTOMY_PROJECTOR_LEASE_TTL_MS",
        default_value_t = 3_000,
        global = true
    )]
    pub projector_lease_ttl_ms: u64,
    /// Address where `relay` and `project` serve `/metrics` and `/healthz`
    /// for Prometheus, e.g. `0.0.0.0:9464` (unset: none). `serve` and `all`
    /// serve `/metrics` on the API's address, and here too when set.
    #[arg(long, env = "NEURECTOMY_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<String>,
    /// Longest time (ms) from SIGTERM/SIGINT to exit: in-flight requests,
    /// commands and batches finish within it; past it, the process logs
    /// what was still in flight and exits with status 1.
    #[arg(
        long,
        env = "NEURECTOMY_SHUTDOWN_DEADLINE_MS",
        default_value_t = 25_000,
        global = true
    )]
    pub shutdown_deadline_ms: u64,
    /// The GraphQL API.
    #[command(flatten)]
    pub api: ApiSettings,
    /// Logging.
    #[command(flatten)]
    pub log: LogSettings,
}

impl Settings {
    /// The shutdown deadline these settings describe.
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_millis(self.shutdown_deadline_ms)
    }

    /// The relay configuration these settings describe.
    pub fn relay_config(&self) -> commands::RelayConfig {
        commands::RelayConfig {
            stream_name: self.jetstream_stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            batch_size: self.relay_batch_size.max(1),
            idle_poll: Duration::from_millis(self.relay_idle_poll_ms.max(1)),
            // The NATS timeout bounds every wait on NATS, acks included.
            ack_timeout: Duration::from_millis(self.nats_timeout_ms.max(1)),
            max_age: Duration::from_secs(self.jetstream_max_age_s),
            max_bytes: self.jetstream_max_bytes,
            replicas: self.jetstream_replicas.max(1),
            partitions: self.jetstream_partitions.max(1),
            ..commands::RelayConfig::default()
        }
    }

    /// The sealing key, if the log is sealed.
    pub fn seal_key(&self) -> anyhow::Result<Option<commands::seal::key::SealKey>> {
        self.seal_key
            .as_ref()
            .filter(|secret| !secret.expose().trim().is_empty())
            .map(|secret| {
                commands::seal::key::SealKey::from_secret(secret.expose())
                    .map_err(|e| anyhow::anyhow!("seal.key (NEURECTOMY_SEAL_KEY): {e}"))
            })
            .transpose()
    }

    /// The keys seals may be signed with: the sealing key's and the
    /// trusted ones.
    pub fn seal_trusted(&self) -> anyhow::Result<Vec<commands::seal::key::PublicKey>> {
        let mut keys = Vec::new();
        if let Some(key) = self.seal_key()? {
            keys.push(key.public().clone());
        }
        for text in self
            .seal_trusted_keys
            .split(',')
            .filter(|t| !t.trim().is_empty())
        {
            keys.push(commands::seal::key::PublicKey::parse(text).map_err(|e| {
                anyhow::anyhow!(
                    "seal.trusted_keys (NEURECTOMY_SEAL_TRUSTED_KEYS): `{}`: {e}",
                    text.trim()
                )
            })?);
        }
        Ok(keys)
    }

    /// How the relay leader seals the log.
    pub fn sealer_config(&self) -> commands::seal::sealer::SealerConfig {
        commands::seal::sealer::SealerConfig {
            block_events: self.seal_block_events.max(1),
            block_time: Duration::from_millis(self.seal_block_ms.max(1)),
            ..commands::seal::sealer::SealerConfig::for_relay(&self.relay_config())
        }
    }

    /// The projector configuration these settings describe.
    pub fn projector_config(&self) -> projections::ProjectorConfig {
        projections::ProjectorConfig {
            stream_name: self.jetstream_stream.clone(),
            batch_size: self.projector_batch_size.max(1),
            linger: Duration::from_millis(self.projector_linger_ms),
            ..projections::ProjectorConfig::default()
        }
    }

    /// The projectors' lease settings, under a fresh owner name.
    pub fn lease_config(&self) -> projections::LeaseConfig {
        projections::LeaseConfig::new(Duration::from_millis(self.projector_lease_ttl_ms))
    }

    /// `host:port` of ArcadeDB's HTTP API: `graph_http`, or port 2480 on
    /// the Bolt URI's host.
    pub fn graph_http(&self) -> String {
        if let Some(http) = &self.graph_http {
            return http.clone();
        }
        let rest = self
            .graph_uri
            .split_once("://")
            .map_or(self.graph_uri.as_str(), |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or(rest);
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let host = match authority.strip_prefix('[') {
            Some(v6) => format!("[{}]", v6.split(']').next().unwrap_or(v6)),
            None => authority
                .split(':')
                .next()
                .unwrap_or("127.0.0.1")
                .to_owned(),
        };
        format!("{host}:2480")
    }

    /// The graph read-model configuration these settings describe.
    pub fn graph_config(&self) -> projections::GraphConfig {
        projections::GraphConfig {
            uri: self.graph_uri.clone(),
            user: self.graph_user.clone(),
            password: self.graph_password.expose().to_owned(),
            database: self.graph_database.clone(),
            timeout: Duration::from_millis(self.graph_timeout_ms.max(1)),
            partitions: self.jetstream_partitions.max(1),
        }
    }

    /// The Redis read-model configuration these settings describe.
    pub fn redis_config(&self) -> projections::RedisModelConfig {
        projections::RedisModelConfig {
            prefix: self.redis_prefix.clone(),
            connect_timeout: Duration::from_millis(self.redis_connect_timeout_ms.max(1)),
            response_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            partitions: self.jetstream_partitions.max(1),
            cluster: self.redis_cluster,
            ..projections::RedisModelConfig::default()
        }
    }

    /// The command-handler configuration these settings describe.
    pub fn handler_config(&self) -> commands::HandlerConfig {
        commands::HandlerConfig {
            max_attempts: self.command_attempts.max(1),
            snapshot_every: self.snapshot_every,
            cache_capacity: self.state_cache,
        }
    }
}

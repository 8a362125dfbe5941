//! The catalogue of settings: which flag and environment variable each
//! configuration-file key stands for, how its value is checked, and what of
//! it is secret.
//!
//! A setting is declared once, as a clap argument with `env = "NEURECTOMY_…"`
//! in [`crate::settings`]; [`KEYS`] adds only what clap cannot say (the
//! file key, the check, the secrecy), keyed by the environment variable. The
//! flag, the type, the default and the help text are read from clap, so they
//! cannot drift apart.

use std::any::TypeId;

use clap::{Arg, ArgAction, Command};

/// How a value is checked beyond parsing into its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Any value of the type.
    Any,
    /// An integer of at least this.
    AtLeast(u64),
    /// 0 (none), or an integer of at least this.
    ZeroOrAtLeast(u64),
    /// Milliseconds, at least `min` and at most an hour.
    Millis {
        /// The smallest value that makes sense.
        min: u64,
    },
    /// A URL the named client accepts.
    Url(UrlKind),
    /// Not empty.
    NonEmpty,
    /// `host:port` (a name or an IP address; port 0 lets the OS pick).
    HostPort,
    /// An HS256 secret: at least 32 bytes.
    JwtSecret,
    /// The path of an existing file.
    File,
    /// CORS origins: each `*` or `scheme://host[:port]`.
    Origins,
    /// A tracing `EnvFilter` directive.
    LogFilter,
    /// A JetStream stream name.
    StreamName,
    /// A NATS subject prefix (dot-separated tokens, no wildcards).
    SubjectPrefix,
    /// An Ed25519 secret key (32 bytes, base64 or hex).
    SealKey,
    /// Ed25519 public keys, comma-separated (none is fine).
    PublicKeys,
}

/// Which client's URL syntax a [`Check::Url`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UrlKind {
    /// sqlx's PostgreSQL URL.
    Postgres,
    /// async-nats's server address.
    Nats,
    /// The redis crate's URL.
    Redis,
    /// neo4rs's Bolt URI.
    Bolt,
}

/// What of a value must not be printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secret {
    /// Nothing: print it.
    No,
    /// The whole value.
    Whole,
    /// The password in a URL (userinfo or a `password=` parameter); with
    /// `token`, a user name alone is a token and is redacted too (NATS).
    UrlPassword {
        /// A lone user name is a credential.
        token: bool,
    },
}

/// What the file key of a setting adds to its clap argument.
#[derive(Debug)]
pub(crate) struct Key {
    /// The environment variable, which names the clap argument.
    pub env: &'static str,
    /// The dotted key in the configuration file (`table.name`).
    pub key: &'static str,
    /// How its value is checked at start.
    pub check: Check,
    /// What of it is secret.
    pub secret: Secret,
}

const fn key(env: &'static str, key: &'static str, check: Check) -> Key {
    Key {
        env,
        key,
        check,
        secret: Secret::No,
    }
}

const fn secret(env: &'static str, key: &'static str, check: Check, secret: Secret) -> Key {
    Key {
        env,
        key,
        check,
        secret,
    }
}

/// Every setting, in the order `neurectomy config` prints them.
pub(crate) const KEYS: &[Key] = &[
    secret(
        "NEURECTOMY_DATABASE_URL",
        "database.url",
        Check::Url(UrlKind::Postgres),
        Secret::UrlPassword { token: false },
    ),
    key(
        "NEURECTOMY_DATABASE_POOL_SIZE",
        "database.pool_size",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_DATABASE_COMMITTERS",
        "database.committers",
        Check::Any,
    ),
    key(
        "NEURECTOMY_DATABASE_TIMEOUT_MS",
        "database.timeout_ms",
        Check::Millis { min: 1 },
    ),
    key(
        "NEURECTOMY_DATABASE_STATEMENT_TIMEOUT_MS",
        "database.statement_timeout_ms",
        Check::Millis { min: 0 },
    ),
    secret(
        "NEURECTOMY_NATS_URL",
        "nats.url",
        Check::Url(UrlKind::Nats),
        Secret::UrlPassword { token: true },
    ),
    key(
        "NEURECTOMY_NATS_TIMEOUT_MS",
        "nats.timeout_ms",
        Check::Millis { min: 1 },
    ),
    key(
        "NEURECTOMY_JETSTREAM_STREAM",
        "nats.stream",
        Check::StreamName,
    ),
    key(
        "NEURECTOMY_SUBJECT_PREFIX",
        "nats.subject_prefix",
        Check::SubjectPrefix,
    ),
    key(
        "NEURECTOMY_JETSTREAM_MAX_AGE_S",
        "nats.stream_max_age_s",
        Check::ZeroOrAtLeast(120),
    ),
    key(
        "NEURECTOMY_JETSTREAM_MAX_BYTES",
        "nats.stream_max_bytes",
        Check::Any,
    ),
    key(
        "NEURECTOMY_JETSTREAM_REPLICAS",
        "nats.stream_replicas",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_JETSTREAM_PARTITIONS",
        "nats.stream_partitions",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_SNAPSHOT_EVERY",
        "commands.snapshot_every",
        Check::Any,
    ),
    key(
        "NEURECTOMY_COMMAND_ATTEMPTS",
        "commands.attempts",
        Check::AtLeast(1),
    ),
    key("NEURECTOMY_STATE_CACHE", "commands.state_cache", Check::Any),
    key(
        "NEURECTOMY_RELAY_BATCH_SIZE",
        "relay.batch_size",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_RELAY_IDLE_POLL_MS",
        "relay.idle_poll_ms",
        Check::Millis { min: 1 },
    ),
    secret(
        "NEURECTOMY_SEAL_KEY",
        "seal.key",
        Check::SealKey,
        Secret::Whole,
    ),
    key(
        "NEURECTOMY_SEAL_TRUSTED_KEYS",
        "seal.trusted_keys",
        Check::PublicKeys,
    ),
    key(
        "NEURECTOMY_SEAL_BLOCK_EVENTS",
        "seal.block_events",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_SEAL_BLOCK_MS",
        "seal.block_ms",
        Check::Millis { min: 1 },
    ),
    secret(
        "NEURECTOMY_REDIS_URL",
        "redis.url",
        Check::Url(UrlKind::Redis),
        Secret::UrlPassword { token: false },
    ),
    key("NEURECTOMY_REDIS_PREFIX", "redis.prefix", Check::Any),
    key("NEURECTOMY_REDIS_CLUSTER", "redis.cluster", Check::Any),
    key(
        "NEURECTOMY_REDIS_CONNECT_TIMEOUT_MS",
        "redis.connect_timeout_ms",
        Check::Millis { min: 1 },
    ),
    key(
        "NEURECTOMY_REDIS_TIMEOUT_MS",
        "redis.timeout_ms",
        Check::Millis { min: 1 },
    ),
    key(
        "NEURECTOMY_GRAPH_URI",
        "graph.uri",
        Check::Url(UrlKind::Bolt),
    ),
    key("NEURECTOMY_GRAPH_USER", "graph.user", Check::Any),
    secret(
        "NEURECTOMY_GRAPH_PASSWORD",
        "graph.password",
        Check::Any,
        Secret::Whole,
    ),
    key(
        "NEURECTOMY_GRAPH_DATABASE",
        "graph.database",
        Check::NonEmpty,
    ),
    key(
        "NEURECTOMY_GRAPH_TIMEOUT_MS",
        "graph.timeout_ms",
        Check::Millis { min: 1 },
    ),
    key("NEURECTOMY_GRAPH_HTTP", "graph.http", Check::HostPort),
    key(
        "NEURECTOMY_PROJECTOR_BATCH_SIZE",
        "projector.batch_size",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_PROJECTOR_LINGER_MS",
        "projector.linger_ms",
        Check::Millis { min: 0 },
    ),
    key(
        "NEURECTOMY_PROJECTOR_LEASE_TTL_MS",
        "projector.lease_ttl_ms",
        Check::Millis { min: 300 },
    ),
    key("NEURECTOMY_API_LISTEN", "api.listen", Check::HostPort),
    secret(
        "NEURECTOMY_JWT_SECRET",
        "api.jwt_secret",
        Check::JwtSecret,
        Secret::Whole,
    ),
    key(
        "NEURECTOMY_JWT_PUBLIC_KEY",
        "api.jwt_public_key",
        Check::File,
    ),
    key(
        "NEURECTOMY_API_CONSISTENCY_TIMEOUT_MS",
        "api.consistency_timeout_ms",
        Check::Millis { min: 0 },
    ),
    key(
        "NEURECTOMY_API_MAX_DEPTH",
        "api.max_depth",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_API_MAX_COMPLEXITY",
        "api.max_complexity",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_API_MAX_FIELDS",
        "api.max_fields",
        Check::AtLeast(1),
    ),
    key("NEURECTOMY_API_MAX_PAGE", "api.max_page", Check::AtLeast(1)),
    key(
        "NEURECTOMY_API_INTROSPECTION",
        "api.introspection",
        Check::Any,
    ),
    key(
        "NEURECTOMY_API_BODY_LIMIT",
        "api.body_limit",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_API_WS_MESSAGE_LIMIT",
        "api.ws_message_limit",
        Check::AtLeast(64),
    ),
    key(
        "NEURECTOMY_API_WS_INIT_TIMEOUT_MS",
        "api.ws_init_timeout_ms",
        Check::Millis { min: 1 },
    ),
    key(
        "NEURECTOMY_API_WS_MAX_SUBSCRIPTIONS",
        "api.ws_max_subscriptions",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_API_CORS_ORIGINS",
        "api.cors_origins",
        Check::Origins,
    ),
    key(
        "NEURECTOMY_API_SUBSCRIBER_BUFFER",
        "api.subscriber_buffer",
        Check::AtLeast(1),
    ),
    key("NEURECTOMY_API_AGENT_CACHE", "api.agent_cache", Check::Any),
    key("NEURECTOMY_LOG", "log.filter", Check::LogFilter),
    key("NEURECTOMY_LOG_FORMAT", "log.format", Check::Any),
    key(
        "NEURECTOMY_METRICS_LISTEN",
        "metrics.listen",
        Check::HostPort,
    ),
    key(
        "NEURECTOMY_SHUTDOWN_DEADLINE_MS",
        "shutdown.deadline_ms",
        Check::Millis { min: 1 },
    ),
    key(
        "NEURECTOMY_SIM_AGENTS",
        "simulate.agents",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_SIM_WORKFLOWS",
        "simulate.workflows",
        Check::AtLeast(1),
    ),
    key(
        "NEURECTOMY_SIM_TASKS",
        "simulate.tasks_per_workflow",
        Check::AtLeast(1),
    ),
    key("NEURECTOMY_SIM_RATE", "simulate.rate", Check::Any),
    key("NEURECTOMY_SIM_DURATION", "simulate.duration", Check::Any),
    key("NEURECTOMY_SIM_TENANT", "simulate.tenant", Check::NonEmpty),
    key(
        "NEURECTOMY_SIM_TENANTS",
        "simulate.tenants",
        Check::AtLeast(1),
    ),
    key("NEURECTOMY_SIM_SEED", "simulate.seed", Check::Any),
];

/// The environment variable of `--config`, the one setting the file cannot
/// hold.
pub(crate) const CONFIG_ENV: &str = "NEURECTOMY_CONFIG";

/// The TOML type of a setting, from its clap argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A string (also paths and enumerations).
    Str,
    /// A non-negative integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// An array of strings (a comma-separated environment variable).
    List,
}

impl Kind {
    /// What a file value of this kind must be, for messages.
    pub(crate) fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Bool => "a boolean (true or false)",
            Kind::List => "an array of strings",
        }
    }

    fn of(arg: &Arg) -> Kind {
        if matches!(arg.get_action(), ArgAction::Append) {
            return Kind::List;
        }
        let id = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
        ];
        if id == TypeId::of::<bool>() {
            Kind::Bool
        } else if integers.iter().any(|t| id == *t) {
            Kind::Int
        } else {
            Kind::Str
        }
    }
}

/// One setting: its [`Key`] and what clap says about it.
#[derive(Debug, Clone)]
pub(crate) struct Setting {
    /// The file key, check and secrecy.
    pub key: &'static Key,
    /// The clap argument id (the field name in `settings.rs`).
    pub id: String,
    /// The flag, `--name`.
    pub flag: String,
    /// The sub-commands that take the flag (empty: all of them).
    pub commands: Vec<String>,
    /// The TOML type.
    pub kind: Kind,
    /// The help text.
    pub help: String,
    /// The built-in default (empty: not set).
    pub defaults: Vec<String>,
    /// The argument itself, to parse values with its value parser.
    pub arg: Arg,
}

impl Setting {
    /// The table and the name of the file key.
    pub(crate) fn table_and_name(&self) -> (&'static str, &'static str) {
        self.key.key.split_once('.').unwrap_or(("", self.key.key))
    }
}

/// Every setting of the command line, in [`KEYS`] order.
#[derive(Debug, Clone)]
pub(crate) struct Catalog {
    /// The settings.
    pub settings: Vec<Setting>,
}

impl Catalog {
    /// Reads the settings' flags, types, defaults and help from `command`
    /// (arguments of sub-commands included) and pairs them with [`KEYS`].
    pub(crate) fn of(command: &Command) -> Catalog {
        let mut args: Vec<Found> = Vec::new();
        collect(command, None, &mut args);
        let settings = KEYS
            .iter()
            .filter_map(|key| {
                let found = args.iter().find(|found| found.env == key.env)?;
                let arg = &found.arg;
                Some(Setting {
                    key,
                    id: arg.get_id().to_string(),
                    flag: arg
                        .get_long()
                        .map_or_else(|| arg.get_id().to_string(), |l| format!("--{l}")),
                    commands: found.commands.clone(),
                    kind: Kind::of(arg),
                    help: arg
                        .get_long_help()
                        .or(arg.get_help())
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    defaults: arg
                        .get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect(),
                    arg: arg.clone(),
                })
            })
            .collect();
        Catalog { settings }
    }

    /// The setting of an environment variable.
    pub(crate) fn by_env(&self, env: &str) -> Option<usize> {
        self.settings.iter().position(|s| s.key.env == env)
    }

    /// The setting of a file key.
    pub(crate) fn by_key(&self, key: &str) -> Option<usize> {
        self.settings.iter().position(|s| s.key.key == key)
    }

    /// The file's tables, in order.
    pub(crate) fn tables(&self) -> Vec<&'static str> {
        let mut tables: Vec<&'static str> = Vec::new();
        for setting in &self.settings {
            let (table, _) = setting.table_and_name();
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
        tables
    }
}

/// An argument with an environment variable.
#[derive(Debug)]
pub(crate) struct Found {
    /// The variable.
    pub env: String,
    /// The argument (its first occurrence).
    pub arg: Arg,
    /// The sub-commands that have it (empty: the top level, for all).
    pub commands: Vec<String>,
}

/// Every argument with an environment variable, in `command` and its
/// sub-commands (`simulate` and `all` share the simulator's); `within` is
/// the sub-command `command` is, if it is one.
pub(crate) fn collect(command: &Command, within: Option<&str>, into: &mut Vec<Found>) {
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
            continue;
        };
        let index = match into.iter().position(|found| found.env == env) {
            Some(index) => index,
            None => {
                into.push(Found {
                    env: env.to_owned(),
                    arg: arg.clone(),
                    commands: Vec::new(),
                });
                into.len() - 1
            }
        };
        if let Some(name) = within {
            into[index].commands.push(name.to_owned());
        }
    }
    for sub in command.get_subcommands() {
        collect(sub, Some(sub.get_name()), into);
    }
}

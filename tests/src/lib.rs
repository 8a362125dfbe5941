//! # End-to-end tests
//!
//! Tests in `tests/` start the real `neurectomy` binary (built in this
//! package as `neurectomy-e2e`) as child processes against the real
//! PostgreSQL and NATS JetStream, kill them, restart them, and check what
//! landed in the event store and on JetStream.
//!
//! This library holds what those tests share:
//!
//! - [`instance`]: the binary run on scratch resources;
//! - [`services`]: private Redis, NATS, graph and PostgreSQL servers for the
//!   fault tests;
//! - [`pipeline`]: a store, relay and stream of one test, in process;
//! - [`api_cli`], [`start_api`]: the API started as `neurectomy serve`
//!   starts it (the binary's loader and its `Application`), and [`api`]'s
//!   `TestApi` around it with both projectors;
//! - [`read_side`]: whole-model dumps and comparisons; [`ws`]: a
//!   `graphql-transport-ws` client; [`js`]: the Node.js clients of `tests/js`.

use std::process::Stdio;

pub mod instance;
pub mod read_side;
pub mod services;
pub mod ws;

use tokio::process::{Child, Command};

/// A child `neurectomy` process, killed when dropped.
#[derive(Debug)]
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its role, for messages.
    pub role: String,
}

/// Environment pointing a process at a test's database and JetStream names.
#[derive(Debug, Clone)]
pub struct Target {
    /// Path of the binary.
    pub binary: String,
    /// `NEURECTOMY_DATABASE_URL`.
    pub database_url: String,
    /// `NEURECTOMY_NATS_URL`.
    pub nats_url: String,
    /// `NEURECTOMY_JETSTREAM_STREAM`.
    pub stream: String,
    /// `NEURECTOMY_SUBJECT_PREFIX`.
    pub subject_prefix: String,
}

impl Target {
    /// A command for `args` with the target's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .env("NEURECTOMY_DATABASE_URL", &self.database_url)
            .env("NEURECTOMY_NATS_URL", &self.nats_url)
            .env("NEURECTOMY_JETSTREAM_STREAM", &self.stream)
            .env("NEURECTOMY_SUBJECT_PREFIX", &self.subject_prefix)
            .env("NEURECTOMY_RELAY_IDLE_POLL_MS", "100")
            .env("NEURECTOMY_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Spawns `args` in the background (output discarded).
    pub fn spawn(&self, role: &str, args: &[&str]) -> std::io::Result<Process> {
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Process {
            child,
            role: role.to_owned(),
        })
    }
}

impl Process {
    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}

/// The head of `store`'s log once every committed event is readable: the
/// gap-safe horizon is cluster-wide, so another test's open transaction can
/// briefly hold it below events this test committed. Panics (failing the
/// test) if PostgreSQL fails.
#[allow(clippy::unwrap_used)]
pub async fn readable_head(store: &commands::EventStore) -> i64 {
    commands::testkit::eventually(
        "every written event to be readable",
        std::time::Duration::from_secs(60),
        || {
            let store = store.clone();
            async move {
                let head = store.head().await.unwrap();
                (head.readable >= head.written).then_some(head.written)
            }
        },
    )
    .await
}

pub mod pipeline {
    //! The write side running in-process for one test: an isolated
    //! database, JetStream stream and relay, plus helpers to drive a
    //! workload and to wait for read models. Shared by the projection tests.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use api::simulate::SimulateArgs;
    use commands::testkit::{eventually, TestDatabase, TestNats};
    use commands::{CommandHandler, EventStore, HandlerConfig, Relay};
    use projections::{Projector, ProjectorConfig, ProjectorError, ReadModel};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    /// A projector task and the token that stops it.
    pub type Running = (CancellationToken, JoinHandle<Result<(), ProjectorError>>);

    /// A workload running until stopped ([`Pipeline::start_workload`]).
    #[derive(Debug)]
    pub struct Workload {
        stop: CancellationToken,
        task: JoinHandle<()>,
    }

    impl Workload {
        /// Whether it still runs (it stops only when told to, or failing).
        pub fn is_running(&self) -> bool {
            !self.task.is_finished()
        }

        /// Stops it and waits for its last command; fails the test if it
        /// failed.
        pub async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    /// Database, JetStream stream and a running relay, isolated per test.
    #[derive(Debug)]
    pub struct Pipeline {
        /// The test's database (dropped at the end).
        pub db: TestDatabase,
        /// The test's JetStream stream and subject prefix.
        pub nats: TestNats,
        /// The event store on `db`.
        pub store: EventStore,
        /// Cancels everything the test started.
        pub stop: CancellationToken,
        relay: JoinHandle<()>,
    }

    impl Pipeline {
        /// Creates the database and stream and starts the relay; fails with
        /// the service's start command when one is unreachable.
        pub async fn start() -> Self {
            Self::start_with(|_| {}).await
        }

        /// [`Pipeline::start`] with the relay's configuration adjusted (its
        /// stream's retention, say) before the stream is created.
        pub async fn start_with(adjust: impl FnOnce(&mut commands::RelayConfig)) -> Self {
            Self::start_on(&commands::testkit::nats_url(), adjust).await
        }

        /// [`Pipeline::start_with`] on the NATS server (or cluster node) at
        /// `nats_url`. The stream is created as soon as JetStream answers
        /// (a cluster that just started elects its leaders first).
        pub async fn start_on(
            nats_url: &str,
            adjust: impl FnOnce(&mut commands::RelayConfig),
        ) -> Self {
            Self::start_sealing(nats_url, adjust, None).await
        }

        /// A pipeline whose relay seals the log with `key` in blocks of at
        /// most `block_events` events or `block_time`.
        pub async fn start_sealed(
            key: commands::seal::key::SealKey,
            block_events: usize,
            block_time: Duration,
        ) -> Self {
            Self::start_sealing(
                &commands::testkit::nats_url(),
                |_| {},
                Some((key, block_events, block_time)),
            )
            .await
        }

        async fn start_sealing(
            nats_url: &str,
            adjust: impl FnOnce(&mut commands::RelayConfig),
            sealing: Option<(commands::seal::key::SealKey, usize, Duration)>,
        ) -> Self {
            let db = TestDatabase::create(8)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut nats = TestNats::create_at(nats_url)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            adjust(&mut nats.relay);
            let store = EventStore::new(db.pool.clone());
            let stop = CancellationToken::new();
            let mut relay = Relay::new(store.clone(), nats.client.clone(), nats.relay.clone());
            if let Some((key, block_events, block_time)) = sealing {
                let config = commands::seal::sealer::SealerConfig {
                    block_events,
                    block_time,
                    ..commands::seal::sealer::SealerConfig::for_relay(&nats.relay)
                };
                relay = relay.with_sealer(commands::seal::sealer::Sealer::new(
                    store.clone(),
                    nats.client.clone(),
                    key,
                    config,
                ));
            }
            {
                let relay = &relay;
                eventually(
                    "JetStream to create the stream",
                    Duration::from_secs(60),
                    || async move { relay.ensure_stream().await.ok().map(|_| ()) },
                )
                .await;
            }
            let relay = tokio::spawn({
                let stop = stop.clone();
                async move { relay.run(stop).await }
            });
            Self {
                db,
                nats,
                store,
                stop,
                relay,
            }
        }

        /// A projector feeding `model` from this pipeline (batches of 200).
        pub fn projector<M: ReadModel>(&self, model: M) -> Arc<Projector<M>> {
            self.partition_projector(model, 1, 0)
        }

        /// A projector of partition `partition` of `partitions` on `model`
        /// (which must be `RedisModel::for_partition(partition)`).
        pub fn partition_projector<M: ReadModel>(
            &self,
            model: M,
            partitions: u32,
            partition: u32,
        ) -> Arc<Projector<M>> {
            let config = ProjectorConfig {
                stream_name: self.nats.relay.stream_name.clone(),
                batch_size: 200,
                partitions,
                partition,
                ..ProjectorConfig::default()
            };
            Arc::new(Projector::new(
                model,
                self.store.clone(),
                self.nats.client.clone(),
                config,
            ))
        }

        /// Runs a projector in a task of its own.
        pub fn spawn<M: ReadModel>(&self, projector: &Arc<Projector<M>>) -> Running {
            let stop = self.stop.child_token();
            let projector = projector.clone();
            let task = tokio::spawn({
                let stop = stop.clone();
                async move { projector.run(stop).await }
            });
            (stop, task)
        }

        /// The simulator settings the tests use (tenant `acme`).
        pub fn workload(seconds: u64, rate: u32, seed: u64) -> SimulateArgs {
            SimulateArgs {
                agents: 8,
                workflows: 3,
                tasks_per_workflow: 6,
                rate,
                duration: seconds,
                tenant: "acme".to_owned(),
                tenants: 1,
                seed,
            }
        }

        /// Drives a workload to its end.
        pub async fn simulate(&self, args: SimulateArgs) {
            let handler = CommandHandler::new(self.store.clone(), HandlerConfig::default());
            api::simulate::drive(handler, args, self.stop.child_token())
                .await
                .unwrap();
        }

        /// Drives a workload in the background.
        pub fn spawn_simulation(&self, args: SimulateArgs) -> JoinHandle<()> {
            let handler = CommandHandler::new(self.store.clone(), HandlerConfig::default());
            let stop = self.stop.child_token();
            tokio::spawn(async move { api::simulate::drive(handler, args, stop).await.unwrap() })
        }

        /// Drives a workload until the log holds `events` more events than
        /// when it started, with every event type of `kinds` among them —
        /// however fast commands go on this machine — and stops it.
        pub async fn simulate_until(&self, args: SimulateArgs, events: i64, kinds: &[&str]) {
            let from = self.store.head().await.unwrap().written;
            let workload = self.start_workload(args);
            let kinds: Vec<String> = kinds.iter().map(|k| (*k).to_owned()).collect();
            let (store, pool, kinds) = (&self.store, &self.db.pool, &kinds);
            eventually(
                &format!("the workload to write {events} events, of types {kinds:?} too"),
                Duration::from_secs(120),
                || async move {
                    let written = store.count_after(from, events).await.unwrap();
                    let seen: i64 = sqlx::query_scalar(
                        "SELECT count(DISTINCT event_type) FROM events \
                         WHERE position > $1 AND event_type = ANY($2)",
                    )
                    .bind(from)
                    .bind(kinds)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                    (written >= events && seen == kinds.len() as i64).then_some(())
                },
            )
            .await;
            workload.stop().await;
        }

        /// Drives a workload in the background until [`Workload::stop`]
        /// (`args.duration` is ignored): for tests that need commands to
        /// flow for as long as something else takes.
        pub fn start_workload(&self, args: SimulateArgs) -> Workload {
            let handler = CommandHandler::new(self.store.clone(), HandlerConfig::default());
            let stop = self.stop.child_token();
            let args = SimulateArgs {
                duration: 0,
                ..args
            };
            let task = tokio::spawn({
                let stop = stop.clone();
                async move { api::simulate::drive(handler, args, stop).await.unwrap() }
            });
            Workload { stop, task }
        }

        /// Waits until the log holds an event committed after `position`
        /// (commands are flowing); returns the head.
        pub async fn head_beyond(&self, position: i64) -> i64 {
            eventually(
                "the log to grow (commands to flow)",
                Duration::from_secs(60),
                || async move {
                    let head = self.store.head().await.unwrap().written;
                    (head > position).then_some(head)
                },
            )
            .await
        }

        /// The head of the log once every committed event is readable: the
        /// gap-safe horizon is cluster-wide, so another test's open
        /// transaction can briefly hold it below events this test committed.
        pub async fn head(&self) -> i64 {
            crate::readable_head(&self.store).await
        }

        /// Waits until `model` has applied the whole log; returns the head.
        pub async fn caught_up<M: ReadModel + Clone>(&self, model: &M) -> i64 {
            let head = self.head().await;
            self.caught_up_to(model, head).await;
            head
        }

        /// Waits until `model` has applied the log up to `position`.
        pub async fn caught_up_to<M: ReadModel + Clone>(&self, model: &M, position: i64) {
            let what = format!(
                "the {} projection to catch up to position {position}",
                model.name()
            );
            eventually(&what, Duration::from_secs(60), || {
                let model = model.clone();
                async move { (model.checkpoint().await.unwrap() >= position).then_some(()) }
            })
            .await;
        }

        /// Stops the relay and drops the database.
        pub async fn shutdown(self) {
            self.stop.cancel();
            self.relay.await.unwrap();
            drop(self.db);
        }
    }
}

/// The command line of an API started as in production (`neurectomy serve`,
/// loaded and checked by the binary's own loader, with no environment) on
/// `pipe`'s database and stream, `redis`'s prefix and `graph`'s database,
/// listening on a free port, with the HS256 `secret`; `extra` flags (before
/// the `serve` sub-command) on top. Start it with [`start_api`].
#[allow(clippy::unwrap_used)]
pub fn api_cli(
    pipe: &pipeline::Pipeline,
    redis: &projections::testkit::TestRedis,
    graph: &projections::graph_testkit::TestGraph,
    secret: &str,
    extra: &[&str],
) -> ::api::cli::Cli {
    let graph_uri = std::env::var("NEURECTOMY_TEST_GRAPH_URI")
        .unwrap_or_else(|_| "bolt://127.0.0.1:7687".to_owned());
    let graph_password = std::env::var("NEURECTOMY_TEST_GRAPH_PASSWORD")
        .unwrap_or_else(|_| "neurectomy-dev".to_owned());
    let mut args = vec![
        "neurectomy",
        "--database-url",
        &pipe.db.url,
        "--nats-url",
        &pipe.nats.url,
        "--redis-url",
        &redis.url,
        "--redis-prefix",
        &redis.prefix,
        "--graph-uri",
        &graph_uri,
        "--graph-password",
        &graph_password,
        "--graph-database",
        &graph.database,
        "--api-listen",
        "127.0.0.1:0",
        "--jwt-secret",
        secret,
    ];
    args.extend_from_slice(extra);
    args.push("serve");
    ::api::cli::load(args, &|_| None)
        .unwrap_or_else(|e| panic!("the test's settings: {e}"))
        .cli
}

/// [`api_cli`] parsed by clap alone, without the configuration checks: for
/// the one test of a request-time limit that a checked configuration cannot
/// reach (a complexity limit below one full page).
#[allow(clippy::unwrap_used)]
pub fn api_cli_unchecked(
    pipe: &pipeline::Pipeline,
    redis: &projections::testkit::TestRedis,
    graph: &projections::graph_testkit::TestGraph,
    secret: &str,
    extra: &[&str],
) -> ::api::cli::Cli {
    use clap::Parser as _;
    let checked = api_cli(pipe, redis, graph, secret, &[]);
    let mut args: Vec<String> = vec!["neurectomy".into()];
    for (flag, value) in [
        ("--database-url", checked.settings.database_url.clone()),
        ("--nats-url", checked.settings.nats_url.clone()),
        ("--redis-url", checked.settings.redis_url.clone()),
        ("--redis-prefix", checked.settings.redis_prefix.clone()),
        ("--graph-uri", checked.settings.graph_uri.clone()),
        (
            "--graph-password",
            checked.settings.graph_password.expose().to_owned(),
        ),
        ("--graph-database", checked.settings.graph_database.clone()),
        ("--api-listen", "127.0.0.1:0".to_owned()),
        ("--jwt-secret", secret.to_owned()),
    ] {
        args.push(flag.to_owned());
        args.push(value);
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.push("serve".into());
    ::api::cli::Cli::try_parse_from(args).unwrap()
}

/// Starts the API as `neurectomy serve` does (the binary's
/// [`::api::startup::Application`]), stopped by `stop` instead of signals.
#[allow(clippy::unwrap_used)]
pub async fn start_api(
    settings: ::api::settings::Settings,
    stop: &tokio_util::sync::CancellationToken,
) -> ::api::startup::Application {
    ::api::startup::Application::build_with(
        settings,
        ::api::startup::Roles::api(),
        ::api::startup::Stop::Token(stop.clone()),
    )
    .await
    .unwrap_or_else(|e| panic!("starting the API: {e:#}"))
}

pub mod api {
    //! The GraphQL API running in-process on a real port for one test, on
    //! the test's own database, JetStream stream, Redis prefix and graph
    //! database, with both projectors running.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;

    use api::auth::{Authenticator, Role};
    use projections::graph_testkit::TestGraph;
    use projections::testkit::TestRedis;
    use projections::GraphModel;
    use serde_json::{json, Value};
    use tokio::task::JoinHandle;

    use crate::pipeline::{Pipeline, Running};

    /// The HS256 secret of test tokens.
    pub const SECRET: &str = "test-secret-test-secret-test-secret!";

    /// Pipeline, read models, projectors and the API server.
    pub struct TestApi {
        /// Store, relay and stream.
        pub pipe: Pipeline,
        /// The Redis read model (its own prefix).
        pub redis: TestRedis,
        /// The graph read model (its own database).
        pub graph: TestGraph,
        /// Where the API listens.
        pub addr: SocketAddr,
        /// Mints tokens for the tests.
        pub auth: Authenticator,
        /// HTTP client.
        pub http: reqwest::Client,
        projectors: Vec<Running>,
        server: JoinHandle<anyhow::Result<()>>,
    }

    impl std::ops::Deref for TestApi {
        type Target = Pipeline;
        fn deref(&self) -> &Pipeline {
            &self.pipe
        }
    }

    impl TestApi {
        /// Everything with the default settings.
        pub async fn start() -> Self {
            Self::start_with(&[]).await
        }

        /// Everything, the API with these flags on top of the defaults
        /// (e.g. `["--api-ws-max-subscriptions", "3"]`), checked as the
        /// binary checks them.
        pub async fn start_with(flags: &[&str]) -> Self {
            Self::start_as(flags, crate::api_cli).await
        }

        /// Everything on a stream of `partitions` partitions: the Redis
        /// model projected a partition per projector (each publishing its
        /// report as `redis/p<k>`), the API told of the partitions.
        pub async fn start_partitioned(partitions: u32) -> Self {
            let pipe = Pipeline::start_with(|relay| relay.partitions = partitions).await;
            let count = partitions.to_string();
            let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
            Self::start_on(
                pipe,
                &["--jetstream-partitions", &count],
                crate::api_cli,
                (partitions, redis),
            )
            .await
        }

        /// [`TestApi::start_partitioned`] with the Redis model on `redis`
        /// (e.g. [`TestRedis::on_cluster`]), the API given `flags` on top.
        pub async fn start_partitioned_on(
            partitions: u32,
            redis: TestRedis,
            flags: &[&str],
        ) -> Self {
            let pipe = Pipeline::start_with(|relay| relay.partitions = partitions).await;
            let count = partitions.to_string();
            let mut all = vec!["--jetstream-partitions", count.as_str()];
            all.extend_from_slice(flags);
            Self::start_on(pipe, &all, crate::api_cli, (partitions, redis)).await
        }

        /// Everything, with the relay sealing the log with `key` (blocks of
        /// at most 40 events or `block_time`) and the API serving its proofs.
        pub async fn start_sealed(
            key: &commands::seal::key::SealKey,
            block_time: std::time::Duration,
        ) -> Self {
            let pipe = Pipeline::start_sealed(key.clone(), 40, block_time).await;
            let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
            let (secret, stream) = (key.secret_text(), pipe.nats.relay.stream_name.clone());
            Self::start_on(
                pipe,
                &["--seal-key", &secret, "--jetstream-stream", &stream],
                crate::api_cli,
                (1, redis),
            )
            .await
        }

        /// [`TestApi::start_with`] without the configuration's cross-checks
        /// (see [`crate::api_cli_unchecked`]).
        pub async fn start_unchecked(flags: &[&str]) -> Self {
            Self::start_as(flags, crate::api_cli_unchecked).await
        }

        async fn start_as(
            flags: &[&str],
            cli: fn(&Pipeline, &TestRedis, &TestGraph, &str, &[&str]) -> ::api::cli::Cli,
        ) -> Self {
            let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
            Self::start_on(Pipeline::start().await, flags, cli, (1, redis)).await
        }

        async fn start_on(
            pipe: Pipeline,
            flags: &[&str],
            cli: fn(&Pipeline, &TestRedis, &TestGraph, &str, &[&str]) -> ::api::cli::Cli,
            (partitions, redis): (u32, TestRedis),
        ) -> Self {
            // The graph is projected in the stream's partitions as well.
            let graph = TestGraph::create_partitioned(partitions)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let graph_model = GraphModel::connect(graph.model.config().clone())
                .await
                .unwrap();
            let (redis_projectors, graph_projectors): (Vec<_>, Vec<_>) = if partitions > 1 {
                (0..partitions)
                    .map(|k| {
                        (
                            pipe.partition_projector(redis.model.for_partition(k), partitions, k),
                            pipe.partition_projector(graph_model.for_partition(k), partitions, k),
                        )
                    })
                    .unzip()
            } else {
                (
                    vec![pipe.projector(redis.model.clone())],
                    vec![pipe.projector(graph_model)],
                )
            };
            // As in production: projectors publish their state for /readyz.
            let statuses = redis_projectors
                .iter()
                .map(|p| p.status())
                .chain(graph_projectors.iter().map(|p| p.status()));
            for status in statuses {
                tokio::spawn(projections::redis::health::publish_status(
                    redis.model.clone(),
                    status,
                    pipe.stop.clone(),
                ));
            }
            let mut projectors: Vec<Running> =
                redis_projectors.iter().map(|p| pipe.spawn(p)).collect();
            projectors.extend(graph_projectors.iter().map(|p| pipe.spawn(p)));
            let auth = Authenticator::new(Some(SECRET), None).unwrap();
            let cli = cli(&pipe, &redis, &graph, SECRET, flags);
            let app = crate::start_api(cli.settings, &pipe.stop).await;
            let addr = app.addr().expect("the API runs");
            let server = tokio::spawn(app.run_until_stopped());
            Self {
                pipe,
                redis,
                graph,
                addr,
                auth,
                http: reqwest::Client::new(),
                projectors,
                server,
            }
        }

        /// A token for `tenant` with `roles`.
        pub fn token(&self, tenant: &str, roles: &[Role]) -> String {
            self.auth.mint("tester", tenant, roles, 600).unwrap()
        }

        /// `http://addr/path`.
        pub fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        /// POSTs a GraphQL request; returns the status and the JSON body.
        pub async fn graphql(
            &self,
            token: Option<&str>,
            query: &str,
            variables: Value,
        ) -> (u16, Value) {
            let mut request = self
                .http
                .post(self.url("/graphql"))
                .json(&json!({ "query": query, "variables": variables }));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }

        /// Runs `query` and returns `data`, failing on any error.
        pub async fn data(&self, token: &str, query: &str, variables: Value) -> Value {
            let (status, body) = self.graphql(Some(token), query, variables).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.get("errors").is_none(), "unexpected errors: {body}");
            body["data"].clone()
        }

        /// Runs `query` and returns its first error's code and message.
        pub async fn error(
            &self,
            token: Option<&str>,
            query: &str,
            variables: Value,
        ) -> (String, String) {
            let (_, body) = self.graphql(token, query, variables).await;
            let error = &body["errors"][0];
            assert!(!error.is_null(), "expected an error: {body}");
            (
                error["extensions"]["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                error["message"].as_str().unwrap_or("").to_owned(),
            )
        }

        /// Waits until both read models have applied the log's head.
        pub async fn caught_up(&self) -> i64 {
            let head = self.pipe.caught_up(&self.redis.model).await;
            self.pipe.caught_up(&self.graph.model).await.max(head)
        }

        /// Stops projectors and the server, then the pipeline.
        pub async fn shutdown(self) {
            self.pipe.stop.cancel();
            for (stop, task) in self.projectors {
                stop.cancel();
                let _ = task.await;
            }
            let _ = self.server.await;
            self.pipe.shutdown().await;
        }
    }
}

pub mod js {
    //! The JavaScript clients in `tests/js/` (graphql-js, graphql-ws, Apollo
    //! Client, and Chromium driven by playwright-core), run by Node.js from
    //! `PATH` against a test's API: `node tests/js/<script> <base url>
    //! <token>`. A script prints one JSON object per line on stdout, each
    //! with an `event`, the last being `{"event": "result", …}`
    //! (`tests/js/lib/harness.mjs`); its stderr goes to the test's output.
    //! `scripts/test.sh` (through `scripts/js.sh`) installs what they need.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::{Path, PathBuf};
    use std::process::{ExitStatus, Stdio};
    use std::time::Duration;

    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
    use tokio::process::{Child, ChildStdin, ChildStdout, Command};

    /// `tests/js/`.
    pub fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
    }

    /// The Chromium the browser tests drive: Debian's, or
    /// `NEURECTOMY_TEST_CHROMIUM`.
    pub fn chromium() -> PathBuf {
        std::env::var_os("NEURECTOMY_TEST_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
    }

    /// Fails the test, naming what to install, unless the packages of
    /// `tests/js/package-lock.json` are installed and, with `browser`,
    /// Chromium is there. (Node.js itself is checked when a script starts.)
    pub fn require(browser: bool) {
        let modules = dir().join("node_modules");
        for package in [
            "playwright-core",
            "graphql",
            "graphql-ws",
            "ws",
            "@apollo/client",
        ] {
            assert!(
                modules.join(package).join("package.json").is_file(),
                "{} is missing: run `npm ci` in {} (scripts/test.sh does, through scripts/js.sh)",
                modules.join(package).display(),
                dir().display(),
            );
        }
        if browser {
            let chromium = chromium();
            assert!(
                chromium.is_file(),
                "{} is missing: install Debian's chromium (`apt-get install chromium`; \
                 scripts/test.sh does, through scripts/js.sh) or set NEURECTOMY_TEST_CHROMIUM",
                chromium.display(),
            );
        }
    }

    /// A running script; killed when dropped.
    pub struct Script {
        child: Child,
        stdout: Lines<BufReader<ChildStdout>>,
        stdin: Option<ChildStdin>,
        name: String,
        /// The `result` event, once read.
        result: Option<Value>,
    }

    impl Script {
        /// Starts `node tests/js/<script> <base> <token>`.
        pub fn spawn(script: &str, base: &str, token: &str) -> Self {
            Self::spawn_with(script, base, token, &[])
        }

        /// Starts `node tests/js/<script> <base> <token>` with `env` added
        /// to its environment and its stdin open for [`Script::send`].
        pub fn spawn_with(script: &str, base: &str, token: &str, env: &[(&str, &str)]) -> Self {
            let path = dir().join(script);
            let mut child = Command::new("node")
                .arg(&path)
                .arg(base)
                .arg(token)
                .envs(env.iter().copied())
                .current_dir(dir())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run `node {}`: {e}; the JavaScript tests need Node.js 20 or newer \
                         on PATH (https://nodejs.org/ or your distribution's nodejs)",
                        path.display()
                    )
                });
            let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
            let stdin = child.stdin.take();
            Self {
                child,
                stdout,
                stdin,
                name: script.to_owned(),
                result: None,
            }
        }

        /// Writes `line` (and a newline) to the script's stdin.
        pub async fn send(&mut self, line: &str) {
            use tokio::io::AsyncWriteExt as _;
            let stdin = self
                .stdin
                .as_mut()
                .unwrap_or_else(|| panic!("{}: stdin is closed", self.name));
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .unwrap();
            stdin.flush().await.unwrap();
        }

        /// The next JSON line, within `timeout`; `None` at the end of the
        /// output. Lines that are not JSON objects fail the test.
        pub async fn event(&mut self, timeout: Duration) -> Option<Value> {
            let line = tokio::time::timeout(timeout, self.stdout.next_line())
                .await
                .unwrap_or_else(|_| panic!("{} printed nothing for {timeout:?}", self.name))
                .unwrap();
            line.map(|line| {
                serde_json::from_str::<Value>(&line)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| {
                        panic!("{} printed a line that is not JSON: {line}", self.name)
                    })
            })
        }

        /// Reads events until one named `name` (returned) or the result
        /// (`Err` with it), each within `timeout`.
        pub async fn until(&mut self, name: &str, timeout: Duration) -> Result<Value, Value> {
            if let Some(result) = &self.result {
                return Err(result.clone());
            }
            loop {
                match self.event(timeout).await {
                    Some(event) if event["event"] == "result" => {
                        self.result = Some(event.clone());
                        return if name == "result" {
                            Ok(event)
                        } else {
                            Err(event)
                        };
                    }
                    Some(event) if event["event"] == name => return Ok(event),
                    Some(_) => {}
                    None => panic!("{} ended before printing `{name}` or a result", self.name),
                }
            }
        }

        /// The `result` event and the exit status, within `timeout`.
        pub async fn result(mut self, timeout: Duration) -> (Value, ExitStatus) {
            let result = match self.until("result", timeout).await {
                Ok(result) | Err(result) => result,
            };
            let status = tokio::time::timeout(timeout, self.child.wait())
                .await
                .unwrap_or_else(|_| panic!("{} did not exit after its result", self.name))
                .unwrap();
            (result, status)
        }
    }
}

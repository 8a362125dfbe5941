//! # Start-up: one `Application` for every role
//!
//! [`Application::build`] connects what the chosen [`Roles`] need — once,
//! in [`connect`] — runs migrations when asked, and starts each role under
//! one cancellation token: the relay, the projectors, the GraphQL API, the
//! workload simulator. [`Application::port`] says where the API listens
//! (tests bind port 0), and [`Application::run_until_stopped`] waits for the
//! token (SIGINT/SIGTERM, or [`Application::shutdown`]) and stops every role
//! in the order of [`crate::shutdown`] within the shutdown deadline.
//!
//! Every sub-command of the binary that runs until stopped (`all`, `serve`,
//! `relay`, `project`, `simulate`) and every end-to-end test that needs a
//! running API goes through here, so they cannot start differently.

pub mod connect;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use commands::{CommandHandler, EventStore, Relay};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::graphql::{ApiLimits, Services};
use crate::http::{AppState, ServerConfig};
use crate::settings::{Projection, Settings};
use crate::shutdown::Workers;
use crate::simulate::SimulateArgs;
use crate::telemetry::probes::Probes;

/// What one process runs.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// Create the database if missing and migrate before anything starts.
    pub migrate: bool,
    /// The outbox relay (PostgreSQL → JetStream).
    pub relay: bool,
    /// The projectors: `None` none, `Some(None)` all, `Some(Some(p))` only `p`.
    pub projectors: Option<Option<Projection>>,
    /// The GraphQL API.
    pub api: bool,
    /// The workload simulator, with its options.
    pub simulation: Option<SimulateArgs>,
}

impl Roles {
    /// `neurectomy all [--simulate]`.
    pub fn all(simulation: Option<SimulateArgs>) -> Self {
        Self {
            migrate: true,
            relay: true,
            projectors: Some(None),
            api: true,
            simulation,
        }
    }

    /// `neurectomy serve`: the API alone.
    pub fn api() -> Self {
        Self {
            api: true,
            ..Self::default()
        }
    }

    /// Whether only projectors run (then one that stops stops the process).
    fn projectors_only(&self) -> bool {
        self.projectors.is_some() && !self.relay && !self.api && self.simulation.is_none()
    }
}

/// Where the stop comes from.
#[derive(Debug, Clone)]
pub enum Stop {
    /// SIGINT or SIGTERM (a second one exits at once).
    Signals,
    /// Only this token (tests, embedding).
    Token(CancellationToken),
}

/// A role's task: its name and its result.
type Task = (&'static str, JoinHandle<anyhow::Result<()>>);

/// A running process: its connections and its roles' tasks.
pub struct Application {
    settings: Settings,
    pool: PgPool,
    nats: async_nats::Client,
    store: EventStore,
    shutdown: CancellationToken,
    workers: Workers,
    api: Option<ApiServer>,
    /// Stopped in this order after the API (see `run_until_stopped`).
    simulation: Option<Task>,
    projectors: Vec<Task>,
    relay: Option<Task>,
    background: Vec<JoinHandle<()>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    /// Projector failures end the process's run with an error.
    projectors_only: bool,
}

/// The API of a running [`Application`].
#[derive(Debug)]
pub struct ApiServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The server task; ends after the shutdown once connections drained.
    pub task: JoinHandle<std::io::Result<()>>,
    /// Its shared subscription executions.
    pub hub: crate::http::hub::Hub,
}

impl Application {
    /// Connects, migrates if asked, and starts `roles`; stops on signals.
    pub async fn build(settings: Settings, roles: Roles) -> anyhow::Result<Self> {
        Self::build_with(settings, roles, Stop::Signals).await
    }

    /// [`Application::build`], stopping as `stop` says.
    pub async fn build_with(settings: Settings, roles: Roles, stop: Stop) -> anyhow::Result<Self> {
        crate::telemetry::metrics::install();
        let pool = if roles.migrate {
            connect::migrated_pool(&settings).await?
        } else {
            connect::connect_database(&settings).await?
        };
        let nats = connect::connect_nats(&settings).await?;
        let store = EventStore::with_committers(pool.clone(), settings.database_committers);
        let workers = Workers::default();
        let shutdown = match stop {
            Stop::Signals => crate::shutdown::on_signal(workers.clone()),
            Stop::Token(token) => token,
        };
        let mut app = Self {
            settings,
            pool,
            nats,
            store,
            shutdown,
            workers,
            api: None,
            simulation: None,
            projectors: Vec::new(),
            relay: None,
            background: Vec::new(),
            metrics: None,
            projectors_only: roles.projectors_only(),
        };
        let mut probes = Probes {
            postgres: Some(app.pool.clone()),
            nats: Some(app.nats.clone()),
            ..Probes::default()
        };
        if roles.api || roles.simulation.is_some() {
            // Wakes relays in other processes (e.g. a standby) on our commits.
            let notifier = app.store.spawn_commit_notifier(app.shutdown.clone());
            app.background.push(tokio::spawn(async move {
                let _ = notifier.await;
            }));
        }
        if roles.relay {
            app.start_relay().await?;
        }
        if let Some(only) = roles.projectors {
            app.start_projectors(only, &mut probes).await?;
        }
        if roles.api {
            // The API's probes cover every dependency, and it computes the
            // projections' lag at scrape time from their reports.
            let api = app.start_api().await?;
            probes.redis = Some(api.1.redis.clone());
            probes.graph = Some(api.1.graph.clone());
            probes.projections.clear();
            app.api = Some(api.0);
        }
        app.background
            .push(tokio::spawn(probes.run(app.shutdown.clone())));
        app.metrics = start_metrics(&app.settings, &app.shutdown).await?;
        if let Some(simulation) = roles.simulation {
            let alone = !roles.relay && roles.projectors.is_none() && !roles.api;
            let handler = CommandHandler::new(app.store.clone(), app.settings.handler_config());
            app.background.push(tokio::spawn({
                let (handler, shutdown) = (handler.clone(), app.shutdown.clone());
                async move { handler.watch_erasures(shutdown).await }
            }));
            let shutdown = app.shutdown.clone();
            app.simulation = Some((
                "simulator",
                tokio::spawn(async move {
                    let result =
                        crate::simulate::drive(handler, simulation, shutdown.clone()).await;
                    // A simulation of its own ends the process when its
                    // duration is up.
                    if alone {
                        shutdown.cancel();
                    }
                    result
                }),
            ));
        }
        Ok(app)
    }

    async fn start_relay(&mut self) -> anyhow::Result<()> {
        let mut relay = Relay::new(
            self.store.clone(),
            self.nats.clone(),
            self.settings.relay_config(),
        );
        match self.settings.seal_key()? {
            Some(key) => {
                tracing::info!(key = key.id(), public_key = %key.public().text(), "the relay leader seals the log");
                relay = relay.with_sealer(commands::seal::sealer::Sealer::new(
                    self.store.clone(),
                    self.nats.clone(),
                    key,
                    self.settings.sealer_config(),
                ));
            }
            None => tracing::warn!(
                "no seal key (NEURECTOMY_SEAL_KEY): the log is not sealed; `neurectomy audit keygen` makes a key"
            ),
        }
        self.workers.add("relay", relay.in_hand());
        relay
            .ensure_stream()
            .await
            .context("ensuring the JetStream stream exists")?;
        let shutdown = self.shutdown.clone();
        self.relay = Some((
            "relay",
            tokio::spawn(async move {
                relay.run(shutdown).await;
                Ok(())
            }),
        ));
        tracing::info!(stream = %self.settings.jetstream_stream, "relay started");
        Ok(())
    }

    /// Spawns the projectors `only` selects; adds them to the shutdown
    /// reports and what they use to `probes`.
    async fn start_projectors(
        &mut self,
        only: Option<Projection>,
        probes: &mut Probes,
    ) -> anyhow::Result<()> {
        // Projectors publish their state to Redis for `/readyz` and
        // `projectionStatus` of API processes.
        let reports = connect::connect_redis(&self.settings).await?;
        probes.redis = Some(reports.clone());
        if only.is_none_or(|p| p == Projection::Redis) {
            let model = connect::connect_redis(&self.settings).await?;
            let partitions = self.settings.jetstream_partitions.max(1);
            if partitions > 1 {
                let model: (_, fn(&_, u32) -> _) = (model, projections::RedisModel::for_partition);
                self.spawn_partitions("redis", &model, partitions, &reports, probes);
            } else {
                let leases = self.leases("redis");
                let config = self.settings.projector_config();
                self.spawn_projector("redis", model, config, leases, &reports, probes);
            }
            tracing::info!(
                prefix = %self.settings.redis_prefix,
                partitions,
                "redis projector started"
            );
        }
        if only.is_none_or(|p| p == Projection::Graph) {
            let model = connect::connect_graph(&self.settings).await?;
            probes.graph = Some(model.clone());
            let partitions = self.settings.jetstream_partitions.max(1);
            if partitions > 1 {
                let model: (_, fn(&_, u32) -> _) = (model, projections::GraphModel::for_partition);
                self.spawn_partitions("graph", &model, partitions, &reports, probes);
            } else {
                let leases = self.leases("graph");
                let config = self.settings.projector_config();
                self.spawn_projector("graph", model, config, leases, &reports, probes);
            }
            tracing::info!(
                uri = %self.settings.graph_uri,
                database = %self.settings.graph_database,
                partitions,
                "graph projector started"
            );
        }
        Ok(())
    }

    /// The leases of projection `name` (`<stream>/<name>`).
    fn leases(&self, name: &str) -> projections::Leases {
        projections::Leases::new(
            self.store.pool().clone(),
            format!("{}/{name}", self.settings.jetstream_stream),
            self.settings.lease_config(),
        )
    }

    /// Projection `name` in `partitions` partitions: a projector per
    /// partition (of the model's `for_partition`), each under its
    /// partition's lease, and this process's membership among the
    /// processes sharing them (it takes at most its fair share; see
    /// `projections::lease`).
    fn spawn_partitions<M: projections::ReadModel + Send + Sync + 'static>(
        &mut self,
        name: &'static str,
        (model, for_partition): &(M, fn(&M, u32) -> M),
        partitions: u32,
        reports: &projections::RedisModel,
        probes: &mut Probes,
    ) {
        let leases = self.leases(name).with_partitions(partitions);
        // The index a partition's catch-up reads through; built in the
        // background (reads are correct without it, only slower), once
        // among the processes starting together.
        self.background.push(tokio::spawn({
            let store = self.store.clone();
            async move {
                if let Err(error) = store.ensure_partition_index(partitions).await {
                    let error = format!("{:#}", anyhow::Error::new(error));
                    tracing::warn!(
                        %error,
                        "cannot build the partition index; partition reads walk the whole log until it exists"
                    );
                }
            }
        }));
        self.background.push(tokio::spawn({
            let (leases, stop) = (leases.clone(), self.shutdown.clone());
            async move { leases.keep_membership(stop).await }
        }));
        for partition in 0..partitions {
            let config = projections::ProjectorConfig {
                partitions,
                partition,
                ..self.settings.projector_config()
            };
            self.spawn_projector(
                name,
                for_partition(model, partition),
                config,
                leases.clone(),
                reports,
                probes,
            );
        }
    }

    fn spawn_projector<M: projections::ReadModel + Send + Sync + 'static>(
        &mut self,
        name: &'static str,
        model: M,
        config: projections::ProjectorConfig,
        leases: projections::Leases,
        reports: &projections::RedisModel,
        probes: &mut Probes,
    ) {
        let projector =
            projections::Projector::new(model, self.store.clone(), self.nats.clone(), config)
                .with_leases(leases);
        let reported = projector.status().borrow().name.clone();
        self.background
            .push(tokio::spawn(projections::redis::health::publish_status(
                reports.clone(),
                projector.status(),
                self.shutdown.clone(),
            )));
        self.workers
            .add(format!("projector {reported}"), projector.in_hand());
        probes.projections.push((reported, projector.status()));
        let shutdown = self.shutdown.clone();
        let stops_process = self.projectors_only;
        self.projectors.push((
            name,
            tokio::spawn(async move {
                let result = projector.run(shutdown.clone()).await;
                if result.is_err() && stops_process {
                    shutdown.cancel();
                }
                result.map_err(anyhow::Error::from)
            }),
        ));
    }

    /// Starts the GraphQL API on `api.listen`; returns it and its services.
    async fn start_api(&mut self) -> anyhow::Result<(ApiServer, Services)> {
        let settings = &self.settings;
        let auth = connect::authenticator(&settings.api)
            .context("configuring bearer-token verification")?;
        let redis = connect::connect_redis(settings).await?;
        let graph = connect::connect_graph(settings).await?;
        // Readers follow replays of the Redis model (a new active generation).
        self.background.push(tokio::spawn({
            let redis = redis.clone();
            let shutdown = self.shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    if let Err(error) = redis.refresh().await {
                        tracing::debug!(%error, "could not re-read the active Redis generation");
                    }
                }
            }
        }));
        let limits = ApiLimits::from_settings(&settings.api);
        let feed = crate::graphql::subscriptions::Feed::start(
            self.store.clone(),
            redis.clone(),
            &settings.redis_url,
            limits.subscriber_buffer,
            // The near cache is kept exact by following the change feeds,
            // which the API does not read on a Redis Cluster yet.
            if settings.redis_cluster {
                0
            } else {
                limits.agent_cache
            },
            self.shutdown.clone(),
        )
        .context("starting the subscriptions' change feed")?;
        let handler = CommandHandler::new(self.store.clone(), settings.handler_config());
        // Erasures reach this process's state cache within a second.
        self.background.push(tokio::spawn({
            let (handler, shutdown) = (handler.clone(), self.shutdown.clone());
            async move { handler.watch_erasures(shutdown).await }
        }));
        let services = Services {
            store: self.store.clone(),
            handler,
            redis,
            graph,
            feed,
            limits,
            seals: crate::graphql::audit::proof::Seals {
                log: settings.sealer_config().log,
                keys: settings.seal_trusted()?,
            },
        };
        let schemas = crate::graphql::schemas(services.clone());
        let state = Arc::new(AppState {
            hub: crate::http::hub::Hub::new(schemas.strict.clone(), services.feed.buffer()),
            schema: schemas.strict,
            fast: schemas.fast,
            documents: Default::default(),
            auth,
            services: services.clone(),
            nats: self.nats.clone(),
            config: ServerConfig::from_settings(&settings.api),
            shutdown: self.shutdown.clone(),
        });
        let listener = tokio::net::TcpListener::bind(&settings.api.api_listen)
            .await
            .with_context(|| {
                format!(
                    "listening on {} (NEURECTOMY_API_LISTEN)",
                    settings.api.api_listen
                )
            })?;
        let addr = listener
            .local_addr()
            .context("reading the listening address")?;
        let hub = state.hub.clone();
        let router = crate::http::router(state)
            .layer(axum::middleware::from_fn(crate::shutdown::track_request));
        let stop = self.shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        tracing::info!(%addr, "GraphQL API listening: http://{addr}/ (GraphiQL), /graphql, /graphql/ws");
        Ok((ApiServer { addr, task, hub }, services))
    }

    /// The API's address, if this process runs the API.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|api| api.addr)
    }

    /// The API's port, if this process runs the API.
    pub fn port(&self) -> Option<u16> {
        self.addr().map(|addr| addr.port())
    }

    /// The API's shared subscription executions, if it runs.
    pub fn hub(&self) -> Option<&crate::http::hub::Hub> {
        self.api.as_ref().map(|api| &api.hub)
    }

    /// The event store this process writes to.
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The token that stops every role.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Waits for the stop, then stops every role — the simulator, the
    /// projectors, the API (with its commands and sockets), the metrics
    /// listener, the relay — flushes NATS and closes the pool, all within
    /// the shutdown deadline. An error if a role failed or the deadline
    /// passed.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            settings,
            pool,
            nats,
            shutdown,
            workers,
            api,
            simulation,
            projectors,
            relay,
            background,
            metrics,
            ..
        } = self;
        shutdown.cancelled().await;
        let stop = async {
            let mut failure = None;
            for (name, task) in simulation.into_iter().chain(projectors) {
                if let Some(error) = joined(name, task.await) {
                    tracing::error!("{error:#}");
                    failure.get_or_insert(error);
                }
            }
            if let Some(api) = api {
                match api.task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        failure
                            .get_or_insert(anyhow::Error::from(error).context("serving the API"));
                    }
                    Err(error) => {
                        failure.get_or_insert(anyhow::anyhow!("the API task panicked: {error}"));
                    }
                }
            }
            crate::shutdown::quiesce().await;
            join_metrics(metrics).await;
            if let Some((name, task)) = relay {
                if let Some(error) = joined(name, task.await) {
                    failure.get_or_insert(error);
                }
            }
            for task in background {
                let _ = task.await;
            }
            flush_nats(&nats).await;
            pool.close().await;
            failure
        };
        let failure =
            crate::shutdown::drain(&shutdown, settings.shutdown_deadline(), &workers, stop).await?;
        failure.map_or(Ok(()), Err)
    }
}

/// A role's error, if its task failed or panicked.
fn joined(
    name: &str,
    result: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> Option<anyhow::Error> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.context(format!("the {name} stopped"))),
        Err(error) => Some(anyhow::anyhow!("the {name} task panicked: {error}")),
    }
}

/// Serves `/metrics` on `metrics.listen`, if set, until `shutdown`.
async fn start_metrics(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<JoinHandle<std::io::Result<()>>>> {
    let Some(address) = &settings.metrics_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address} (NEURECTOMY_METRICS_LISTEN)"))?;
    let addr = listener
        .local_addr()
        .context("reading the metrics listener's address")?;
    tracing::info!(%addr, "metrics listening: http://{addr}/metrics");
    Ok(Some(tokio::spawn(crate::telemetry::metrics::serve(
        listener,
        shutdown.clone(),
    ))))
}

/// Joins the metrics listener, if any.
async fn join_metrics(metrics: Option<JoinHandle<std::io::Result<()>>>) {
    if let Some(task) = metrics {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the metrics listener failed"),
            Err(error) => tracing::warn!(%error, "the metrics listener panicked"),
        }
    }
}

/// Sends what the NATS client still buffers (the projectors' last
/// acknowledgements) before the process exits.
async fn flush_nats(nats: &async_nats::Client) {
    match tokio::time::timeout(Duration::from_secs(5), nats.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not flush NATS at shutdown"),
        Err(_) => tracing::warn!("flushing NATS at shutdown timed out"),
    }
}

//! Start-up and shutdown: one place builds pools and clients, runs
//! migrations and ensures the JetStream stream exists; one cancellation token
//! (cancelled by SIGINT/SIGTERM) stops every task, and every task is joined
//! within the shutdown deadline (the sequence is in [`crate::shutdown`]).

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use commands::{CommandHandler, EventStore, Relay};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions as _;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use crate::settings::{AllArgs, ProjectArgs, Projection, Settings};

pub use crate::secret::redact;

/// Connects to the event store (the database must exist).
pub async fn connect_database(settings: &Settings) -> anyhow::Result<PgPool> {
    let statement_timeout = Duration::from_millis(settings.database_statement_timeout_ms);
    pool(settings, Some(statement_timeout).filter(|t| !t.is_zero())).await
}

/// A pool of at most `database_pool_size` connections: getting one (and
/// connecting) waits at most `database_timeout_ms`, and with
/// `statement_timeout` the server cancels any statement running longer.
async fn pool(settings: &Settings, statement_timeout: Option<Duration>) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(&settings.database_url).with_context(|| {
        format!(
            "reading the PostgreSQL URL {}",
            redact(&settings.database_url)
        )
    })?;
    if let Some(timeout) = statement_timeout {
        options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
    }
    // sqlx's statement log prints whole statements (the append's is ~1.5
    // KB) on every slow one; the store logs slow statements by name.
    options = options.disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(settings.database_pool_size.max(1))
        .acquire_timeout(Duration::from_millis(settings.database_timeout_ms.max(1)))
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {} (is it running, and has `neurectomy migrate` created the database?)",
                redact(&settings.database_url)
            )
        })
}

/// Connects to NATS; the client reconnects by itself after outages.
pub async fn connect_nats(settings: &Settings) -> anyhow::Result<async_nats::Client> {
    let timeout = Duration::from_millis(settings.nats_timeout_ms.max(1));
    let connect = async_nats::ConnectOptions::new()
        .name("neurectomy")
        .connection_timeout(timeout)
        .request_timeout(Some(timeout))
        // The client's default waits up to seconds between attempts; a
        // server that is back is noticed within a second.
        .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.min(10) as u64))
        .connect(&settings.nats_url);
    tokio::time::timeout(timeout * 2, connect)
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "connecting to NATS at {} (is nats-server running with -js?)",
                settings.nats_url
            )
        })
}

/// Creates the database if it is missing, then runs the migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = migrated_pool(settings).await?;
    pool.close().await;
    Ok(())
}

/// Creates the database if it is missing, connects, runs the migrations and
/// returns the pool (start-up of `all` keeps using it).
pub async fn migrated_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let url = &settings.database_url;
    let exists = Postgres::database_exists(url)
        .await
        .with_context(|| format!("checking whether the database at {} exists", redact(url)))?;
    if !exists {
        Postgres::create_database(url)
            .await
            .with_context(|| format!("creating the database at {}", redact(url)))?;
        tracing::info!(url = %redact(url), "created the database");
    }
    // Migrations run without the statement timeout: building an index on
    // a large table may take longer.
    let migrating = pool(settings, None).await?;
    commands::migrate(&migrating)
        .await
        .context("running the event-store migrations")?;
    migrating.close().await;
    tracing::info!("event store migrated");
    connect_database(settings).await
}

/// A token cancelled on SIGINT or SIGTERM (a second signal exits at once).
pub fn shutdown_on_signal() -> CancellationToken {
    crate::shutdown::on_signal(crate::shutdown::Workers::default())
}

/// Serves `/metrics` on `NEURECTOMY_METRICS_LISTEN`, if set, until `shutdown`.
pub async fn start_metrics(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(address) = &settings.metrics_listen else {
        return Ok(None);
    };
    crate::metrics::install();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address} (NEURECTOMY_METRICS_LISTEN)"))?;
    let addr = listener
        .local_addr()
        .context("reading the metrics listener's address")?;
    tracing::info!(%addr, "metrics listening: http://{addr}/metrics");
    Ok(Some(tokio::spawn(crate::metrics::serve(
        listener,
        shutdown.clone(),
    ))))
}

/// Joins the metrics listener, if any.
async fn join_metrics(metrics: Option<tokio::task::JoinHandle<std::io::Result<()>>>) {
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

/// Runs the relay alone until a signal.
pub async fn run_relay(settings: &Settings) -> anyhow::Result<()> {
    crate::metrics::install();
    let pool = connect_database(settings).await?;
    let nats = connect_nats(settings).await?;
    let store = EventStore::new(pool.clone());
    let relay = Relay::new(store, nats.clone(), settings.relay_config());
    let workers = crate::shutdown::Workers::default();
    workers.add("relay", relay.in_hand());
    let shutdown = crate::shutdown::on_signal(workers.clone());
    let metrics = start_metrics(settings, &shutdown).await?;
    let probes = crate::probes::Probes {
        postgres: Some(pool.clone()),
        nats: Some(nats.clone()),
        ..Default::default()
    };
    let probing = tokio::spawn(probes.run(shutdown.clone()));
    let run = async {
        relay.run(shutdown.clone()).await;
        let _ = probing.await;
        join_metrics(metrics).await;
        flush_nats(&nats).await;
        pool.close().await;
    };
    crate::shutdown::drain(&shutdown, settings.shutdown_deadline(), &workers, run).await?;
    Ok(())
}

/// Connects the Redis read model.
pub async fn connect_redis(settings: &Settings) -> anyhow::Result<projections::RedisModel> {
    projections::RedisModel::connect(&settings.redis_url, settings.redis_config())
        .await
        .with_context(|| {
            format!(
                "connecting to Redis at {} (is redis-server running?)",
                redact(&settings.redis_url)
            )
        })
}

/// Projector tasks.
type ProjectorTasks = Vec<tokio::task::JoinHandle<Result<(), projections::ProjectorError>>>;

/// Spawns the projectors selected by `only`, returning their tasks; adds
/// them to `workers` (shutdown reports) and what they use to `probes`.
async fn spawn_projectors(
    settings: &Settings,
    store: &EventStore,
    nats: &async_nats::Client,
    only: Option<Projection>,
    shutdown: &CancellationToken,
    workers: &crate::shutdown::Workers,
    probes: &mut crate::probes::Probes,
) -> anyhow::Result<ProjectorTasks> {
    let mut tasks = Vec::new();
    // Projectors publish their state to Redis for `/readyz` and
    // `projectionStatus` of API processes.
    let reports = connect_redis(settings).await?;
    probes.redis = Some(reports.clone());
    if only.is_none_or(|p| p == Projection::Redis) {
        let model = connect_redis(settings).await?;
        let projector = projections::Projector::new(
            model,
            store.clone(),
            nats.clone(),
            settings.projector_config(),
        );
        tokio::spawn(projections::redis::health::publish_status(
            reports.clone(),
            projector.status(),
            shutdown.clone(),
        ));
        workers.add("projector redis", projector.in_hand());
        probes.projections.push(("redis", projector.status()));
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move { projector.run(shutdown).await }));
        tracing::info!(prefix = %settings.redis_prefix, "redis projector started");
    }
    if only.is_none_or(|p| p == Projection::Graph) {
        let model = connect_graph(settings).await?;
        probes.graph = Some(model.clone());
        let projector = projections::Projector::new(
            model,
            store.clone(),
            nats.clone(),
            settings.projector_config(),
        );
        tokio::spawn(projections::redis::health::publish_status(
            reports.clone(),
            projector.status(),
            shutdown.clone(),
        ));
        workers.add("projector graph", projector.in_hand());
        probes.projections.push(("graph", projector.status()));
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move { projector.run(shutdown).await }));
        tracing::info!(uri = %settings.graph_uri, database = %settings.graph_database, "graph projector started");
    }
    Ok(tasks)
}

/// Connects the graph read model (and ensures its constraints exist).
pub async fn connect_graph(settings: &Settings) -> anyhow::Result<projections::GraphModel> {
    projections::GraphModel::connect(settings.graph_config()).await.with_context(|| {
        format!(
            "connecting to the graph at {} (database {}); in development start it with scripts/graph.sh up",
            settings.graph_uri, settings.graph_database
        )
    })
}

/// Runs the projectors until a signal (or until one stops on an event it
/// cannot apply).
pub async fn run_projectors(settings: &Settings, args: ProjectArgs) -> anyhow::Result<()> {
    crate::metrics::install();
    let pool = connect_database(settings).await?;
    let nats = connect_nats(settings).await?;
    let store = EventStore::new(pool.clone());
    let workers = crate::shutdown::Workers::default();
    let shutdown = crate::shutdown::on_signal(workers.clone());
    let metrics = start_metrics(settings, &shutdown).await?;
    let mut probes = crate::probes::Probes {
        postgres: Some(pool.clone()),
        nats: Some(nats.clone()),
        ..Default::default()
    };
    let tasks = spawn_projectors(
        settings,
        &store,
        &nats,
        args.only,
        &shutdown,
        &workers,
        &mut probes,
    )
    .await?;
    let probing = tokio::spawn(probes.run(shutdown.clone()));
    let run = async {
        let mut failure = None;
        for task in tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    shutdown.cancel();
                    failure = Some(anyhow::Error::from(error));
                }
                Err(error) => failure = Some(anyhow::anyhow!("a projector task panicked: {error}")),
            }
        }
        let _ = probing.await;
        join_metrics(metrics).await;
        flush_nats(&nats).await;
        pool.close().await;
        failure
    };
    let failure =
        crate::shutdown::drain(&shutdown, settings.shutdown_deadline(), &workers, run).await?;
    failure.map_or(Ok(()), Err)
}

/// Prints the relay's and the projections' checkpoints and lag.
pub async fn status(settings: &Settings) -> anyhow::Result<()> {
    use projections::ReadModel as _;
    // Each part answers within its own deadline: status is what an operator
    // runs when something is down, so a dependency that hangs is reported
    // as such, not waited for.
    let postgres = async {
        let pool = connect_database(settings).await?;
        let store = EventStore::new(pool.clone());
        let head = store.head().await.context("reading the head of the log")?;
        Ok((store, head))
    };
    let (store, head) = within("PostgreSQL", postgres).await?;
    println!(
        "event store: head position {} (readable {})",
        head.written, head.readable
    );
    // JetStream's last message is the relay's primary record (the
    // PostgreSQL checkpoint trails it by up to a second).
    let relayed = within("NATS", relay_position(settings)).await;
    match relayed {
        Ok(Some((position, sequence))) => {
            let lag = store.count_after(position, 10_000_000).await?;
            println!(
                "relay {}: published up to position {position} (JetStream sequence {sequence}), {lag} event(s) behind",
                settings.jetstream_stream
            );
        }
        Ok(None) => println!("relay {}: nothing published yet", settings.jetstream_stream),
        Err(error) => println!("relay {}: unknown ({error:#})", settings.jetstream_stream),
    }
    // A projection that cannot be reached is reported, not fatal.
    let redis = async { Ok(connect_redis(settings).await?.checkpoint().await?) };
    let redis = within("Redis", redis).await;
    print_projection(&store, "redis", &settings.redis_prefix, redis).await?;
    let graph = async {
        let model = connect_graph(settings).await?;
        let checkpoint = model.checkpoint().await?;
        Ok((checkpoint, model.database(std::time::Duration::ZERO).await?))
    };
    let graph: anyhow::Result<(i64, String)> = within("the graph", graph).await;
    let namespace = graph
        .as_ref()
        .map_or(settings.graph_database.clone(), |(_, db)| {
            format!("database {db}")
        });
    print_projection(&store, "graph", &namespace, graph.map(|(c, _)| c)).await?;
    store.pool().close().await;
    Ok(())
}

/// How long `status` waits for each dependency.
const STATUS_DEADLINE: Duration = Duration::from_secs(5);

/// `work` within [`STATUS_DEADLINE`]; past it, an error naming `what`.
async fn within<T>(
    what: &str,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(STATUS_DEADLINE, work).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!(
            "{what} did not answer within {} s",
            STATUS_DEADLINE.as_secs()
        )),
    }
}

/// One `status` line: a projection's checkpoint and lag, or why unknown.
async fn print_projection(
    store: &EventStore,
    name: &str,
    namespace: &str,
    checkpoint: anyhow::Result<i64>,
) -> anyhow::Result<()> {
    match checkpoint {
        Ok(checkpoint) => {
            let lag = store.count_after(checkpoint, 10_000_000).await?;
            println!(
                "projection {name} ({namespace}): checkpoint {checkpoint}, {lag} event(s) behind"
            );
        }
        Err(error) => println!("projection {name} ({namespace}): unknown ({error:#})"),
    }
    Ok(())
}

/// Messages `status` walks back past (foreign or deleted) to find the
/// relay's last one.
const STATUS_WALK: u64 = 1_000;

/// Position and sequence of the last message the relay published: the last
/// one carrying its headers, at most [`STATUS_WALK`] below the stream's last
/// (anything else published on its subjects is passed over).
async fn relay_position(settings: &Settings) -> anyhow::Result<Option<(i64, u64)>> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let nats = connect_nats(settings).await?;
    let js = async_nats::jetstream::new(nats);
    let stream = match js.get_stream(&settings.jetstream_stream).await {
        Ok(stream) => stream,
        Err(_) => return Ok(None),
    };
    let info = stream
        .get_info()
        .await
        .context("reading the JetStream stream")?;
    let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
    let floor = first.max(last.saturating_sub(STATUS_WALK));
    for sequence in (floor..=last).rev() {
        match stream.get_raw_message(sequence).await {
            Ok(message) => {
                if let Some(stamp) = commands::relay::stamp(&message.headers) {
                    return Ok(Some((stamp.position, sequence)));
                }
            }
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("reading JetStream message {sequence}"))
            }
        }
    }
    if last >= first {
        anyhow::bail!(
            "none of the last {} message(s) up to sequence {last} carries the relay's headers",
            last - floor + 1
        );
    }
    Ok(None)
}

/// Diffs the read models (Redis and the graph) against the event store, each
/// up to its own checkpoint; fails if either disagrees. Works while the
/// projectors run (see `projections::verify`).
pub async fn verify(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect_database(settings).await?;
    let store = EventStore::new(pool.clone());
    let redis = connect_redis(settings).await?;
    let graph = connect_graph(settings).await?;

    let mut summaries = Vec::new();
    let mut disagreeing = Vec::new();
    let mut report = |name: &'static str,
                      namespace: &str,
                      entities: &str,
                      found: projections::verify::Confirmed| {
        for difference in &found.differences {
            println!("{name}: {difference}");
        }
        let skipped = if found.skipped > 0 {
            format!(
                "; {} {entities} changed after it, not compared",
                found.skipped
            )
        } else {
            String::new()
        };
        let moving = if found.transient > 0 {
            format!(
                "; {} more difference(s) seen once, not confirmed",
                found.transient
            )
        } else {
            String::new()
        };
        summaries.push(format!(
            "{name} ({namespace}): {} difference(s) up to position {}{skipped}{moving}",
            found.differences.len(),
            found.until
        ));
        if !found.differences.is_empty() {
            disagreeing.push(name);
        }
    };

    let found = projections::verify::verify_redis_confirmed(&store, &redis)
        .await
        .context("verifying the Redis read model")?;
    report("redis", &settings.redis_prefix, "hash(es)", found);

    let found = projections::verify::verify_graph_confirmed(&store, &graph)
        .await
        .context("verifying the graph read model")?;
    let database = graph
        .database(std::time::Duration::ZERO)
        .await
        .context("resolving the graph's active database")?;
    report("graph", &format!("database {database}"), "node(s)", found);

    for summary in &summaries {
        println!("{summary}");
    }
    pool.close().await;
    anyhow::ensure!(
        disagreeing.is_empty(),
        "read model(s) disagreeing with the event store: {}",
        disagreeing.join(", ")
    );
    Ok(())
}

/// Runs every role in one process: migrations, the relay, the projectors
/// and, optionally, the simulator.
pub async fn run_all(settings: &Settings, args: AllArgs) -> anyhow::Result<()> {
    let pool = migrated_pool(settings).await?;
    let nats = connect_nats(settings).await?;
    let store = EventStore::new(pool.clone());
    let workers = crate::shutdown::Workers::default();
    let shutdown = crate::shutdown::on_signal(workers.clone());
    // Wakes relays in other processes (e.g. a standby) on our commits.
    let notifier = store.spawn_commit_notifier(shutdown.clone());

    let relay = Relay::new(store.clone(), nats.clone(), settings.relay_config());
    workers.add("relay", relay.in_hand());
    relay
        .ensure_stream()
        .await
        .context("ensuring the JetStream stream exists")?;
    let relay_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    tracing::info!(stream = %settings.jetstream_stream, "relay started");

    // The API's probes cover every dependency, and it computes the
    // projections' lag at scrape time.
    let mut probes = crate::probes::Probes::default();
    let projectors = spawn_projectors(
        settings,
        &store,
        &nats,
        None,
        &shutdown,
        &workers,
        &mut probes,
    )
    .await?;
    let api = start_api(settings, &store, &nats, &shutdown).await?;
    let metrics = start_metrics(settings, &shutdown).await?;

    let simulation = args.simulate.then(|| {
        let handler = CommandHandler::new(store.clone(), settings.handler_config());
        let shutdown = shutdown.clone();
        let sim = args.simulation.clone();
        tokio::spawn(async move { crate::simulate::drive(handler, sim, shutdown).await })
    });

    shutdown.cancelled().await;
    let stop = async {
        if let Some(simulation) = simulation {
            match simulation.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!("simulator failed: {error:#}"),
                Err(error) => tracing::error!(%error, "simulator task panicked"),
            }
        }
        for projector in projectors {
            match projector.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!("{error}"),
                Err(error) => tracing::error!(%error, "a projector task panicked"),
            }
        }
        match api.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the API server failed"),
            Err(error) => tracing::error!(%error, "the API task panicked"),
        }
        crate::shutdown::quiesce().await;
        join_metrics(metrics).await;
        let relay_result = relay_task.await;
        let _ = notifier.await;
        flush_nats(&nats).await;
        pool.close().await;
        relay_result
    };
    crate::shutdown::drain(&shutdown, settings.shutdown_deadline(), &workers, stop)
        .await?
        .context("joining the relay task")
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    /// The server task; ends after `shutdown` once connections drained.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Its shared subscription executions.
    pub hub: crate::ws::Hub,
}

/// Starts the GraphQL API on `settings.api.api_listen` until `shutdown`.
pub async fn start_api(
    settings: &Settings,
    store: &EventStore,
    nats: &async_nats::Client,
    shutdown: &CancellationToken,
) -> anyhow::Result<ApiServer> {
    crate::metrics::install();
    let auth = settings
        .api
        .authenticator()
        .context("configuring bearer-token verification")?;
    let redis = connect_redis(settings).await?;
    let graph = connect_graph(settings).await?;
    // Readers follow replays of the Redis model (a new active generation).
    tokio::spawn({
        let redis = redis.clone();
        let shutdown = shutdown.clone();
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
    });
    let limits = settings.api.limits();
    let feed = crate::graphql::subscriptions::Feed::start(
        store.clone(),
        redis.clone(),
        &settings.redis_url,
        limits.subscriber_buffer,
        shutdown.clone(),
    )
    .context("starting the subscriptions' change feed")?;
    let services = crate::graphql::Services {
        store: store.clone(),
        handler: CommandHandler::new(store.clone(), settings.handler_config()),
        redis,
        graph,
        feed,
        limits,
    };
    let schema = crate::graphql::schema(services.clone());
    let state = std::sync::Arc::new(crate::server::AppState {
        hub: crate::ws::Hub::new(schema.clone(), services.feed.buffer()),
        schema,
        documents: Default::default(),
        auth,
        services,
        nats: nats.clone(),
        config: settings.api.server_config(),
        shutdown: shutdown.clone(),
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
    tokio::spawn(
        crate::probes::Probes {
            postgres: Some(store.pool().clone()),
            nats: Some(nats.clone()),
            redis: Some(state.services.redis.clone()),
            graph: Some(state.services.graph.clone()),
            projections: Vec::new(),
        }
        .run(shutdown.clone()),
    );
    let router = crate::server::router(state)
        .layer(axum::middleware::from_fn(crate::shutdown::track_request));
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    tracing::info!(%addr, "GraphQL API listening: http://{addr}/ (GraphiQL), /graphql, /graphql/ws");
    Ok(ApiServer { addr, task, hub })
}

/// Runs the API alone until a signal.
pub async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect_database(settings).await?;
    let nats = connect_nats(settings).await?;
    let store = EventStore::new(pool.clone());
    let workers = crate::shutdown::Workers::default();
    let shutdown = crate::shutdown::on_signal(workers.clone());
    // Wakes the relay (in another process) on the mutations' commits.
    let notifier = store.spawn_commit_notifier(shutdown.clone());
    let api = start_api(settings, &store, &nats, &shutdown).await?;
    let metrics = start_metrics(settings, &shutdown).await?;
    let run = async {
        let served = api.task.await;
        crate::shutdown::quiesce().await;
        join_metrics(metrics).await;
        let _ = notifier.await;
        pool.close().await;
        served
    };
    crate::shutdown::drain(&shutdown, settings.shutdown_deadline(), &workers, run)
        .await?
        .context("joining the API task")?
        .context("serving the API")
}

/// Prints a token for local use.
pub fn token(settings: &Settings, args: &crate::settings::TokenArgs) -> anyhow::Result<()> {
    let auth = settings
        .api
        .authenticator()
        .context("minting needs the key the API verifies with")?;
    let token = auth
        .mint(&args.subject, &args.tenant, &args.roles, args.ttl)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{token}");
    Ok(())
}

//! `neurectomy status`: the relay's and each projection's checkpoint and
//! lag, each part within its own deadline.

use std::time::Duration;

use anyhow::Context as _;
use commands::EventStore;

use crate::settings::Settings;
use crate::startup::connect;

/// Prints the relay's and the projections' checkpoints and lag.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    use projections::ReadModel as _;
    // Each part answers within its own deadline: status is what an operator
    // runs when something is down, so a dependency that hangs is reported
    // as such, not waited for.
    let postgres = async {
        let pool = connect::connect_database(settings).await?;
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
            let lag = store.lag(position).await?;
            println!(
                "relay {}: published up to position {position} (JetStream sequence {sequence}), {lag} event(s) behind",
                settings.jetstream_stream
            );
        }
        Ok(None) => println!("relay {}: nothing published yet", settings.jetstream_stream),
        Err(error) => println!("relay {}: unknown ({error:#})", settings.jetstream_stream),
    }
    // A projection that cannot be reached is reported, not fatal.
    if settings.jetstream_partitions > 1 {
        print_partitions(&store, settings, "redis").await;
        print_partitions(&store, settings, "graph").await;
        store.pool().close().await;
        return Ok(());
    } else {
        let redis = async { Ok(connect::connect_redis(settings).await?.checkpoint().await?) };
        let redis = within("Redis", redis).await;
        print_projection(&store, "redis", &settings.redis_prefix, redis).await?;
        print_lease(&store, settings, "redis").await;
    }
    let graph = async {
        let model = connect::connect_graph(settings).await?;
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
    print_lease(&store, settings, "graph").await;
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
            let lag = store.lag(checkpoint).await?;
            println!(
                "projection {name} ({namespace}): checkpoint {checkpoint}, {lag} event(s) behind"
            );
        }
        Err(error) => println!("projection {name} ({namespace}): unknown ({error:#})"),
    }
    Ok(())
}

/// One `status` line: who holds the projection's lease (the process that
/// applies it; any other `project` process stands by).
async fn print_lease(store: &EventStore, settings: &Settings, name: &str) {
    let leases = projections::Leases::new(
        store.pool().clone(),
        format!("{}/{name}", settings.jetstream_stream),
        settings.lease_config(),
    );
    let holders = leases.holders().await;
    print_holder(holders.as_ref().map(|holders| holders.first()));
}

/// The `lease:` line of a projection or partition.
fn print_holder(holder: Result<Option<&projections::LeaseHolder>, &projections::LeaseError>) {
    match holder {
        Ok(Some(h)) if h.live => {
            println!("  lease: held by {} (fencing token {})", h.owner, h.token)
        }
        Ok(Some(h)) => println!(
            "  lease: free (expired or released; last held by {}, fencing token {})",
            h.owner, h.token
        ),
        Ok(None) => println!("  lease: never taken (no `project` process has run it)"),
        Err(error) => println!("  lease: unknown ({error})"),
    }
}

/// The `status` lines of `projection` (`redis` or `graph`) projected in
/// partitions: one per partition (checkpoint, lag, state) with who holds
/// its lease.
async fn print_partitions(store: &EventStore, settings: &Settings, projection: &str) {
    let graph = projection == "graph";
    let views = async {
        let reports = connect::connect_redis(settings).await?;
        if graph {
            let model = connect::connect_graph(settings).await?;
            let database = model.database(Duration::ZERO).await?;
            let views =
                projections::redis::health::graph_partition_views(&model, &reports, store).await?;
            Ok((format!("database {database}"), views))
        } else {
            let views = projections::redis::health::partition_views(&reports, store).await?;
            Ok((settings.redis_prefix.clone(), views))
        }
    };
    let what = if graph { "the graph or Redis" } else { "Redis" };
    let views: anyhow::Result<_> = within(what, views).await;
    let leases = projections::Leases::new(
        store.pool().clone(),
        format!("{}/{projection}", settings.jetstream_stream),
        settings.lease_config(),
    );
    let holders = leases.holders().await;
    let (namespace, views) = match views {
        Ok(views) => views,
        Err(error) => {
            let namespace = if graph {
                format!("database {}", settings.graph_database)
            } else {
                settings.redis_prefix.clone()
            };
            println!(
                "projection {projection} ({namespace}, {} partitions): unknown ({error:#})",
                settings.jetstream_partitions
            );
            return;
        }
    };
    for view in views {
        let lag = if view.lag_exact {
            format!("{} event(s) behind", view.lag)
        } else {
            format!("at most {} event(s) behind", view.lag)
        };
        println!(
            "projection {} ({namespace}): checkpoint {}, {lag}, {}",
            view.name, view.checkpoint, view.report.state
        );
        print_holder(holders.as_ref().map(|holders| {
            holders
                .iter()
                .find(|h| u32::try_from(h.partition).ok() == Some(view.partition))
        }));
    }
}

/// Messages `status` walks back past (foreign or deleted) to find the
/// relay's last one.
const STATUS_WALK: u64 = 1_000;

/// Position and sequence of the last message the relay published: the last
/// one carrying its headers, at most [`STATUS_WALK`] below the stream's last
/// (anything else published on its subjects is passed over).
async fn relay_position(settings: &Settings) -> anyhow::Result<Option<(i64, u64)>> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let nats = connect::connect_nats(settings).await?;
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

//! `neurectomy verify`: fold every stream and diff against the read models.

use anyhow::Context as _;
use commands::EventStore;

use crate::settings::Settings;
use crate::startup::connect;

/// Diffs the read models (Redis and the graph) against the event store, each
/// up to its own checkpoint; fails if either disagrees. Works while the
/// projectors run (see `projections::verify`).
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect::connect_database(settings).await?;
    let store = EventStore::new(pool.clone());
    let redis = connect::connect_redis(settings).await?;
    let graph = connect::connect_graph(settings).await?;

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

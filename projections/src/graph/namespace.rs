//! Which database holds the graph read model: the home database, or the
//! one a replay built and pointed the home database at (see the module docs
//! of [`super`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use neo4rs::query;

use super::{collect, GraphModel, PROJECTION};
use crate::model::ApplyError;

/// The pointer node's label (in the home database).
const POINTER_LABEL: &str = "ReadModel";

/// Nodes deleted per transaction when a namespace is cleared in place.
const CLEAR_CHUNK: i64 = 5_000;

/// The resolved pointer, shared by the clones of one model.
#[derive(Debug)]
pub(super) struct Namespace {
    home: String,
    /// A replay's target: this database, whatever the pointer says.
    pinned: Option<String>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The database the pointer named when last read.
    resolved: String,
    /// When it was read (`None`: never).
    at: Option<Instant>,
    /// The database the projector last read its checkpoint from or wrote to.
    writing: Option<String>,
}

impl Namespace {
    pub(super) fn new(home: &str, pinned: Option<String>) -> Self {
        Self {
            home: home.to_owned(),
            state: Mutex::new(State {
                resolved: pinned.clone().unwrap_or_else(|| home.to_owned()),
                at: None,
                writing: None,
            }),
            pinned,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding the lock cannot leave the state torn (plain
        // assignments), so a poisoned lock is used as is.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut state)
    }

    pub(super) fn set_writing(&self, database: &str) {
        self.with(|s| s.writing = Some(database.to_owned()));
    }
}

impl GraphModel {
    /// The home database (the configured one, which holds the pointer).
    pub fn home_database(&self) -> &str {
        &self.namespace.home
    }

    /// The database the model reads and writes, resolving the pointer when
    /// the cached value is older than `max_age`.
    pub async fn database(&self, max_age: Duration) -> Result<String, neo4rs::Error> {
        if let Some(pinned) = &self.namespace.pinned {
            return Ok(pinned.clone());
        }
        let cached = self.namespace.with(|s| {
            s.at.filter(|at| at.elapsed() < max_age)
                .map(|_| s.resolved.clone())
        });
        if let Some(database) = cached {
            return Ok(database);
        }
        let database = self
            .pointer()
            .await?
            .unwrap_or_else(|| self.namespace.home.clone());
        self.namespace.with(|s| {
            s.resolved.clone_from(&database);
            s.at = Some(Instant::now());
        });
        Ok(database)
    }

    /// The checkpoint readers see (the database the pointer names, as
    /// resolved for reads). Of a model projected in partitions: the lowest
    /// partition checkpoint (a partition's checkpoint is the position of
    /// the last event of the partition applied, so this is a lower bound of
    /// what the whole model has applied; 0 while a partition has none).
    pub async fn read_checkpoint(&self) -> Result<i64, neo4rs::Error> {
        if self.config.partitions > 1 {
            let each = self.partition_checkpoints().await?;
            return Ok(each.into_iter().map(|c| c.unwrap_or(0)).min().unwrap_or(0));
        }
        let rows = self
            .bounded("reading the checkpoint", async {
                let mut txn = self.begin().await?;
                let rows = collect(&mut txn, super::write::checkpoint_query(PROJECTION)).await?;
                super::finish(txn).await;
                Ok(rows)
            })
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<i64>("position").ok())
            .unwrap_or(0))
    }

    /// Every partition's checkpoint (`None`: none stored yet), partition
    /// `k` at index `k`, in one query; one entry, the model's checkpoint,
    /// when it is not projected in partitions.
    pub async fn partition_checkpoints(&self) -> Result<Vec<Option<i64>>, neo4rs::Error> {
        let partitions = self.config.partitions.max(1);
        let names: Vec<String> = if partitions > 1 {
            (0..partitions).map(super::partition_name).collect()
        } else {
            vec![PROJECTION.to_owned()]
        };
        let rows = self
            .bounded("reading the partitions' checkpoints", async {
                let mut txn = self.begin().await?;
                let rows = collect(
                    &mut txn,
                    query(
                        "MATCH (c:Checkpoint) WHERE c.projection IN $names \
                         RETURN c.projection AS projection, c.position AS position",
                    )
                    .param("names", names.clone()),
                )
                .await?;
                super::finish(txn).await;
                Ok(rows)
            })
            .await?;
        let mut each = vec![None; names.len()];
        for row in rows {
            let (Ok(name), Ok(position)) =
                (row.get::<String>("projection"), row.get::<i64>("position"))
            else {
                continue;
            };
            if let Some(k) = names.iter().position(|n| *n == name) {
                each[k] = Some(position);
            }
        }
        Ok(each)
    }

    /// The checkpoint a reader of `tenant` waits for: the model's, or, when
    /// it is projected in partitions, that of the tenant's partition (the
    /// position of the last event of that partition applied), with the
    /// partition (0 when not split).
    pub async fn read_checkpoint_of(&self, tenant: &str) -> Result<(u32, i64), neo4rs::Error> {
        let partitions = self.config.partitions;
        if partitions <= 1 {
            return Ok((0, self.read_checkpoint().await?));
        }
        let partition = commands::partition::of(tenant, partitions);
        let name = super::partition_name(partition);
        let rows = self
            .bounded("reading a partition's checkpoint", async {
                let mut txn = self.begin().await?;
                let rows = collect(&mut txn, super::write::checkpoint_query(&name)).await?;
                super::finish(txn).await;
                Ok(rows)
            })
            .await?;
        let checkpoint = rows
            .first()
            .and_then(|r| r.get::<i64>("position").ok())
            .unwrap_or(0);
        Ok((partition, checkpoint))
    }

    /// What the pointer in the home database names, if there is one.
    async fn pointer(&self) -> Result<Option<String>, neo4rs::Error> {
        let mut txn = self
            .graph()
            .start_txn_on(self.namespace.home.as_str())
            .await?;
        let rows = collect(
            &mut txn,
            query(&format!(
                "MATCH (r:{POINTER_LABEL} {{projection: $projection}}) RETURN r.database AS database"
            ))
            .param("projection", PROJECTION),
        )
        .await?;
        super::finish(txn).await;
        Ok(rows.first().and_then(|r| r.get::<String>("database").ok()))
    }

    /// Where the projector's next batch goes: the pointer resolved now. When
    /// it names another database than the last batch went to, a replay has
    /// switched the model: [`ApplyError::Moved`], so the projector re-reads
    /// its checkpoint there.
    pub(super) async fn database_for_batch(&self) -> Result<String, ApplyError> {
        let database =
            self.database(Duration::ZERO)
                .await
                .map_err(|source| ApplyError::Unavailable {
                    store: "the graph",
                    doing: "resolving the graph's namespace".to_owned(),
                    source: Box::new(source),
                })?;
        let previous = self.namespace.with(|s| s.writing.replace(database.clone()));
        match previous {
            Some(previous) if previous != database => Err(ApplyError::Moved {
                store: "graph",
                reason: format!("the read model moved from database {previous} to {database}"),
            }),
            _ => Ok(database),
        }
    }

    /// Points the home database at this model's database (a replay's
    /// target, once caught up); returns the database it named before. One
    /// write: readers and the projector move at their next resolution.
    pub async fn activate(&self) -> Result<String, neo4rs::Error> {
        let target = self.database(Duration::ZERO).await?;
        let mut txn = self
            .graph()
            .start_txn_on(self.namespace.home.as_str())
            .await?;
        let rows = collect(
            &mut txn,
            query(&format!(
                "MERGE (r:{POINTER_LABEL} {{projection: $projection}}) \
                 WITH r, r.database AS previous \
                 SET r.database = $database \
                 RETURN previous"
            ))
            .param("projection", PROJECTION)
            .param("database", target.as_str()),
        )
        .await?;
        txn.commit().await?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<String>("previous").ok())
            .unwrap_or_else(|| self.namespace.home.clone()))
    }

    /// Deletes every node of the read model from `database` but the
    /// pointer, in chunks (an abandoned namespace that is the home
    /// database, which cannot be dropped). Returns the nodes deleted.
    pub async fn clear_database(&self, database: &str) -> Result<u64, neo4rs::Error> {
        let mut deleted = 0u64;
        loop {
            let mut txn = self.graph().start_txn_on(database).await?;
            let rows = collect(
                &mut txn,
                query(&format!(
                    "MATCH (n) WHERE NOT n:{POINTER_LABEL} WITH n LIMIT $chunk \
                     DETACH DELETE n RETURN count(*) AS deleted"
                ))
                .param("chunk", CLEAR_CHUNK),
            )
            .await?;
            txn.commit().await?;
            let chunk = rows
                .first()
                .and_then(|r| r.get::<i64>("deleted").ok())
                .unwrap_or(0);
            deleted += u64::try_from(chunk).unwrap_or(0);
            if chunk < CLEAR_CHUNK {
                return Ok(deleted);
            }
        }
    }
}

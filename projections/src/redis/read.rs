//! Reads of the Redis read model, for the API: single entities, id lists
//! from the indexes, and pages of entities, each scoped by tenant (an
//! entity of another tenant reads as absent).

use std::collections::HashMap;

use domain::TaskStatus;

use super::RedisModel;

/// A hash as stored: field → value.
pub type Fields = HashMap<String, String>;

/// Agent statuses, as stored in the index keys.
const AGENT_STATUSES: [&str; 4] = ["active", "paused", "failed", "retired"];

/// Which entity a hash holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    /// `agent:<id>`.
    Agent,
    /// `task:<id>`.
    Task,
    /// `workflow:<id>`.
    Workflow,
}

impl Entity {
    fn prefix(self) -> &'static str {
        match self {
            Entity::Agent => "agent",
            Entity::Task => "task",
            Entity::Workflow => "workflow",
        }
    }
}

impl RedisModel {
    /// The hash of one entity, if it exists and belongs to `tenant`.
    pub async fn entity(
        &self,
        entity: Entity,
        tenant: &str,
        id: &str,
    ) -> Result<Option<Fields>, redis::RedisError> {
        let mut conn = self.connection();
        let fields: Fields = redis::cmd("HGETALL")
            .arg(self.key_of(tenant, &format!("{}:{id}", entity.prefix())))
            .query_async(&mut conn)
            .await?;
        Ok(Some(fields).filter(|f| f.get("tenant").is_some_and(|t| t == tenant)))
    }

    /// Only `names` of an entity's hash (and whether it is the tenant's),
    /// in one `HMGET`: `None` if absent or another tenant's.
    pub async fn entity_fields(
        &self,
        entity: Entity,
        tenant: &str,
        id: &str,
        names: &[&str],
    ) -> Result<Option<Fields>, redis::RedisError> {
        let mut conn = self.connection();
        let mut values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key_of(tenant, &format!("{}:{id}", entity.prefix())))
            .arg("tenant")
            .arg(names)
            .query_async(&mut conn)
            .await?;
        let mut values = values.drain(..);
        if values.next().flatten().as_deref() != Some(tenant) {
            return Ok(None);
        }
        Ok(Some(
            names
                .iter()
                .zip(values)
                .filter_map(|(name, value)| Some(((*name).to_owned(), value?)))
                .collect(),
        ))
    }

    /// The hashes of `ids` in order (absent or another tenant's: `None`),
    /// in one round trip.
    pub async fn entities(
        &self,
        entity: Entity,
        tenant: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Fields>>, redis::RedisError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL")
                .arg(self.key_of(tenant, &format!("{}:{id}", entity.prefix())));
        }
        let mut conn = self.connection();
        let rows: Vec<Fields> = pipe.query_async(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|f| Some(f).filter(|f| f.get("tenant").is_some_and(|t| t == tenant)))
            .collect())
    }

    /// Ids of the tenant's agents with `status` and `capability` (either
    /// optional), sorted.
    pub async fn agent_ids(
        &self,
        tenant: &str,
        status: Option<&str>,
        capability: Option<&str>,
    ) -> Result<Vec<String>, redis::RedisError> {
        let mut conn = self.connection();
        let by_status = |s: &str| self.key_of(tenant, &format!("agents:{tenant}:status:{s}"));
        let mut ids: Vec<String> = match (status, capability) {
            (Some(status), Some(cap)) => {
                redis::cmd("SINTER")
                    .arg(by_status(status))
                    .arg(self.key_of(tenant, &format!("agents:{tenant}:capability:{cap}")))
                    .query_async(&mut conn)
                    .await?
            }
            (Some(status), None) => {
                redis::cmd("SMEMBERS")
                    .arg(by_status(status))
                    .query_async(&mut conn)
                    .await?
            }
            (None, Some(cap)) => {
                redis::cmd("SMEMBERS")
                    .arg(self.key_of(tenant, &format!("agents:{tenant}:capability:{cap}")))
                    .query_async(&mut conn)
                    .await?
            }
            (None, None) => {
                let keys: Vec<String> = AGENT_STATUSES.iter().map(|s| by_status(s)).collect();
                redis::cmd("SUNION")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await?
            }
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// Ids of a workflow's tasks in `state` (or in any state), sorted; the
    /// workflow is `tenant`'s.
    pub async fn task_ids(
        &self,
        tenant: &str,
        workflow: &str,
        state: Option<&str>,
    ) -> Result<Vec<String>, redis::RedisError> {
        let mut conn = self.connection();
        let key = |s: &str| self.key_of(tenant, &format!("workflow:{workflow}:tasks:{s}"));
        let mut ids: Vec<String> = match state {
            Some(state) => {
                redis::cmd("SMEMBERS")
                    .arg(key(state))
                    .query_async(&mut conn)
                    .await?
            }
            None => {
                let keys: Vec<String> = TaskStatus::ALL.iter().map(|s| key(s.as_str())).collect();
                redis::cmd("SUNION")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await?
            }
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// The stored checkpoint, or `None` when there is none: the model is
    /// empty (nothing applied yet, or Redis lost its data). Of a model
    /// projected in partitions: the lowest partition checkpoint, `None`
    /// when no partition has one.
    pub async fn checkpoint_if_any(&self) -> Result<Option<i64>, redis::RedisError> {
        let partitions = self.config.partitions;
        if partitions <= 1 {
            let mut conn = self.connection();
            return redis::cmd("GET")
                .arg(self.key("checkpoint"))
                .query_async(&mut conn)
                .await;
        }
        let each = self.partition_checkpoints().await?;
        if each.iter().all(Option::is_none) {
            return Ok(None);
        }
        Ok(each.into_iter().map(|c| c.unwrap_or(0)).min())
    }

    /// The checkpoint readers see (the active generation's), without
    /// resolving the generation again (0: none). Of a model projected in
    /// partitions: the lowest partition checkpoint (a partition's checkpoint
    /// is the position of the last event of the partition applied, so this
    /// is a lower bound of what the whole model has applied).
    pub async fn read_checkpoint(&self) -> Result<i64, redis::RedisError> {
        Ok(self.checkpoint_if_any().await?.unwrap_or(0))
    }

    /// Every partition's checkpoint (`None`: none stored yet), partition
    /// `k` at index `k`, in one `MGET`; one entry, the model's checkpoint,
    /// when it is not projected in partitions.
    pub async fn partition_checkpoints(&self) -> Result<Vec<Option<i64>>, redis::RedisError> {
        let partitions = self.config.partitions;
        let mut conn = self.connection();
        if partitions <= 1 {
            let checkpoint: Option<i64> = redis::cmd("GET")
                .arg(self.key("checkpoint"))
                .query_async(&mut conn)
                .await?;
            return Ok(vec![checkpoint]);
        }
        let keys: Vec<String> = (0..partitions)
            .map(|k| self.key_in(k, &format!("checkpoint:p{k}")))
            .collect();
        if self.clustered() {
            // One slot per partition: one GET each.
            let mut each = Vec::with_capacity(keys.len());
            for key in keys {
                let checkpoint: Option<i64> =
                    redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                each.push(checkpoint);
            }
            return Ok(each);
        }
        redis::cmd("MGET").arg(keys).query_async(&mut conn).await
    }

    /// The checkpoint a reader of `tenant` waits for: the model's, or, when
    /// it is projected in partitions, that of the tenant's partition (the
    /// position of the last event of that partition applied), with the
    /// partition (0 when not split).
    pub async fn read_checkpoint_of(&self, tenant: &str) -> Result<(u32, i64), redis::RedisError> {
        let partitions = self.config.partitions;
        if partitions <= 1 {
            return Ok((0, self.read_checkpoint().await?));
        }
        let partition = commands::partition::of(tenant, partitions);
        let mut conn = self.connection();
        let checkpoint: Option<i64> = redis::cmd("GET")
            .arg(self.key_in(partition, &format!("checkpoint:p{partition}")))
            .query_async(&mut conn)
            .await?;
        Ok((partition, checkpoint.unwrap_or(0)))
    }
}

//! Test isolation for the Redis read model: a key prefix of its own per
//! test, every key under it deleted when the fixture is dropped. Fails with
//! the command that starts Redis when it is unreachable; never skips.
//! [`dump_model`] renders a whole model (every key of its generation with
//! its contents) so that a model built through faults can be compared with
//! a clean rebuild under another prefix.
//!
//! The Redis URL comes from `NEURECTOMY_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`).

use uuid::Uuid;

use crate::redis::{RedisModel, RedisModelConfig};

/// How to start Redis on a development machine.
pub const START_REDIS: &str = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no   (or: scripts/services.sh up)";

/// The Redis URL tests use.
pub fn redis_url() -> String {
    std::env::var("NEURECTOMY_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A Redis read model under a unique prefix, wiped on drop.
#[derive(Debug)]
pub struct TestRedis {
    /// The model.
    pub model: RedisModel,
    /// Its prefix.
    pub prefix: String,
    /// The URL.
    pub url: String,
}

impl TestRedis {
    /// Connects and picks a unique prefix.
    pub async fn create() -> Result<Self, String> {
        Self::create_at(&redis_url()).await
    }

    /// Like [`TestRedis::create`] on the Redis at `url` (e.g. a private
    /// server a test starts and stops).
    pub async fn create_at(url: &str) -> Result<Self, String> {
        let url = url.to_owned();
        let prefix = format!("test:{}:", Uuid::new_v4().simple());
        let config = RedisModelConfig {
            prefix: prefix.clone(),
            ..RedisModelConfig::default()
        };
        let connect = RedisModel::connect(&url, config);
        let model = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
            .await
            .map_err(|_| {
                format!("Redis at {url} did not answer within 5 s. Start it with: {START_REDIS}")
            })?
            .map_err(|e| {
                format!("Redis at {url} is not reachable ({e}). Start it with: {START_REDIS}")
            })?;
        Ok(Self { model, prefix, url })
    }

    /// A model under a unique prefix on the Redis Cluster whose seed nodes
    /// `urls` lists (comma-separated), projected in `partitions`
    /// partitions. Nothing is wiped on drop there: the test's cluster is
    /// its own and goes with it.
    pub async fn on_cluster(urls: &str, partitions: u32) -> Result<Self, String> {
        let prefix = format!("test:{}:", Uuid::new_v4().simple());
        let config = RedisModelConfig {
            prefix: prefix.clone(),
            partitions,
            cluster: true,
            ..RedisModelConfig::default()
        };
        let model = RedisModel::connect(urls, config)
            .await
            .map_err(|e| format!("the Redis Cluster at {urls} is not reachable ({e})"))?;
        Ok(Self {
            model,
            prefix,
            url: urls.to_owned(),
        })
    }

    /// Every key under the prefix with its value rendered as text (for
    /// before/after comparisons of the whole read model).
    pub async fn dump(
        &self,
    ) -> Result<std::collections::BTreeMap<String, String>, redis::RedisError> {
        dump(&self.url, &self.prefix).await
    }

    /// The model's whole contents, keys relative to its generation (see
    /// [`dump_model`]).
    pub async fn dump_model(
        &self,
    ) -> Result<std::collections::BTreeMap<String, String>, redis::RedisError> {
        dump_model(&self.model).await
    }

    /// Deletes every key under the prefix (simulates a flushed Redis).
    pub async fn wipe(&self) -> Result<(), redis::RedisError> {
        wipe(&self.url, &self.prefix).await
    }
}

async fn keys(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    prefix: &str,
) -> Result<Vec<String>, redis::RedisError> {
    let mut cursor: u64 = 0;
    let mut all = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        all.extend(batch);
        if next == 0 {
            return Ok(all);
        }
        cursor = next;
    }
}

async fn wipe(url: &str, prefix: &str) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for chunk in keys(&mut conn, prefix).await?.chunks(500) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(())
}

async fn dump(
    url: &str,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, String>, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut out = std::collections::BTreeMap::new();
    for key in keys(&mut conn, prefix).await? {
        let value = render(&mut conn, &key).await?;
        out.insert(key, value);
    }
    Ok(out)
}

/// A whole Redis read model as text, for comparing two models built apart
/// (a projector's after faults, and a clean rebuild into a prefix of its
/// own): every key under the model's prefix with its full contents —
/// hashes field by field, index sets and the recently-active sorted set
/// member by member (with scores), each change feed entry by entry (id and
/// fields, in order), strings such as the checkpoint.
///
/// Keys of the active generation are named relative to it (`agent:<id>`,
/// `feed:<tenant>`, `checkpoint`), so models under different prefixes or
/// generations compare equal when they hold the same. Two keys under the
/// prefix are not the model's and are left out: the `active` pointer, and
/// the projectors' status reports `projector:<name>` (a `project` process
/// writes them for `/readyz`). Any other key — another generation's, or one
/// the model should never have written — is kept as `outside the
/// generation: <key without the prefix>`, so that it shows up as a
/// difference. A generation's `fence` (the lease token its last batch was
/// written under) is bookkeeping of whoever wrote, not content, and is left
/// out too.
pub async fn dump_model(
    model: &RedisModel,
) -> Result<std::collections::BTreeMap<String, String>, redis::RedisError> {
    let generation = model.refresh().await?;
    let mut conn = model.connection();
    let prefix = model.prefix();
    let pointer = model.pointer_key();
    let mut out = std::collections::BTreeMap::new();
    for key in keys(&mut conn, prefix).await? {
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        if key == pointer || rest.starts_with(crate::redis::health::REPORT_KEY) {
            continue;
        }
        let name = match rest
            .strip_prefix(generation.as_str())
            .and_then(|r| r.strip_prefix(':'))
        {
            Some(name) => name.to_owned(),
            None => format!("outside the generation: {rest}"),
        };
        if name == "fence" || name.starts_with("fence:p") {
            continue;
        }
        let value = render(&mut conn, &key).await?;
        out.insert(name, value);
    }
    Ok(out)
}

/// The contents of `key` as deterministic text (set members sorted, hash
/// fields by name, sorted sets and streams in their order).
async fn render(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    key: &str,
) -> Result<String, redis::RedisError> {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(conn).await?;
    Ok(match kind.as_str() {
        "hash" => {
            let v: std::collections::BTreeMap<String, String> =
                redis::cmd("HGETALL").arg(key).query_async(conn).await?;
            format!("{v:?}")
        }
        "set" => {
            let mut v: Vec<String> = redis::cmd("SMEMBERS").arg(key).query_async(conn).await?;
            v.sort();
            format!("{v:?}")
        }
        "zset" => {
            let v: Vec<(String, String)> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(conn)
                .await?;
            format!("{v:?}")
        }
        "stream" => {
            type Entry = (String, Vec<(String, String)>);
            let v: Vec<Entry> = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query_async(conn)
                .await?;
            format!("{v:?}")
        }
        "string" => {
            let v: Option<String> = redis::cmd("GET").arg(key).query_async(conn).await?;
            format!("{v:?}")
        }
        other => format!("a {other} (no key of the model has this type)"),
    })
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if self.model.clustered() {
            return;
        }
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        commands::testkit::clean_up(async move {
            let _ = wipe(&url, &prefix).await;
        });
    }
}

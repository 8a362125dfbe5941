//! Test isolation for the Redis read model: a key prefix of its own per
//! test, every key under it deleted when the fixture is dropped. Fails with
//! the command that starts Redis when it is unreachable; never skips.
//!
//! The Redis URL comes from `NEURECTOMY_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`).

use uuid::Uuid;

use crate::live::{LiveModel, LiveModelConfig};

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
    pub model: LiveModel,
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
        let config = LiveModelConfig {
            prefix: prefix.clone(),
            ..LiveModelConfig::default()
        };
        let connect = LiveModel::connect(&url, config);
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

    /// Every key under the prefix with its value rendered as text (for
    /// before/after comparisons of the whole read model).
    pub async fn dump(
        &self,
    ) -> Result<std::collections::BTreeMap<String, String>, redis::RedisError> {
        dump(&self.url, &self.prefix).await
    }

    /// Deletes every key under the prefix (simulates a flushed Redis).
    pub async fn wipe(&self) -> Result<(), redis::RedisError> {
        wipe(&self.url, &self.prefix).await
    }
}

async fn keys(
    conn: &mut redis::aio::MultiplexedConnection,
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
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
        let value = match kind.as_str() {
            "hash" => {
                let v: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                format!("{v:?}")
            }
            "set" => {
                let mut v: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                v.sort();
                format!("{v:?}")
            }
            "zset" => {
                let v: Vec<(String, String)> = redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await?;
                format!("{v:?}")
            }
            "stream" => {
                let v: redis::Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await?;
                format!("{v:?}")
            }
            _ => {
                let v: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                format!("{v:?}")
            }
        };
        out.insert(key, value);
    }
    Ok(out)
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        commands::testkit::clean_up(async move {
            let _ = wipe(&url, &prefix).await;
        });
    }
}

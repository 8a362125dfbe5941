//! The connection readers use: to a single Redis (a connection manager
//! that reconnects) or to a Redis Cluster (the cluster client, which routes
//! each command, and each single-slot pipeline, to the primary serving its
//! slot and follows the cluster's topology changes). Both run every command
//! within the model's timeouts.
//!
//! On a cluster every multi-key command and every pipeline must stay in one
//! hash slot: the model's keys carry their partition as a hash tag
//! (`{p<k>}`, see [`super::RedisModel::key_in`]), and what spans
//! partitions (the generation pointer with a checkpoint, the checkpoints of
//! all partitions) is asked key by key.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to a single Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum Connection {
    /// One Redis server (a reconnecting manager).
    Single(ConnectionManager),
    /// A Redis Cluster (the cluster client's connection).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The seed nodes of a cluster URL setting: comma-separated `redis://`
/// URLs (a cluster client learns the other nodes from any of them).
pub fn seeds(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `host:port` of the primary serving `slot`, from a `CLUSTER SLOTS`
/// answer (`None`: no range holds it).
pub fn primary_of_slot(slots: &Value, slot: i64) -> Option<(String, u16)> {
    let Value::Array(ranges) = slots else {
        return None;
    };
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let (Some(from), Some(to), Some(primary)) = (range.first(), range.get(1), range.get(2))
        else {
            continue;
        };
        let (Ok(from), Ok(to)) = (
            redis::from_redis_value::<i64>(from),
            redis::from_redis_value::<i64>(to),
        ) else {
            continue;
        };
        if !(from..=to).contains(&slot) {
            continue;
        }
        let Value::Array(node) = primary else {
            return None;
        };
        let host: String = redis::from_redis_value(node.first()?).ok()?;
        let port: u16 = redis::from_redis_value(node.get(1)?).ok()?;
        return Some((host, port));
    }
    None
}

/// Every primary's `host:port`, from a `CLUSTER SLOTS` answer.
pub fn primaries(slots: &Value) -> Vec<(String, u16)> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut found: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let Some(Value::Array(node)) = range.get(2) else {
            continue;
        };
        let host = node
            .first()
            .and_then(|h| redis::from_redis_value::<String>(h).ok());
        let port = node
            .get(1)
            .and_then(|p| redis::from_redis_value::<u16>(p).ok());
        if let (Some(host), Some(port)) = (host, port) {
            if !found.contains(&(host.clone(), port)) {
                found.push((host, port));
            }
        }
    }
    found
}

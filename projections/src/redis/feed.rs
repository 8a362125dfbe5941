//! Reading the change feeds: the stream `feed:<tenant>` of a generation
//! (see the key table of [`super`]), which the projector writes in the same
//! `MULTI/EXEC` as the state each entry describes, with the event's global
//! position as the entry id (`<position>-0`).
//!
//! A [`FeedReader`] reads on a connection of its own, since its `XREAD`
//! blocks for up to [`BLOCK`] and would hold up every command multiplexed
//! with it. Every reply is awaited for at most [`BLOCK`] plus the model's
//! response timeout: past that Redis is not answering, the read fails, and
//! the caller connects a new reader ([`FeedClient::connect`]), which
//! notices a Redis that is back at once. [`FeedWaker`] makes a blocked read
//! return early (`CLIENT UNBLOCK` from another connection), to re-issue it
//! over another set of feeds.
//!
//! The reader only reads and decodes. Which feeds to read, from where, and
//! what to do about a page that may have been trimmed or holds an entry the
//! projector did not write, is the caller's (the API's fan-out to
//! subscribers).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};

use super::RedisModel;

/// Entries read per feed and `XREAD`. A page this long may not reach the
/// end of what the feed holds (and the feed may have been trimmed past the
/// reader meanwhile).
pub const READ_COUNT: usize = 256;

/// How long one `XREAD` blocks when nothing arrives.
pub const BLOCK: Duration = Duration::from_secs(5);

/// What the key of a feed starts with, within a generation.
pub(super) const FEED_KEY: &str = "feed:";

/// Why reading a change feed failed.
#[derive(Debug, thiserror::Error)]
pub enum FeedReadError {
    /// The Redis URL does not parse.
    #[error("the Redis URL is invalid")]
    Url(#[source] redis::RedisError),
    /// Redis failed, is unreachable or did not answer in time; the reader's
    /// connection may be unusable: connect a new one.
    #[error("Redis failed while {doing}")]
    Redis {
        /// What the reader was doing.
        doing: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
}

fn failed(doing: impl Into<String>) -> impl FnOnce(redis::RedisError) -> FeedReadError {
    let doing = doing.into();
    move |source| FeedReadError::Redis { doing, source }
}

/// One entry of a change feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEntry {
    /// The entry id as stored.
    pub id: String,
    /// The global position the id names; `None` when the id is not one the
    /// projector writes (the entry came from elsewhere).
    pub position: Option<i64>,
    /// The event type (field `type`; empty if absent).
    pub event_type: String,
    /// The event's stream (field `stream_id`; empty if absent).
    pub stream_id: String,
    /// The event's data (field `data`; `null` if absent or not JSON).
    pub data: serde_json::Value,
    /// W3C `traceparent` of the event's projection; absent from entries of
    /// untraced changes (and older ones).
    pub traceparent: Option<String>,
}

impl FeedEntry {
    fn from_stream_id(entry: StreamId) -> Self {
        Self {
            position: entry_position(&entry.id),
            event_type: entry.get("type").unwrap_or_default(),
            stream_id: entry.get("stream_id").unwrap_or_default(),
            data: entry
                .get::<Vec<u8>>("data")
                .and_then(|d| serde_json::from_slice(&d).ok())
                .unwrap_or_default(),
            traceparent: entry.get("traceparent"),
            id: entry.id,
        }
    }
}

/// The entries one `XREAD` returned for one feed, in id order.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedPage {
    /// The feed's key.
    pub key: String,
    /// Its entries after the id the read started from, at most
    /// [`READ_COUNT`].
    pub entries: Vec<FeedEntry>,
}

/// Position of a feed entry id `<position>-0`.
fn entry_position(id: &str) -> Option<i64> {
    id.split_once('-').map_or(id, |(p, _)| p).parse().ok()
}

impl RedisModel {
    /// The key of `tenant`'s change feed in the current generation.
    pub fn feed_key(&self, tenant: &str) -> String {
        self.key_of(tenant, &format!("{FEED_KEY}{tenant}"))
    }
}

/// Opens the connections change feeds are read on. Cheap to clone.
#[derive(Clone)]
pub struct FeedClient {
    /// The client of the readers' own connections.
    client: redis::Client,
    /// On a Redis Cluster: the partition whose feeds are read, on the
    /// primary serving its slot (asked at every connection).
    partition: Option<u32>,
    /// The model whose feeds are read (its timeouts; its shared connection
    /// carries [`FeedWaker::wake`]).
    model: RedisModel,
}

impl std::fmt::Debug for FeedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedClient").finish_non_exhaustive()
    }
}

impl FeedClient {
    /// Readers of `model`'s feeds, on connections of their own to `url`
    /// (the Redis `model` is connected to).
    pub fn open(url: &str, model: RedisModel) -> Result<Self, FeedReadError> {
        let client = redis::Client::open(url).map_err(FeedReadError::Url)?;
        Ok(Self {
            client,
            partition: None,
            model,
        })
    }

    /// Readers of the feeds of `partition` of `model`, which is on a Redis
    /// Cluster: each connection goes to the primary serving the
    /// partition's slot (one `XREAD` may only name keys of one slot).
    pub fn for_partition(model: RedisModel, partition: u32) -> Self {
        Self {
            client: model.client.clone(),
            partition: Some(partition),
            model,
        }
    }

    /// Redis's host and port, when it is reached over TCP (with or
    /// without TLS); `None` for a Unix socket.
    pub fn tcp_address(&self) -> Option<(String, u16)> {
        match &self.client.get_connection_info().addr {
            redis::ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
            redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
            _ => None,
        }
    }

    /// Connects a reader: within the model's connect timeout, every reply
    /// within [`BLOCK`] plus its response timeout.
    pub async fn connect(&self) -> Result<FeedReader, FeedReadError> {
        let timeouts = self.model.config();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(timeouts.connect_timeout)
            .set_response_timeout(BLOCK + timeouts.response_timeout);
        let client =
            match self.partition {
                Some(partition) => self.model.partition_owner(partition).await.map_err(|e| {
                    FeedReadError::Redis {
                        doing: "finding the primary of the partition's feeds".to_owned(),
                        source: redis::RedisError::from((
                            redis::ErrorKind::IoError,
                            "no primary for the partition",
                            e.to_string(),
                        )),
                    }
                })?,
                None => self.client.clone(),
            };
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(failed("connecting the change-feed reader"))?;
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(failed("reading the reader's client id"))?;
        Ok(FeedReader {
            conn,
            id,
            model: self.model.clone(),
            node: self.partition.map(|_| client),
        })
    }
}

/// A change-feed reader on a connection of its own.
pub struct FeedReader {
    /// The reader's own connection.
    conn: MultiplexedConnection,
    /// Its client id, for `CLIENT UNBLOCK`.
    id: i64,
    /// The model whose shared connection wakes the reader.
    model: RedisModel,
    /// On a cluster: the reader's node, where `CLIENT UNBLOCK` must go.
    node: Option<redis::Client>,
}

impl std::fmt::Debug for FeedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedReader")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl FeedReader {
    /// What wakes this reader's blocked [`FeedReader::read`].
    pub fn waker(&self) -> FeedWaker {
        FeedWaker {
            model: self.model.clone(),
            id: self.id,
            node: self.node.clone(),
        }
    }

    /// One `XREAD` over `feeds` (key, and the position after which to
    /// read), blocking for up to [`BLOCK`], of at most [`READ_COUNT`]
    /// entries per feed. `None` when nothing arrived in time or the read
    /// was woken ([`FeedWaker::wake`]); otherwise a page per feed that has
    /// entries.
    pub async fn read(
        &mut self,
        feeds: &[(String, i64)],
    ) -> Result<Option<Vec<FeedPage>>, FeedReadError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        for (key, _) in feeds {
            cmd.arg(key);
        }
        for (_, after) in feeds {
            cmd.arg(format!("{after}-0"));
        }
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut self.conn)
            .await
            .map_err(failed("reading the change feeds"))?;
        Ok(reply.map(|reply| {
            reply
                .keys
                .into_iter()
                .map(|stream| FeedPage {
                    key: stream.key,
                    entries: stream
                        .ids
                        .into_iter()
                        .map(FeedEntry::from_stream_id)
                        .collect(),
                })
                .collect()
        }))
    }

    /// Position of the last entry of the feed `key` (0 if it is empty or
    /// absent).
    pub async fn last_position(&mut self, key: &str) -> Result<i64, FeedReadError> {
        let ids = self
            .one_id("XREVRANGE", key, "+", "-")
            .await
            .map_err(failed(format!("reading the end of {key}")))?;
        Ok(ids.as_deref().and_then(entry_position).unwrap_or(0))
    }

    /// Position of the first (oldest) entry of the feed `key`.
    pub async fn first_position(&mut self, key: &str) -> Result<Option<i64>, FeedReadError> {
        let ids = self
            .one_id("XRANGE", key, "-", "+")
            .await
            .map_err(failed(format!("reading the start of {key}")))?;
        Ok(ids.as_deref().and_then(entry_position))
    }

    /// The id of the first entry `command` (`XRANGE`, `XREVRANGE`) returns
    /// over `from`..`to`.
    async fn one_id(
        &mut self,
        command: &str,
        key: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<String>, redis::RedisError> {
        let ids: Vec<(String, Vec<(String, String)>)> = redis::cmd(command)
            .arg(key)
            .arg(from)
            .arg(to)
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await?;
        Ok(ids.into_iter().next().map(|(id, _)| id))
    }
}

/// Wakes a [`FeedReader`] blocked in [`FeedReader::read`], from the
/// model's shared connection. Cheap to clone.
#[derive(Clone)]
pub struct FeedWaker {
    /// The model whose shared connection sends `CLIENT UNBLOCK`.
    model: RedisModel,
    /// The reader's client id.
    id: i64,
    /// On a cluster: the reader's node (a client id is a node's own).
    node: Option<redis::Client>,
}

impl std::fmt::Debug for FeedWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedWaker")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl FeedWaker {
    /// Makes the reader's blocked read return `None` now. `false` when no
    /// read of the reader was blocked: the `CLIENT UNBLOCK` may have
    /// overtaken the `XREAD` it should unblock, so a caller that must wake
    /// the read retries until it lands or the read returns.
    pub async fn wake(&self) -> Result<bool, FeedReadError> {
        let mut unblock = redis::cmd("CLIENT");
        unblock.arg("UNBLOCK").arg(self.id);
        let unblocked: i64 = match &self.node {
            Some(node) => {
                let mut conn = node
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(failed("connecting to the change-feed reader's node"))?;
                unblock.query_async(&mut conn).await
            }
            None => {
                let mut conn = self.model.connection();
                unblock.query_async(&mut conn).await
            }
        }
        .map_err(failed("waking the change-feed reader"))?;
        Ok(unblocked == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::entry_position;

    #[test]
    fn entry_ids_name_positions() {
        assert_eq!(entry_position("42-0"), Some(42));
        assert_eq!(entry_position("42"), Some(42));
        assert_eq!(entry_position("x-0"), None);
    }
}

//! Deleting erased events' messages from the JetStream log: the relay
//! leader's part of an erasure (README, "Erasure").

use uuid::Uuid;

use super::{db, EraseError};
use crate::EventStore;

/// How often the relay leader looks for erasures to purge from JetStream.
pub const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Deletes from the JetStream log `stream` the messages of the events
/// erased by erasures the relay has published past (`published`: the last
/// position it published; an erasure after it might still race a batch
/// read before it), and marks them purged. The server overwrites a deleted
/// message (a secure erase); a projector that finds one missing reads the
/// store instead, which holds the digests. Returns the messages deleted.
pub async fn purge(
    store: &EventStore,
    stream: &async_nats::jetstream::stream::Stream,
    published: i64,
) -> Result<usize, EraseError> {
    let pending: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT event_id, position FROM erasures WHERE purged_at IS NULL AND position <= $1 \
         ORDER BY position LIMIT 16",
    )
    .bind(published)
    .fetch_all(store.pool())
    .await
    .map_err(db("reading the erasures to purge from JetStream"))?;
    let mut deleted = 0;
    for (erasure, _) in pending {
        let targets: Vec<(i64, Uuid)> = sqlx::query_as(
            "SELECT position, event_id FROM tombstones WHERE erasure = $1 ORDER BY position",
        )
        .bind(erasure)
        .fetch_all(store.pool())
        .await
        .map_err(db("reading an erasure's tombstones"))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| nats("reading the stream", &e))?;
        let (mut low, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
        for (position, event_id) in targets {
            // None: aged out, or never published before its erasure.
            if let Some((sequence, stamped)) = find(stream, low, last, position).await? {
                low = sequence + 1;
                if stamped == event_id {
                    stream
                        .delete_message(sequence)
                        .await
                        .map_err(|e| nats("deleting an erased event's message", &e))?;
                    deleted += 1;
                }
            }
        }
        sqlx::query("UPDATE erasures SET purged_at = now() WHERE event_id = $1")
            .bind(erasure)
            .execute(store.pool())
            .await
            .map_err(db("marking an erasure purged"))?;
        tracing::info!(%erasure, deleted, "erased events' messages deleted from JetStream");
    }
    Ok(deleted)
}

fn nats(doing: &str, error: &dyn std::fmt::Display) -> EraseError {
    EraseError::JetStream {
        doing: doing.to_owned(),
        message: error.to_string(),
    }
}

/// The sequence of the message holding `position` in `[low, high]`, and
/// the event id it is stamped with: a binary search on the stamps (the
/// relay publishes in position order), stepping over deleted and foreign
/// messages.
async fn find(
    stream: &async_nats::jetstream::stream::Stream,
    mut low: u64,
    mut high: u64,
    position: i64,
) -> Result<Option<(u64, Uuid)>, EraseError> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    while low <= high {
        let middle = low + (high - low) / 2;
        let mut probe = middle;
        let mut found = None;
        while probe <= high {
            match stream.get_raw_message(probe).await {
                Ok(message) => {
                    if let Some(stamp) = crate::relay::stamp(&message.headers) {
                        found = Some((probe, stamp));
                        break;
                    }
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(nats("reading the JetStream log", &e)),
            }
            probe += 1;
        }
        match found {
            None => {
                if middle == 0 {
                    break;
                }
                high = middle - 1;
            }
            Some((sequence, stamp)) if stamp.position == position => {
                return Ok(Some((sequence, stamp.event_id)))
            }
            Some((sequence, stamp)) if stamp.position < position => low = sequence + 1,
            Some(_) => {
                if middle == 0 {
                    break;
                }
                high = middle - 1;
            }
        }
    }
    Ok(None)
}

/// Runs [`purge`] every [`PURGE_EVERY`] while the relay leads (`stop`),
/// after what `progress` says it published.
pub async fn purge_loop(
    store: EventStore,
    jetstream: async_nats::jetstream::Context,
    stream: String,
    progress: tokio::sync::watch::Receiver<crate::relay::RelayProgress>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PURGE_EVERY) => {}
        }
        let published = progress.borrow().position;
        if published <= 0 {
            continue;
        }
        let purged = async {
            let pending: Option<i64> =
                sqlx::query_scalar("SELECT min(position) FROM erasures WHERE purged_at IS NULL")
                    .fetch_one(store.pool())
                    .await
                    .map_err(db("looking for erasures to purge"))?;
            if pending.is_none_or(|p| p > published) {
                return Ok(0);
            }
            let stream = jetstream
                .get_stream(&stream)
                .await
                .map_err(|e| nats("opening the JetStream log", &e))?;
            purge(&store, &stream, published).await
        };
        match purged.await {
            Ok(_) => failing = false,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "could not purge erased events from JetStream; retrying");
                }
                failing = true;
            }
        }
    }
}

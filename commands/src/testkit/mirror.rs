//! The JetStream stream as an exact mirror of the event store: every event
//! once, in global order, with the relay's subject, message id, headers and
//! the stored event as its body. Shared by the relay's integration tests
//! and the end-to-end fault tests; each check panics (failing the test)
//! with what differs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream;
use futures::{StreamExt as _, TryStreamExt as _};
use uuid::Uuid;

use super::eventually;
use crate::relay::{
    RelayConfig, HEADER_EVENT_TYPE, HEADER_POSITION, HEADER_SCHEMA_VERSION, HEADER_STREAM_ID,
    HEADER_STREAM_VERSION, HEADER_TENANT, HEADER_TRACEPARENT,
};
use crate::{EventStore, RecordedEvent};

/// How long [`read_everything`] waits for every committed event to be
/// readable.
const WAIT: Duration = Duration::from_secs(30);

/// Reads the whole log gap-safely, waiting until every committed event is
/// readable (transactions elsewhere in the cluster can hold the horizon back).
/// Asserts positions strictly increase.
pub async fn read_everything(store: &EventStore) -> Vec<RecordedEvent> {
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    eventually("the gap-safe reader to see every event", WAIT, || async {
        let mut all: Vec<RecordedEvent> = Vec::new();
        loop {
            let after = all.last().map_or(0, |e| e.position);
            let batch = store.read_all(after, 1000).await.unwrap();
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        assert!(
            all.windows(2).all(|w| w[0].position < w[1].position),
            "read_all positions must strictly increase"
        );
        (all.len() as i64 == expected).then_some(all)
    })
    .await
}

fn header<'a>(message: &'a jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

/// The JetStream stream holds exactly `events`, once each, in order, with the
/// relay's subjects, ids and headers, and payloads equal to the store's rows.
pub async fn assert_mirror(
    events: &[RecordedEvent],
    js: &jetstream::Context,
    config: &RelayConfig,
) {
    let stream = js.get_stream(&config.stream_name).await.unwrap();
    let info = stream.get_info().await.unwrap();
    let n = events.len() as u64;
    assert_eq!(
        (
            info.state.messages,
            info.state.first_sequence,
            info.state.last_sequence
        ),
        (n, 1, n),
        "JetStream must hold exactly the {n} events of the store, from sequence 1"
    );
    let messages = read_stream(&stream, n).await;
    assert_messages_mirror(events, &messages, config);
}

/// Messages 1..=`last` of `stream`.
pub async fn read_stream(
    stream: &jetstream::stream::Stream,
    last: u64,
) -> Vec<jetstream::message::StreamMessage> {
    futures::stream::iter(1..=last)
        .map(|seq| stream.get_raw_message(seq))
        .buffered(32)
        .try_collect()
        .await
        .unwrap()
}

/// `messages` are exactly `events`, in order, with the relay's subjects,
/// ids and headers, and payloads equal to the store's rows; on a stream of
/// several partitions, each on its tenant's partition subject, naming the
/// previous event of its partition.
pub fn assert_messages_mirror(
    events: &[RecordedEvent],
    messages: &[jetstream::message::StreamMessage],
    config: &RelayConfig,
) {
    assert_eq!(
        messages.len(),
        events.len(),
        "one message of the relay per event"
    );
    let js_positions: Vec<i64> = messages
        .iter()
        .map(|m| header(m, HEADER_POSITION).unwrap().parse().unwrap())
        .collect();
    let store_positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    assert_eq!(
        js_positions, store_positions,
        "Neurectomy-Position headers must follow read_all order"
    );
    let payloads: Vec<RecordedEvent> = messages
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let js_ids: Vec<Uuid> = payloads.iter().map(|e| e.event_id).collect();
    let store_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(
        js_ids, store_ids,
        "payload event ids must follow read_all order"
    );

    let partitions = config.partitions.max(1);
    let mut previous = vec![0i64; partitions as usize];
    for ((message, payload), event) in messages.iter().zip(&payloads).zip(events) {
        let at = format!("message {} (position {})", message.sequence, event.position);
        assert_eq!(
            payload, event,
            "{at}: payload differs from the stored event"
        );
        let partition = crate::partition::of(&event.metadata.tenant, partitions);
        assert_eq!(
            message.subject.as_str(),
            crate::partition::subject(
                &config.subject_prefix,
                partitions,
                partition,
                event.kind(),
                &event.event_type
            ),
            "{at}: subject"
        );
        let chained = previous[partition as usize].to_string();
        assert_eq!(
            header(message, crate::partition::HEADER_PARTITION_PREVIOUS),
            (partitions > 1).then_some(chained.as_str()),
            "{at}: the previous event of partition {partition}"
        );
        previous[partition as usize] = event.position;
        let event_id = event.event_id.to_string();
        let version = event.stream_version.to_string();
        let schema = event.schema_version.to_string();
        let expected = [
            ("Nats-Msg-Id", Some(event_id.as_str())),
            (HEADER_STREAM_ID, Some(event.stream_id.as_str())),
            (HEADER_STREAM_VERSION, Some(version.as_str())),
            (HEADER_EVENT_TYPE, Some(event.event_type.as_str())),
            (HEADER_SCHEMA_VERSION, Some(schema.as_str())),
            (HEADER_TENANT, Some(event.metadata.tenant.as_str())),
            (HEADER_TRACEPARENT, event.metadata.traceparent.as_deref()),
        ];
        for (name, value) in expected {
            assert_eq!(header(message, name), value, "{at}: header {name}");
        }
    }
}

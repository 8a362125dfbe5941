//! The WebSocket part of `api`: `--subscribers` `graphql-transport-ws`
//! connections each holding [`SUBSCRIPTION`] on one agent, the API's RSS
//! with all of them, and the time from one `pauseAgent` to each
//! connection's `next`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::http::http;
use super::process::{memory, mib, Memory};
use super::{
    Api, Row, Scratch, PAUSE, SETTLE, SUBSCRIPTION, SUBSCRIPTION_FIELD, WS_P99_TARGET_MS,
    WS_RSS_TARGET_MIB,
};
use crate::cli::BenchApiArgs;
use crate::figures::histogram;
use crate::meter::{Cost, Meter, Peer};

/// How long subscribers get to receive the change.
const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

/// A subscriber's view of the run, sent to the collector.
#[derive(Debug)]
enum Seen {
    /// Subscribed (connected, acknowledged, `subscribe` sent).
    Subscribed,
    /// Could not subscribe, or the server ended the subscription.
    Failed(String),
}

/// Each subscriber's latest `next`: when it arrived and its position,
/// written by the subscriber's task and read by the collector. Not a
/// message per `next`: 10,000 channel sends, and the collector's wake-ups,
/// would compete for the two cores with the delivery they time.
struct Arrivals {
    base: Instant,
    /// Nanoseconds after `base`, plus one (0: none yet).
    at: Vec<AtomicU64>,
    /// The position ([`Arrivals::NO_POSITION`] if the `next` had none).
    position: Vec<AtomicI64>,
}

impl Arrivals {
    const NO_POSITION: i64 = i64::MIN;

    fn new(n: usize) -> Self {
        Self {
            base: Instant::now(),
            at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            position: (0..n).map(|_| AtomicI64::new(Self::NO_POSITION)).collect(),
        }
    }

    fn record(&self, index: usize, at: Instant, position: Option<i64>) {
        let nanos = at.saturating_duration_since(self.base).as_nanos() as u64 + 1;
        self.position[index].store(position.unwrap_or(Self::NO_POSITION), Ordering::Relaxed);
        // Release: whoever sees the time sees the position.
        self.at[index].store(nanos, Ordering::Release);
    }

    /// The latest `next` of subscriber `index`: when, and its position.
    fn get(&self, index: usize) -> Option<(Instant, Option<i64>)> {
        let nanos = self.at[index].load(Ordering::Acquire);
        if nanos == 0 {
            return None;
        }
        let position = self.position[index].load(Ordering::Relaxed);
        Some((
            self.base + Duration::from_nanos(nanos - 1),
            (position != Self::NO_POSITION).then_some(position),
        ))
    }
}

/// The WebSocket scenario; failures become "not available" rows.
pub(super) async fn ws_scenario(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    agent: &str,
    rows: &mut Vec<Row>,
) {
    let n = args.subscribers;
    let rss_name = format!("ws: API RSS with {n} subscriptions");
    let p99_name = format!("ws: one change → {n} subscribers, p99");
    let rss_target = format!("≤ {WS_RSS_TARGET_MIB:.0} MiB");
    let p99_target = format!("≤ {WS_P99_TARGET_MS:.0} ms, all received");
    if let Err(error) = probe(api, agent).await {
        let why = format!("{error:#}");
        eprintln!("the WebSocket part is not available: {why}");
        rows.push(Row::not_available(&rss_name, rss_target, why.clone()));
        rows.push(Row::not_available(&p99_name, p99_target, why));
        return;
    }
    match subscribers(args, scratch, api, agent).await {
        Ok((rss, delivery)) => {
            rows.push(
                Row::new(&rss_name, mib(rss.rss_kib), "MiB")
                    .target(rss_target, mib(rss.rss_kib) <= WS_RSS_TARGET_MIB)
                    .detail(rss.describe()),
            );
            rows.push(delivery.row(&p99_name, p99_target, n));
            rows.push(
                Row::new(
                    "ws: API CPU per delivered message",
                    delivery.cost.cpu_us,
                    "µs",
                )
                .detail(delivery.cost.describe()),
            );
        }
        Err(error) => {
            let why = format!("{error:#}");
            eprintln!("the WebSocket part failed: {why}");
            rows.push(Row::not_available(&rss_name, rss_target, why.clone()));
            rows.push(Row::not_available(&p99_name, p99_target, why));
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, initialises (`connection_init` → `connection_ack`) and sends
/// the `subscribe` message.
async fn subscribe(api: &Api, agent: &str) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{}/graphql/ws", api.addr)
        .into_client_request()
        .context("building the WebSocket request")?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", http_value("graphql-transport-ws"));
    // Small buffers: 10,000 of them live in this process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .context("opening the WebSocket")?;
    let init = json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", api.token)}});
    socket
        .send(Message::text(init.to_string()))
        .await
        .context("sending connection_init")?;
    loop {
        let message = socket
            .next()
            .await
            .context("the server closed the WebSocket before connection_ack")?
            .context("reading connection_ack")?;
        match message {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                match value.get("type").and_then(Value::as_str) {
                    Some("connection_ack") => break,
                    Some("ping") => {
                        let pong = json!({"type": "pong"}).to_string();
                        socket.send(Message::text(pong)).await?;
                    }
                    _ => anyhow::bail!("expected connection_ack, got {text}"),
                }
            }
            Message::Close(frame) => {
                anyhow::bail!("the server closed the WebSocket at connection_init: {frame:?}")
            }
            _ => {}
        }
    }
    let subscribe = json!({
        "id": "1",
        "type": "subscribe",
        "payload": {"query": SUBSCRIPTION, "variables": {"id": agent}},
    });
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .context("sending subscribe")?;
    Ok(socket)
}

/// A `next` without errors, read into borrowed parts only: the position of
/// the update (`Some(None)` if it carries none); `None` for anything else.
fn plain_next(text: &str) -> Option<Option<i64>> {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        payload: Option<Payload<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Payload<'a> {
        #[serde(borrow)]
        data: Option<Data<'a>>,
        errors: Option<serde::de::IgnoredAny>,
    }
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "agentUpdated", borrow)]
        update: Option<Update<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Update<'a> {
        position: Option<&'a str>,
    }
    let message: Message<'_> = serde_json::from_str(text).ok()?;
    let payload = message.payload?;
    if message.kind != "next" || payload.errors.is_some() {
        return None;
    }
    Some(
        payload
            .data
            .and_then(|d| d.update)
            .and_then(|u| u.position)
            .and_then(|p| p.parse().ok()),
    )
}

/// The messages of a `next` or `error` message's GraphQL errors, if any.
fn errors_of(message: &Value) -> Option<String> {
    let payload = message.get("payload")?;
    let errors = match payload {
        Value::Array(errors) => errors,
        other => other.get("errors")?.as_array()?,
    };
    let messages: Vec<String> = errors
        .iter()
        .map(|e| {
            e.get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), str::to_owned)
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

fn http_value(value: &'static str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(value)
}

/// One subscription first: if the server refuses it (say the field does not
/// exist), it answers with `error` at once.
async fn probe(api: &Api, agent: &str) -> anyhow::Result<()> {
    let mut socket = subscribe(api, agent).await?;
    let quiet = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(quiet);
    let outcome = loop {
        tokio::select! {
            () = &mut quiet => break Ok(()),
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                    if let Some(errors) = errors_of(&value) {
                        break Err(anyhow::anyhow!("the server refused the subscription: {errors}"));
                    }
                    match value.get("type").and_then(Value::as_str) {
                        Some("error") => break Err(anyhow::anyhow!(
                            "the server refused the subscription: {}",
                            value.get("payload").map_or_else(|| text.to_string(), Value::to_string)
                        )),
                        Some("complete") => break Err(anyhow::anyhow!(
                            "the server completed the subscription at once"
                        )),
                        Some("ping") => {
                            let pong = json!({"type": "pong"}).to_string();
                            socket.send(Message::text(pong)).await?;
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(frame))) => break Err(anyhow::anyhow!(
                    "the server closed the subscription's WebSocket: {frame:?}"
                )),
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(anyhow::Error::from(error).context("reading the probe subscription")),
                None => break Err(anyhow::anyhow!("the server closed the probe's WebSocket")),
            },
        }
    };
    let _ = socket.close(None).await;
    outcome
}

/// Holds a subscription until `stop`, reporting what it sees.
async fn hold(
    api: Arc<Api>,
    agent: Arc<str>,
    index: usize,
    connecting: Arc<Semaphore>,
    seen: mpsc::Sender<(usize, Seen)>,
    arrivals: Arc<Arrivals>,
    stop: CancellationToken,
) {
    let subscribed = {
        let Ok(_permit) = connecting.acquire().await else {
            return;
        };
        tokio::select! {
            () = stop.cancelled() => return,
            subscribed = tokio::time::timeout(Duration::from_secs(60), subscribe(&api, &agent)) => subscribed,
        }
    };
    let mut socket = match subscribed {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => {
            let _ = seen.send((index, Seen::Failed(format!("{error:#}")))).await;
            return;
        }
        Err(_) => {
            let _ = seen
                .send((index, Seen::Failed("no subscription within 60 s".into())))
                .await;
            return;
        }
    };
    if seen.send((index, Seen::Subscribed)).await.is_err() {
        return;
    }
    // One waiter for the connection's life, not one per message: 10,000
    // clients woken together would contend for the token's lock.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            () = &mut stopped => break,
            message = socket.next() => message,
        };
        let report = match message {
            Some(Ok(Message::Text(text))) => {
                let at = Instant::now();
                // The common case read cheaply (10,000 clients share the
                // API's two cores); anything else through the full parse.
                if let Some(position) = plain_next(text.as_str()) {
                    arrivals.record(index, at, position);
                    continue;
                }
                let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                match value.get("type").and_then(Value::as_str) {
                    Some("next") if errors_of(&value).is_some() => Some(Seen::Failed(format!(
                        "the subscription answered with errors: {}",
                        errors_of(&value).unwrap_or_default()
                    ))),
                    Some("next") => {
                        let position = value
                            .pointer(&format!("/payload/data/{SUBSCRIPTION_FIELD}/position"))
                            .and_then(|p| match p {
                                Value::String(s) => s.parse().ok(),
                                other => other.as_i64(),
                            });
                        arrivals.record(index, at, position);
                        None
                    }
                    Some("ping") => {
                        let pong = json!({"type": "pong"}).to_string();
                        if socket.send(Message::text(pong)).await.is_err() {
                            Some(Seen::Failed("could not answer a ping".into()))
                        } else {
                            None
                        }
                    }
                    Some("error" | "complete") => Some(Seen::Failed(format!(
                        "the server ended the subscription: {text}"
                    ))),
                    _ => None,
                }
            }
            Some(Ok(Message::Close(frame))) => Some(Seen::Failed(format!(
                "the server closed the WebSocket: {frame:?}"
            ))),
            Some(Ok(_)) => None,
            Some(Err(error)) => Some(Seen::Failed(format!("reading: {error}"))),
            None => Some(Seen::Failed("the server closed the WebSocket".into())),
        };
        let Some(report) = report else {
            continue;
        };
        let failed = matches!(report, Seen::Failed(_));
        if seen.send((index, report)).await.is_err() || failed {
            break;
        }
    }
    let _ = socket.close(None).await;
}

/// Delivery of the one change to the subscribers.
struct Delivery {
    latencies: Histogram<u64>,
    received: usize,
    subscribed: usize,
    lost: usize,
    early: usize,
    mutation_ms: f64,
    first_failure: Option<String>,
    /// What one delivered message cost the API process (and Redis).
    cost: Cost,
}

impl Delivery {
    fn row(&self, name: &str, target: String, wanted: usize) -> Row {
        if self.received == 0 {
            return Row::not_available(
                name,
                target,
                format!(
                    "no subscriber received the change ({} of {wanted} subscribed{})",
                    self.subscribed,
                    self.first_failure
                        .as_ref()
                        .map_or(String::new(), |f| format!("; first failure: {f}"))
                ),
            );
        }
        let ms = |q: f64| self.latencies.value_at_quantile(q) as f64 / 1000.0;
        let p99 = ms(0.99);
        let mut detail = format!(
            "received by {} of {wanted} ({} subscribed); first {:.1} ms, p50 {:.1} ms, max {:.1} ms; the mutation took {:.1} ms",
            self.received,
            self.subscribed,
            self.latencies.min() as f64 / 1000.0,
            ms(0.5),
            self.latencies.max() as f64 / 1000.0,
            self.mutation_ms
        );
        if self.lost > 0 {
            detail.push_str(&format!("; {} connection(s) lost", self.lost));
        }
        if self.early > 0 {
            detail.push_str(&format!("; {} `next` before the change", self.early));
        }
        if let Some(failure) = &self.first_failure {
            detail.push_str(&format!("; first failure: {failure}"));
        }
        Row::new(name, p99, "ms")
            .target(target, self.received == wanted && p99 <= WS_P99_TARGET_MS)
            .detail(detail)
    }
}

/// Opens the subscriptions, reads the API's RSS, changes the agent and
/// times its delivery to every subscriber.
async fn subscribers(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    agent: &str,
) -> anyhow::Result<(Memory, Delivery)> {
    let n = args.subscribers;
    let stop = scratch.stop.child_token();
    // Every subscriber sends a few messages at most: room for all of them.
    let (tx, mut rx) = mpsc::channel::<(usize, Seen)>(n * 2 + 16);
    let connecting = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let shared = Arc::new(Api {
        addr: api.addr,
        pid: api.pid,
        token: api.token.clone(),
    });
    let agent_id: Arc<str> = Arc::from(agent);
    let arrivals = Arc::new(Arrivals::new(n));
    eprintln!(
        "opening {n} WebSocket subscriptions ({} handshakes at a time)…",
        args.connect_concurrency.max(1)
    );
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for index in 0..n {
        clients.push(tokio::spawn(hold(
            shared.clone(),
            agent_id.clone(),
            index,
            connecting.clone(),
            tx.clone(),
            arrivals.clone(),
            stop.clone(),
        )));
    }
    drop(tx);
    let outcome = deliver(n, api, agent, &mut rx, &arrivals, started).await;
    stop.cancel();
    eprintln!("closing the subscriptions…");
    for client in clients {
        let _ = client.await;
    }
    outcome
}

async fn deliver(
    n: usize,
    api: &Api,
    agent: &str,
    rx: &mut mpsc::Receiver<(usize, Seen)>,
    arrivals: &Arrivals,
    started: Instant,
) -> anyhow::Result<(Memory, Delivery)> {
    let mut subscribed = vec![false; n];
    let mut subscribed_count = 0;
    let mut failed = 0;
    let mut first_failure: Option<String> = None;
    let deadline = started + Duration::from_secs(120 + n as u64 / 50);
    while subscribed_count + failed < n {
        let Ok(Some((index, seen))) = tokio::time::timeout_at(deadline.into(), rx.recv()).await
        else {
            anyhow::bail!(
                "{subscribed_count} of {n} subscribed and {failed} failed within {} s",
                deadline.duration_since(started).as_secs()
            );
        };
        match seen {
            Seen::Subscribed => {
                subscribed[index] = true;
                subscribed_count += 1;
                if subscribed_count % 1_000 == 0 {
                    eprintln!(
                        "  {subscribed_count} subscribed ({:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Seen::Failed(why) => {
                if subscribed[index] {
                    subscribed[index] = false;
                    subscribed_count -= 1;
                }
                failed += 1;
                first_failure.get_or_insert(why);
            }
        }
    }
    anyhow::ensure!(
        subscribed_count > 0,
        "no subscription opened: {}",
        first_failure.unwrap_or_default()
    );
    eprintln!(
        "{subscribed_count} subscribed, {failed} failed, in {:.1} s; letting them settle…",
        started.elapsed().as_secs_f64()
    );
    // The server registers a subscription after reading `subscribe`; nothing
    // acknowledges it in graphql-transport-ws, so allow it a quiet moment.
    let settle = tokio::time::Instant::now() + SETTLE;
    let mut lost = 0;
    while let Ok(Some((index, seen))) = tokio::time::timeout_at(settle, rx.recv()).await {
        match seen {
            Seen::Failed(why) => {
                if std::mem::take(&mut subscribed[index]) {
                    lost += 1;
                }
                first_failure.get_or_insert(why);
            }
            Seen::Subscribed => {}
        }
    }
    // `next`s before the change (none expected: a live subscription sends
    // nothing until something changes).
    let early = (0..n).filter(|&i| arrivals.get(i).is_some()).count();
    let rss = memory(api.pid)?;
    eprintln!(
        "API RSS with {} subscriptions: {:.1} MiB; pausing agent {agent}…",
        subscribed_count - lost,
        mib(rss.rss_kib)
    );

    let body = json!({"query": PAUSE, "variables": {"id": agent}}).to_string();
    // The API's cost of the change: one mutation, then a message to each
    // subscriber (the mutation is a rounding error beside 10,000 messages).
    let meter = Meter::start("delivery", api.pid, &[Peer::Redis]).await?;
    let sent = Instant::now();
    let (status, answer) = http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body))
        .await
        .context("sending pauseAgent")?;
    let answered = Instant::now();
    let value: Value = serde_json::from_str(&answer).unwrap_or_default();
    let position: i64 = value
        .pointer("/data/pauseAgent/position")
        .and_then(|p| match p {
            Value::String(s) => s.parse().ok(),
            other => other.as_i64(),
        })
        .with_context(|| format!("pauseAgent failed (HTTP {status}): {answer}"))?;

    let waiting = subscribed.iter().filter(|s| **s).count();
    let until = tokio::time::Instant::from_std(answered + DELIVERY_LIMIT);
    // The subscribers record their arrivals themselves; look every 2 ms
    // (the times are theirs, so looking adds nothing to them).
    let ours = |i: usize| {
        arrivals
            .get(i)
            .filter(|(_, at_position)| at_position.is_none_or(|p| p >= position))
    };
    loop {
        while let Ok((index, seen)) = rx.try_recv() {
            if let Seen::Failed(why) = seen {
                if std::mem::take(&mut subscribed[index]) {
                    lost += 1;
                }
                first_failure.get_or_insert(why);
            }
        }
        let pending = (0..n).any(|i| subscribed[i] && ours(i).is_none());
        if !pending || tokio::time::Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut latencies = histogram();
    let mut received_count = 0;
    for i in (0..n).filter(|&i| subscribed[i]) {
        if let Some((at, _)) = ours(i) {
            // Arrivals before the response count as immediate.
            let micros = at.saturating_duration_since(answered).as_micros();
            let _ = latencies.record(micros.max(1) as u64);
            received_count += 1;
        }
    }
    let cost = meter.finish(received_count as u64).await?;
    Ok((
        rss,
        Delivery {
            latencies,
            received: received_count,
            subscribed: waiting,
            lost,
            early,
            mutation_ms: answered.duration_since(sent).as_secs_f64() * 1000.0,
            first_failure,
            cost,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_keep_each_subscribers_latest_next() {
        let arrivals = Arrivals::new(3);
        assert!(arrivals.get(0).is_none());
        let first = Instant::now();
        arrivals.record(0, first, Some(7));
        arrivals.record(1, first, None);
        let later = first + Duration::from_millis(5);
        arrivals.record(0, later, Some(9));
        let (at, position) = arrivals.get(0).unwrap();
        assert_eq!(position, Some(9));
        assert!(at.duration_since(later) < Duration::from_micros(1));
        assert_eq!(arrivals.get(1).map(|(_, p)| p), Some(None));
        assert!(arrivals.get(2).is_none());
    }

    #[test]
    fn plain_next_reads_the_position_and_leaves_the_rest_to_the_full_parse() {
        let next = r#"{"type":"next","id":"1","payload":{"data":{"agentUpdated":{"position":"42","agent":{"id":"a","status":"paused"}}}}}"#;
        assert_eq!(plain_next(next), Some(Some(42)));
        let errors =
            r#"{"type":"next","id":"1","payload":{"data":null,"errors":[{"message":"x"}]}}"#;
        assert_eq!(plain_next(errors), None);
        assert_eq!(plain_next(r#"{"type":"ping"}"#), None);
        assert_eq!(plain_next("not json"), None);
        // `Data` names the subscription's field literally (serde renames
        // take literals): it must be the field the subscription selects.
        let selected = SUBSCRIPTION
            .split_once('{')
            .and_then(|(_, rest)| rest.trim_start().split('(').next())
            .map(str::trim);
        assert_eq!(selected, Some(SUBSCRIPTION_FIELD));
        let renamed = format!(
            r#"{{"type":"next","id":"1","payload":{{"data":{{"{SUBSCRIPTION_FIELD}":{{"position":"9"}}}}}}}}"#
        );
        assert_eq!(plain_next(&renamed), Some(Some(9)));
    }
}

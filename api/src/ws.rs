//! GraphQL over WebSocket: `graphql-transport-ws` and the legacy `graphql-ws`
//! (subscriptions-transport-ws), with shared executions.
//!
//! Clients that hold the same live subscription share one execution: same
//! tenant and roles, same document, operation and variables, and no
//! `afterPosition` (a resuming subscription replays its own past). The
//! [`Hub`] runs that execution once, serializes each of its messages once
//! and hands the bytes to every client through a bounded [`broadcast`]
//! channel; each connection only frames them with its own subscription id.
//! One state change seen by 10,000 clients of the same subscription is thus
//! resolved and serialized once, not 10,000 times, and a client costs a
//! channel receiver instead of an execution.
//!
//! A client that falls `buffer` messages behind the shared execution is cut
//! off like any slow subscriber: `SUBSCRIBER_TOO_SLOW` naming the last
//! position it was sent (every message is tagged with the position the
//! execution yielded, see [`DeliveredPosition`]), then `complete`.
//! Subscriptions with `afterPosition`, and queries or mutations sent over
//! the socket, run on their own, as before.
//!
//! Protocol errors close the socket with the codes of graphql-transport-ws:
//! 4400 (not a protocol message), 4401 (`subscribe` before the
//! `connection_ack`), 4403 (bad token in `connection_init`, or the token
//! expired while the socket was open), 4408 (no `connection_init` in time),
//! 4409 (an id already in use), 4429 (a second `connection_init`); 1009
//! for an oversized message and 1001 at shutdown. A close frame's reason is
//! cut to [`MAX_CLOSE_REASON`] bytes on a character boundary (RFC 6455
//! §5.5: a control frame carries at most 125 bytes, two of them the code).
//!
//! A subscription refused before it executes — a document that does not
//! parse, does not validate or is over the limits — is answered with the
//! protocol's `error` message (no `complete` follows); errors while it runs
//! arrive in `next` payloads. A socket holding `ws_max_subscriptions`
//! subscriptions gets `error` (code `TOO_MANY_SUBSCRIPTIONS`) for the next.
//!
//! A token is good for as long as it is valid: when it expires the socket
//! is closed with 4403, which graphql-ws clients retry — with a fresh token
//! from their `connectionParams` function, resubscribing with
//! `afterPosition` = their last position, they miss nothing.
//!
//! The server pings every [`KEEPALIVE`] (`ka` in the legacy protocol).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_graphql::http::{ClientMessage, WebSocketProtocols};
use async_graphql::parser::types::{OperationType, Selection};
use async_graphql::{Pos, Request, Response};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{BoxStream, SplitSink, SplitStream};
use futures::{SinkExt as _, Stream, StreamExt as _};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{AuthError, Principal, Role};
use crate::error::ApiError;
use crate::graphql::subscriptions::{too_slow, DeliveredPosition, DeliverySpan};
use crate::graphql::ApiSchema;
use crate::server::AppState;
use crate::sync::lock;

/// How often the server pings an idle client.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// How long a closing socket waits for the client's close frame.
const CLOSING_HANDSHAKE: Duration = Duration::from_secs(1);

/// Longest close reason, bytes: a close frame's payload is at most 125
/// bytes, two of which are the code (RFC 6455 §5.5).
pub const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to [`MAX_CLOSE_REASON`] bytes on a character boundary.
pub fn close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// The shared executions of one process. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("buffer", &self.inner.buffer)
            .field("executions", &lock(&self.inner.groups).len())
            .finish_non_exhaustive()
    }
}

struct HubInner {
    schema: ApiSchema,
    /// Messages a client may fall behind its shared execution.
    buffer: usize,
    /// Live executions by what they run. Weak: the clients own them.
    groups: Mutex<HashMap<GroupKey, Weak<Group>>>,
    next_id: AtomicU64,
}

/// What makes two subscriptions the same execution.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    tenant: String,
    roles: Vec<Role>,
    query: String,
    operation: Option<String>,
    /// The variables as JSON.
    variables: String,
}

/// One message of a shared execution.
enum Frame {
    /// A result, serialized, and the position the execution had yielded.
    Next { payload: Box<str>, position: i64 },
    /// The request was refused before it executed: its errors, serialized.
    Refused { errors: Box<str> },
    /// The execution ended.
    Complete,
}

/// What a subscription's stream yields to its connection.
pub(crate) enum Item {
    /// A message to send.
    Message(String),
    /// An `error` message to send; the subscription is over (no
    /// `complete`).
    Refused(String),
}

/// The errors of `response` as a JSON array if it refused the request
/// before execution (no data; only parse, validation or limit errors).
fn refused(response: &Response) -> Option<String> {
    let before_execution = response.data == async_graphql::Value::Null
        && !response.errors.is_empty()
        && response.errors.iter().all(crate::graphql::is_request_error);
    before_execution.then(|| {
        serde_json::to_string(&response.errors).unwrap_or_else(|e| {
            ApiError::internal("the refusal could not be serialized", e).to_errors_json()
        })
    })
}

/// A shared execution; ends (its task is aborted) when its last client goes.
struct Group {
    id: u64,
    key: GroupKey,
    hub: Weak<HubInner>,
    tx: broadcast::Sender<Arc<Frame>>,
    /// The last position the execution yielded (where a late joiner starts).
    position: DeliveredPosition,
    task: tokio::task::AbortHandle,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.task.abort();
        crate::metrics::subscription_execution(true, -1.0);
        if let Some(hub) = self.hub.upgrade() {
            let mut groups = lock(&hub.groups);
            // Unless a new execution of the same key replaced this one.
            if groups.get(&self.key).is_some_and(|g| g.strong_count() == 0) {
                groups.remove(&self.key);
            }
        }
    }
}

impl Hub {
    /// Shared executions of `schema`'s subscriptions; clients may fall
    /// `buffer` messages behind.
    pub fn new(schema: ApiSchema, buffer: usize) -> Self {
        Self {
            inner: Arc::new(HubInner {
                schema,
                buffer: buffer.max(1),
                groups: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Executions running now (shared ones).
    pub fn executions(&self) -> usize {
        lock(&self.inner.groups).len()
    }

    /// The stream of framed messages for subscription `id` of a client.
    fn subscribe(
        &self,
        protocol: WebSocketProtocols,
        id: &str,
        request: Request,
        principal: &Principal,
    ) -> BoxStream<'static, Item> {
        let id_json: Arc<str> = match serde_json::to_string(id) {
            Ok(json) => json.into(),
            Err(_) => Arc::from("\"\""),
        };
        match shared_key(&request, principal) {
            Some(key) => {
                let (group, rx, joined_at) = self.join(key, request, principal);
                shared_stream(
                    SharedSub {
                        _group: group,
                        rx,
                        delivered: joined_at,
                        buffer: self.inner.buffer,
                        done: false,
                    },
                    protocol,
                    id_json,
                )
            }
            None => {
                let execution = Execution::start(false);
                let delivery = DeliverySpan::default();
                let mut first = true;
                self.inner
                    .schema
                    .execute_stream(request.data(principal.clone()).data(delivery.clone()))
                    .map(move |response| {
                        let _running = &execution;
                        if std::mem::take(&mut first) {
                            if let Some(errors) = refused(&response) {
                                return Item::Refused(error_message(protocol, &id_json, &errors));
                            }
                        }
                        let message = || next_message(protocol, &id_json, &payload(&response));
                        Item::Message(match delivery.take() {
                            Some(span) => span.in_scope(message),
                            None => message(),
                        })
                    })
                    .boxed()
            }
        }
    }

    /// Joins the execution of `key`, starting it if none runs.
    fn join(
        &self,
        key: GroupKey,
        request: Request,
        principal: &Principal,
    ) -> (Arc<Group>, broadcast::Receiver<Arc<Frame>>, i64) {
        let mut groups = lock(&self.inner.groups);
        if let Some(group) = groups.get(&key).and_then(Weak::upgrade) {
            let rx = group.tx.subscribe();
            let joined_at = group.position.get();
            return (group, rx, joined_at);
        }
        let (tx, rx) = broadcast::channel(self.inner.buffer);
        let position = DeliveredPosition::default();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let delivery = DeliverySpan::default();
        let stream = self.inner.schema.execute_stream(
            request
                .data(principal.clone())
                .data(position.clone())
                .data(delivery.clone()),
        );
        let task = tokio::spawn(run_group(
            stream,
            tx.clone(),
            (position.clone(), delivery),
            Arc::downgrade(&self.inner),
            key.clone(),
            id,
        ));
        crate::metrics::subscription_execution(true, 1.0);
        let group = Arc::new(Group {
            id,
            key: key.clone(),
            hub: Arc::downgrade(&self.inner),
            tx,
            position,
            task: task.abort_handle(),
        });
        groups.insert(key, Arc::downgrade(&group));
        (group, rx, 0)
    }
}

/// Runs a shared execution: each result serialized once, tagged with its
/// position, sent to every client.
async fn run_group(
    stream: impl Stream<Item = Response> + Send + 'static,
    tx: broadcast::Sender<Arc<Frame>>,
    (position, delivery): (DeliveredPosition, DeliverySpan),
    hub: Weak<HubInner>,
    key: GroupKey,
    id: u64,
) {
    futures::pin_mut!(stream);
    let mut first = true;
    while let Some(response) = stream.next().await {
        if std::mem::take(&mut first) {
            if let Some(errors) = refused(&response) {
                let _ = tx.send(Arc::new(Frame::Refused {
                    errors: errors.into_boxed_str(),
                }));
                break;
            }
        }
        let send = || {
            let frame = Frame::Next {
                payload: payload(&response).into_boxed_str(),
                position: position.get(),
            };
            // No receiver: the last client is leaving and aborts this task.
            let _ = tx.send(Arc::new(frame));
        };
        match delivery.take() {
            Some(span) => {
                span.record("subscribers", tx.receiver_count());
                span.in_scope(send);
            }
            None => send(),
        }
    }
    // Ended: clients that come now start a new execution; those joined get
    // `complete` (or have had `error`). (The Arc is dropped after the lock
    // is released: dropping the last one takes the lock.)
    if let Some(hub) = hub.upgrade() {
        let current = lock(&hub.groups).get(&key).and_then(Weak::upgrade);
        if current.as_ref().is_some_and(|g| g.id == id) {
            lock(&hub.groups).remove(&key);
        }
        drop(current);
    }
    let _ = tx.send(Arc::new(Frame::Complete));
}

/// The key under which `request` can share an execution: a subscription
/// operation whose top-level fields are plain fields without
/// `afterPosition` (resuming replays a client's own past) and no request
/// extensions. `None`: it runs on its own.
fn shared_key(request: &Request, principal: &Principal) -> Option<GroupKey> {
    if !request.extensions.is_empty() {
        return None;
    }
    // Unparsable documents run on their own, which reports the error.
    let document = async_graphql::parser::parse_query(&request.query).ok()?;
    let mut operations =
        document
            .operations
            .iter()
            .filter(|(name, _)| match (&request.operation_name, name) {
                (Some(wanted), Some(name)) => wanted.as_str() == name.as_str(),
                (None, _) => true,
                (Some(_), None) => false,
            });
    let (_, operation) = operations.next()?;
    if operations.next().is_some() || operation.node.ty != OperationType::Subscription {
        return None;
    }
    let plain = operation
        .node
        .selection_set
        .node
        .items
        .iter()
        .all(|selection| match &selection.node {
            Selection::Field(field) => field
                .node
                .arguments
                .iter()
                .all(|(name, _)| name.node.as_str() != "afterPosition"),
            _ => false,
        });
    if !plain {
        return None;
    }
    Some(GroupKey {
        tenant: principal.tenant.clone(),
        roles: principal.roles.iter().copied().collect(),
        query: request.query.clone(),
        operation: request.operation_name.clone(),
        variables: serde_json::to_string(&request.variables).ok()?,
    })
}

/// A client of a shared execution.
struct SharedSub {
    /// Keeps the execution running.
    _group: Arc<Group>,
    rx: broadcast::Receiver<Arc<Frame>>,
    /// The last position sent to this client (or the execution's when it
    /// joined): where it resumes if cut off.
    delivered: i64,
    buffer: usize,
    done: bool,
}

fn shared_stream(
    sub: SharedSub,
    protocol: WebSocketProtocols,
    id_json: Arc<str>,
) -> BoxStream<'static, Item> {
    futures::stream::unfold((sub, id_json), move |(mut sub, id_json)| async move {
        if sub.done {
            return None;
        }
        let message = match sub.rx.recv().await {
            Ok(frame) => match &*frame {
                Frame::Next { payload, position } => {
                    sub.delivered = sub.delivered.max(*position);
                    Item::Message(next_message(protocol, &id_json, payload))
                }
                Frame::Refused { errors } => {
                    sub.done = true;
                    Item::Refused(error_message(protocol, &id_json, errors))
                }
                Frame::Complete => return None,
            },
            Err(RecvError::Lagged(missed)) => {
                sub.done = true;
                let error = too_slow(missed, sub.buffer, sub.delivered);
                let response = Response::from_errors(vec![error.into_server_error(Pos::default())]);
                Item::Message(next_message(protocol, &id_json, &payload(&response)))
            }
            Err(RecvError::Closed) => return None,
        };
        Some((message, (sub, id_json)))
    })
    .boxed()
}

/// Counts an execution in the metrics while it lives.
struct Execution {
    shared: bool,
}

impl Execution {
    fn start(shared: bool) -> Self {
        crate::metrics::subscription_execution(shared, 1.0);
        Self { shared }
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        crate::metrics::subscription_execution(self.shared, -1.0);
    }
}

/// A response as JSON (a response always serializes; if not, an error).
fn payload(response: &Response) -> String {
    serde_json::to_string(response).unwrap_or_else(|e| {
        let error = ApiError::internal("the response could not be serialized", e);
        format!(r#"{{"errors":{}}}"#, error.to_errors_json())
    })
}

/// `next` (`data` in the legacy protocol) carrying `payload` (JSON).
fn next_message(protocol: WebSocketProtocols, id_json: &str, payload: &str) -> String {
    let kind = match protocol {
        WebSocketProtocols::GraphQLWS => "next",
        WebSocketProtocols::SubscriptionsTransportWS => "data",
    };
    let mut message = String::with_capacity(payload.len() + id_json.len() + 32);
    message.push_str(r#"{"type":""#);
    message.push_str(kind);
    message.push_str(r#"","id":"#);
    message.push_str(id_json);
    message.push_str(r#","payload":"#);
    message.push_str(payload);
    message.push('}');
    message
}

/// `error` carrying `errors` (a JSON array of GraphQL errors). The legacy
/// protocol's `error` carries one error object.
fn error_message(protocol: WebSocketProtocols, id_json: &str, errors: &str) -> String {
    let payload = match protocol {
        WebSocketProtocols::GraphQLWS => errors.to_owned(),
        WebSocketProtocols::SubscriptionsTransportWS => {
            match serde_json::from_str::<Vec<serde_json::Value>>(errors) {
                Ok(mut all) if !all.is_empty() => all.swap_remove(0).to_string(),
                _ => errors.to_owned(),
            }
        }
    };
    format!(r#"{{"type":"error","id":{id_json},"payload":{payload}}}"#)
}

fn complete_message(id: &str) -> String {
    serde_json::json!({"type": "complete", "id": id}).to_string()
}

/// The token in a `connection_init` payload: `authorization` (or
/// `Authorization`) as `Bearer <token>`, or `token`.
fn payload_token(payload: &serde_json::Value) -> Option<String> {
    ["authorization", "Authorization"]
        .iter()
        .find_map(|k| payload.get(k).and_then(|v| v.as_str()).map(str::to_owned))
        .or_else(|| {
            payload
                .get("token")
                .and_then(|v| v.as_str())
                .map(|t| format!("Bearer {t}"))
        })
}

/// A connection's subscriptions, polled in turn.
#[derive(Default)]
struct Subscriptions {
    items: Vec<(String, BoxStream<'static, Item>)>,
    turn: usize,
}

enum Outgoing {
    /// A message of a subscription (for a refused one, its `error`; it is
    /// removed).
    Message(String),
    /// A subscription ended (removed): send `complete`.
    Ended(String),
}

impl Subscriptions {
    fn contains(&self, id: &str) -> bool {
        self.items.iter().any(|(i, _)| i == id)
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn insert(&mut self, id: String, stream: BoxStream<'static, Item>) {
        crate::metrics::subscription(1.0);
        self.items.push((id, stream));
    }

    fn remove(&mut self, id: &str) -> bool {
        let before = self.items.len();
        self.items.retain(|(i, _)| i != id);
        let removed = before - self.items.len();
        crate::metrics::subscription(-(removed as f64));
        removed > 0
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Outgoing> {
        let n = self.items.len();
        for k in 0..n {
            let index = (self.turn + k) % n;
            match self.items[index].1.poll_next_unpin(cx) {
                Poll::Ready(Some(Item::Message(message))) => {
                    self.turn = index + 1;
                    return Poll::Ready(Outgoing::Message(message));
                }
                Poll::Ready(Some(Item::Refused(message))) => {
                    drop(self.items.swap_remove(index));
                    crate::metrics::subscription(-1.0);
                    return Poll::Ready(Outgoing::Message(message));
                }
                Poll::Ready(None) => {
                    let (id, _) = self.items.swap_remove(index);
                    crate::metrics::subscription(-1.0);
                    return Poll::Ready(Outgoing::Ended(id));
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        crate::metrics::subscription(-(self.items.len() as f64));
    }
}

/// What to do after a step of the connection.
enum Flow {
    Continue,
    /// Close with a code and reason.
    Close(u16, String),
    /// Stop (the client closed or went away).
    End,
}

/// Serves one WebSocket (split: the unsplit socket is large, and one
/// process holds ~10,000 of these futures).
pub async fn serve(
    state: Arc<AppState>,
    mut sink: SplitSink<WebSocket, Message>,
    mut source: SplitStream<WebSocket>,
    protocol: WebSocketProtocols,
) {
    crate::metrics::websocket(1.0);
    let _open = crate::shutdown::WEBSOCKETS.enter();
    let mut principal: Option<Principal> = None;
    let mut subscriptions = Subscriptions::default();
    let init_deadline = tokio::time::sleep(state.config.ws_init_timeout);
    futures::pin_mut!(init_deadline);
    // Armed by `connection_init`: when the token stops being valid.
    let expiry = tokio::time::sleep(FOREVER);
    futures::pin_mut!(expiry);
    let keepalive = tokio::time::sleep(KEEPALIVE);
    futures::pin_mut!(keepalive);
    // One waiter for the whole connection: a new `cancelled()` future per
    // loop turn would register and deregister under the token's lock on
    // every message, which 10,000 connections woken together contend for.
    let shutdown = state.shutdown.cancelled();
    futures::pin_mut!(shutdown);
    loop {
        let flow = tokio::select! {
            incoming = source.next() => {
                let before = principal.is_some();
                let flow = match receive(&state, protocol, incoming, &mut principal, &mut subscriptions) {
                    Ok(Some(reply)) => send(&mut sink, reply).await,
                    Ok(None) => Flow::Continue,
                    Err(flow) => flow,
                };
                if let (false, Some(p)) = (before, &principal) {
                    expiry.as_mut().reset(tokio::time::Instant::now() + until(p.expires_at));
                }
                flow
            }
            outgoing = futures::future::poll_fn(|cx| subscriptions.poll_next(cx)) => {
                match outgoing {
                    Outgoing::Message(message) => send(&mut sink, message).await,
                    Outgoing::Ended(id) => send(&mut sink, complete_message(&id)).await,
                }
            }
            () = &mut shutdown => Flow::Close(
                1001,
                "going away: the server is shutting down; resubscribe with afterPosition".to_owned(),
            ),
            () = &mut init_deadline, if principal.is_none() => Flow::Close(
                4408,
                "Connection initialisation timeout".to_owned(),
            ),
            () = &mut expiry, if principal.is_some() => Flow::Close(
                4403,
                "Forbidden: the token expired; reconnect with a fresh one and resubscribe with afterPosition".to_owned(),
            ),
            () = &mut keepalive => {
                keepalive.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
                let ping = match protocol {
                    WebSocketProtocols::GraphQLWS => r#"{"type":"ping"}"#,
                    WebSocketProtocols::SubscriptionsTransportWS => r#"{"type":"ka"}"#,
                };
                if principal.is_some() {
                    send(&mut sink, ping.to_owned()).await
                } else {
                    Flow::Continue
                }
            }
        };
        match flow {
            Flow::Continue => {}
            Flow::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: close_reason(&reason).into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                // The closing handshake (RFC 6455 §7.1.1): the client
                // answers with its close frame; what it sent meanwhile is
                // read and dropped, so nothing unread resets the connection
                // before it read the code. Bounded: a client that never
                // answers is let go.
                let _ = tokio::time::timeout(CLOSING_HANDSHAKE, async {
                    while let Some(Ok(message)) = source.next().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
                break;
            }
            Flow::End => break,
        }
    }
    drop(subscriptions);
    let _ = sink.close().await;
    crate::metrics::websocket(-1.0);
}

/// A wait that does not end (in the life of a socket).
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The time from now until `expires_at` (seconds since the Unix epoch), at
/// most [`FOREVER`].
fn until(expires_at: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(expires_at)
        .saturating_sub(now)
        .min(FOREVER)
}

async fn send(sink: &mut SplitSink<WebSocket, Message>, text: String) -> Flow {
    match sink.send(Message::Text(text.into())).await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::End,
    }
}

/// Handles a client message: the reply to send, if any, or how to stop.
fn receive(
    state: &AppState,
    protocol: WebSocketProtocols,
    incoming: Option<Result<Message, axum::Error>>,
    principal: &mut Option<Principal>,
    subscriptions: &mut Subscriptions,
) -> Result<Option<String>, Flow> {
    let limit = state.config.ws_message_limit;
    let size = match &incoming {
        Some(Ok(Message::Text(text))) => text.len(),
        Some(Ok(Message::Binary(bytes))) => bytes.len(),
        _ => 0,
    };
    if size > limit {
        return Err(Flow::Close(
            1009,
            format!("message of {size} bytes refused: the limit is {limit}"),
        ));
    }
    let message = match incoming {
        Some(Ok(Message::Text(text))) => ClientMessage::from_bytes(text.as_str()),
        Some(Ok(Message::Binary(bytes))) => ClientMessage::from_bytes(&bytes),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(None),
        Some(Ok(Message::Close(_))) | None => return Err(Flow::End),
        Some(Err(error)) => {
            // Oversized messages and broken frames end up here.
            tracing::debug!(%error, "websocket receive failed");
            return Err(Flow::Close(1009, format!("message refused: {error}")));
        }
    };
    let message = message.map_err(|e| {
        Flow::Close(
            4400,
            format!("Invalid message received: {e} (expected a graphql-transport-ws message)"),
        )
    })?;
    match message {
        ClientMessage::ConnectionInit { payload } => {
            if principal.is_some() {
                return Err(Flow::Close(
                    4429,
                    "Too many initialisation requests".to_owned(),
                ));
            }
            let verified = payload_token(&payload.unwrap_or_default())
                .ok_or(AuthError::Missing)
                .and_then(|t| state.auth.verify_header(Some(&t)));
            match verified {
                Ok(p) => {
                    *principal = Some(p);
                    Ok(Some(r#"{"type":"connection_ack"}"#.to_owned()))
                }
                Err(e) => Err(Flow::Close(4403, format!("Forbidden: {e}"))),
            }
        }
        ClientMessage::Start { id, payload } => {
            let Some(principal) = principal.as_ref() else {
                return Err(Flow::Close(4401, "Unauthorized".to_owned()));
            };
            if subscriptions.contains(&id) {
                return Err(Flow::Close(
                    4409,
                    format!("Subscriber for {id} already exists"),
                ));
            }
            let limit = state.config.ws_max_subscriptions;
            if subscriptions.len() >= limit {
                let id_json = serde_json::to_string(&id).unwrap_or_else(|_| "\"\"".to_owned());
                let error = ApiError::TooManySubscriptions(format!("this connection already holds {limit} subscriptions, the most one connection may; complete one first or open another connection"));
                return Ok(Some(error_message(
                    protocol,
                    &id_json,
                    &error.to_errors_json(),
                )));
            }
            let stream = state.hub.subscribe(protocol, &id, payload, principal);
            subscriptions.insert(id, stream);
            Ok(None)
        }
        ClientMessage::Stop { id } => Ok(subscriptions.remove(&id).then(|| complete_message(&id))),
        ClientMessage::ConnectionTerminate => Err(Flow::End),
        ClientMessage::Ping { payload } => Ok(Some(match payload {
            Some(payload) => serde_json::json!({"type": "pong", "payload": payload}).to_string(),
            None => r#"{"type":"pong"}"#.to_owned(),
        })),
        ClientMessage::Pong { .. } => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn principal(tenant: &str) -> Principal {
        Principal {
            expires_at: u64::MAX,
            subject: "t".to_owned(),
            tenant: tenant.to_owned(),
            roles: BTreeSet::from([Role::Viewer]),
        }
    }

    fn request(query: &str, variables: serde_json::Value) -> Request {
        Request::new(query).variables(async_graphql::Variables::from_json(variables))
    }

    #[test]
    fn live_subscriptions_share_resuming_ones_do_not() {
        let q = "subscription($id: ID!){ agentUpdated(id: $id) { position } }";
        let a = shared_key(
            &request(q, serde_json::json!({"id": "a"})),
            &principal("t1"),
        );
        let b = shared_key(
            &request(q, serde_json::json!({"id": "a"})),
            &principal("t1"),
        );
        assert!(a.is_some());
        assert_eq!(a, b);
        // Another tenant, other variables: another execution.
        let other_tenant = shared_key(
            &request(q, serde_json::json!({"id": "a"})),
            &principal("t2"),
        );
        assert_ne!(a, other_tenant);
        let other_agent = shared_key(
            &request(q, serde_json::json!({"id": "b"})),
            &principal("t1"),
        );
        assert_ne!(a, other_agent);
        // afterPosition (literal or variable), queries, fragments: their own.
        for own in [
            "subscription { events(afterPosition: \"5\") { position } }",
            "subscription($p: Position){ events(afterPosition: $p) { position } }",
            "{ projectionStatus { name } }",
            "subscription { ...F } fragment F on Subscription { events { position } }",
            "not graphql",
        ] {
            assert!(
                shared_key(&request(own, serde_json::json!({})), &principal("t1")).is_none(),
                "{own}"
            );
        }
    }

    #[test]
    fn close_reasons_fit_a_control_frame_and_keep_whole_characters() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON && cut.len() >= MAX_CLOSE_REASON - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        let ascii = "x".repeat(300);
        assert_eq!(close_reason(&ascii).len(), MAX_CLOSE_REASON);
    }

    #[test]
    fn error_messages_carry_the_errors_in_each_protocol() {
        let errors = r#"[{"message":"bad","extensions":{"code":"GRAPHQL_VALIDATION_FAILED"}}]"#;
        let text = error_message(WebSocketProtocols::GraphQLWS, "\"7\"", errors);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["type"], "error");
        assert_eq!(value["id"], "7");
        assert_eq!(value["payload"][0]["message"], "bad");
        let legacy = error_message(
            WebSocketProtocols::SubscriptionsTransportWS,
            "\"7\"",
            errors,
        );
        let value: serde_json::Value = serde_json::from_str(&legacy).unwrap_or_default();
        assert_eq!(value["payload"]["message"], "bad");
    }

    #[test]
    fn next_messages_frame_the_payload_with_the_id() {
        let text = next_message(
            WebSocketProtocols::GraphQLWS,
            "\"s\\\"1\"",
            r#"{"data":{}}"#,
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["type"], "next");
        assert_eq!(value["id"], "s\"1");
        assert_eq!(value["payload"]["data"], serde_json::json!({}));
        let legacy = next_message(WebSocketProtocols::SubscriptionsTransportWS, "\"1\"", "{}");
        assert!(legacy.starts_with(r#"{"type":"data""#), "{legacy}");
    }
}

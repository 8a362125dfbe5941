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

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_graphql::http::{ClientMessage, WebSocketProtocols};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{BoxStream, SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};

use crate::auth::{AuthError, Principal};
use crate::error::ApiError;

use super::hub::{complete_message, error_message, Item};
use super::state::AppState;
use crate::error::bad_request;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response as HttpResponse;

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
        crate::telemetry::metrics::subscription(1.0);
        self.items.push((id, stream));
    }

    fn remove(&mut self, id: &str) -> bool {
        let before = self.items.len();
        self.items.retain(|(i, _)| i != id);
        let removed = before - self.items.len();
        crate::telemetry::metrics::subscription(-(removed as f64));
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
                    crate::telemetry::metrics::subscription(-1.0);
                    return Poll::Ready(Outgoing::Message(message));
                }
                Poll::Ready(None) => {
                    let (id, _) = self.items.swap_remove(index);
                    crate::telemetry::metrics::subscription(-1.0);
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
        crate::telemetry::metrics::subscription(-(self.items.len() as f64));
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
    crate::telemetry::metrics::websocket(1.0);
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
    crate::telemetry::metrics::websocket(-1.0);
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

pub(crate) async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> HttpResponse {
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|protocols| {
            protocols
                .split(',')
                .find_map(|p| p.trim().parse::<WebSocketProtocols>().ok())
        });
    let Some(protocol) = protocol else {
        return bad_request(
            StatusCode::BAD_REQUEST,
            "request the `graphql-transport-ws` (or legacy `graphql-ws`) subprotocol",
        );
    };
    // The socket refuses what is far too large (it would have to be held
    // to be read); a message over the configured limit but within this is
    // read whole and refused by the connection with 1009, so the close
    // frame reaches a client that is not still sending (unread bytes at a
    // close make the kernel reset the connection, and the client never sees
    // the code).
    let limit = state.config.ws_message_limit;
    let hard_limit = limit.saturating_mul(4).max(1 << 20);
    upgrade
        .protocols(["graphql-transport-ws", "graphql-ws"])
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        // Small per-connection buffers: one process holds ~10,000 sockets
        // (tungstenite's defaults are 128 KiB each way). The read buffer is
        // allocated up front for every socket and kept for its lifetime,
        // while client messages are small (`subscribe`, `ping`, `complete`);
        // a larger frame grows it to the frame's length as needed.
        .read_buffer_size(512)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| serve_websocket(state, socket, protocol))
}

/// Splits the socket before the connection's future is built: an `async fn`
/// keeps its arguments in its state for its whole life, and the unsplit
/// socket is large (one process holds ~10,000 of these futures).
fn serve_websocket(
    state: Arc<AppState>,
    socket: WebSocket,
    protocol: WebSocketProtocols,
) -> impl std::future::Future<Output = ()> + Send {
    let (sink, source) = socket.split();
    crate::http::ws::serve(state, sink, source, protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! A `graphql-transport-ws` client for the tests: connect and initialise,
//! subscribe, read replies (answering pings), and see how the server closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A connection to `/graphql/ws`.
pub struct Client {
    /// The socket.
    pub ws: WebSocketStream<TcpStream>,
}

/// One `next`, `error` or `complete` of a subscription.
#[derive(Debug)]
pub enum Reply {
    /// `next` with data: the subscription id and `payload.data`.
    Next(String, Value),
    /// `next` with errors (`payload.errors`) or `error` (`payload`).
    Error(String, Value),
    /// `complete`.
    Complete(String),
}

impl Client {
    /// Connects (optionally with a small, fixed receive buffer) and
    /// initialises the connection with `token`.
    pub async fn connect(addr: SocketAddr, token: &str, receive_buffer: Option<u32>) -> Self {
        let mut client = Self::open(addr, receive_buffer).await;
        client
            .send(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}))
            .await;
        let ack = client.receive(Duration::from_secs(10)).await.unwrap();
        assert_eq!(ack["type"], "connection_ack", "got {ack}");
        client
    }

    /// Opens the socket (`graphql-transport-ws`) without initialising it.
    pub async fn open(addr: SocketAddr, receive_buffer: Option<u32>) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = receive_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(addr).await.unwrap();
        let mut request = format!("ws://{addr}/graphql/ws")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        Self { ws }
    }

    /// How the server closes the connection: the close frame's code and
    /// reason, read within `timeout` (other messages are skipped). Fails
    /// if the connection ends without a close frame or does not end.
    pub async fn closed(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("the server did not close within {timeout:?}"));
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("the connection failed instead of closing: {e}"),
                None => panic!("the connection ended without a close frame"),
            }
        }
    }

    /// Sends a protocol message.
    pub async fn send(&mut self, message: Value) {
        self.ws
            .send(Message::text(message.to_string()))
            .await
            .unwrap();
    }

    /// Sends `subscribe`.
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(json!({
            "id": id,
            "type": "subscribe",
            "payload": {"query": query, "variables": variables}
        }))
        .await;
    }

    /// The next protocol message (answering pings), or `None` on timeout.
    pub async fn receive(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(text.as_str()).unwrap();
                    if value["type"] == "ping" {
                        self.send(json!({"type": "pong"})).await;
                        continue;
                    }
                    return Some(value);
                }
                Some(Ok(Message::Close(frame))) => {
                    panic!("the server closed the connection: {frame:?}")
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("websocket failed: {e}"),
                None => panic!("the server closed the connection"),
            }
        }
    }

    /// The next reply of any subscription; panics after `timeout`.
    pub async fn reply(&mut self, timeout: Duration) -> Reply {
        let message = self
            .receive(timeout)
            .await
            .unwrap_or_else(|| panic!("no message within {timeout:?}"));
        let id = message["id"].as_str().unwrap_or_default().to_owned();
        match message["type"].as_str() {
            Some("next") if message["payload"]["errors"].is_null() => {
                Reply::Next(id, message["payload"]["data"].clone())
            }
            Some("next") => Reply::Error(id, message["payload"]["errors"].clone()),
            Some("error") => Reply::Error(id, message["payload"].clone()),
            Some("complete") => Reply::Complete(id),
            _ => panic!("unexpected message {message}"),
        }
    }

    /// The next data of subscription `id`, first from `others` (replies
    /// of other subscriptions read earlier), which keeps what it reads of
    /// other subscriptions.
    pub async fn next_of(&mut self, id: &str, others: &mut Vec<Reply>) -> Value {
        let earlier = others.iter().position(|r| match r {
            Reply::Next(i, _) | Reply::Error(i, _) | Reply::Complete(i) => i == id,
        });
        let mut reply = match earlier {
            Some(index) => others.remove(index),
            None => self.reply(Duration::from_secs(20)).await,
        };
        loop {
            match reply {
                Reply::Next(i, data) if i == id => return data,
                Reply::Error(i, errors) if i == id => panic!("subscription {id} failed: {errors}"),
                Reply::Complete(i) if i == id => panic!("subscription {id} completed"),
                other => others.push(other),
            }
            reply = self.reply(Duration::from_secs(20)).await;
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

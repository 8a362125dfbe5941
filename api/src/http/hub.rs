//! Shared subscription executions, and the messages both WebSocket
//! protocols send.
//!
//! Clients that hold the same live subscription share one execution (same
//! tenant and roles, document, operation and variables, no `afterPosition`):
//! the [`Hub`] runs it once, serializes each message once and hands the
//! bytes to every client through a bounded broadcast channel; each
//! connection only frames them with its own subscription id ([`super::ws`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_graphql::http::WebSocketProtocols;
use async_graphql::parser::types::{OperationType, Selection};
use async_graphql::{Pos, Request, Response};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::graphql::subscriptions::{too_slow, DeliveredPosition, DeliverySpan};
use crate::graphql::ApiSchema;
use crate::sync::lock;

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
        crate::telemetry::metrics::subscription_execution(true, -1.0);
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
    pub(crate) fn subscribe(
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
        crate::telemetry::metrics::subscription_execution(true, 1.0);
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
        crate::telemetry::metrics::subscription_execution(shared, 1.0);
        Self { shared }
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        crate::telemetry::metrics::subscription_execution(self.shared, -1.0);
    }
}

/// A response as JSON (a response always serializes; if not, an error).
pub(crate) fn payload(response: &Response) -> String {
    serde_json::to_string(response).unwrap_or_else(|e| {
        let error = ApiError::internal("the response could not be serialized", e);
        format!(r#"{{"errors":{}}}"#, error.to_errors_json())
    })
}

/// `next` (`data` in the legacy protocol) carrying `payload` (JSON).
pub(crate) fn next_message(protocol: WebSocketProtocols, id_json: &str, payload: &str) -> String {
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
pub(crate) fn error_message(protocol: WebSocketProtocols, id_json: &str, errors: &str) -> String {
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

pub(crate) fn complete_message(id: &str) -> String {
    serde_json::json!({"type": "complete", "id": id}).to_string()
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

//! Subscriptions, fed by the projections' change feed ([`Feed`]): one
//! upstream reader per process, fanned out in memory.
//!
//! Every message carries its global position. A subscription given
//! `afterPosition` first replays what it missed and then switches to live
//! without a gap or a duplicate at the seam:
//!
//! 1. it joins its tenant's channels ([`Feed::join`]) — from now on every
//!    live message reaches it, and every one published before lies at or
//!    below the event store's readable head read next;
//! 2. it reads that head `H` and replays its tenant's events in
//!    `(afterPosition, H]` from the store (gap-safe reads);
//! 3. it then delivers live messages, skipping those at or below the last
//!    position covered (positions are unique and increase).
//!
//! If live messages piled up beyond the buffer during the replay, the replay
//! resumes from the store from where it stopped (a few times at most). A
//! subscriber that falls `buffer` messages behind once live is closed with
//! `SUBSCRIBER_TOO_SLOW`, naming the position to resume from.
//!
//! Agent subscriptions deliver states, not events: with `afterPosition`, an
//! initial snapshot of the agents changed since, then each change's state.
//!
//! Tenant isolation: a subscriber only joins its own tenant's channels
//! (the tenant of its token), and catch-up reads filter by tenant.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::{Context, SimpleObject, Subscription as SubscriptionDerive, ID};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

pub use super::feed::{AgentMessage, EventMessage, Feed, FeedError, Subscriber};
use super::reads::{AgentFilter, AgentStatus};
use super::types::{Agent, Event};
use super::{caller, ids, services, Position};
use crate::auth::Role;
use crate::error::{unavailable, ApiError};

/// Events read from the store per catch-up page.
const PAGE: i64 = 256;
/// How many times a replay outrun by the live feed starts over from where it
/// stopped before the subscriber is treated as too slow.
const MAX_CATCH_UPS: u32 = 3;

/// The position of the last message a subscription's stream yielded, for
/// the transport: a subscription shared by several clients tags each
/// serialized message with it (the client's selection may not include the
/// position), so that a client cut off as too slow learns where to resume.
#[derive(Debug, Clone, Default)]
pub struct DeliveredPosition(pub Arc<AtomicI64>);

impl DeliveredPosition {
    /// The last position yielded (0 before the first).
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(tracker: &Option<Self>, position: i64) {
        if let Some(tracker) = tracker {
            tracker.0.store(position, Ordering::Relaxed);
        }
    }
}

/// The span of delivering the message a subscription's stream yields, for
/// the transport: a live message of a sampled trace opens it (a child of
/// its fan-out), the transport takes it once the message is resolved and
/// ends it when the message is on its way to the clients.
#[derive(Debug, Clone, Default)]
pub struct DeliverySpan(Arc<Mutex<Option<tracing::Span>>>);

impl DeliverySpan {
    /// Opens the delivery span of a live message whose fan-out has
    /// `traceparent`, if that is sampled.
    fn start(tracker: &Option<Self>, traceparent: Option<&str>, position: i64) {
        let Some(tracker) = tracker else {
            return;
        };
        let Some(span) = commands::trace::follow(traceparent, || {
            tracing::info_span!(
                parent: None,
                "subscription.deliver",
                position,
                subscribers = tracing::field::Empty,
            )
        }) else {
            return;
        };
        *tracker.slot() = Some(span);
    }

    /// The span of the message just yielded, if it has one.
    pub fn take(&self) -> Option<tracing::Span> {
        self.slot().take()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<tracing::Span>> {
        // Held for a swap only; a panic leaves an `Option` usable.
        crate::sync::lock(&self.0)
    }
}

/// An agent's state after a change.
#[derive(Debug, Clone, SimpleObject)]
pub struct AgentUpdate {
    /// Position of the change (resume after it with `afterPosition`).
    pub position: Position,
    /// The agent's state right after.
    pub agent: Arc<Agent>,
}

/// All subscriptions. Each needs the `viewer` role (any valid token).
#[derive(Default)]
pub struct Subscription;

fn feed_error(e: FeedError) -> async_graphql::Error {
    match e {
        FeedError::Stopped => ApiError::ShuttingDown(
            "the server is shutting down; subscribe again (with afterPosition) elsewhere".into(),
        )
        .into(),
        other => unavailable("the change feed", other),
    }
}

#[SubscriptionDerive]
impl Subscription {
    /// One agent's state after each change. With `afterPosition`, first its
    /// current state if it changed after that position.
    async fn agent_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
        after_position: Option<Position>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<AgentUpdate>>> {
        let who = caller(ctx, Role::Viewer)?;
        let id = ids::agent("id", &id)?.to_string();
        let feed = services(ctx).feed.clone();
        // Set-up futures (join, Redis, store) are boxed, here and below: the
        // resolver's future lives inline in async-graphql's per-subscription
        // stream for as long as the subscription, so its size is paid by
        // each of ~10,000 subscribers; boxed, it is freed once set up.
        let (subscriber, _, agents) = Box::pin(feed.join(&who.tenant)).await.map_err(feed_error)?;
        let mut snapshot = VecDeque::new();
        let mut floor = 0;
        if let Some(after) = after_position {
            let fields = Box::pin(services(ctx).redis.entity(
                projections::Entity::Agent,
                &who.tenant,
                &id,
            ))
            .await
            .map_err(|e| unavailable("Redis", e))?;
            floor = after.0;
            if let Some(fields) = fields {
                let agent = Agent::from_fields(&id, &fields);
                if agent.last_position.0 > after.0 {
                    floor = agent.last_position.0;
                    snapshot.push_back(AgentUpdate {
                        position: agent.last_position,
                        agent: Arc::new(agent),
                    });
                }
            }
        }
        let wanted = AgentWanted::One(id);
        Ok(agent_stream(AgentSub {
            _subscriber: subscriber,
            rx: agents,
            wanted,
            pending: snapshot,
            floor,
            delivered: after_position.map_or(0, |p| p.0),
            buffer: feed.buffer(),
            tracker: ctx.data_opt::<DeliveredPosition>().cloned(),
            delivery: ctx.data_opt::<DeliverySpan>().cloned(),
            done: false,
        }))
    }

    /// States of the caller's agents matching `filter` (on their new state)
    /// after each change. With `afterPosition`, first the current state of
    /// every matching agent that changed after it.
    async fn agents_updated(
        &self,
        ctx: &Context<'_>,
        filter: Option<AgentFilter>,
        after_position: Option<Position>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<AgentUpdate>>> {
        let who = caller(ctx, Role::Viewer)?;
        let services = services(ctx);
        let feed = services.feed.clone();
        let filter = filter.unwrap_or_default();
        let status = filter.status.map(AgentStatus::as_str);
        let (subscriber, _, agents) = Box::pin(feed.join(&who.tenant)).await.map_err(feed_error)?;
        let mut snapshot = Vec::new();
        let mut floor = 0;
        if let Some(after) = after_position {
            floor = after.0;
            let ids = Box::pin(services.redis.agent_ids(
                &who.tenant,
                status,
                filter.capability.as_deref(),
            ))
            .await
            .map_err(|e| unavailable("Redis", e))?;
            let rows = Box::pin(services.redis.entities(
                projections::Entity::Agent,
                &who.tenant,
                &ids,
            ))
            .await
            .map_err(|e| unavailable("Redis", e))?;
            for (id, row) in ids.iter().zip(rows) {
                let Some(fields) = row else { continue };
                let agent = Agent::from_fields(id, &fields);
                if agent.last_position.0 > after.0 {
                    floor = floor.max(agent.last_position.0);
                    snapshot.push(AgentUpdate {
                        position: agent.last_position,
                        agent: Arc::new(agent),
                    });
                }
            }
            snapshot.sort_by_key(|u| u.position);
        }
        let wanted = AgentWanted::Matching {
            status,
            capability: filter.capability,
        };
        Ok(agent_stream(AgentSub {
            _subscriber: subscriber,
            rx: agents,
            wanted,
            pending: snapshot.into(),
            floor,
            delivered: after_position.map_or(0, |p| p.0),
            buffer: feed.buffer(),
            tracker: ctx.data_opt::<DeliveredPosition>().cloned(),
            delivery: ctx.data_opt::<DeliverySpan>().cloned(),
            done: false,
        }))
    }

    /// Events of a workflow: of its own stream and of its tasks' streams.
    /// With `afterPosition`, first those after it from the event store.
    async fn workflow_events(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        after_position: Option<Position>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Arc<Event>>>> {
        let who = caller(ctx, Role::Viewer)?;
        let workflow_id = ids::workflow("workflowId", &workflow_id)?.to_string();
        event_subscription(
            services(ctx).feed.clone(),
            (
                ctx.data_opt::<DeliveredPosition>().cloned(),
                ctx.data_opt::<DeliverySpan>().cloned(),
            ),
            who.tenant.clone(),
            EventWanted {
                types: None,
                workflow: Some(workflow_id),
            },
            after_position,
        )
        .await
    }

    /// The caller's tenant's global event log, optionally only `types`.
    /// With `afterPosition`, first the events after it from the event store.
    async fn events(
        &self,
        ctx: &Context<'_>,
        after_position: Option<Position>,
        types: Option<Vec<String>>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Arc<Event>>>> {
        let who = caller(ctx, Role::Viewer)?;
        event_subscription(
            services(ctx).feed.clone(),
            (
                ctx.data_opt::<DeliveredPosition>().cloned(),
                ctx.data_opt::<DeliverySpan>().cloned(),
            ),
            who.tenant.clone(),
            EventWanted {
                types,
                workflow: None,
            },
            after_position,
        )
        .await
    }
}

/// Which agent states a subscriber wants.
enum AgentWanted {
    /// One agent.
    One(String),
    /// Agents whose new state matches.
    Matching {
        status: Option<&'static str>,
        capability: Option<String>,
    },
}

impl AgentWanted {
    fn matches(&self, agent: &Agent) -> bool {
        match self {
            AgentWanted::One(id) => agent.id.as_str() == id,
            AgentWanted::Matching { status, capability } => {
                status.is_none_or(|s| agent.status == s)
                    && capability
                        .as_ref()
                        .is_none_or(|c| agent.capabilities.contains(c))
            }
        }
    }
}

/// A subscriber to agent states.
struct AgentSub {
    /// Keeps the tenant's channel alive; counted in the metrics.
    _subscriber: Subscriber,
    rx: Receiver<Arc<AgentMessage>>,
    wanted: AgentWanted,
    /// The initial snapshot, delivered first.
    pending: VecDeque<AgentUpdate>,
    /// Live changes at or below this are covered by the snapshot. (Not
    /// raised by live messages: one change can move several agents at the
    /// same position.)
    floor: i64,
    /// The last position delivered (or `afterPosition`).
    delivered: i64,
    buffer: usize,
    tracker: Option<DeliveredPosition>,
    delivery: Option<DeliverySpan>,
    done: bool,
}

impl AgentSub {
    async fn next(&mut self) -> Option<async_graphql::Result<AgentUpdate>> {
        if self.done {
            return None;
        }
        if let Some(update) = self.pending.pop_front() {
            self.delivered = update.position.0;
            DeliveredPosition::set(&self.tracker, self.delivered);
            return Some(Ok(update));
        }
        loop {
            match self.rx.recv().await {
                Ok(m) => {
                    if m.position <= self.floor || !self.wanted.matches(&m.agent) {
                        continue;
                    }
                    self.delivered = m.position;
                    DeliveredPosition::set(&self.tracker, self.delivered);
                    DeliverySpan::start(&self.delivery, m.traceparent.as_deref(), m.position);
                    return Some(Ok(AgentUpdate {
                        position: Position(m.position),
                        agent: m.agent.clone(),
                    }));
                }
                Err(RecvError::Lagged(missed)) => {
                    self.done = true;
                    return Some(Err(too_slow(missed, self.buffer, self.delivered)));
                }
                Err(RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(feed_error(FeedError::Stopped)));
                }
            }
        }
    }
}

fn agent_stream(sub: AgentSub) -> impl Stream<Item = async_graphql::Result<AgentUpdate>> {
    futures::stream::unfold(sub, |mut sub| async move {
        let item = sub.next().await?;
        Some((item, sub))
    })
}

/// `SUBSCRIBER_TOO_SLOW`, resumable from `delivered`.
pub(crate) fn too_slow(missed: u64, buffer: usize, delivered: i64) -> async_graphql::Error {
    crate::telemetry::metrics::subscription_drop("too_slow");
    tracing::info!(
        missed,
        buffer,
        delivered,
        "closed a subscriber that fell behind"
    );
    ApiError::SubscriberTooSlow(format!(
            "this subscription fell more than {buffer} message(s) behind the live feed ({missed} missed) and was closed; \
             subscribe again with afterPosition: \"{delivered}\" (the last position delivered) to resume without a gap"
        ))
    .into()
}

/// Which events a subscriber wants.
struct EventWanted {
    /// Only these types.
    types: Option<Vec<String>>,
    /// Only events of this workflow (its stream and its tasks').
    workflow: Option<String>,
}

impl EventWanted {
    fn matches(&self, event_type: &str, workflow: Option<&str>) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|t| t == event_type))
            && self.workflow.as_deref().is_none_or(|w| workflow == Some(w))
    }
}

/// A subscriber to events.
struct EventSub {
    feed: Feed,
    tenant: String,
    /// Keeps the tenant's channel alive; counted in the metrics.
    _subscriber: Subscriber,
    rx: Receiver<Arc<EventMessage>>,
    wanted: EventWanted,
    /// Replaying `(after, until]` from the store.
    catch_up: Option<(i64, i64)>,
    /// Replayed events waiting to be delivered.
    page: VecDeque<Arc<Event>>,
    /// Every event of the tenant at or below this was handled (delivered or
    /// filtered out): live messages at or below are duplicates.
    seen: i64,
    /// The last position delivered (or `afterPosition`).
    delivered: i64,
    /// Whether a live message was taken since the last replay.
    live_since_catch_up: bool,
    catch_ups: u32,
    tracker: Option<DeliveredPosition>,
    delivery: Option<DeliverySpan>,
    done: bool,
}

async fn event_subscription(
    feed: Feed,
    (tracker, delivery): (Option<DeliveredPosition>, Option<DeliverySpan>),
    tenant: String,
    wanted: EventWanted,
    after: Option<Position>,
) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Arc<Event>>>> {
    let (subscriber, events, _) = Box::pin(feed.join(&tenant)).await.map_err(feed_error)?;
    let catch_up = match after {
        Some(after) => {
            // Read after joining: see the module docs.
            let head = Box::pin(feed.store().head())
                .await
                .map_err(|e| unavailable("the event store", e))?;
            Some((after.0, head.readable))
        }
        None => None,
    };
    let sub = EventSub {
        feed,
        tenant,
        _subscriber: subscriber,
        rx: events,
        wanted,
        catch_up,
        page: VecDeque::new(),
        seen: after.map_or(0, |p| p.0),
        delivered: after.map_or(0, |p| p.0),
        live_since_catch_up: after.is_none(),
        catch_ups: 0,
        tracker,
        delivery,
        done: false,
    };
    Ok(futures::stream::unfold(sub, |mut sub| async move {
        let item = sub.next().await?;
        Some((item, sub))
    }))
}

impl EventSub {
    async fn next(&mut self) -> Option<async_graphql::Result<Arc<Event>>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.page.pop_front() {
                self.delivered = event.position.0;
                DeliveredPosition::set(&self.tracker, self.delivered);
                return Some(Ok(event));
            }
            if let Some((after, until)) = self.catch_up {
                if let Err(e) = self.replay(after, until).await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(m) => {
                    if m.position <= self.seen {
                        continue;
                    }
                    self.seen = m.position;
                    self.live_since_catch_up = true;
                    if self
                        .wanted
                        .matches(&m.event.event_type, m.workflow.as_deref())
                    {
                        self.delivered = m.position;
                        DeliveredPosition::set(&self.tracker, self.delivered);
                        DeliverySpan::start(&self.delivery, m.traceparent.as_deref(), m.position);
                        return Some(Ok(m.event.clone()));
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    if !self.live_since_catch_up && self.catch_ups < MAX_CATCH_UPS {
                        // The live feed outran the replay, not the client:
                        // start listening afresh and replay on from the
                        // store up to a new head (same seam as at the start).
                        self.catch_ups += 1;
                        self.rx = self.rx.resubscribe();
                        match self.feed.store().head().await {
                            Ok(head) => self.catch_up = Some((self.seen, head.readable)),
                            Err(e) => {
                                self.done = true;
                                return Some(Err(unavailable("the event store", e)));
                            }
                        }
                        continue;
                    }
                    self.done = true;
                    return Some(Err(too_slow(missed, self.feed.buffer(), self.delivered)));
                }
                Err(RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(feed_error(FeedError::Stopped)));
                }
            }
        }
    }

    /// Reads the next page of the replay into `page`.
    async fn replay(&mut self, after: i64, until: i64) -> async_graphql::Result<()> {
        if after >= until {
            self.catch_up = None;
            self.seen = self.seen.max(until);
            return Ok(());
        }
        let store = self.feed.store();
        let events = store
            .read_tenant(
                &self.tenant,
                after,
                until,
                PAGE,
                self.wanted.types.as_deref(),
            )
            .await
            .map_err(|e| unavailable("the event store", e))?;
        let workflows = match self.wanted.workflow {
            Some(_) => self
                .feed
                .workflows(&self.tenant, &events)
                .await
                .map_err(|e| unavailable("Redis", e))?,
            None => vec![None; events.len()],
        };
        // Fewer than a page: the range is exhausted (`until` is below the
        // store's gap-safe horizon).
        let next = match events.last() {
            Some(last) if events.len() as i64 == PAGE => last.position,
            _ => until,
        };
        for (event, workflow) in events.iter().zip(workflows) {
            if self.wanted.matches(&event.event_type, workflow.as_deref()) {
                self.page.push_back(Arc::new(Event::from(event)));
            }
        }
        self.seen = self.seen.max(next);
        self.catch_up = Some((next, until));
        self.live_since_catch_up = false;
        Ok(())
    }
}

//! The command handler: load state (snapshot + tail) → `decide` → append with
//! the expected version, retrying `decide` on fresh state when a concurrent
//! writer wins, a bounded number of times.

use domain::{
    AgentId, AgentState, Aggregate, AggregateKind, Command, DomainError, DomainEvent, Related,
    TaskId, TaskState, WorkflowId, WorkflowState,
};
use std::sync::Arc;

use time::OffsetDateTime;
use tracing::Instrument;

use crate::cache::StateCache;
use crate::envelope::{CommandContext, EventMetadata, ExpectedVersion, NewEvent, RecordedEvent};
use crate::error::{AppendError, CommandError, ReadError};
use crate::event_store::EventStore;
use crate::idempotency::{event_id, CommandHash};

/// Tuning of the command handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerConfig {
    /// Attempts (load → decide → append) before giving up on a version
    /// conflict, when the caller did not pin an expected version.
    pub max_attempts: u32,
    /// Take a snapshot whenever a stream crosses a multiple of this many
    /// events (0 disables snapshots).
    pub snapshot_every: u64,
    /// Streams whose folded state is kept in memory between commands
    /// (0 disables the cache; see the `cache` module for why it is safe).
    pub cache_capacity: usize,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            snapshot_every: 100,
            cache_capacity: 100_000,
        }
    }
}

/// What a successful command did.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    /// The stream written.
    pub stream_id: String,
    /// The stream's version after the command.
    pub version: i64,
    /// Global position of the command's last event.
    pub position: i64,
    /// The events written.
    pub events: Vec<RecordedEvent>,
    /// True when the command id had been handled before and these are the
    /// events of that first run (nothing new was appended).
    pub replayed: bool,
    /// Load → decide → append attempts it took (more than 1 after losing
    /// races to concurrent writers).
    pub attempts: u32,
}

/// Handles commands against the event store. Cheap to clone; clones share
/// the state cache.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    store: EventStore,
    config: HandlerConfig,
    cache: Arc<StateCache>,
    /// Whether [`CommandHandler::watch_erasures`] is listening.
    watching: Arc<std::sync::atomic::AtomicBool>,
}

/// A stream folded into its aggregate state.
struct Loaded<A> {
    state: A,
    version: i64,
    tenant: Option<String>,
    /// False when taken from the cache without asking the store; the append's
    /// version check (or a fresh load) must confirm it.
    verified: bool,
    /// The cache's epoch before loading: if an erasure moved it since, the
    /// state may hold erased values (not cached, not snapshotted).
    epoch: u64,
}

/// How to load a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    /// Use the cached state as is, if there is one (no round trip).
    Optimistic,
    /// Bring the cached state (or the snapshot) up to date from the store.
    Current,
}

impl CommandHandler {
    /// A handler over `store`.
    pub fn new(store: EventStore, config: HandlerConfig) -> Self {
        Self {
            store,
            cache: Arc::new(StateCache::new(config.cache_capacity)),
            config,
            watching: Arc::default(),
        }
    }

    /// Whether [`CommandHandler::watch_erasures`] is listening for erasures
    /// (its first connection moves the cache's epoch: a command running
    /// across that moment neither caches nor snapshots its state).
    pub fn watching_erasures(&self) -> bool {
        self.watching.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The store it writes to.
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Keeps the state cache free of erased values (README, "Erasure"):
    /// listens for erasures (`NOTIFY neurectomy_erasures`) and forgets the
    /// streams each erased; while not listening (PostgreSQL unreachable)
    /// the cache is emptied and bypassed, so no erasure goes unnoticed.
    /// Runs until `shutdown`.
    pub async fn watch_erasures(&self, shutdown: tokio_util::sync::CancellationToken) {
        let pool = self.store.pool().clone();
        let mut connected = false;
        while !shutdown.is_cancelled() {
            let listened = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen(crate::erasure::CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = shutdown.cancelled() => return,
                listener = listened => match listener {
                    Ok(listener) => listener,
                    Err(error) => {
                        if connected {
                            tracing::warn!(%error, "not listening for erasures: the state cache is off until PostgreSQL is back");
                        }
                        connected = false;
                        self.watching
                            .store(false, std::sync::atomic::Ordering::Release);
                        self.cache.reset(false);
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            // Erasures may have been missed while not listening.
            self.cache.reset(true);
            self.watching
                .store(true, std::sync::atomic::Ordering::Release);
            connected = true;
            loop {
                let notification = tokio::select! {
                    () = shutdown.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match notification {
                    Ok(Some(notification)) => {
                        let streams = match notification.payload().parse::<uuid::Uuid>() {
                            Ok(erasure) => crate::erasure::streams_of(&pool, erasure).await.ok(),
                            Err(_) => None,
                        };
                        match streams {
                            Some(streams) => self.cache.erased(streams.iter().map(String::as_str)),
                            // Not known which: forget everything.
                            None => self.cache.reset(true),
                        }
                    }
                    // The connection was lost (and notifications with it).
                    Ok(None) | Err(_) => {
                        self.watching
                            .store(false, std::sync::atomic::Ordering::Release);
                        self.cache.reset(false);
                        break;
                    }
                }
            }
        }
    }

    /// Handles any command.
    pub async fn execute(
        &self,
        command: Command,
        ctx: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        match command {
            Command::Agent(c) => self.handle::<AgentState>(c, ctx).await,
            Command::Task(c) => self.handle::<TaskState>(c, ctx).await,
            Command::Workflow(c) => self.handle::<WorkflowState>(c, ctx).await,
        }
    }

    /// Handles a command of aggregate `A`.
    pub async fn handle<A: Aggregate>(
        &self,
        command: A::Command,
        ctx: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let stream = A::stream_of(&command).to_string();
        // At INFO where spans are exported (traces); elsewhere at DEBUG,
        // enabled only when the logs are (`NEURECTOMY_LOG=debug`): opening
        // a span and formatting its fields for the log layer cost a fifth
        // of a command's CPU, for log lines that at INFO seldom come.
        let span = if crate::trace::recording() {
            tracing::info_span!(
                "command",
                kind = %A::KIND,
                stream_id = %stream,
                command_id = %ctx.command_id,
                attempts = tracing::field::Empty,
            )
        } else {
            tracing::debug_span!(
                "command",
                kind = %A::KIND,
                stream_id = %stream,
                command_id = %ctx.command_id,
                attempts = tracing::field::Empty,
            )
        };
        // Inside a traced caller (the API's operation span) the command span
        // is its child; a caller without a span of its own passes its
        // context in the command context instead.
        if let Some(traceparent) = ctx.traceparent.as_deref() {
            if crate::trace::current().is_none() {
                crate::trace::continue_from(&span, traceparent);
            }
        }
        self.handle_in_span::<A>(command, ctx, stream)
            .instrument(span)
            .await
    }

    async fn handle_in_span<A: Aggregate>(
        &self,
        command: A::Command,
        ctx: &CommandContext,
        stream: String,
    ) -> Result<CommandOutcome, CommandError> {
        // A cause must be an event of the caller's tenant; the answer is the
        // same whether the id is another tenant's or nobody's.
        if let Some(cause) = ctx.causation_id {
            if !self.store.has_event_of_tenant(&ctx.tenant, cause).await? {
                return Err(CommandError::Malformed {
                    reason: format!(
                        "causationId {cause} is not an event of this tenant; name the event that caused the command (its id as `eventLog` or a command's result shows it), or leave it out"
                    ),
                });
            }
        }
        let command_json = serde_json::to_value(&command).map_err(|e| CommandError::Malformed {
            reason: format!("command cannot be serialized: {e}"),
        })?;
        let command_type = command_json
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("unknown")
            .to_owned();
        // The compact JSON of the value (sorted keys): what `to_string`
        // gives, without going through `Display`.
        let canonical = serde_json::to_vec(&command_json).map_err(|e| CommandError::Malformed {
            reason: format!("command cannot be serialized: {e}"),
        })?;
        let command_hash = CommandHash::of(canonical);

        // A caller-pinned version is checked against the store, not the cache.
        let mut freshness = if ctx.expected_version.is_some() {
            Freshness::Current
        } else {
            Freshness::Optimistic
        };
        let max_attempts = self.config.max_attempts.max(1);
        let mut attempt = 0;
        // The events carry the command span's context (not the caller's), so
        // what happens to them downstream continues this trace under it.
        let traceparent = crate::trace::current().or_else(|| ctx.traceparent.clone());
        let (expected, actual) = loop {
            let loaded = self.load::<A>(&stream, freshness).await?;
            freshness = Freshness::Current;
            // Only decisions on current state count against `max_attempts`:
            // the first load may come from the cache unchecked, and a refusal
            // or a conflict decided on it is a stale cache, not a lost race,
            // so it is decided again on current state (once per command).
            let verified = loaded.verified;
            if verified {
                attempt += 1;
            }
            tracing::Span::current().record("attempts", attempt.max(1));
            if loaded.tenant.as_deref().is_some_and(|t| t != ctx.tenant) {
                // Another tenant's stream is indistinguishable from a missing
                // one, and a creation's id that is taken is taken, whoever
                // took it (ids are UUIDs: the collision tells nothing).
                let id = stream
                    .split_once('-')
                    .map_or(stream.as_str(), |(_, id)| id)
                    .to_owned();
                return Err(if A::creates(&command) {
                    DomainError::AlreadyExists { kind: A::KIND, id }
                } else {
                    DomainError::NotFound { kind: A::KIND, id }
                }
                .into());
            }
            let current = u64::try_from(loaded.version).unwrap_or(0);
            if let Some(required) = ctx.expected_version.and_then(ExpectedVersion::required) {
                if required != current {
                    if let Some(done) = self.already_handled(ctx, &command_hash).await? {
                        return Ok(done);
                    }
                    return Err(CommandError::Conflict {
                        stream_id: stream,
                        expected: ctx.expected_version.unwrap_or(ExpectedVersion::Any),
                        actual: current,
                        attempts: attempt,
                    });
                }
            }

            let related = self.related(&loaded.state, &command, &ctx.tenant).await?;
            let decided = crate::trace::step(|| tracing::info_span!("decide"))
                .in_scope(|| loaded.state.decide(&command, &related));
            let events = match decided {
                Ok(events) => events,
                // Refused on a cached state: check again on the current one.
                Err(_) if !verified => continue,
                Err(refusal) => {
                    // A retried command may be refused by the state it produced
                    // itself (e.g. completing a completed task): answer with the
                    // first run's result instead.
                    if let Some(done) = self.already_handled(ctx, &command_hash).await? {
                        return Ok(done);
                    }
                    tracing::debug!(code = refusal.code(), %refusal, "command refused");
                    return Err(refusal.into());
                }
            };

            let now = OffsetDateTime::now_utc();
            let new_events: Vec<NewEvent> = events
                .iter()
                .cloned()
                .enumerate()
                .map(|(index, event)| {
                    let event = A::into_domain(event);
                    NewEvent {
                        event_type: event.event_type().to_owned(),
                        schema_version: event.schema_version(),
                        data: event.to_data(),
                        metadata: EventMetadata {
                            event_id: event_id(&ctx.tenant, ctx.command_id, index),
                            command_id: ctx.command_id,
                            command_type: command_type.clone(),
                            command_hash: command_hash.as_str().to_owned(),
                            correlation_id: ctx.correlation_id.unwrap_or(ctx.command_id),
                            causation_id: ctx.causation_id.unwrap_or(ctx.command_id),
                            actor: ctx.actor.clone(),
                            tenant: ctx.tenant.clone(),
                            occurred_at: now,
                            traceparent: traceparent.clone(),
                        },
                    }
                })
                .collect();

            match self
                .store
                .append(&stream, ExpectedVersion::Exact(current), new_events)
                .await
            {
                Ok(recorded) => {
                    let mut state = loaded.state;
                    for event in &events {
                        state.evolve(event);
                    }
                    let new_version = recorded.last().map_or(loaded.version, |e| e.stream_version);
                    if self.cache.epoch() == loaded.epoch {
                        self.maybe_snapshot(&stream, &ctx.tenant, &state, current, new_version)
                            .await;
                    }
                    self.cache
                        .put(&stream, new_version, &ctx.tenant, state, loaded.epoch);
                    let last = recorded
                        .last()
                        .map_or((current as i64, 0), |e| (e.stream_version, e.position));
                    return Ok(CommandOutcome {
                        stream_id: stream,
                        version: last.0,
                        position: last.1,
                        events: recorded,
                        replayed: false,
                        attempts: attempt.max(1),
                    });
                }
                Err(AppendError::Conflict {
                    expected, actual, ..
                }) => {
                    self.cache.remove(&stream);
                    if ctx.expected_version.is_some() {
                        if let Some(done) = self.already_handled(ctx, &command_hash).await? {
                            return Ok(done);
                        }
                        break (expected, actual);
                    }
                    if attempt >= max_attempts {
                        break (expected, actual);
                    }
                    tracing::debug!(
                        attempt,
                        actual,
                        "version conflict; deciding again on fresh state"
                    );
                }
                Err(AppendError::DuplicateEvent { .. }) => {
                    return match self.already_handled(ctx, &command_hash).await? {
                        Some(done) => Ok(done),
                        // The colliding events vanished: impossible unless
                        // someone deletes events by hand.
                        None => Err(CommandError::Malformed {
                            reason: format!(
                                "command id {} collides with events that cannot be found",
                                ctx.command_id
                            ),
                        }),
                    };
                }
                Err(AppendError::BadBatch { count, max }) => {
                    return Err(CommandError::Malformed {
                        reason: format!(
                            "the command produced {count} events; one append holds at most {max}"
                        ),
                    })
                }
                Err(AppendError::Refused { reason, .. }) => {
                    return Err(CommandError::Malformed { reason })
                }
                Err(AppendError::Database { source, .. }) => {
                    return Err(CommandError::Unavailable { source })
                }
            }
        };
        Err(CommandError::Conflict {
            stream_id: stream,
            expected: ctx.expected_version.unwrap_or(expected),
            actual,
            attempts: attempt.max(1),
        })
    }

    /// If this command id already produced events, returns that first result
    /// (same content) or `CommandIdReused` (different content).
    async fn already_handled(
        &self,
        ctx: &CommandContext,
        command_hash: &CommandHash,
    ) -> Result<Option<CommandOutcome>, CommandError> {
        let events = self
            .store
            .events_of_command(&ctx.tenant, ctx.command_id)
            .await?;
        let Some(first) = events.first() else {
            return Ok(None);
        };
        if !command_hash.matches(&first.metadata.command_hash) {
            return Err(CommandError::CommandIdReused {
                command_id: ctx.command_id,
                stream_id: first.stream_id.clone(),
                previous_type: first.metadata.command_type.clone(),
            });
        }
        let last = events
            .last()
            .map_or((0, 0), |e| (e.stream_version, e.position));
        Ok(Some(CommandOutcome {
            stream_id: first.stream_id.clone(),
            version: last.0,
            position: last.1,
            events,
            replayed: true,
            attempts: 1,
        }))
    }

    /// Folds a stream into aggregate state: from the cache (optimistic), from
    /// the cache plus newer events, or from the snapshot plus its tail.
    async fn load<A: Aggregate>(
        &self,
        stream: &str,
        freshness: Freshness,
    ) -> Result<Loaded<A>, CommandError> {
        let span =
            crate::trace::step(|| tracing::info_span!("load", kind = %A::KIND, stream, ?freshness));
        self.load_in_span(stream, freshness).instrument(span).await
    }

    async fn load_in_span<A: Aggregate>(
        &self,
        stream: &str,
        freshness: Freshness,
    ) -> Result<Loaded<A>, CommandError> {
        let epoch = self.cache.epoch();
        let cached = self.cache.get::<A>(stream);
        if let (Freshness::Optimistic, Some((version, tenant, state))) = (freshness, &cached) {
            return Ok(Loaded {
                state: state.clone(),
                version: *version,
                tenant: Some(tenant.clone()),
                verified: false,
                epoch,
            });
        }
        let (mut state, base_version, mut tenant, loaded) = match cached {
            Some((version, tenant, state)) => {
                let tail = self.store.load_stream_after(stream, version).await?;
                (state, version, Some(tenant), tail)
            }
            None => {
                let mut loaded = self.store.load_stream(stream, A::SNAPSHOT_VERSION).await?;
                match loaded.snapshot.take() {
                    Some((version, json)) => match serde_json::from_value::<A>(json) {
                        Ok(state) => (state, version, None, loaded),
                        Err(error) => {
                            // A snapshot that no longer parses is only an
                            // optimisation lost: rebuild from every event.
                            tracing::warn!(%error, stream, "ignoring unreadable snapshot");
                            let all = self.store.load_stream(stream, i32::MIN).await?;
                            (A::default(), 0, None, all)
                        }
                    },
                    None => (A::default(), 0, None, loaded),
                }
            }
        };
        let version = loaded.events.last().map_or(base_version, |e| e.version);
        if loaded.tenant.is_some() {
            tenant = loaded.tenant;
        }
        for stored in loaded.events {
            let event =
                DomainEvent::from_stored(&stored.event_type, stored.schema_version, stored.data)
                    .map_err(|source| {
                        CommandError::from(ReadError::Decode {
                            position: stored.position,
                            stream_id: stream.to_owned(),
                            source,
                        })
                    })?;
            match A::from_domain(event) {
                Some(event) => state.evolve(&event),
                None => {
                    tracing::error!(
                        stream,
                        version = stored.version,
                        event_type = stored.event_type,
                        "event of another aggregate kind in stream"
                    );
                }
            }
        }
        if let Some(tenant) = &tenant {
            self.cache
                .put(stream, version, tenant, state.clone(), epoch);
        }
        Ok(Loaded {
            state,
            version,
            tenant,
            verified: true,
            epoch,
        })
    }

    /// Loads the current state of every stream `decide` reads besides its own.
    /// Streams of other tenants are left out (they look absent).
    async fn related<A: Aggregate>(
        &self,
        state: &A,
        command: &A::Command,
        tenant: &str,
    ) -> Result<Related, CommandError> {
        let mut related = Related::default();
        for stream in state.related(command) {
            let name = stream.to_string();
            let uuid = stream.uuid();
            match stream.kind() {
                AggregateKind::Agent => {
                    let l = self.load::<AgentState>(&name, Freshness::Current).await?;
                    if l.tenant.as_deref() == Some(tenant) {
                        related.insert_agent(AgentId::from_uuid(uuid), l.state);
                    }
                }
                AggregateKind::Task => {
                    let l = self.load::<TaskState>(&name, Freshness::Current).await?;
                    if l.tenant.as_deref() == Some(tenant) {
                        related.insert_task(TaskId::from_uuid(uuid), l.state);
                    }
                }
                AggregateKind::Workflow => {
                    let l = self
                        .load::<WorkflowState>(&name, Freshness::Current)
                        .await?;
                    if l.tenant.as_deref() == Some(tenant) {
                        related.insert_workflow(WorkflowId::from_uuid(uuid), l.state);
                    }
                }
                // No aggregate relates to an erasure.
                AggregateKind::Erasure => {}
            }
        }
        Ok(related)
    }

    /// Saves a snapshot when the append crossed a multiple of `snapshot_every`.
    /// Failures are logged, not returned: the command has committed, and a
    /// missing snapshot only costs load time.
    async fn maybe_snapshot<A: Aggregate>(
        &self,
        stream: &str,
        tenant: &str,
        state: &A,
        before: u64,
        after: i64,
    ) {
        let every = self.config.snapshot_every;
        if every == 0 || (after as u64) / every == before / every {
            return;
        }
        let json = match serde_json::to_value(state) {
            Ok(json) => json,
            Err(error) => {
                tracing::warn!(%error, stream, "could not serialize a snapshot");
                return;
            }
        };
        if let Err(error) = self
            .store
            .save_snapshot(stream, after, A::SNAPSHOT_VERSION, tenant, json)
            .await
        {
            tracing::warn!(%error, stream, "could not save a snapshot");
        }
    }
}

#[cfg(test)]
mod tests {
    /// Command hashes are stored with events and compared when a command
    /// is retried: the bytes hashed must stay what `Value::to_string` gave.
    #[test]
    fn the_hashed_bytes_are_the_compact_json_of_to_string() {
        let command = serde_json::json!({
            "type": "CreateTask",
            "task_id": "0b9d4d3e-5b1a-4bb4-9d7e-2f0a1f6f4d11",
            "title": "quote \" backslash \\ tab \t newline \n é 🚀 \u{0001}",
            "input": {"z": [1, 2.5, -3e-7, null, true], "a": {"nested": {}}},
            "priority": 50,
        });
        let hashed = serde_json::to_vec(&command).unwrap();
        assert_eq!(hashed, command.to_string().into_bytes());
    }
}

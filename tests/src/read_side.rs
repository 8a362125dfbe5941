//! What the read-side fault tests share: the seed of their random choices,
//! a fast backlog, the log decoded, a read model wrapper that holds a batch
//! where the test wants to kill the projector (and the kill rounds built on
//! it), clean rebuilds to compare with, and readable differences between
//! dumps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commands::testkit::eventually;
use commands::EventStore;
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use projections::{
    ApplyError, Fence, Projected, Projector, ProjectorConfig, ProjectorState, ReadModel,
};
use tokio::sync::{watch, Notify};

use crate::pipeline::Pipeline;

/// The seed of a test's random choices: `NEURECTOMY_TEST_SEED`, or a random
/// one. Logged with the test's name, so that a failing run can be repeated.
/// Never 0 (the simulator takes 0 for "pick one").
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("NEURECTOMY_TEST_SEED") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("NEURECTOMY_TEST_SEED={value:?} is not a u64")),
        Err(_) => rand::random::<u64>(),
    }
    .max(1);
    eprintln!("{test}: seed {seed} (NEURECTOMY_TEST_SEED={seed} repeats it)");
    seed
}

/// Appends a backlog of `agents` × `per_agent` agent events straight to
/// the store, one append (one transaction) per agent, far faster than
/// commands: each agent registered, then paused and resumed in turn, so
/// that every event moves its hash, its status index sets, its score in the
/// recently active agents and the change feed. Ids, names and capabilities
/// come from `rng`; each event occurs a millisecond after the one before.
pub async fn append_agent_backlog(
    store: &EventStore,
    tenant: &str,
    agents: usize,
    per_agent: usize,
    rng: &mut impl rand::Rng,
) {
    use domain::{AgentEvent, AgentId, AgentKind, DomainEvent};
    const CAPABILITIES: [&str; 5] = ["code", "review", "search", "plan", "test"];
    let mut at = time::OffsetDateTime::now_utc();
    for n in 0..agents {
        let agent_id = AgentId::from_uuid(uuid::Uuid::from_u128(rng.gen()));
        let mut capabilities: Vec<String> = CAPABILITIES
            .iter()
            .filter(|_| rng.gen_bool(0.5))
            .map(|c| (*c).to_owned())
            .collect();
        capabilities.sort();
        let command_id = uuid::Uuid::from_u128(rng.gen());
        let events = (0..per_agent)
            .map(|i| {
                let event = match i {
                    0 => AgentEvent::AgentRegistered {
                        agent_id,
                        name: format!("backlog-{n}"),
                        kind: AgentKind::Tool,
                        model: None,
                        capabilities: capabilities.clone(),
                        parent_agent_id: None,
                    },
                    i if i % 2 == 1 => AgentEvent::AgentPaused {
                        agent_id,
                        reason: Some(format!("pause {i}")),
                    },
                    _ => AgentEvent::AgentResumed { agent_id },
                };
                let event = DomainEvent::Agent(event);
                at += Duration::from_millis(1);
                commands::NewEvent {
                    event_type: event.event_type().to_owned(),
                    schema_version: event.schema_version(),
                    data: event.to_data(),
                    metadata: commands::EventMetadata {
                        event_id: uuid::Uuid::from_u128(rng.gen()),
                        command_id,
                        command_type: "Backlog".to_owned(),
                        command_hash: String::new(),
                        correlation_id: command_id,
                        causation_id: command_id,
                        actor: "test".to_owned(),
                        tenant: tenant.to_owned(),
                        occurred_at: at,
                        traceparent: None,
                    },
                }
            })
            .collect();
        store
            .append(
                &DomainEvent::Agent(AgentEvent::AgentResumed { agent_id })
                    .stream_id()
                    .to_string(),
                commands::ExpectedVersion::NoStream,
                events,
            )
            .await
            .unwrap();
    }
}

/// Every event of the log up to `until`, decoded.
pub async fn log(store: &EventStore, until: i64) -> Vec<Projected> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 1_000).await.unwrap();
        let Some(last) = batch.last().map(|e| e.position) else {
            return out;
        };
        out.extend(
            batch
                .into_iter()
                .take_while(|recorded| recorded.position <= until)
                .map(|recorded| {
                    let event = recorded.decode().unwrap();
                    Projected::new(recorded, event)
                }),
        );
        if last >= until {
            return out;
        }
        after = last;
    }
}

/// A Redis read model built from the log up to `until` in one clean pass
/// (batches of 200, one model, nothing killed) under a prefix of its own.
pub async fn redis_rebuilt(store: &EventStore, until: i64) -> TestRedis {
    let clean = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    for batch in log(store, until).await.chunks(200) {
        clean.model.apply(batch).await.unwrap();
    }
    assert_eq!(clean.model.checkpoint().await.unwrap(), until);
    clean
}

/// A graph read model built from the log up to `until` in one clean pass
/// (batches of 200, one model, nothing killed) in a database of its own.
pub async fn graph_rebuilt(store: &EventStore, until: i64) -> TestGraph {
    let clean = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    for batch in log(store, until).await.chunks(200) {
        clean.model.apply(batch).await.unwrap();
    }
    assert_eq!(clean.model.checkpoint().await.unwrap(), until);
    clean
}

/// Fails unless two Redis dumps ([`projections::testkit::dump_model`]) are
/// equal, naming the first keys that differ (`expected` is the reference:
/// a clean rebuild, or the model before a fault).
pub fn assert_same_redis(
    what: &str,
    actual: &BTreeMap<String, String>,
    expected: &BTreeMap<String, String>,
) {
    let lines = |dump: &BTreeMap<String, String>| {
        dump.iter()
            .map(|(key, value)| format!("{key} = {value}"))
            .collect::<Vec<_>>()
    };
    assert_same_lines(what, &lines(actual), &lines(expected));
}

/// Fails unless two dumps (sorted lines: a graph's, or a Redis model's
/// keys with their contents) are equal, listing the first differences:
/// lines found in only one of them, and, for a key (the text before ` = `)
/// whose contents differ, where they first differ.
pub fn assert_same_lines(what: &str, actual: &[String], expected: &[String]) {
    if actual == expected {
        return;
    }
    fn surplus<'a>(lines: &'a [String], other: &[String]) -> Vec<&'a str> {
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for line in other {
            *counts.entry(line.as_str()).or_default() += 1;
        }
        let mut out = Vec::new();
        for line in lines {
            match counts.get_mut(line.as_str()) {
                Some(n) if *n > 0 => *n -= 1,
                _ => out.push(line.as_str()),
            }
        }
        out
    }
    // At most 300 bytes of `line` from about `at` on.
    fn excerpt(line: &str, at: usize) -> String {
        let mut start = at.saturating_sub(60).min(line.len());
        while !line.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (start + 300).min(line.len());
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let before = if start > 0 { "…" } else { "" };
        let after = if end < line.len() { "…" } else { "" };
        format!("{before}{}{after}", &line[start..end])
    }
    let key = |line: &str| line.split_once(" = ").map(|(key, _)| key.to_owned());
    let (mut ours, mut theirs) = (surplus(actual, expected), surplus(expected, actual));
    let mut report = Vec::new();
    ours.retain(|line| {
        let Some(k) = key(line) else { return true };
        let Some(i) = theirs.iter().position(|t| key(t).as_ref() == Some(&k)) else {
            return true;
        };
        let other = theirs.remove(i);
        let at = line
            .bytes()
            .zip(other.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(line.len().min(other.len()));
        report.push(format!(
            "  {k} differs at byte {at}:\n    {what}: {}\n    the reference: {}",
            excerpt(line, at),
            excerpt(other, at)
        ));
        false
    });
    report.extend(
        ours.iter()
            .map(|line| format!("  only in {what}: {}", excerpt(line, 0))),
    );
    report.extend(
        theirs
            .iter()
            .map(|line| format!("  only in the reference: {}", excerpt(line, 0))),
    );
    let shown = report.len().min(12);
    panic!(
        "{what} ({} lines) differs from the reference ({} lines) in {} place(s), e.g.:\n{}",
        actual.len(),
        expected.len(),
        report.len(),
        report[..shown].join("\n")
    );
}

/// Where [`Gate`] holds a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Before the inner model writes anything of it.
    BeforeWrite,
    /// After the inner model wrote it, with its checkpoint, and before the
    /// runtime sees the apply return: not in the projector's status, and
    /// (live) not acknowledged to JetStream.
    AfterWrite,
}

/// A batch [`Gate`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Where.
    pub hold: Hold,
    /// Position of its first event.
    pub first: i64,
    /// Position of its last event.
    pub last: i64,
    /// What the inner model's apply returned (after the write only).
    pub written: Option<Result<(), String>>,
}

/// A read model that passes every batch to `inner`, except the one it is
/// armed for ([`Gate::arm`]): that batch is held, before or after the inner
/// write, until [`Gate::release`] — or until the test kills the projector
/// in it. [`Gate::held`] tells the test a batch is held, and which.
pub struct Gate<M> {
    inner: M,
    catch_up_batch_size: Option<usize>,
    /// The hold armed, and how many applies still pass before it.
    armed: Arc<Mutex<Option<(Hold, usize)>>>,
    held: Arc<watch::Sender<Option<Held>>>,
    release: Arc<Notify>,
}

impl<M: Clone> Clone for Gate<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            catch_up_batch_size: self.catch_up_batch_size,
            armed: self.armed.clone(),
            held: self.held.clone(),
            release: self.release.clone(),
        }
    }
}

impl<M: ReadModel> Gate<M> {
    /// An open gate in front of `inner` (with its catch-up batch size).
    pub fn new(inner: M) -> Self {
        Self {
            catch_up_batch_size: inner.catch_up_batch_size(),
            inner,
            armed: Arc::default(),
            held: Arc::new(watch::channel(None).0),
            release: Arc::default(),
        }
    }

    /// The same, with catch-up batches of the projector's batch size (a
    /// test's backlog then spans several catch-up batches).
    pub fn with_projector_batches(mut self) -> Self {
        self.catch_up_batch_size = None;
        self
    }

    /// The model behind the gate.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// Holds the batch after the next `skip` ones, at `hold`.
    pub fn arm(&self, hold: Hold, skip: usize) {
        self.held.send_replace(None);
        *self.armed.lock().unwrap() = Some((hold, skip));
    }

    /// Waits (at most a minute) until a batch is held; returns it.
    pub async fn held(&self) -> Held {
        let held = self.held.subscribe();
        eventually("the gate to hold a batch", Duration::from_secs(60), || {
            let held = held.borrow().clone();
            async move { held }
        })
        .await
    }

    /// Lets the held batch go on.
    pub fn release(&self) {
        self.release.notify_one();
    }

    /// Whether this apply is the one to hold.
    fn take(&self) -> Option<Hold> {
        let mut armed = self.armed.lock().unwrap();
        match armed.as_mut() {
            Some((hold, 0)) => {
                let hold = *hold;
                *armed = None;
                Some(hold)
            }
            Some((_, skip)) => {
                *skip -= 1;
                None
            }
            None => None,
        }
    }

    async fn gated(
        &self,
        after: Option<i64>,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        let apply = || async {
            match after {
                Some(after) => self.inner.apply_after(after, fence, events).await,
                None => self.inner.apply(events).await,
            }
        };
        let Some(hold) = self.take() else {
            return apply().await;
        };
        let position = |p: Option<&Projected>| p.map_or(0, |p| p.recorded.position);
        let mut held = Held {
            hold,
            first: position(events.first()),
            last: position(events.last()),
            written: None,
        };
        match hold {
            Hold::BeforeWrite => {
                self.held.send_replace(Some(held));
                self.release.notified().await;
                apply().await
            }
            Hold::AfterWrite => {
                let result = apply().await;
                held.written = Some(result.as_ref().map(|_| ()).map_err(ToString::to_string));
                self.held.send_replace(Some(held));
                self.release.notified().await;
                result
            }
        }
    }
}

impl<M: ReadModel> ReadModel for Gate<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn catch_up_batch_size(&self) -> Option<usize> {
        self.catch_up_batch_size
    }

    async fn checkpoint(&self) -> Result<i64, ApplyError> {
        self.inner.checkpoint().await
    }

    async fn apply(&self, events: &[Projected]) -> Result<(), ApplyError> {
        self.gated(None, None, events).await
    }

    async fn apply_after(
        &self,
        after: i64,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        self.gated(Some(after), fence, events).await
    }
}

/// Runs a projector on the model `model_for(round)` gives, `rounds` times,
/// and kills each run (aborts its task) with a batch held inside the model:
/// even rounds while catching up (the run starts on a backlog of several
/// catch-up batches), odd rounds while live; rounds 0, 1, 4, 5… before the
/// write, the others after it (written with its checkpoint, neither in the
/// projector's status nor acknowledged to JetStream). At least one batch
/// is applied in every run before the held one (how many comes from
/// `seed`), so the checkpoint moves between kills.
///
/// Each kill is checked to have landed where it should: the projector's
/// state is the phase aimed at, the checkpoint moved during the run, and
/// the stored checkpoint shows the held batch unwritten (before) or
/// written with the projector unaware of it (after). Commands must be
/// flowing throughout. Projectors take batches of `batch_size` events,
/// in catch-up too.
pub async fn kill_inside_batches<M, F, Fut>(
    pipe: &Pipeline,
    rounds: usize,
    batch_size: usize,
    seed: u64,
    mut model_for: F,
) where
    M: ReadModel + Clone,
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = M>,
{
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        let catching_up = round % 2 == 0;
        let hold = if round % 4 < 2 {
            Hold::BeforeWrite
        } else {
            Hold::AfterWrite
        };
        let model = model_for(round).await;
        let gate = Gate::new(model.clone()).with_projector_batches();
        let projector = Arc::new(Projector::new(
            gate.clone(),
            pipe.store.clone(),
            pipe.nats.client.clone(),
            ProjectorConfig {
                stream_name: pipe.nats.relay.stream_name.clone(),
                batch_size,
                ..ProjectorConfig::default()
            },
        ));
        let before = model.checkpoint().await.unwrap();
        let skip = rng.gen_range(1..=2usize);
        if catching_up {
            // More readable events than `skip + 1` catch-up batches: the
            // catch-up's pages are full up to the held batch, one of them.
            let need = (skip + 1) * batch_size + 1;
            let store = &pipe.store;
            eventually(
                "a backlog of several catch-up batches",
                Duration::from_secs(60),
                || async move {
                    let readable = store.read_all(before, need as i64).await.unwrap().len();
                    (readable >= need).then_some(())
                },
            )
            .await;
            gate.arm(hold, skip);
        }
        let (_stop, task) = pipe.spawn(&projector);
        if !catching_up {
            let status = projector.status();
            eventually("the projector to go live", Duration::from_secs(60), || {
                let state = status.borrow().state;
                async move { (state == ProjectorState::Live).then_some(()) }
            })
            .await;
            gate.arm(hold, skip);
        }
        let held = gate.held().await;
        let status = projector.status().borrow().clone();
        let stored = model.checkpoint().await.unwrap();
        let context = format!(
            "round {round}: {held:?}, stored checkpoint {stored} (was {before}), {status:?}"
        );
        let phase = if catching_up {
            ProjectorState::CatchingUp
        } else {
            ProjectorState::Live
        };
        assert_eq!(status.state, phase, "{context}");
        assert!(stored > before, "the checkpoint did not move: {context}");
        match hold {
            Hold::BeforeWrite => assert!(
                stored == status.checkpoint && stored < held.first,
                "the held batch was written: {context}"
            ),
            Hold::AfterWrite => {
                assert_eq!(held.written, Some(Ok(())), "{context}");
                assert!(
                    stored == held.last && status.checkpoint < held.first,
                    "the held batch is not written, or the projector saw it applied: {context}"
                );
            }
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled(), "{context}");
        eprintln!("killed: {context}");
    }
}

#[cfg(test)]
mod tests {
    use super::assert_same_lines;

    fn lines(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| (*l).to_owned()).collect()
    }

    #[test]
    fn equal_dumps_pass() {
        assert_same_lines(
            "a",
            &lines(&["k = 1", "k = 1"]),
            &lines(&["k = 1", "k = 1"]),
        );
    }

    #[test]
    fn differences_are_named_where_they_are() {
        let failed = std::panic::catch_unwind(|| {
            assert_same_lines(
                "the model",
                &lines(&["feed = [1, 2, 4]", "ghost = x", "same = 1"]),
                &lines(&["feed = [1, 2, 3]", "same = 1", "same = 1"]),
            )
        })
        .unwrap_err();
        let message = failed.downcast_ref::<String>().unwrap();
        assert!(message.contains("in 3 place(s)"), "{message}");
        assert!(message.contains("feed differs at byte 14"), "{message}");
        assert!(message.contains("the model: feed = [1, 2, 4]"), "{message}");
        assert!(
            message.contains("only in the model: ghost = x"),
            "{message}"
        );
        assert!(
            message.contains("only in the reference: same = 1"),
            "{message}"
        );
    }
}

//! The near cache of `agent(id)`: agents as Redis last held them, kept in
//! the API process and kept current by the change feed.
//!
//! A cached agent is answered without a Redis round trip — most of what an
//! `agent(id)` request cost was that trip (the send, the wake-ups, the
//! reply's parse) and the hash's conversion. What it is kept current by:
//!
//! - The feed ([`super::feed`]) follows every tenant the cache holds agents
//!   of (the cache is a member of the tenant's channels, as a subscriber
//!   is). Every change it reads for the tenant first bumps the tenant's
//!   sequence number, then drops the agents the change touched (named by
//!   its stream or its data, or the assignee of a task it ended). An agent
//!   is stored only if no change of its tenant was read between the start
//!   of its Redis read and the store ([`Ticket`]): a read that raced a
//!   change is answered but not kept.
//! - Hits are answered only while the feed is reading (a failed read clears
//!   everything until the reader is back), while the Redis generation the
//!   API reads is the one the feed follows, and while a connection to
//!   Redis on which nothing is ever sent is still open: when Redis dies or
//!   restarts the kernel closes it, and a non-blocking peek on each hit
//!   sees that before any request could have reached the dead server, so
//!   reads during an outage fail fast as before instead of answering from
//!   memory. (Redis over a Unix socket has no such connection: no cache.)
//!
//! What a caller sees: an agent at most the feed's delay behind Redis (it
//! reads changes as they are written; typically well under a millisecond),
//! never older than an answer it got before from this process. A query
//! with `atLeastPosition` (or `X-Min-Position`) reads Redis after waiting
//! for its position, exactly as without the cache.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use super::types::Agent;
use crate::sync::lock;

/// What [`NearCache::lookup`] found.
pub enum Lookup {
    /// The agent, current as of the feed's last read.
    Hit(Arc<Agent>),
    /// Not cached: read Redis, and store what it said with
    /// [`NearCache::store`] if there is a ticket.
    Miss(Option<Ticket>),
    /// The cache does not follow the tenant yet: read Redis, and have the
    /// feed follow it ([`super::feed::Feed::follow`]).
    Follow,
}

/// The tenant's sequence number when a read of Redis started.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

/// What keeps the feed following a tenant while it is held (the feed's
/// `Subscriber`).
type Membership = Box<dyn std::any::Any + Send>;

struct Tenant {
    /// The feed follows the tenant while this is held (`None`: joining).
    member: Option<Membership>,
    agents: HashMap<String, Arc<Agent>>,
    /// Bumped by every change read for the tenant.
    seq: u64,
    /// Looked up since the last sweep.
    used: bool,
}

#[derive(Default)]
struct State {
    /// The Redis generation the feed reads; `None` while it does not.
    live: Option<String>,
    tenants: HashMap<String, Tenant>,
    /// Agents held over all tenants.
    held: usize,
    /// Open while Redis is up (see the module's documentation).
    sentinel: Option<TcpStream>,
}

impl State {
    fn clear(&mut self) {
        for tenant in self.tenants.values_mut() {
            tenant.agents.clear();
            tenant.seq += 1;
        }
        self.held = 0;
    }

    /// Whether the sentinel connection is still open (closes it if not).
    fn redis_up(&mut self) -> bool {
        let Some(socket) = &self.sentinel else {
            return false;
        };
        let mut byte = [0u8; 1];
        let up = match socket.peek(&mut byte) {
            // Redis never writes to a connection that sent nothing.
            Ok(n) => n > 0,
            Err(e) => e.kind() == ErrorKind::WouldBlock,
        };
        if !up {
            tracing::debug!("the near cache's connection to Redis closed; answering from Redis");
            self.sentinel = None;
            self.live = None;
            self.clear();
        }
        up
    }
}

/// The cache; one per process, owned by the feed.
pub struct NearCache {
    /// Agents held at most over all tenants (0: no cache).
    capacity: usize,
    /// Tenants followed at most.
    tenants: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("NearCache")
            .field("capacity", &self.capacity)
            .field("tenants", &state.tenants.len())
            .field("held", &state.held)
            .finish()
    }
}

impl NearCache {
    /// A cache of at most `capacity` agents (0: none) of at most `tenants`
    /// tenants.
    pub fn new(capacity: usize, tenants: usize) -> Self {
        Self {
            capacity,
            tenants,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether the cache is on at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// `id` of `tenant`, if cached and the cache may answer; `generation`
    /// tells whether the API reads the generation the feed follows.
    pub fn lookup(&self, tenant: &str, id: &str, generation: impl Fn(&str) -> bool) -> Lookup {
        if !self.enabled() {
            return Lookup::Miss(None);
        }
        let mut state = lock(&self.state);
        let current = state.live.as_deref().is_some_and(generation);
        if !current || !state.redis_up() {
            return Lookup::Miss(None);
        }
        let limit = self.tenants;
        let known = state.tenants.len();
        let Some(entry) = state.tenants.get_mut(tenant) else {
            if known >= limit {
                return Lookup::Miss(None);
            }
            state.tenants.insert(
                tenant.to_owned(),
                Tenant {
                    member: None,
                    agents: HashMap::new(),
                    seq: 0,
                    used: true,
                },
            );
            return Lookup::Follow;
        };
        entry.used = true;
        if entry.member.is_none() {
            return Lookup::Miss(None);
        }
        match entry.agents.get(id) {
            Some(agent) => Lookup::Hit(agent.clone()),
            None => Lookup::Miss(Some(Ticket(entry.seq))),
        }
    }

    /// Keeps `agent` (as Redis said when the read with `ticket` started)
    /// unless a change of its tenant was read since.
    pub fn store(&self, tenant: &str, id: &str, ticket: Ticket, agent: Arc<Agent>) {
        let mut state = lock(&self.state);
        if state.live.is_none() {
            return;
        }
        if state.held >= self.capacity {
            state.clear();
        }
        let Some(entry) = state.tenants.get_mut(tenant) else {
            return;
        };
        if entry.member.is_none() || entry.seq != ticket.0 {
            return;
        }
        if entry.agents.insert(id.to_owned(), agent).is_none() {
            state.held += 1;
        }
    }

    /// The feed follows `tenant` now, while `member` is held (or failed
    /// to: `None`).
    pub fn followed(&self, tenant: &str, member: Option<Membership>) {
        let mut state = lock(&self.state);
        match member {
            Some(member) => {
                if let Some(entry) = state.tenants.get_mut(tenant) {
                    entry.member = Some(member);
                    entry.seq += 1;
                }
            }
            None => {
                state.tenants.remove(tenant);
            }
        }
    }

    /// A change of `tenant` was read: no read started before may be kept.
    /// Whether the tenant has agents cached.
    pub fn changing(&self, tenant: &str) -> bool {
        let mut state = lock(&self.state);
        match state.tenants.get_mut(tenant) {
            Some(entry) => {
                entry.seq += 1;
                !entry.agents.is_empty()
            }
            None => false,
        }
    }

    /// Drops `ids` of `tenant` (agents a change touched).
    pub fn forget<'a>(&self, tenant: &str, ids: impl IntoIterator<Item = &'a String>) {
        let mut state = lock(&self.state);
        let Some(entry) = state.tenants.get_mut(tenant) else {
            return;
        };
        let mut dropped = 0;
        for id in ids {
            if entry.agents.remove(id).is_some() {
                dropped += 1;
            }
        }
        state.held -= dropped;
    }

    /// The feed reads `generation` again, on a fresh connection; `sentinel`
    /// is a new connection to Redis that nothing is sent on (`None`: Redis
    /// is not on TCP, or it could not be opened: no answers from memory).
    pub fn resume(&self, generation: &str, sentinel: Option<TcpStream>) {
        let mut state = lock(&self.state);
        state.clear();
        state.live = sentinel.is_some().then(|| generation.to_owned());
        state.sentinel = sentinel;
    }

    /// The feed stopped reading (failed, or a switch of generation it has
    /// not followed yet): nothing is answered from memory until it resumes.
    pub fn suspend(&self) {
        let mut state = lock(&self.state);
        state.live = None;
        state.clear();
    }

    /// Stops following tenants not looked up since the last sweep.
    pub fn sweep(&self) {
        let mut state = lock(&self.state);
        let before = state.tenants.len();
        let mut dropped = 0;
        state.tenants.retain(|_, tenant| {
            let keep = std::mem::take(&mut tenant.used);
            if !keep {
                dropped += tenant.agents.len();
            }
            keep
        });
        state.held -= dropped;
        if state.tenants.len() < before {
            tracing::debug!(
                idle = before - state.tenants.len(),
                "the near cache stopped following idle tenants"
            );
        }
    }

    /// Whether the generation the feed reads is `generation`.
    pub fn follows(&self, generation: &str) -> bool {
        lock(&self.state).live.as_deref() == Some(generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn agent(name: &str) -> Arc<Agent> {
        let mut fields = projections::Fields::new();
        fields.insert("name".to_owned(), name.to_owned());
        Arc::new(Agent::from_fields("a", &fields))
    }

    fn hit(lookup: Lookup) -> Option<String> {
        match lookup {
            Lookup::Hit(agent) => Some(agent.name.clone()),
            _ => None,
        }
    }

    fn ticket(lookup: Lookup) -> Ticket {
        match lookup {
            Lookup::Miss(Some(ticket)) => ticket,
            Lookup::Miss(None) => panic!("a miss without a ticket"),
            Lookup::Hit(_) => panic!("a hit"),
            Lookup::Follow => panic!("follow"),
        }
    }

    /// A connected sentinel and the server's end of it.
    fn sentinel() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn answers_only_what_no_change_overtook_while_redis_is_up() {
        let cache = NearCache::new(10, 2);
        let any = |_: &str| true;
        assert!(
            matches!(cache.lookup("t", "a", any), Lookup::Miss(None)),
            "not reading"
        );
        let (client, server) = sentinel();
        cache.resume("g1", Some(client));
        assert!(
            matches!(cache.lookup("t", "a", |g| g == "g2"), Lookup::Miss(None)),
            "another generation"
        );
        assert!(matches!(cache.lookup("t", "a", any), Lookup::Follow));
        assert!(
            matches!(cache.lookup("t", "a", any), Lookup::Miss(None)),
            "joining"
        );
        cache.followed("t", Some(Box::new(())));

        // Stored, then answered.
        let first = ticket(cache.lookup("t", "a", any));
        cache.store("t", "a", first, agent("one"));
        assert_eq!(hit(cache.lookup("t", "a", any)).as_deref(), Some("one"));

        // A change read while a read was in flight: not kept.
        let stale = ticket(cache.lookup("t", "b", any));
        assert!(!cache.changing("u"), "another tenant");
        assert!(cache.changing("t"));
        cache.store("t", "b", stale, agent("old"));
        assert!(hit(cache.lookup("t", "b", any)).is_none());
        // The touched agent is dropped, the others kept.
        cache.forget("t", &["a".to_owned()]);
        assert!(hit(cache.lookup("t", "a", any)).is_none());
        let fresh = ticket(cache.lookup("t", "b", any));
        cache.store("t", "b", fresh, agent("two"));
        assert_eq!(hit(cache.lookup("t", "b", any)).as_deref(), Some("two"));

        // Full: everything goes, and the store that found it full is not kept.
        for i in 0..12 {
            let id = format!("x{i}");
            let t = ticket(cache.lookup("t", &id, any));
            cache.store("t", &id, t, agent("x"));
        }
        assert!(lock(&cache.state).held <= 10);

        // Redis closes the sentinel: nothing from memory, at once.
        drop(server);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(matches!(cache.lookup("t", "b", any), Lookup::Miss(None)));
        assert_eq!(lock(&cache.state).held, 0);
        // Until the feed reads again with a new sentinel.
        let (client, _server) = sentinel();
        cache.resume("g1", Some(client));
        let t = ticket(cache.lookup("t", "b", any));
        cache.store("t", "b", t, agent("three"));
        assert_eq!(hit(cache.lookup("t", "b", any)).as_deref(), Some("three"));
        cache.suspend();
        assert!(
            matches!(cache.lookup("t", "b", any), Lookup::Miss(None)),
            "suspended"
        );
    }

    #[test]
    fn idle_tenants_are_let_go_and_tenants_are_bounded() {
        let cache = NearCache::new(10, 1);
        let (client, _server) = sentinel();
        cache.resume("g", Some(client));
        let any = |_: &str| true;
        assert!(matches!(cache.lookup("t", "a", any), Lookup::Follow));
        cache.followed("t", Some(Box::new(())));
        assert!(
            matches!(cache.lookup("u", "a", any), Lookup::Miss(None)),
            "one tenant at most"
        );
        cache.sweep();
        assert_eq!(
            lock(&cache.state).tenants.len(),
            1,
            "used since the last sweep"
        );
        cache.sweep();
        assert!(
            lock(&cache.state).tenants.is_empty(),
            "idle for a whole sweep"
        );
        assert!(matches!(cache.lookup("u", "a", any), Lookup::Follow));
        cache.followed("u", None);
        assert!(
            matches!(cache.lookup("u", "a", any), Lookup::Follow),
            "joining failed: again"
        );
        assert!(!NearCache::new(0, 1).enabled());
    }
}

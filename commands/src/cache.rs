//! A bounded, per-process cache of folded aggregate state.
//!
//! Why it is safe: events are immutable, so a state folded up to version `v`
//! stays correct forever as the fold of events `1..=v`. The handler decides on
//! a cached state *optimistically* and appends with `ExpectedVersion::Exact(v)`:
//! if another writer (in this process or any other) appended meanwhile, the
//! append conflicts, the entry is dropped and the command is decided again on
//! fresh state. A refusal decided on a cached state is re-checked on fresh
//! state before it is returned, so a stale cache never refuses a legal command.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use domain::Aggregate;

/// One cached stream.
struct Entry {
    /// Version the state is folded up to.
    version: i64,
    /// Tenant owning the stream.
    tenant: String,
    /// The folded state (an `A: Aggregate`, type-erased).
    state: Arc<dyn Any + Send + Sync>,
}

/// Folded states by stream id, at most `capacity` of them.
pub(crate) struct StateCache {
    capacity: usize,
    entries: Mutex<HashMap<String, Entry>>,
    /// Moves on at every erasure (and loss of the erasure feed): a state
    /// loaded before may hold erased values, and is neither cached nor
    /// snapshotted.
    epoch: AtomicU64,
    /// False while erasures are watched but the watch is down (the cache is
    /// then bypassed: an erasure could go unnoticed).
    live: AtomicBool,
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl StateCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave an entry half-written
        // (inserts and removes are single calls), so a poisoned map is usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current epoch (see [`StateCache::put`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Forgets `streams` after an erasure of their events; states loaded
    /// before are no longer cached.
    pub(crate) fn erased<'s>(&self, streams: impl IntoIterator<Item = &'s str>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut entries = self.lock();
        for stream in streams {
            entries.remove(stream);
        }
    }

    /// Empties the cache and uses it again (`live`) or not until told.
    pub(crate) fn reset(&self, live: bool) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.live.store(live, Ordering::Release);
        self.lock().clear();
    }

    /// The cached `(version, tenant, state)` of a stream, if any.
    pub(crate) fn get<A: Aggregate>(&self, stream: &str) -> Option<(i64, String, A)> {
        if self.capacity == 0 || !self.live.load(Ordering::Acquire) {
            return None;
        }
        let (version, tenant, state) = {
            let entries = self.lock();
            let entry = entries.get(stream)?;
            (entry.version, entry.tenant.clone(), entry.state.clone())
        };
        // Clone outside the lock: states can hold sizeable JSON documents.
        state
            .downcast_ref::<A>()
            .map(|s| (version, tenant, s.clone()))
    }

    /// Records the state of a stream at `version` (keeps a newer entry),
    /// unless an erasure came since it was loaded (at `epoch`).
    pub(crate) fn put<A: Aggregate>(
        &self,
        stream: &str,
        version: i64,
        tenant: &str,
        state: A,
        epoch: u64,
    ) {
        if self.capacity == 0 || !self.live.load(Ordering::Acquire) {
            return;
        }
        let mut entries = self.lock();
        // Under the lock: `erased` moves the epoch before it takes the lock.
        if self.epoch() != epoch {
            return;
        }
        if entries.get(stream).is_some_and(|e| e.version >= version) {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(stream) {
            // Evict about a tenth, in hash order (effectively random): cheap,
            // and a miss only costs one snapshot load.
            let evict: Vec<String> = entries
                .keys()
                .take(self.capacity / 10 + 1)
                .cloned()
                .collect();
            for key in evict {
                entries.remove(&key);
            }
        }
        entries.insert(
            stream.to_owned(),
            Entry {
                version,
                tenant: tenant.to_owned(),
                state: Arc::new(state),
            },
        );
    }

    /// Forgets a stream (after a conflict showed the entry is stale).
    pub(crate) fn remove(&self, stream: &str) {
        self.lock().remove(stream);
    }
}

//! What a batch worker (the relay, a projector) holds right now: the events
//! of a batch it has started and not finished. A shutdown waits for it to
//! reach zero and, when its deadline passes first, reports it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Events of the batch a worker is publishing or applying (0 between
/// batches). Cheap to clone; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct InHand(Arc<AtomicUsize>);

impl InHand {
    /// Events held now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Marks `events` as held until the returned guard is dropped.
    pub fn hold(&self, events: usize) -> Holding<'_> {
        self.0.store(events, Ordering::Relaxed);
        Holding(self)
    }
}

/// Clears the count of an [`InHand`] when dropped (the batch is done, or
/// abandoned with its task).
#[derive(Debug)]
pub struct Holding<'a>(&'a InHand);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0 .0.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::InHand;

    #[test]
    fn a_hold_lasts_as_long_as_its_guard() {
        let in_hand = InHand::default();
        let seen = in_hand.clone();
        {
            let _holding = in_hand.hold(42);
            assert_eq!(seen.get(), 42);
        }
        assert_eq!(seen.get(), 0);
    }
}

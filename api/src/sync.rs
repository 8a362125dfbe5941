//! The one lock helper of the crate.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking it over if a panic poisoned it. Every lock in this
/// crate guards plain data (a map, a list, an `Option`) changed by single
/// calls that cannot leave it half-updated, so after a panic it is still
/// consistent, and one failed request must not fail every later one.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

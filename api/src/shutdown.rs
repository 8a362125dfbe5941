//! Graceful shutdown: the signals, what is still in flight, and the deadline.
//!
//! One [`CancellationToken`] drives it. On the first SIGTERM or SIGINT:
//!
//! 1. The API stops accepting connections and finishes the requests it has
//!    (axum's graceful shutdown). Each command runs in a task of its own
//!    ([`spawn_command`]), so a command whose client went away still runs to
//!    its end (an append is one transaction either way). Open WebSockets get
//!    close code 1001, "going away": clients resubscribe elsewhere with
//!    their last position.
//! 2. The relay publishes the batch in hand, awaits every acknowledgement,
//!    writes its checkpoint and releases its lock.
//! 3. Each projector applies the batch in hand together with its checkpoint,
//!    acknowledges it, and stops.
//! 4. The process waits for the commands and WebSockets still open, flushes
//!    NATS (so the last acknowledgements reach the server), closes its pool
//!    and exits 0.
//!
//! All of it must end within the deadline (`NEURECTOMY_SHUTDOWN_DEADLINE_MS`,
//! counted from the signal; see [`drain`]). Past it the process reports, at
//! error level, what was still in flight ([`InFlight`]: HTTP requests,
//! commands, WebSockets, and the batch each worker held) and exits 1. A
//! second signal exits 1 at once, with the same report.
//!
//! The counters are process-wide statics: a process runs one API, and they
//! are fed from deep inside it (the command resolver, every socket).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commands::InHand;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A count of things in flight that can be waited on until it is zero.
#[derive(Debug)]
pub struct Counter {
    count: AtomicUsize,
    idle: Notify,
}

impl Counter {
    /// Zero.
    pub const fn new() -> Self {
        Self {
            count: AtomicUsize::new(0),
            idle: Notify::const_new(),
        }
    }

    /// How many are in flight now.
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts one in flight until the guard is dropped.
    pub fn enter(&'static self) -> Entered {
        self.count.fetch_add(1, Ordering::AcqRel);
        Entered(self)
    }

    /// Waits until none is in flight.
    pub async fn idle(&self) {
        loop {
            // Registered before the check, so a drop to zero in between
            // is not missed.
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// One in flight on a [`Counter`]; leaves it when dropped.
#[derive(Debug)]
pub struct Entered(&'static Counter);

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// HTTP requests being answered ([`track_request`]).
pub static HTTP_REQUESTS: Counter = Counter::new();
/// Commands running ([`spawn_command`]).
pub static COMMANDS: Counter = Counter::new();
/// Open WebSockets.
pub static WEBSOCKETS: Counter = Counter::new();

/// The batch workers (relay, projectors) of a process, by name, whose batch
/// in hand a shutdown report names. Cheap to clone; clones share the list.
#[derive(Debug, Clone, Default)]
pub struct Workers(Arc<Mutex<Vec<(String, InHand)>>>);

impl Workers {
    /// Adds a worker.
    pub fn add(&self, name: impl Into<String>, in_hand: InHand) {
        self.lock().push((name.into(), in_hand));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, InHand)>> {
        // Held for a push or a copy; a panic leaves the list usable.
        crate::sync::lock(&self.0)
    }
}

/// What a process still had in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// HTTP requests being answered.
    pub http_requests: usize,
    /// Commands running.
    pub commands: usize,
    /// WebSockets open.
    pub websockets: usize,
    /// Each worker and the events of the batch it held (0: between batches).
    pub batches: Vec<(String, usize)>,
}

impl InFlight {
    /// What is in flight now.
    pub fn now(workers: &Workers) -> Self {
        Self {
            http_requests: HTTP_REQUESTS.get(),
            commands: COMMANDS.get(),
            websockets: WEBSOCKETS.get(),
            batches: workers
                .lock()
                .iter()
                .map(|(name, in_hand)| (name.clone(), in_hand.get()))
                .collect(),
        }
    }
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} HTTP request(s), {} command(s), {} open WebSocket(s)",
            self.http_requests, self.commands, self.websockets
        )?;
        for (name, events) in &self.batches {
            match events {
                0 => write!(f, "; {name}: between batches")?,
                n => write!(f, "; {name}: mid-batch ({n} events)")?,
            }
        }
        Ok(())
    }
}

/// The shutdown did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error("the shutdown deadline ({} ms) passed with work in flight: {in_flight}", deadline.as_millis())]
pub struct DeadlinePassed {
    /// The deadline.
    pub deadline: Duration,
    /// What was still in flight.
    pub in_flight: InFlight,
}

/// A token cancelled on the first SIGINT or SIGTERM; a second one exits the
/// process at once (status 1), reporting what `workers` and the counters
/// still had in flight.
pub fn on_signal(workers: Workers) -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut signals = match Signals::new() {
            Ok(signals) => signals,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the process");
                Signals::ctrl_c_only()
            }
        };
        let first = signals.next().await;
        tracing::info!(signal = first, "shutdown requested");
        trigger.cancel();
        let second = signals.next().await;
        tracing::error!(
            signal = second,
            in_flight = %InFlight::now(&workers),
            "second signal: exiting at once"
        );
        std::process::exit(1);
    });
    token
}

/// SIGINT and, on Unix, SIGTERM.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Self> {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        Ok(Self { term: Some(term) })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Self> {
        Ok(Self {})
    }

    fn ctrl_c_only() -> Self {
        Self {
            #[cfg(unix)]
            term: None,
        }
    }

    /// The name of the next signal.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        if let Some(term) = self.term.as_mut() {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal can be received: never return.
            std::future::pending::<()>().await;
        }
        "SIGINT"
    }
}

/// Runs `work` (a process's shutdown sequence, or all of its life) to its
/// end, unless `shutdown` has been cancelled for longer than `deadline`:
/// then it gives up, reporting what `workers` and the counters still had in
/// flight.
pub async fn drain<T>(
    shutdown: &CancellationToken,
    deadline: Duration,
    workers: &Workers,
    work: impl std::future::Future<Output = T>,
) -> Result<T, DeadlinePassed> {
    let expired = async {
        shutdown.cancelled().await;
        tokio::time::sleep(deadline).await;
    };
    tokio::select! {
        result = work => Ok(result),
        () = expired => Err(DeadlinePassed {
            deadline,
            in_flight: InFlight::now(workers),
        }),
    }
}

/// Waits until no command runs and no WebSocket is open (after the server
/// stopped accepting: sockets close themselves with 1001 on the token).
pub async fn quiesce() {
    COMMANDS.idle().await;
    WEBSOCKETS.idle().await;
}

/// Middleware counting the HTTP requests being answered.
pub async fn track_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let _in_flight = HTTP_REQUESTS.enter();
    next.run(request).await
}

/// Runs a command in a task of its own, counted in [`COMMANDS`]: it runs to
/// its end even if the request that started it is dropped (the client went
/// away), and a shutdown waits for it.
pub fn spawn_command<F>(command: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument as _;
    let running = COMMANDS.enter();
    tokio::spawn(
        async move {
            let _running = running;
            command.await
        }
        .in_current_span(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_signal_and_reports_what_is_in_flight() {
        let shutdown = CancellationToken::new();
        let workers = Workers::default();
        let relay = InHand::default();
        workers.add("relay", relay.clone());
        let _holding = relay.hold(7);

        // Before the signal, no deadline runs.
        let finished = drain(&shutdown, Duration::from_millis(100), &workers, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "done"
        })
        .await;
        assert_eq!(finished.ok(), Some("done"));

        shutdown.cancel();
        let passed = drain(
            &shutdown,
            Duration::from_millis(100),
            &workers,
            std::future::pending::<()>(),
        )
        .await;
        let Err(passed) = passed else {
            panic!("the deadline should have passed")
        };
        assert_eq!(passed.in_flight.batches, vec![("relay".to_owned(), 7)]);
        let message = passed.to_string();
        assert!(message.contains("100 ms"), "{message}");
        assert!(message.contains("relay: mid-batch (7 events)"), "{message}");
    }

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        static COUNTED: Counter = Counter::new();
        let first = COUNTED.enter();
        let second = COUNTED.enter();
        let waiter = tokio::spawn(COUNTED.idle());
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("idle did not return after the last guard"));
    }
}

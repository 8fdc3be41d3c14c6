//! Graceful shutdown: the drain signal that long-lived streams listen to, and the count of
//! in-flight calls the server waits for.
//!
//! On SIGTERM the server (see [`crate::serve`]) first marks health `NOT_SERVING` and fires the
//! [`Drain`], so that streams which would otherwise never end (health `Watch`, change-log
//! subscriptions) finish; it keeps accepting calls while [`InFlight`] says calls are still
//! running, up to the grace period; then it closes its connections.

use std::future::Future as _;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Tells long-lived work that the server is shutting down. Cheap to clone.
///
/// [`Drain::is_draining`] is one atomic load: a stream may ask it for every message it sends.
/// (`CancellationToken::is_cancelled` takes the token's mutex, which every stream of a process
/// shares; with thousands of WatchProfiles streams asking at once, that lock showed in the
/// fan-out's profile.)
#[derive(Debug, Clone, Default)]
pub struct Drain {
    begun: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Drain {
    /// A drain that has not begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins the drain: [`Drain::is_draining`] is true from now on, and then every
    /// [`Drain::draining`] future completes.
    pub fn begin(&self) {
        self.begun.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    /// Completes once the drain has begun; use it to end long-lived streams.
    pub async fn draining(&self) {
        self.token.cancelled().await;
    }
}

/// Counts the calls in flight, from the arrival of a request until its response body has been
/// sent or dropped (so a server stream counts for as long as it streams), and cuts them off
/// when the grace period is over.
#[derive(Debug, Clone)]
pub struct InFlight {
    count: watch::Sender<usize>,
    cut_off: CancellationToken,
    /// Set just before `cut_off` is cancelled: read without the token's lock.
    cut: Arc<AtomicBool>,
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl InFlight {
    /// A counter at zero.
    pub fn new() -> Self {
        Self {
            count: watch::channel(0).0,
            cut_off: CancellationToken::new(),
            cut: Arc::default(),
        }
    }

    /// Ends every counted call now: one still waiting for its handler is answered
    /// `UNAVAILABLE`, a streaming one ends with `UNAVAILABLE` trailers. Both are retryable, and
    /// the connection stays usable for the closing handshake.
    pub fn cut_off(&self) {
        self.cut.store(true, Ordering::Release);
        self.cut_off.cancel();
    }

    /// How many calls are in flight now.
    pub fn current(&self) -> usize {
        *self.count.borrow()
    }

    /// Completes when no call is in flight.
    pub async fn idle(&self) {
        let mut rx = self.count.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Counts one more call in flight until the returned guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.count.send_modify(|n| *n += 1);
        InFlightGuard {
            count: self.count.clone(),
        }
    }

    /// The token cancelled by [`InFlight::cut_off`].
    pub fn cut_off_token(&self) -> CancellationToken {
        self.cut_off.clone()
    }

    /// A wait for [`InFlight::cut_off`] cheap enough to poll for every frame of a body.
    pub fn cut_off_wait(&self) -> CutOffWait {
        CutOffWait {
            cut: self.cut.clone(),
            wait: Box::pin(self.cut_off.clone().cancelled_owned()),
            registered: false,
        }
    }
}

/// Waits for [`InFlight::cut_off`], for a response body that checks it on every frame.
///
/// Polling the token's own future takes the token's mutex, which every call of the process
/// shares: with thousands of streams sending at once it showed in the fan-out's profile
/// (`docs/benchmarks.md`, `watch`). This polls that future once, so that the task is woken at
/// the cut-off, and then only once the cut-off has begun, reading an atomic flag otherwise.
/// The body must stay in the task that first polled it (hyper polls a body in one task).
#[derive(Debug)]
pub struct CutOffWait {
    cut: Arc<AtomicBool>,
    wait: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    registered: bool,
}

impl CutOffWait {
    /// Ready once the cut-off has begun.
    pub fn poll_cut_off(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.registered && !self.cut.load(Ordering::Acquire) {
            return std::task::Poll::Pending;
        }
        self.registered = true;
        self.wait.as_mut().poll(cx)
    }
}

/// One call counted in flight; dropping it ends the call for the drain.
#[derive(Debug)]
pub struct InFlightGuard {
    count: watch::Sender<usize>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count follows guards, and `idle` completes only at zero.
    #[tokio::test]
    async fn in_flight_counts_guards() {
        let in_flight = InFlight::new();
        let a = in_flight.enter();
        let b = in_flight.enter();
        assert_eq!(in_flight.current(), 2);
        drop(a);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.expect("idle completes");
        assert_eq!(in_flight.current(), 0);
    }

    /// A drain wakes every waiter.
    #[tokio::test]
    async fn drain_wakes_waiters() {
        let drain = Drain::new();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.draining().await }
        });
        assert!(!drain.is_draining());
        drain.begin();
        waiter.await.expect("drained");
        assert!(drain.is_draining());
    }
}

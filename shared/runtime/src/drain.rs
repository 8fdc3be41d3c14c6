//! Graceful shutdown: the drain signal that long-lived streams listen to, and the count of
//! in-flight calls the server waits for.
//!
//! On SIGTERM the server (see [`crate::serve`]) first marks health `NOT_SERVING` and fires the
//! [`Drain`], so that streams which would otherwise never end (health `Watch`, change-log
//! subscriptions) finish; it keeps accepting calls while [`InFlight`] says calls are still
//! running, up to the grace period; then it closes its connections.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Tells long-lived work that the server is shutting down. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
}

impl Drain {
    /// A drain that has not begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins the drain: every [`Drain::draining`] future completes.
    pub fn begin(&self) {
        self.token.cancel();
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
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
        }
    }

    /// Ends every counted call now: one still waiting for its handler is answered
    /// `UNAVAILABLE`, a streaming one ends with `UNAVAILABLE` trailers. Both are retryable, and
    /// the connection stays usable for the closing handshake.
    pub fn cut_off(&self) {
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

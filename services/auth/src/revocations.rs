//! `WatchRevocations`: the revoked sessions and the signing keys, for every local verifier.
//!
//! users and the aggregator verify access tokens with auth's public keys and never ask auth
//! per request, so a logout would not reach them before the token expires. They follow this
//! stream instead. One task per auth process tails the `revocations` table (woken at once by a
//! local revocation, and every poll interval for those other replicas commit) and broadcasts
//! each new one; a subscriber gets a snapshot of every revocation still in force, then the live
//! ones — subscribed to the broadcast before the snapshot is read, so nothing falls between.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use mesh_proto::{
    auth::v1::{RevokedSession, WatchRevocationsResponse},
    time::{timestamp_from_unix_ms, unix_now_ms},
};
use mesh_runtime::Drain;
use tokio::sync::{Notify, broadcast};
use tokio_stream::Stream;
use tonic::Status;

use crate::store::{AuthStore, Revocation};

/// Revocations read per query and sent per message.
const PAGE: i64 = 512;
/// How often the feed looks for revocations other replicas committed.
pub(crate) const POLL: Duration = Duration::from_millis(250);
/// Revocations the live broadcast keeps for a subscriber that falls behind; beyond that it
/// catches up from the table.
const BUFFER: usize = 1024;

/// The stream type of `WatchRevocations`.
pub(crate) type RevocationStream =
    Pin<Box<dyn Stream<Item = Result<WatchRevocationsResponse, Status>> + Send + 'static>>;

/// The process's one live feed of revocations.
#[derive(Debug)]
pub(crate) struct RevocationFeed {
    tx: broadcast::Sender<Arc<Revocation>>,
    published: AtomicI64,
    wake: Notify,
    store: Arc<dyn AuthStore>,
    drain: Drain,
}

fn revoked(revocation: &Revocation) -> RevokedSession {
    RevokedSession {
        session_id: revocation.session_id.clone(),
        expire_time: Some(timestamp_from_unix_ms(revocation.expire_time)),
    }
}

impl RevocationFeed {
    /// Starts the feed after revocation `after` (the newest at start-up), until `drain`.
    pub(crate) fn start(
        store: Arc<dyn AuthStore>,
        after: i64,
        drain: Drain,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, _) = broadcast::channel(BUFFER);
        let feed = Arc::new(Self {
            tx,
            published: AtomicI64::new(after),
            wake: Notify::new(),
            store,
            drain,
        });
        let task = tokio::spawn(feed.clone().run());
        (feed, task)
    }

    async fn run(self: Arc<Self>) {
        let mut failing = false;
        loop {
            let after = self.published.load(Ordering::SeqCst);
            let mut full = false;
            match self.store.revocations_after(after, i64::MIN, PAGE).await {
                Ok(page) => {
                    if failing {
                        tracing::info!("revocation feed reads the table again");
                        failing = false;
                    }
                    full = page.len() as i64 == PAGE;
                    for revocation in page {
                        self.published.store(revocation.id, Ordering::SeqCst);
                        let _ = self.tx.send(Arc::new(revocation));
                    }
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(error = %mesh_telemetry::error_chain(&err),
                            "revocation feed cannot read the table; retrying");
                        failing = true;
                    }
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                () = self.drain.draining() => return,
            }
        }
    }

    /// Tells the feed that a revocation was committed here (it reads the table at once).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// How many followers there are.
    pub(crate) fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A follower's stream: `jwks_json` and the snapshot (read a page at a time as the
    /// follower reads it), then revocations as they come.
    pub(crate) fn subscribe(&self, jwks_json: String) -> RevocationStream {
        // Subscribed before the snapshot is read: whatever commits meanwhile is in the
        // receiver (or, if it falls behind, read from the table after the snapshot).
        let follower = Follower {
            rx: self.tx.subscribe(),
            store: self.store.clone(),
            drain: self.drain.clone(),
            position: 0,
            jwks_json: Some(jwks_json),
            snapshot: true,
            catching_up: false,
        };
        Box::pin(futures_util::stream::unfold(
            follower,
            |mut follower| async move {
                let item = follower.next().await?;
                Some((item, follower))
            },
        ))
    }
}

/// One follower's state: a position in the revocations, and at most one page in hand.
struct Follower {
    rx: broadcast::Receiver<Arc<Revocation>>,
    store: Arc<dyn AuthStore>,
    drain: Drain,
    /// The newest revocation id sent.
    position: i64,
    /// The key set, until the first message has carried it.
    jwks_json: Option<String>,
    /// Sending the snapshot, a page at a time from the table.
    snapshot: bool,
    /// Reading from the table after falling behind the broadcast.
    catching_up: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<WatchRevocationsResponse, Status>> {
        loop {
            if self.drain.is_draining() {
                return None;
            }
            if self.snapshot || self.catching_up {
                let read = tokio::select! {
                    () = self.drain.draining() => return None,
                    read = self.store.revocations_after(self.position, unix_now_ms(), PAGE) => read,
                };
                let page = match read {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::warn!(error = %mesh_telemetry::error_chain(&err),
                            "cannot read revocations for a follower");
                        return Some(Err(Status::unavailable("storage unavailable; retry")));
                    }
                };
                let more = page.len() as i64 == PAGE;
                if let Some(last) = page.last() {
                    self.position = last.id;
                }
                let snapshot_complete = self.snapshot && !more;
                if self.snapshot {
                    self.snapshot = more;
                } else {
                    self.catching_up = more;
                }
                if page.is_empty() && !snapshot_complete && self.jwks_json.is_none() {
                    continue;
                }
                return Some(Ok(WatchRevocationsResponse {
                    sessions: page.iter().map(revoked).collect(),
                    jwks_json: self.jwks_json.take().unwrap_or_default(),
                    snapshot_complete,
                }));
            }
            let received = tokio::select! {
                () = self.drain.draining() => return None,
                received = self.rx.recv() => received,
            };
            match received {
                Ok(revocation) => {
                    if revocation.id <= self.position {
                        continue;
                    }
                    let mut sessions = vec![revoked(&revocation)];
                    self.position = revocation.id;
                    // Whatever else is already there goes in the same message.
                    while let Ok(more) = self.rx.try_recv() {
                        if more.id > self.position {
                            self.position = more.id;
                            sessions.push(revoked(&more));
                        }
                        if sessions.len() as i64 >= PAGE {
                            break;
                        }
                    }
                    return Some(Ok(WatchRevocationsResponse {
                        sessions,
                        ..WatchRevocationsResponse::default()
                    }));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

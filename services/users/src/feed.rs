//! The live change feed behind `WatchUsers`: one task per process tails the durable log and
//! broadcasts each event, in sequence order, to every subscriber.
//!
//! A subscriber first subscribes to the broadcast, then (when it gave a position) replays the
//! stored events after it, and then takes the live events, skipping any it has already sent —
//! every event committed after the subscription is in its broadcast receiver, and every one
//! committed before is in the table, so the seam has no gap and no duplicate. A subscriber that
//! falls more than the buffer behind is told so by the broadcast (it lagged) and catches up
//! from the table the same way, so no event is ever skipped silently.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use mesh_runtime::Drain;
use tokio::sync::{Notify, broadcast};
use tokio_stream::Stream;
use tonic::Status;

use crate::store::{Commits, Event, StoreError, UsersStore};

/// Events read from the table per query by the live feed.
const BATCH: i64 = 500;
/// Events read from the table per query by a replay: what one subscriber holds at most while
/// its client has not read them.
const REPLAY_BATCH: i64 = 64;
/// The shortest poll interval the feed accepts.
const MIN_POLL: Duration = Duration::from_millis(10);

/// Aborts the commit listener when the feed stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The process's one live feed of the change log.
#[derive(Debug)]
pub(crate) struct Feed {
    tx: broadcast::Sender<Arc<Event>>,
    /// The sequence of the newest event broadcast: where the feed reads on from.
    published: AtomicI64,
    wake: Notify,
}

impl Feed {
    /// Starts the feed after sequence `after` (the log's end at start-up): it reads new events
    /// when [`Feed::wake`] is called (after a local commit), when the store announces a commit
    /// of another replica (PostgreSQL's `LISTEN`/`NOTIFY`), and every `poll` in case an
    /// announcement was lost, until `drain` begins.
    pub(crate) fn start(
        store: Arc<dyn UsersStore>,
        after: i64,
        buffer: usize,
        poll: Duration,
        drain: Drain,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, _) = broadcast::channel(buffer.max(1));
        let feed = Arc::new(Self {
            tx,
            published: AtomicI64::new(after),
            wake: Notify::new(),
        });
        let task = tokio::spawn(feed.clone().run(store, poll.max(MIN_POLL), drain));
        (feed, task)
    }

    async fn run(self: Arc<Self>, store: Arc<dyn UsersStore>, poll: Duration, drain: Drain) {
        // Other replicas' commits, as PostgreSQL announces them; the poll stays as the net
        // for announcements lost while the listening connection was down.
        let listening = match store.commits().await {
            Ok(Some(commits)) => Some(tokio::spawn(self.clone().follow(commits))),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(error = %mesh_telemetry::error_chain(&err),
                    "cannot listen for other replicas' commits; polling only");
                None
            }
        };
        let _stop_listening = listening.map(AbortOnDrop);
        let mut failing = false;
        loop {
            let after = self.published.load(Ordering::SeqCst);
            let mut full = false;
            match store.live_events_after(after, BATCH).await {
                Ok(events) => {
                    if failing {
                        tracing::info!("change feed reads the log again");
                        failing = false;
                    }
                    full = events.len() as i64 == BATCH;
                    for event in events {
                        self.published.store(event.sequence, Ordering::SeqCst);
                        let _ = self.tx.send(Arc::new(event));
                    }
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(error = %mesh_telemetry::error_chain(&err),
                            "change feed cannot read the log; retrying");
                        failing = true;
                    }
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(poll) => {}
                () = drain.draining() => return,
            }
        }
    }

    /// Wakes the feed for every commit announced on `commits`. When the listening connection
    /// is lost, the feed reads the log once more (announcements may have been lost) and the
    /// next wait connects again.
    async fn follow(self: Arc<Self>, mut commits: Commits) {
        let mut failing = false;
        loop {
            match commits.next().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("listening for other replicas' commits again");
                        failing = false;
                    }
                    self.wake();
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(error = %mesh_telemetry::error_chain(&err),
                            "lost the connection that listens for other replicas' commits; \
                             reconnecting");
                        failing = true;
                    }
                    self.wake();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Tells the feed that a change was committed (it reads the log at once).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The number of live subscribers.
    pub(crate) fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A subscription: events after `after` when given (replayed from the table first), else
    /// from the live edge: after every change committed before the subscription. Also returns
    /// that live edge (the log's newest sequence when the subscription began): the stream sends
    /// every event with a larger sequence.
    pub(crate) async fn subscribe(
        &self,
        store: Arc<dyn UsersStore>,
        after: Option<i64>,
        drain: Drain,
    ) -> Result<
        (
            i64,
            impl Stream<Item = Result<Event, Status>> + Send + 'static,
        ),
        StoreError,
    > {
        let rx = self.tx.subscribe();
        // Read after subscribing: every event committed later is in the receiver.
        let head = store.last_sequence().await?;
        let (position, replaying) = match after {
            Some(after) => (after, true),
            None => (head, false),
        };
        let state = Subscriber {
            rx,
            store,
            drain,
            position,
            replaying,
            pending: VecDeque::new(),
            done: false,
        };
        let events = futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        Ok((head, events))
    }
}

/// Why a replay page could not be read.
enum Replay {
    /// Events after the position were removed by retention (through this sequence).
    Pruned(i64),
    /// The database failed.
    Store(StoreError),
}

/// The stored events after `position`, unless retention removed some of them: then a replay
/// would have a gap, and the subscriber is told where the log now starts.
async fn replay_page(store: &dyn UsersStore, position: i64) -> Result<Vec<Event>, Replay> {
    let events = store
        .events_after(position, REPLAY_BATCH)
        .await
        .map_err(Replay::Store)?;
    // Read after the page: a prune that ran before the read shows here.
    let pruned = store.pruned_through().await.map_err(Replay::Store)?;
    if position < pruned {
        return Err(Replay::Pruned(pruned));
    }
    Ok(events)
}

/// OUT_OF_RANGE for a position older than the retained log.
pub(crate) fn pruned_message(position: i64, pruned: i64) -> String {
    format!(
        "after_sequence {position} is before the retained change log: events through sequence \
         {pruned} were removed by retention; the first available sequence is {} (resume with \
         after_sequence = {pruned}, or without one for the live edge)",
        pruned + 1
    )
}

/// One `WatchUsers` stream's state.
struct Subscriber {
    rx: broadcast::Receiver<Arc<Event>>,
    store: Arc<dyn UsersStore>,
    drain: Drain,
    /// The sequence of the last event sent (or the starting point).
    position: i64,
    /// Reading from the table rather than from the broadcast.
    replaying: bool,
    /// Events read from the table, not yet sent.
    pending: VecDeque<Event>,
    done: bool,
}

impl Subscriber {
    fn shutting_down(&mut self) -> Status {
        self.done = true;
        Status::unavailable(format!(
            "the server is shutting down; resume with after_sequence = {}",
            self.position
        ))
    }

    async fn next(&mut self) -> Option<Result<Event, Status>> {
        loop {
            if self.done {
                return None;
            }
            if self.drain.is_draining() {
                return Some(Err(self.shutting_down()));
            }
            if let Some(event) = self.pending.pop_front() {
                self.position = event.sequence;
                return Some(Ok(event));
            }
            if self.replaying {
                let read = tokio::select! {
                    biased;
                    () = self.drain.draining() => return Some(Err(self.shutting_down())),
                    read = replay_page(self.store.as_ref(), self.position) => read,
                };
                match read {
                    Err(Replay::Pruned(pruned)) => {
                        self.done = true;
                        return Some(Err(crate::error::UsersError::OutOfRange(pruned_message(
                            self.position,
                            pruned,
                        ))
                        .into()));
                    }
                    Err(Replay::Store(err)) => {
                        tracing::warn!(error = %mesh_telemetry::error_chain(&err),
                            "cannot replay the change log for a subscriber");
                        self.done = true;
                        return Some(Err(Status::unavailable(format!(
                            "storage unavailable; resume with after_sequence = {}",
                            self.position
                        ))));
                    }
                    Ok(events) => {
                        // A short page means the table is caught up: what commits later is in
                        // the receiver, which was subscribed before this read.
                        self.replaying = events.len() as i64 == REPLAY_BATCH;
                        self.pending.extend(events);
                    }
                }
                continue;
            }
            let received = tokio::select! {
                biased;
                () = self.drain.draining() => return Some(Err(self.shutting_down())),
                received = self.rx.recv() => received,
            };
            match received {
                Ok(event) if event.sequence <= self.position => {}
                Ok(event) => {
                    self.position = event.sequence;
                    return Some(Ok(Event::clone(&event)));
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        position = self.position,
                        "subscriber fell behind the live feed; catching up from the log"
                    );
                    self.replaying = true;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Some(Err(self.shutting_down()));
                }
            }
        }
    }
}

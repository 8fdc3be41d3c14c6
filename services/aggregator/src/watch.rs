//! `WatchProfiles`: ONE upstream `WatchUsers` subscription per aggregator process, fanned out
//! to every subscriber.
//!
//! The upstream task authenticates with a service token (`IssueServiceToken`, renewed before
//! it expires), learns the log's position from the stream's `x-mesh-log-head` metadata, and
//! after any disconnect (users restarting) reconnects with backoff and resumes from the last
//! sequence it saw — so the local feed has no gap. Each event is broadcast once.
//!
//! A subscriber subscribes to the broadcast first. Without a position it takes the live events
//! from there. With one, it first reads users' log through a replay stream of its own and
//! switches to the broadcast as soon as the replay reaches the oldest event the broadcast holds
//! for it: every later event is in the broadcast, every earlier one came from the replay, so
//! there is no gap and (skipping what was already sent) no duplicate. A subscriber that falls
//! more than the buffer behind replays the same way from where it was.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt as _;
use mesh_proto::{
    aggregator::v1::{Profile, ProfileEvent, ProfileEventKind},
    auth::v1::IssueServiceTokenRequest,
    users::v1::{EventKind, UserEvent, WatchUsersRequest},
};
use mesh_runtime::Drain;
use tokio::{
    sync::{Mutex, broadcast},
    time::Instant,
};
use tonic::{Request, Status, Streaming};

use crate::{
    downstream::{Downstreams, jitter, relay},
    server::BoxStream,
};

/// Response metadata of users' `WatchUsers`: the log's position when the stream began.
const LOG_HEAD_HEADER: &str = "x-mesh-log-head";
/// Longest wait between upstream reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The aggregator's service identity for its own upstream calls.
#[derive(Debug, Clone)]
pub(crate) struct ServiceCredentials {
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
}

/// A service token, fetched on first use and renewed once half its lifetime has passed.
#[derive(Debug)]
pub(crate) struct ServiceToken {
    credentials: Option<ServiceCredentials>,
    downstream: Arc<Downstreams>,
    cached: Mutex<Option<(String, Instant)>>,
}

impl ServiceToken {
    pub(crate) fn new(
        credentials: Option<ServiceCredentials>,
        downstream: Arc<Downstreams>,
    ) -> Self {
        Self {
            credentials,
            downstream,
            cached: Mutex::new(None),
        }
    }

    /// A token valid for a while yet.
    pub(crate) async fn get(&self) -> Result<String, Status> {
        let Some(credentials) = &self.credentials else {
            return Err(Status::failed_precondition(
                "the aggregator has no service credentials (--client-id, --client-secret)",
            ));
        };
        let mut cached = self.cached.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let mut request = Request::new(IssueServiceTokenRequest {
            client_id: credentials.client_id.clone(),
            client_secret: credentials.client_secret.clone(),
        });
        request.set_timeout(Duration::from_secs(5));
        let reply = self
            .downstream
            .auth()
            .issue_service_token(request)
            .await
            .map_err(|s| relay("auth", s))?
            .into_inner();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let lifetime = reply
            .expire_time
            .map(|t| t.seconds - now_unix)
            .unwrap_or(60)
            .max(2);
        let renew_at = Instant::now() + Duration::from_secs((lifetime / 2) as u64);
        *cached = Some((reply.access_token.clone(), renew_at));
        Ok(reply.access_token)
    }
}

/// The process's one relay of users' change log.
#[derive(Debug)]
pub(crate) struct Fanout {
    tx: broadcast::Sender<Arc<ProfileEvent>>,
    /// The sequence of the newest event broadcast (stored before it is sent); -1 before the
    /// upstream has connected once.
    published: AtomicI64,
    token: Arc<ServiceToken>,
    downstream: Arc<Downstreams>,
    drain: Drain,
    /// The most subscribers at once.
    max_subscribers: usize,
}

fn profile_event(event: UserEvent) -> ProfileEvent {
    let kind = match event.kind() {
        EventKind::Created => ProfileEventKind::Created,
        EventKind::Updated => ProfileEventKind::Updated,
        EventKind::Deleted => ProfileEventKind::Deleted,
        EventKind::Unspecified => ProfileEventKind::Unspecified,
    };
    ProfileEvent {
        sequence: event.sequence,
        kind: kind.into(),
        profile: event.user.map(|user| Profile {
            user_id: user.id,
            display_name: user.display_name,
            bio: user.bio,
            // Events never carry e-mail.
            email: String::new(),
            create_time: user.create_time,
            update_time: user.update_time,
            version: user.version,
        }),
        occur_time: event.occur_time,
    }
}

/// Opens `WatchUsers` after `after` with `token`; the stream and the log head it reports.
async fn open_upstream(
    downstream: &Downstreams,
    token: &str,
    after: Option<i64>,
) -> Result<(Streaming<UserEvent>, Option<i64>), Status> {
    let request = mesh_authn::bearer_request(
        token,
        WatchUsersRequest {
            after_sequence: after,
        },
    );
    let response = downstream.users().watch_users(request).await?;
    let head = response
        .metadata()
        .get(LOG_HEAD_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((response.into_inner(), head))
}

impl Fanout {
    /// Starts the upstream task; it runs until `drain` begins.
    pub(crate) fn start(
        downstream: Arc<Downstreams>,
        token: Arc<ServiceToken>,
        buffer: usize,
        max_subscribers: usize,
        drain: Drain,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, _) = broadcast::channel(buffer.max(1));
        let fanout = Arc::new(Self {
            tx,
            published: AtomicI64::new(-1),
            token,
            downstream,
            drain,
            max_subscribers,
        });
        let task = tokio::spawn(fanout.clone().upstream());
        (fanout, task)
    }

    /// The one upstream subscription: connect, relay, reconnect from the last sequence seen.
    async fn upstream(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let after = Some(self.published.load(Ordering::SeqCst)).filter(|p| *p >= 0);
            let opened = tokio::select! {
                () = self.drain.draining() => return,
                opened = async {
                    let token = self.token.get().await?;
                    open_upstream(&self.downstream, &token, after).await
                } => opened,
            };
            let mut stream = match opened {
                Ok((stream, head)) => {
                    if after.is_none()
                        && let Some(head) = head
                    {
                        self.published.store(head, Ordering::SeqCst);
                    }
                    tracing::info!(?after, ?head, "upstream WatchUsers subscription open");
                    backoff = Duration::from_millis(100);
                    stream
                }
                Err(status) => {
                    tracing::warn!(error = %status, retry_in = ?backoff,
                        "cannot open the upstream WatchUsers subscription");
                    tokio::select! {
                        () = self.drain.draining() => return,
                        () = tokio::time::sleep(jitter(backoff)) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    () = self.drain.draining() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(event)) => {
                        if event.sequence <= self.published.load(Ordering::SeqCst) {
                            continue;
                        }
                        self.published.store(event.sequence, Ordering::SeqCst);
                        let _ = self.tx.send(Arc::new(profile_event(event)));
                    }
                    Some(Err(status)) => {
                        tracing::warn!(error = %status, "upstream WatchUsers ended; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!("upstream WatchUsers closed; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    /// The number of live subscribers.
    pub(crate) fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A subscriber's stream: from `after` (replayed from users' log first), else from the
    /// live edge.
    pub(crate) async fn subscribe(
        &self,
        after: Option<i64>,
    ) -> Result<BoxStream<ProfileEvent>, Status> {
        if let Some(after) = after
            && after < 0
        {
            return Err(Status::invalid_argument(format!(
                "after_sequence must not be negative (got {after})"
            )));
        }
        if self.subscribers() >= self.max_subscribers {
            return Err(Status::resource_exhausted(format!(
                "this aggregator serves its maximum of {} WatchProfiles streams; retry later \
                 or elsewhere",
                self.max_subscribers
            )));
        }
        let rx = self.tx.subscribe();
        let published = self.published.load(Ordering::SeqCst);
        let mut subscriber = Subscriber {
            rx,
            downstream: self.downstream.clone(),
            token: self.token.clone(),
            drain: self.drain.clone(),
            position: after,
            replay: None,
            held: None,
            done: false,
        };
        match after {
            // Open the replay now, so a position beyond users' log is refused up front.
            Some(after) => subscriber.open_replay(after).await?,
            None if published < 0 => {
                return Err(Status::unavailable(
                    "the change feed is not connected to users yet; retry",
                ));
            }
            None => subscriber.position = Some(published),
        }
        let events = futures_util::stream::unfold(subscriber, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        });
        Ok(Box::pin(events))
    }
}

/// One `WatchProfiles` stream's state.
struct Subscriber {
    rx: broadcast::Receiver<Arc<ProfileEvent>>,
    downstream: Arc<Downstreams>,
    token: Arc<ServiceToken>,
    drain: Drain,
    /// The sequence of the last event sent (or the starting point).
    position: Option<i64>,
    /// Reading users' log directly, until it reaches the broadcast.
    replay: Option<Streaming<UserEvent>>,
    /// The oldest broadcast event not yet sent, taken out of the receiver while replaying.
    held: Option<Arc<ProfileEvent>>,
    done: bool,
}

impl Subscriber {
    async fn open_replay(&mut self, after: i64) -> Result<(), Status> {
        let token = self.token.get().await?;
        let (stream, _) = open_upstream(&self.downstream, &token, Some(after))
            .await
            .map_err(|s| relay("users", s))?;
        self.replay = Some(stream);
        self.held = None;
        Ok(())
    }

    fn shutting_down(&mut self) -> Status {
        self.done = true;
        Status::unavailable(format!(
            "the server is shutting down; resume with after_sequence = {}",
            self.position.unwrap_or(0)
        ))
    }

    fn is_new(&self, sequence: i64) -> bool {
        self.position.is_none_or(|p| sequence > p)
    }

    async fn next(&mut self) -> Option<Result<ProfileEvent, Status>> {
        loop {
            if self.done {
                return None;
            }
            if self.drain.is_draining() {
                return Some(Err(self.shutting_down()));
            }
            if let Some(replay) = self.replay.as_mut() {
                // Note the oldest live event, if one has arrived.
                if self.held.is_none() {
                    match self.rx.try_recv() {
                        Ok(event) => self.held = Some(event),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                        Err(_) => {}
                    }
                }
                if let Some(held) = &self.held {
                    // Every event before the held one has been sent once the replay reached
                    // it (or its predecessor, when sequences are consecutive): switch.
                    if self.position.is_some_and(|p| p >= held.sequence - 1) {
                        self.replay = None;
                        continue;
                    }
                }
                let next = tokio::select! {
                    biased;
                    () = self.drain.draining() => return Some(Err(self.shutting_down())),
                    next = replay.next() => next,
                    live = self.rx.recv(), if self.held.is_none() => {
                        match live {
                            Ok(event) => self.held = Some(event),
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => {
                                return Some(Err(self.shutting_down()));
                            }
                        }
                        continue;
                    }
                };
                match next {
                    Some(Ok(event)) => {
                        if !self.is_new(event.sequence) {
                            continue;
                        }
                        self.position = Some(event.sequence);
                        return Some(Ok(profile_event(event)));
                    }
                    Some(Err(status)) => {
                        self.done = true;
                        return Some(Err(Status::unavailable(format!(
                            "users' log is unavailable ({}); resume with after_sequence = {}",
                            status.code(),
                            self.position.unwrap_or(0)
                        ))));
                    }
                    None => {
                        self.done = true;
                        return Some(Err(Status::unavailable(format!(
                            "users' log ended; resume with after_sequence = {}",
                            self.position.unwrap_or(0)
                        ))));
                    }
                }
            }
            if let Some(held) = self.held.take() {
                if self.is_new(held.sequence) {
                    self.position = Some(held.sequence);
                    return Some(Ok(ProfileEvent::clone(&held)));
                }
                continue;
            }
            let received = tokio::select! {
                biased;
                () = self.drain.draining() => return Some(Err(self.shutting_down())),
                received = self.rx.recv() => received,
            };
            match received {
                Ok(event) => {
                    if self.is_new(event.sequence) {
                        self.position = Some(event.sequence);
                        return Some(Ok(ProfileEvent::clone(&event)));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let from = self.position.unwrap_or(0);
                    tracing::debug!(missed, from, "subscriber fell behind; replaying from users");
                    if let Err(status) = self.open_replay(from).await {
                        self.done = true;
                        return Some(Err(Status::unavailable(format!(
                            "cannot catch up from users' log ({}); resume with \
                             after_sequence = {from}",
                            status.code()
                        ))));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Some(Err(self.shutting_down())),
            }
        }
    }
}

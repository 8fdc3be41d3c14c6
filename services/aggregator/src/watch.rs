//! `WatchProfiles`: ONE upstream `WatchUsers` subscription per aggregator process, fanned out
//! to every subscriber from a ring of recent events.
//!
//! The upstream task authenticates with a service token (`IssueServiceToken`, renewed before
//! it expires), learns the log's position from the stream's `x-mesh-log-head` metadata, and
//! after any disconnect (users restarting) reconnects with backoff and resumes from the last
//! sequence it saw — so the relay has no gap. Each event goes into the ring once and the head
//! (the newest sequence) moves on; every subscriber is woken and reads what it has not sent.
//!
//! A subscriber is only a position in the log. Whatever is after its position and still in the
//! ring is served from the ring, shared; whatever is older — a replay from `after_sequence`, or
//! a subscriber that fell more than the ring behind — is read from users' log in small pages,
//! on the relay's own connection to users ([`Replays`]): a page read holds an upstream stream
//! for the milliseconds it takes, never for as long as a slow client takes to read, so replays
//! cannot fill the connections GetMe and GetProfiles use. Pages held by subscribers are bounded
//! in all ([`WatchLimits::catch_up_pages`]); a page its client has not read for
//! [`WatchLimits::replay_idle`] is dropped (and read again if the client comes back). Streams
//! are bounded in all and per caller.
//!
//! Each event is encoded once, when it enters the ring (and once more erased, if its profile
//! is deleted): every subscriber the ring serves sends those same bytes
//! ([`mesh_proto::codec::Encoded`]). Only pages of users' log are encoded per subscriber.
//!
//! Erasure: once an account is deleted, no replay shows its display name or bio — events of a
//! deleted profile still in the ring are served erased, and its DELETED event carries the last
//! state only to subscribers that were live when it happened (users' stored log is erased the
//! same way).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, OnceLock, RwLock, Weak},
    time::Duration,
};

use futures_util::StreamExt as _;
use mesh_proto::{
    aggregator::v1::{Profile, ProfileEvent, ProfileEventKind},
    auth::v1::IssueServiceTokenRequest,
    codec::Encoded,
    users::v1::{EventKind, UserEvent, WatchUsersRequest},
};
use mesh_runtime::{
    Drain,
    bounded::{BoundedMap, key16},
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};
use tonic::{Code, Request, Status, Streaming};

use mesh_runtime::client::{Pool, Traced};
use secrecy::{ExposeSecret as _, SecretString};

use crate::{
    downstream::{Downstreams, retry::jitter},
    error::AggregatorError,
    server::BoxStream,
    slots::{Slot, StreamSlots},
};

// Response metadata of users' `WatchUsers`: the log's position when the stream began.
use mesh_proto::headers::LOG_HEAD as LOG_HEAD_HEADER;
/// Longest wait between upstream reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Events per catch-up page read from users' log.
pub(crate) const PAGE_EVENTS: usize = 64;
/// The longest a page read from users may take.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a subscriber waits for a place for a catch-up page before its stream ends
/// (UNAVAILABLE, naming where to resume).
const PAGE_WAIT: Duration = Duration::from_secs(30);
/// A page is held at most this many idle timeouts in all, however its client reads.
const PAGE_HOLD_IDLES: u32 = 4;
/// Deleted profiles the relay remembers for sending (an hour's worth, at most this many).
const DELETED_KEPT: usize = 65_536;

/// The aggregator's service identity for its own upstream calls.
#[derive(Debug, Clone)]
pub(crate) struct ServiceCredentials {
    pub(crate) client_id: String,
    pub(crate) client_secret: SecretString,
}

/// A service token, fetched on first use and renewed once half its lifetime has passed.
#[derive(Debug)]
pub(crate) struct ServiceToken {
    credentials: Option<ServiceCredentials>,
    downstream: Arc<Downstreams>,
    cached: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
}

impl ServiceToken {
    pub(crate) fn new(
        credentials: Option<ServiceCredentials>,
        downstream: Arc<Downstreams>,
    ) -> Self {
        Self {
            credentials,
            downstream,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// A token valid for a while yet.
    pub(crate) async fn get(&self) -> Result<SecretString, AggregatorError> {
        let Some(credentials) = &self.credentials else {
            return Err(AggregatorError::FailedPrecondition(
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
            client_secret: credentials.client_secret.expose_secret().to_owned(),
        });
        request.set_timeout(Duration::from_secs(5));
        let reply = self
            .downstream
            .auth()
            .issue_service_token(request)
            .await
            .map_err(AggregatorError::auth)?
            .into_inner();
        let now_unix = mesh_proto::time::unix_now();
        let lifetime = reply
            .expire_time
            .map(|t| t.seconds - now_unix)
            .unwrap_or(60)
            .max(2);
        let renew_at = Instant::now() + Duration::from_secs((lifetime / 2) as u64);
        let token = SecretString::from(reply.access_token);
        *cached = Some((token.clone(), renew_at));
        Ok(token)
    }
}

/// The bounds of the relay and its subscribers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchLimits {
    /// Events the ring keeps.
    pub(crate) ring: usize,
    /// Subscribers at once, in all.
    pub(crate) max_subscribers: usize,
    /// Subscribers at once with one caller's identity (token subject).
    pub(crate) per_caller: usize,
    /// Catch-up pages held by subscribers at once, in all.
    pub(crate) catch_up_pages: usize,
    /// Events per catch-up page.
    pub(crate) page_events: usize,
    /// Page reads from users at once.
    pub(crate) page_reads: usize,
    /// How long a held page may wait for its client to read it.
    pub(crate) replay_idle: Duration,
}

/// One event in the ring, encoded (decoded again only to erase it).
#[derive(Debug)]
struct Entry {
    sequence: i64,
    user_id: String,
    deleted_event: bool,
    encoded: Encoded<ProfileEvent>,
    /// The event without display name and bio: for every reader once the profile is deleted,
    /// and, for its DELETED event, for readers that replay it.
    erased: OnceLock<Encoded<ProfileEvent>>,
}

impl Entry {
    /// The event as a reader that replays through `replay_until` sees it.
    fn shown(&self, replay_until: i64) -> &Encoded<ProfileEvent> {
        let replayed = self.sequence <= replay_until;
        match self.erased.get() {
            Some(erased) if !self.deleted_event || replayed => erased,
            _ => &self.encoded,
        }
    }
}

/// `encoded` without display name and bio, encoded.
fn erase_encoded(encoded: &Encoded<ProfileEvent>) -> Encoded<ProfileEvent> {
    // The ring's own encoding: it decodes.
    Encoded::new(&erase(&encoded.to_message().unwrap_or_default()))
}

fn erase(event: &ProfileEvent) -> ProfileEvent {
    let mut erased = event.clone();
    if let Some(profile) = erased.profile.as_mut() {
        profile.display_name.clear();
        profile.bio.clear();
    }
    erased
}

/// The recent events, after `floor`: every event with a larger sequence is here.
#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<Arc<Entry>>,
    floor: i64,
}

impl Ring {
    fn push(&mut self, event: ProfileEvent, capacity: usize) {
        let user_id = event
            .profile
            .as_ref()
            .map(|p| p.user_id.clone())
            .unwrap_or_default();
        let deleted_event = event.kind() == ProfileEventKind::Deleted;
        if deleted_event {
            // No replay shows a deleted profile's name or bio again.
            for entry in self.entries.iter().filter(|e| e.user_id == user_id) {
                let _ = entry.erased.set(erase_encoded(&entry.encoded));
            }
        }
        let entry = Entry {
            sequence: event.sequence,
            user_id,
            deleted_event,
            erased: OnceLock::new(),
            encoded: Encoded::new(&event),
        };
        if deleted_event {
            let _ = entry.erased.set(Encoded::new(&erase(&event)));
        }
        self.entries.push_back(Arc::new(entry));
        while self.entries.len() > capacity.max(1) {
            if let Some(gone) = self.entries.pop_front() {
                self.floor = gone.sequence;
            }
        }
    }

    /// The first event after `position` and its sequence, as a reader that replays through
    /// `replay_until` sees it (`Some(None)`: nothing after it yet); `None` when `position` is
    /// older than the ring. Nothing is encoded and nothing copied: a live subscriber takes
    /// each event this way, sharing its bytes.
    fn next_after(
        &self,
        position: i64,
        replay_until: i64,
    ) -> Option<Option<(i64, Encoded<ProfileEvent>)>> {
        if position < self.floor {
            return None;
        }
        let start = self.entries.partition_point(|e| e.sequence <= position);
        Some(
            self.entries
                .get(start)
                .map(|entry| (entry.sequence, entry.shown(replay_until).clone())),
        )
    }

    /// Up to `max` events after `position`, as a reader that replays through `replay_until`
    /// sees them; `None` when `position` is older than the ring.
    #[cfg(test)]
    fn after(&self, position: i64, replay_until: i64, max: usize) -> Option<Vec<ProfileEvent>> {
        if position < self.floor {
            return None;
        }
        let start = self.entries.partition_point(|e| e.sequence <= position);
        Some(
            self.entries
                .range(start..)
                .take(max)
                .map(|entry| entry.shown(replay_until).to_message().expect("decodes"))
                .collect(),
        )
    }
}

/// Reads pages of users' log on the relay's own connections, a bounded number at once.
#[derive(Debug)]
struct Replays {
    pool: Pool,
    reads: Arc<Semaphore>,
    token: Arc<ServiceToken>,
}

impl Replays {
    fn client(&self) -> mesh_proto::users::v1::user_service_client::UserServiceClient<Traced> {
        mesh_proto::users::v1::user_service_client::UserServiceClient::new(self.pool.channel())
    }

    async fn open(&self, after: i64) -> Result<Streaming<UserEvent>, Status> {
        let token = self.token.get().await?;
        let mut request = mesh_authn::bearer_request(
            token.expose_secret(),
            WatchUsersRequest {
                after_sequence: Some(after),
            },
        );
        request.set_timeout(PAGE_TIMEOUT);
        Ok(self.client().watch_users(request).await?.into_inner())
    }

    /// Whether users accepts `after` as a position (OUT_OF_RANGE beyond its log or before its
    /// retained start).
    async fn check(&self, after: i64) -> Result<(), Status> {
        let _read = self
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        self.open(after).await.map(drop)
    }

    /// Up to `max` events after `after`, stopping at the first with a sequence of `until` or
    /// more (those are in the ring).
    async fn page(&self, after: i64, until: i64, max: usize) -> Result<Vec<ProfileEvent>, Status> {
        let _read = self
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let read = async {
            let mut stream = self.open(after).await?;
            let mut page = Vec::new();
            while page.len() < max {
                match stream.message().await? {
                    Some(event) => {
                        let sequence = event.sequence;
                        page.push(profile_event(event));
                        if sequence >= until {
                            break;
                        }
                    }
                    None => break,
                }
            }
            Ok(page)
        };
        tokio::time::timeout(PAGE_TIMEOUT, read)
            .await
            .unwrap_or_else(|_| {
                Err(AggregatorError::Unavailable("users' log did not answer in time".into()).into())
            })
    }
}

fn closed() -> Status {
    AggregatorError::Unavailable("the server is shutting down; retry".into()).into()
}

/// A page of users' log a subscriber holds until its client has read it; the janitor may take
/// it back.
#[derive(Debug)]
struct HeldPage {
    events: VecDeque<ProfileEvent>,
    /// The page's place in all, and its place in its caller's share.
    permit: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    last_read: Instant,
    since: Instant,
}

/// The process's one relay of users' change log.
#[derive(Debug)]
pub(crate) struct Fanout {
    ring: RwLock<Ring>,
    /// The sequence of the newest event in the ring; -1 before the upstream has connected once.
    head: watch::Sender<i64>,
    token: Arc<ServiceToken>,
    downstream: Arc<Downstreams>,
    replays: Replays,
    drain: Drain,
    limits: WatchLimits,
    slots: Arc<StreamSlots>,
    pages: Arc<Semaphore>,
    /// Each caller's share of the pages (entries dropped by the janitor when unused).
    caller_pages: Mutex<std::collections::HashMap<[u8; 16], Arc<Semaphore>>>,
    /// Profiles deleted lately (by [`key16`] of the id): an event of one, already taken from
    /// the ring or read in a page before its deletion, is still sent erased.
    deleted: Mutex<BoundedMap<[u8; 16], ()>>,
    held: Mutex<Vec<Weak<Mutex<HeldPage>>>>,
    /// Events sent to subscribers from the ring, and from pages of users' log.
    sent: Sent,
    /// The subscribers of each client connection (by its peer address), woken together.
    groups: Groups,
}

/// Events sent to subscribers since the process started, by where they came from.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// From the ring the relay keeps (shared by every subscriber).
    pub(crate) from_ring: std::sync::atomic::AtomicU64,
    /// From pages of users' log (a replay, or a subscriber more than the ring behind).
    pub(crate) from_log: std::sync::atomic::AtomicU64,
}

/// The subscribers of one client connection. A change wakes them connection by connection:
/// the streams of one connection run one after another, each queueing its frame, and their
/// connection's task, woken by the first of them, runs after them all and writes every frame
/// in one system call. Woken all at once from one channel, the streams ran in the order they
/// had subscribed — round robin across connections — and at 100,000 subscribers over 1,000
/// connections each connection's task ran between two of its streams: 0.6 writes per
/// subscriber per change, against 0.03 with groups (`mesh bench watch`).
#[derive(Debug)]
struct Group {
    head: watch::Sender<i64>,
}

/// Every connection's [`Group`], by the client's address.
#[derive(Debug, Default)]
struct Groups(Mutex<std::collections::HashMap<Option<std::net::SocketAddr>, Weak<Group>>>);

/// Groups of connections whose subscribers have all left are kept at most this many beyond
/// twice the subscribers (a client opening connection after connection, each subscribing and
/// leaving, with no change between, must not grow the map).
const DEAD_GROUPS: usize = 64;

impl Groups {
    /// The group of the subscribers on `connection`, made at `head()` if it has none, with
    /// `subscribers` open in all.
    fn join(
        &self,
        connection: Option<std::net::SocketAddr>,
        head: impl FnOnce() -> i64,
        subscribers: usize,
    ) -> Arc<Group> {
        let mut groups = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(group) = groups.get(&connection).and_then(Weak::upgrade) {
            return group;
        }
        if groups.len() >= 2 * subscribers + DEAD_GROUPS {
            groups.retain(|_, group| group.strong_count() > 0);
        }
        // Read under the lock [`Groups::wake`] takes: a head moved after this read wakes the
        // new group too.
        let group = Arc::new(Group {
            head: watch::channel(head()).0,
        });
        groups.insert(connection, Arc::downgrade(&group));
        group
    }

    /// Moves every group's head to `sequence` (`None`: marks it changed, for the drain),
    /// group by group, and forgets the groups whose subscribers have all left.
    fn wake(&self, sequence: Option<i64>) {
        let mut groups = self.0.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|_, group| {
            let Some(group) = group.upgrade() else {
                return false;
            };
            match sequence {
                Some(sequence) => {
                    group.head.send_replace(sequence);
                }
                None => group.head.send_modify(|_| {}),
            }
            true
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map_or(0, |groups| groups.len())
    }
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
    /// Starts the upstream task and the page janitor; they run until `drain` begins.
    pub(crate) fn start(
        downstream: Arc<Downstreams>,
        replay_pool: Pool,
        token: Arc<ServiceToken>,
        limits: WatchLimits,
        drain: Drain,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let fanout = Arc::new(Self {
            ring: RwLock::new(Ring::default()),
            head: watch::channel(-1).0,
            replays: Replays {
                pool: replay_pool,
                reads: Arc::new(Semaphore::new(limits.page_reads.max(1))),
                token: token.clone(),
            },
            token,
            downstream,
            drain,
            limits,
            slots: StreamSlots::new("WatchProfiles", limits.max_subscribers, limits.per_caller),
            pages: Arc::new(Semaphore::new(limits.catch_up_pages.max(1))),
            caller_pages: Mutex::default(),
            deleted: Mutex::new(BoundedMap::new(DELETED_KEPT, Duration::from_secs(3600))),
            held: Mutex::new(Vec::new()),
            groups: Groups::default(),
            sent: Sent::default(),
        });
        let task = tokio::spawn({
            let fanout = fanout.clone();
            async move {
                tokio::join!(fanout.clone().upstream(), fanout.clone().janitor());
                // Subscribers wait on their group's head alone: wake them all to see the drain.
                fanout.wake(None);
            }
        });
        (fanout, task)
    }

    fn head(&self) -> i64 {
        *self.head.borrow()
    }

    /// Moves every group's head to `sequence` (`None`: marks it changed, for the drain).
    fn wake(&self, sequence: Option<i64>) {
        self.groups.wake(sequence);
    }

    /// The one upstream subscription: connect, relay, reconnect from the last sequence seen.
    async fn upstream(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let after = Some(self.head()).filter(|p| *p >= 0);
            let opened = tokio::select! {
                () = self.drain.draining() => return,
                opened = async {
                    let token = self.token.get().await?;
                    open_upstream(&self.downstream, token.expose_secret(), after).await
                } => opened,
            };
            let mut stream = match opened {
                Ok((stream, head)) => {
                    if after.is_none()
                        && let Some(head) = head
                    {
                        self.ring.write().unwrap_or_else(|e| e.into_inner()).floor = head;
                        self.head.send_replace(head);
                        self.wake(Some(head));
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
                        let sequence = event.sequence;
                        if sequence <= self.head() {
                            continue;
                        }
                        let event = profile_event(event);
                        if event.kind() == ProfileEventKind::Deleted
                            && let Some(profile) = &event.profile
                        {
                            self.deleted
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert_with(
                                    key16(&[profile.user_id.as_bytes()]),
                                    Instant::now(),
                                    || (),
                                );
                        }
                        self.ring
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(event, self.limits.ring);
                        self.head.send_replace(sequence);
                        self.wake(Some(sequence));
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

    /// Takes back pages their clients have not read for the idle time.
    async fn janitor(self: Arc<Self>) {
        let every = (self.limits.replay_idle / 4).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                () = self.drain.draining() => return,
                () = tokio::time::sleep(every) => {}
            }
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.retain(|page| {
                let Some(page) = page.upgrade() else {
                    return false;
                };
                let mut page = page.lock().unwrap_or_else(|e| e.into_inner());
                if page.permit.is_none() {
                    return false;
                }
                // Not read for the idle time, or held too long in all (a client reading one
                // event now and then): taken back, read again if the client comes back.
                if page.last_read.elapsed() >= self.limits.replay_idle
                    || page.since.elapsed() >= self.limits.replay_idle * PAGE_HOLD_IDLES
                {
                    page.events = VecDeque::new();
                    page.permit = None;
                    return false;
                }
                true
            });
            drop(held);
            // Forget the shares of callers holding no page.
            let share = self.caller_page_share();
            self.caller_pages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, pages| pages.available_permits() < share);
        }
    }

    /// Pages one caller may hold at once: an eighth of all of them (at least one).
    fn caller_page_share(&self) -> usize {
        (self.limits.catch_up_pages / 8).max(1)
    }

    /// A place for a page of `caller`: one of all the pages and one of the caller's share,
    /// waiting at most [`PAGE_WAIT`].
    async fn page_place(
        &self,
        caller: [u8; 16],
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let share = self.caller_page_share();
        let own = self
            .caller_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(caller)
            .or_insert_with(|| Arc::new(Semaphore::new(share)))
            .clone();
        tokio::time::timeout(PAGE_WAIT, async {
            let own = own.acquire_owned().await.ok()?;
            let all = self.pages.clone().acquire_owned().await.ok()?;
            Some((all, own))
        })
        .await
        .ok()
        .flatten()
    }

    /// The number of live subscribers.
    pub(crate) fn subscribers(&self) -> usize {
        self.slots.open()
    }

    /// The events sent so far, by where they came from.
    pub(crate) fn sent(&self) -> &Sent {
        &self.sent
    }

    /// A subscriber's stream for `caller` (a key of its identity) on `connection` (its
    /// client's address): from `after` (older events replayed first), else from the live edge.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        caller: [u8; 16],
        connection: Option<std::net::SocketAddr>,
        after: Option<i64>,
    ) -> Result<BoxStream<Encoded<ProfileEvent>>, AggregatorError> {
        if let Some(after) = after
            && after < 0
        {
            return Err(AggregatorError::InvalidArgument(format!(
                "after_sequence must not be negative (got {after})"
            )));
        }
        let counted = self.slots.take(caller)?;
        let head = self.head();
        if head < 0 {
            return Err(AggregatorError::Unavailable(
                "the change feed is not connected to users yet; retry".into(),
            ));
        }
        let floor = self.ring.read().map_or(i64::MAX, |ring| ring.floor);
        let (position, replay_until) = match after {
            // Only users knows positions older than the ring or newer than the relay: ask it,
            // so a position beyond its log (or before its retained start) is refused up front.
            Some(after) if after < floor || after > head => {
                self.replays
                    .check(after)
                    .await
                    .map_err(AggregatorError::users)?;
                (after, head)
            }
            Some(after) => (after, head),
            None => (head, -1),
        };
        let group = self
            .groups
            .join(connection, || self.head(), self.slots.open());
        let subscriber = Subscriber {
            caller,
            fanout: self.clone(),
            head: group.head.subscribe(),
            _group: group,
            position,
            replay_until,
            page: None,
            done: false,
            _counted: counted,
        };
        let events = futures_util::stream::unfold(subscriber, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        });
        Ok(Box::pin(events))
    }
}

/// One `WatchProfiles` stream's state: a position, and what it is about to send.
struct Subscriber {
    /// A key of the caller's identity (its share of catch-up pages).
    caller: [u8; 16],
    fanout: Arc<Fanout>,
    /// The head as this subscriber's group sees it.
    head: watch::Receiver<i64>,
    _group: Arc<Group>,
    /// The sequence of the last event sent (or the starting point).
    position: i64,
    /// Events through this sequence are a replay (the head when it subscribed with a position).
    replay_until: i64,
    /// A page read from users, not yet sent.
    page: Option<Arc<Mutex<HeldPage>>>,
    done: bool,
    _counted: Slot,
}

impl Subscriber {
    fn shutting_down(&mut self) -> Status {
        self.done = true;
        unavailable(format!(
            "the server is shutting down; resume with after_sequence = {}",
            self.position
        ))
    }

    /// `event` as this subscriber may see it: erased if its profile has been deleted — unless
    /// it is that profile's DELETED event and this subscriber was live when it happened.
    fn shown(&self, event: &ProfileEvent) -> ProfileEvent {
        let Some(profile) = &event.profile else {
            return event.clone();
        };
        let deleted = self
            .fanout
            .deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key16(&[profile.user_id.as_bytes()]), Instant::now())
            .is_some();
        let live_deletion =
            event.kind() == ProfileEventKind::Deleted && event.sequence > self.replay_until;
        if deleted && !live_deletion {
            erase(event)
        } else {
            event.clone()
        }
    }

    fn failed(&mut self, status: Status) -> Status {
        self.done = true;
        if status.code() == Code::OutOfRange {
            return status;
        }
        unavailable(format!(
            "users' log is unavailable ({}); resume with after_sequence = {}",
            status.code(),
            self.position
        ))
    }

    async fn next(&mut self) -> Option<Result<Encoded<ProfileEvent>, Status>> {
        loop {
            if self.done {
                return None;
            }
            if self.fanout.drain.is_draining() {
                return Some(Err(self.shutting_down()));
            }
            if let Some(page) = self.page.clone() {
                let next = {
                    let mut page = page.lock().unwrap_or_else(|e| e.into_inner());
                    page.last_read = Instant::now();
                    page.events.pop_front()
                };
                match next {
                    Some(event) if event.sequence > self.position => {
                        self.position = event.sequence;
                        self.fanout
                            .sent
                            .from_log
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Some(Ok(Encoded::new(&self.shown(&event))));
                    }
                    Some(_) => continue,
                    // Read out, or taken back by the janitor: read on from the position.
                    None => {
                        self.page = None;
                        continue;
                    }
                }
            }
            let head = *self.head.borrow_and_update();
            if self.position >= head {
                // Only the head is waited on (one registration per wait, not two): once the
                // drain begins, the relay's task marks the head changed for every subscriber.
                // The drain is checked after the head was read, so a mark between the check
                // at the top and here is not missed.
                if self.fanout.drain.is_draining() {
                    return Some(Err(self.shutting_down()));
                }
                if self.head.changed().await.is_err() {
                    return Some(Err(self.shutting_down()));
                }
                continue;
            }
            let (from_ring, floor) = {
                // A panic while the lock was held cannot leave the ring half-changed: read on.
                let ring = self.fanout.ring.read().unwrap_or_else(|e| e.into_inner());
                (
                    ring.next_after(self.position, self.replay_until),
                    ring.floor,
                )
            };
            match from_ring {
                // The ring's own entries are erased once their profile is deleted.
                Some(Some((sequence, event))) => {
                    self.position = sequence;
                    self.fanout
                        .sent
                        .from_ring
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Some(Ok(event));
                }
                // Everything up to the head is in the ring once the head has moved there.
                Some(None) => {
                    if self.fanout.drain.is_draining() || self.head.changed().await.is_err() {
                        return Some(Err(self.shutting_down()));
                    }
                }
                // Older than the ring (boxed: the live path's future stays small).
                None => {
                    if let Some(status) = Box::pin(self.catch_up(floor)).await {
                        return Some(Err(status));
                    }
                }
            }
        }
    }

    /// Reads the page of users' log after this subscriber's position (within the bound on
    /// held pages), up to `floor` where the ring begins; the status to end the stream with if
    /// that fails.
    async fn catch_up(&mut self, floor: i64) -> Option<Status> {
        let drain = self.fanout.drain.clone();
        let permit = tokio::select! {
            () = drain.draining() => return Some(self.shutting_down()),
            permit = self.fanout.page_place(self.caller) => match permit {
                Some(permit) => permit,
                None => {
                    self.done = true;
                    return Some(unavailable(format!(
                        "no catch-up capacity now; resume with after_sequence = {}",
                        self.position
                    )));
                }
            },
        };
        let read = tokio::select! {
            () = drain.draining() => return Some(self.shutting_down()),
            read = self.fanout.replays.page(
                self.position,
                floor,
                self.fanout.limits.page_events,
            ) => read,
        };
        match read {
            Ok(events) if events.is_empty() => {
                // Nothing in users' log between here and the ring.
                self.position = self.position.max(floor);
            }
            Ok(events) => {
                let page = Arc::new(Mutex::new(HeldPage {
                    events: events.into(),
                    permit: Some(permit),
                    last_read: Instant::now(),
                    since: Instant::now(),
                }));
                self.fanout
                    .held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Arc::downgrade(&page));
                self.page = Some(page);
            }
            Err(status) => return Some(self.failed(status)),
        }
        None
    }
}

/// A retryable failure of a subscriber's stream, through the aggregator's one status table.
fn unavailable(message: String) -> Status {
    AggregatorError::Unavailable(message).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64, user: &str, kind: ProfileEventKind) -> ProfileEvent {
        ProfileEvent {
            sequence,
            kind: kind.into(),
            profile: Some(Profile {
                user_id: user.into(),
                display_name: format!("name {sequence}"),
                bio: "bio".into(),
                ..Profile::default()
            }),
            occur_time: None,
        }
    }

    /// The ring keeps the newest events, knows its floor, and hands out what follows a
    /// position; older positions are not its to serve.
    #[test]
    fn ring_serves_what_it_holds() {
        let mut ring = Ring {
            floor: 10,
            ..Ring::default()
        };
        for sequence in [12, 13, 15, 16] {
            ring.push(event(sequence, "u", ProfileEventKind::Updated), 3);
        }
        assert_eq!(ring.floor, 12, "the oldest went");
        let seqs = |v: Option<Vec<ProfileEvent>>| {
            v.map(|v| v.iter().map(|e| e.sequence).collect::<Vec<_>>())
        };
        assert_eq!(seqs(ring.after(12, -1, 10)), Some(vec![13, 15, 16]));
        assert_eq!(seqs(ring.after(14, -1, 10)), Some(vec![15, 16]));
        assert_eq!(seqs(ring.after(15, -1, 1)), Some(vec![16]));
        assert_eq!(seqs(ring.after(16, -1, 10)), Some(vec![]));
        assert_eq!(seqs(ring.after(11, -1, 10)), None);
        // One at a time, as a live subscriber reads it: the same events.
        let next = |position| {
            ring.next_after(position, -1)
                .map(|e| e.map(|(sequence, _)| sequence))
        };
        assert_eq!(next(12), Some(Some(13)));
        assert_eq!(next(13), Some(Some(15)));
        assert_eq!(next(14), Some(Some(15)));
        assert_eq!(next(16), Some(None));
        assert_eq!(next(11), None, "older than the ring");
    }

    /// Every reader of an event in the ring sends the same bytes, encoded once when the event
    /// came in: live and replaying readers alike, erased ones the one erased encoding; only a
    /// replay of a DELETED event differs from what its live readers got.
    #[test]
    fn ring_events_are_encoded_once_for_every_reader() {
        use prost::Message as _;
        let mut ring = Ring::default();
        ring.push(event(1, "kept", ProfileEventKind::Created), 10);
        ring.push(event(2, "gone", ProfileEventKind::Created), 10);
        let read = |ring: &Ring, position, replay_until| {
            ring.next_after(position, replay_until)
                .flatten()
                .expect("in the ring")
                .1
        };
        let first = read(&ring, 0, -1);
        assert_eq!(
            first.bytes()[..],
            event(1, "kept", ProfileEventKind::Created).encode_to_vec()[..]
        );
        for replay_until in [-1, 1, 5] {
            let again = read(&ring, 0, replay_until);
            assert_eq!(again.bytes().as_ptr(), first.bytes().as_ptr(), "shared");
            assert_eq!(again, first);
        }
        ring.push(event(3, "gone", ProfileEventKind::Deleted), 10);
        let erased = read(&ring, 1, -1);
        assert_eq!(read(&ring, 1, 3).bytes().as_ptr(), erased.bytes().as_ptr());
        let shown = erased.to_message().expect("decodes");
        assert_eq!(shown.profile.map(|p| p.display_name), Some(String::new()));
        let live = read(&ring, 2, -1);
        let replayed = read(&ring, 2, 3);
        assert_eq!(read(&ring, 2, -1).bytes().as_ptr(), live.bytes().as_ptr());
        assert_eq!(
            read(&ring, 2, 3).bytes().as_ptr(),
            replayed.bytes().as_ptr()
        );
        assert_ne!(live, replayed, "a replayed deletion is erased");
    }

    /// Groups of connections whose subscribers have left are forgotten, changes or not: a
    /// client that connects, subscribes and leaves again and again does not grow the map.
    #[test]
    fn groups_of_left_connections_are_forgotten() {
        let groups = Groups::default();
        let addr = |port| Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        let kept: Vec<_> = (1..=10)
            .map(|port| groups.join(addr(port), || 5, 10))
            .collect();
        for port in 100..10_100 {
            drop(groups.join(addr(port), || 5, 10));
        }
        assert!(
            groups.len() <= 10 + 2 * 10 + DEAD_GROUPS,
            "{} groups for 10 live",
            groups.len()
        );
        // The live ones are still the ones their subscribers hold, and a change reaches them.
        for (port, group) in (1..=10).zip(&kept) {
            assert!(Arc::ptr_eq(&groups.join(addr(port), || 0, 10), group));
        }
        groups.wake(Some(7));
        assert!(kept.iter().all(|g| *g.head.borrow() == 7));
        assert_eq!(groups.len(), 10, "a change forgets the rest");
    }

    /// A deletion erases the profile's earlier events for everyone, and its own DELETED event
    /// for replays only.
    #[test]
    fn deletion_erases_what_the_ring_holds() {
        let mut ring = Ring::default();
        ring.push(event(1, "gone", ProfileEventKind::Created), 10);
        ring.push(event(2, "kept", ProfileEventKind::Created), 10);
        ring.push(event(3, "gone", ProfileEventKind::Deleted), 10);
        let names = |replay_until| {
            ring.after(0, replay_until, 10)
                .expect("in the ring")
                .iter()
                .map(|e| {
                    e.profile
                        .as_ref()
                        .map(|p| p.display_name.clone())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(names(-1), ["", "name 2", "name 3"], "live");
        assert_eq!(names(3), ["", "name 2", ""], "replayed");
        // Read one at a time, the same erasure.
        let name = |position, replay_until| {
            ring.next_after(position, replay_until)
                .flatten()
                .and_then(|(_, e)| e.to_message().expect("decodes").profile)
                .map(|p| p.display_name)
        };
        assert_eq!(name(0, -1).as_deref(), Some(""));
        assert_eq!(name(2, -1).as_deref(), Some("name 3"), "live deletion");
        assert_eq!(name(2, 3).as_deref(), Some(""), "replayed deletion");
    }
}

//! The tonic implementation of `mesh.users.v1.UserService`: check the caller, parse and
//! validate each request, call the store, map the result back.
//!
//! Every call arrives through [`mesh_authn::AuthLayer`], which has verified the bearer token
//! and put its [`Claims`] into the request's extensions.

use std::{collections::HashSet, pin::Pin, sync::Arc};

use mesh_authn::Claims;
use mesh_proto::time::{timestamp_from_unix_ms as timestamp_ms, unix_now_ms as now_ms};
use mesh_proto::users::v1::{
    BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, DeleteUserRequest,
    DeleteUserResponse, EventKind as ProtoEventKind, GetUserRequest, ListUsersRequest,
    ListUsersResponse, UpdateUserRequest, User as ProtoUser, UserEvent, WatchUsersRequest,
    user_service_server::{UserService, UserServiceServer},
};
use mesh_runtime::Drain;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::{
    domain::{PageTokens, parse_bio, parse_display_name, parse_user_id},
    error::UsersError,
    feed::Feed,
    store::{Changes, Created, Event, EventKind, Updated, User, UsersStore},
};

/// The most ids one `BatchGetUsers` takes.
pub const MAX_BATCH_IDS: usize = 1000;
/// `ListUsers` page size when the caller gives 0.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// The largest `ListUsers` page.
pub const MAX_PAGE_SIZE: i64 = 1000;
/// Response metadata of `WatchUsers`: the log's position when the stream began; the stream
/// sends every event with a larger sequence. A relay resumes from it after a disconnect
/// even if no event came in between.
pub use mesh_proto::headers::LOG_HEAD as LOG_HEAD_HEADER;
/// The longest `CreateUser.request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Accounts the write limit remembers (a key unused until its bucket is full is forgotten).
const WRITE_LIMIT_ACCOUNTS: usize = 65_536;

/// The largest request of each method, where the server-wide 4 MiB is far more than it needs:
/// a profile (64 + 512 characters of up to 4 bytes, an id, a request id) fits in 16 KiB, 1000
/// ids of 36 characters in 64 KiB.
pub const REQUEST_LIMITS: &[(&str, usize)] = &[
    ("CreateUser", 16 * 1024),
    ("GetUser", 1024),
    ("BatchGetUsers", 64 * 1024),
    ("ListUsers", 4 * 1024),
    ("UpdateUser", 16 * 1024),
    ("DeleteUser", 1024),
    ("WatchUsers", 1024),
];

/// The users service's gRPC handlers.
#[derive(Debug, Clone)]
pub struct UsersServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn UsersStore>,
    page_tokens: PageTokens,
    feed: Arc<Feed>,
    drain: Drain,
    max_watch_streams: usize,
    /// WatchUsers streams open (counted before the stream is made, so concurrent calls
    /// cannot overshoot the bound).
    watches: Arc<std::sync::atomic::AtomicUsize>,
    writes: mesh_runtime::bounded::RateLimit<[u8; 16]>,
}

/// `user` as the contract shows it to `viewer`: the e-mail only for its owner.
fn to_proto(user: User, viewer: &Claims) -> ProtoUser {
    let email = if user.id == viewer.sub {
        user.email
    } else {
        String::new()
    };
    ProtoUser {
        id: user.id,
        email,
        display_name: user.display_name,
        bio: user.bio,
        create_time: Some(timestamp_ms(user.create_time)),
        update_time: Some(timestamp_ms(user.update_time)),
        version: user.version,
    }
}

fn event_to_proto(event: Event) -> UserEvent {
    let kind = match event.kind {
        EventKind::Created => ProtoEventKind::Created,
        EventKind::Updated => ProtoEventKind::Updated,
        EventKind::Deleted => ProtoEventKind::Deleted,
    };
    let user = event.user;
    UserEvent {
        sequence: event.sequence,
        kind: kind.into(),
        user: Some(ProtoUser {
            id: user.id,
            // Events never carry e-mail.
            email: String::new(),
            display_name: user.display_name,
            bio: user.bio,
            create_time: Some(timestamp_ms(user.create_time)),
            update_time: Some(timestamp_ms(user.update_time)),
            version: user.version,
        }),
        occur_time: Some(timestamp_ms(event.occur_time)),
    }
}

/// The verified claims of the call.
fn claims<T>(request: &Request<T>) -> Result<Claims, UsersError> {
    request
        .extensions()
        .get::<Claims>()
        .cloned()
        .ok_or(UsersError::Unauthenticated)
}

/// The caller's own user id: a user token's subject. A service token has none.
fn own_id(claims: &Claims) -> Result<String, UsersError> {
    if claims.is_service() {
        return Err(UsersError::PermissionDenied(
            "a service token has no profile of its own",
        ));
    }
    parse_user_id("token subject", &claims.sub)
        .map_err(|_| UsersError::PermissionDenied("the token's subject is not a user id"))
}

/// The id a request names for the caller's own profile: empty means the caller; another
/// (well-formed) id is not theirs.
fn own_target(field: &str, raw: &str, claims: &Claims) -> Result<String, UsersError> {
    let own = own_id(claims)?;
    if raw.is_empty() {
        return Ok(own);
    }
    let id = parse_user_id(field, raw)?;
    if id != own {
        return Err(UsersError::PermissionDenied(
            "only the owner may change or delete a profile",
        ));
    }
    Ok(id)
}

impl UsersServer {
    /// Handlers over `store`, MAC'ing page tokens with `page_tokens` and streaming changes
    /// from `feed`; streams end when `drain` begins.
    pub(crate) fn new(
        store: Arc<dyn UsersStore>,
        page_tokens: PageTokens,
        feed: Arc<Feed>,
        drain: Drain,
        max_watch_streams: usize,
        writes: (u32, f64),
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                page_tokens,
                feed,
                drain,
                max_watch_streams,
                watches: Arc::default(),
                writes: mesh_runtime::bounded::RateLimit::new(
                    writes.0,
                    writes.1,
                    WRITE_LIMIT_ACCOUNTS,
                ),
            }),
        }
    }

    /// The tonic service, accepting request messages up to `limits.max_request_bytes` and
    /// sending responses up to `limits.max_response_bytes`.
    pub fn into_service(self, limits: &mesh_runtime::ServerConfig) -> UserServiceServer<Self> {
        UserServiceServer::new(self)
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes)
    }

    /// One change by the owner of `id`, within the configured burst and rate: one account
    /// cannot fill the change log, flush every relay's ring or serialise everyone's writes.
    fn write_allowed(&self, id: &str) -> Result<(), UsersError> {
        self.inner
            .writes
            .try_take(mesh_runtime::bounded::key16(&[id.as_bytes()]))
            .map_err(|wait| UsersError::Exhausted {
                message: format!(
                    "too many changes to this profile; retry in {} s",
                    mesh_proto::headers::retry_seconds(wait)
                ),
                retry_after: Some(wait),
            })
    }

    async fn create(&self, request: Request<CreateUserRequest>) -> Result<ProtoUser, UsersError> {
        let claims = claims(&request)?;
        let CreateUserRequest { user, request_id } = request.into_inner();
        let user = user.unwrap_or_default();
        let id = own_target("user.id", &user.id, &claims)?;
        self.write_allowed(&id)?;
        let Some(email) = claims.email.clone().filter(|e| !e.is_empty()) else {
            return Err(UsersError::PermissionDenied(
                "the token carries no email claim",
            ));
        };
        let display_name = parse_display_name(&user.display_name)?;
        let bio = parse_bio(&user.bio)?;
        if request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(UsersError::InvalidArgument(format!(
                "request_id must be at most {MAX_REQUEST_ID_BYTES} bytes"
            )));
        }
        let new = User {
            id,
            email,
            display_name,
            bio,
            create_time: 0,
            update_time: 0,
            version: 0,
        };
        let request_id = Some(request_id.as_str()).filter(|r| !r.is_empty());
        match self.inner.store.create(&new, request_id, now_ms()).await? {
            Created::New(user, _event) => {
                self.inner.feed.wake();
                Ok(to_proto(user, &claims))
            }
            Created::Exists {
                user,
                same_request: true,
            } => Ok(to_proto(user, &claims)),
            Created::Exists { .. } => Err(UsersError::AlreadyExists),
        }
    }

    async fn get(&self, request: Request<GetUserRequest>) -> Result<ProtoUser, UsersError> {
        let claims = claims(&request)?;
        let id = parse_user_id("id", &request.get_ref().id)?;
        match self.inner.store.get(&id).await? {
            Some(user) => Ok(to_proto(user, &claims)),
            None => Err(UsersError::NotFound(format!("no user with id {id}"))),
        }
    }

    async fn batch_get(
        &self,
        request: Request<BatchGetUsersRequest>,
    ) -> Result<BatchGetUsersResponse, UsersError> {
        let claims = claims(&request)?;
        let raw = request.into_inner().ids;
        if raw.len() > MAX_BATCH_IDS {
            return Err(UsersError::InvalidArgument(format!(
                "ids: at most {MAX_BATCH_IDS} per call (got {})",
                raw.len()
            )));
        }
        let mut seen = HashSet::with_capacity(raw.len());
        let mut ids = Vec::with_capacity(raw.len());
        for (i, raw) in raw.iter().enumerate() {
            let id = parse_user_id(&format!("ids[{i}]"), raw)?;
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        let mut found: std::collections::HashMap<String, User> = self
            .inner
            .store
            .batch_get(&ids)
            .await?
            .into_iter()
            .map(|user| (user.id.clone(), user))
            .collect();
        let mut reply = BatchGetUsersResponse::default();
        for id in ids {
            match found.remove(&id) {
                Some(user) => reply.users.push(to_proto(user, &claims)),
                None => reply.not_found_ids.push(id),
            }
        }
        Ok(reply)
    }

    async fn list(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<ListUsersResponse, UsersError> {
        let claims = claims(&request)?;
        let ListUsersRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let page_size = match i64::from(page_size) {
            n if n < 0 => {
                return Err(UsersError::InvalidArgument(format!(
                    "page_size must not be negative (got {n})"
                )));
            }
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(self.inner.page_tokens.resume_after(&page_token)?)
        };
        // One more than the page tells whether another page follows.
        let mut users = self
            .inner
            .store
            .list(after.as_deref(), page_size + 1)
            .await?;
        let more = users.len() as i64 > page_size;
        users.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
        let next_page_token = match users.last() {
            Some(last) if more => self.inner.page_tokens.issue(&last.id),
            _ => String::new(),
        };
        Ok(ListUsersResponse {
            users: users.into_iter().map(|u| to_proto(u, &claims)).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateUserRequest>) -> Result<ProtoUser, UsersError> {
        let claims = claims(&request)?;
        let UpdateUserRequest {
            user,
            update_mask,
            expected_version,
        } = request.into_inner();
        let user = user.unwrap_or_default();
        let id = own_target("user.id", &user.id, &claims)?;
        self.write_allowed(&id)?;
        let paths = update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(UsersError::InvalidArgument(
                "update_mask must name at least one path (display_name, bio)".into(),
            ));
        }
        let mut changes = Changes::default();
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    changes.display_name = Some(parse_display_name(&user.display_name)?);
                }
                "bio" => changes.bio = Some(parse_bio(&user.bio)?),
                "id" | "email" | "version" | "create_time" | "update_time" => {
                    return Err(UsersError::InvalidArgument(format!(
                        "update_mask: `{path}` is immutable (mutable paths: display_name, bio)"
                    )));
                }
                other => {
                    let shown = mesh_proto::rules::shown(other, mesh_proto::rules::SHOWN_CHARS);
                    return Err(UsersError::InvalidArgument(format!(
                        "update_mask: unknown path `{shown}` (mutable paths: display_name, bio)"
                    )));
                }
            }
        }
        if expected_version < 0 {
            return Err(UsersError::InvalidArgument(format!(
                "expected_version must not be negative (got {expected_version})"
            )));
        }
        match self
            .inner
            .store
            .update(&id, &changes, expected_version, now_ms())
            .await?
        {
            Updated::Changed(user, _event) => {
                self.inner.feed.wake();
                Ok(to_proto(user, &claims))
            }
            Updated::Unchanged(user) => Ok(to_proto(user, &claims)),
            Updated::NotFound => Err(UsersError::NotFound(format!("no user with id {id}"))),
            Updated::Conflict(stored) => Err(UsersError::Conflict {
                expected: expected_version,
                stored,
            }),
        }
    }

    async fn delete(&self, request: Request<DeleteUserRequest>) -> Result<(), UsersError> {
        let claims = claims(&request)?;
        let id = own_target("id", &request.get_ref().id, &claims)?;
        self.write_allowed(&id)?;
        match self.inner.store.delete(&id, now_ms()).await? {
            Some(_event) => {
                self.inner.feed.wake();
                Ok(())
            }
            None => Err(UsersError::NotFound(format!("no user with id {id}"))),
        }
    }

    async fn watch(
        &self,
        request: Request<WatchUsersRequest>,
    ) -> Result<Response<UserEventStream>, UsersError> {
        claims(&request)?;
        let place = WatchPlace::take(&self.inner.watches, self.inner.max_watch_streams)
            .ok_or_else(|| UsersError::Exhausted {
                message: format!(
                    "this server serves its maximum of {} WatchUsers streams; retry later",
                    self.inner.max_watch_streams
                ),
                retry_after: None,
            })?;
        let after = request.into_inner().after_sequence;
        if let Some(after) = after {
            if after < 0 {
                return Err(UsersError::InvalidArgument(format!(
                    "after_sequence must not be negative (got {after})"
                )));
            }
            let last = self.inner.store.last_sequence().await?;
            if after > last {
                return Err(UsersError::OutOfRange(format!(
                    "after_sequence {after} is beyond the newest stored sequence {last}: \
                     the position is from another log"
                )));
            }
            let pruned = self.inner.store.pruned_through().await?;
            if after < pruned {
                return Err(UsersError::OutOfRange(crate::feed::pruned_message(
                    after, pruned,
                )));
            }
        }
        let (head, events) = self
            .inner
            .feed
            .subscribe(self.inner.store.clone(), after, self.inner.drain.clone())
            .await?;
        tracing::debug!(
            subscribers = self.inner.feed.subscribers(),
            ?after,
            head,
            "watch started"
        );
        let events: UserEventStream = Box::pin(events.map(move |event| {
            // The stream's place goes with the stream.
            let _place = &place;
            event.map(event_to_proto)
        }));
        let mut response = Response::new(events);
        response.metadata_mut().insert(LOG_HEAD_HEADER, head.into());
        Ok(response)
    }
}

/// A `WatchUsers` stream's place in the count, given back when dropped.
#[derive(Debug)]
struct WatchPlace(Arc<std::sync::atomic::AtomicUsize>);

impl WatchPlace {
    fn take(count: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for WatchPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The stream type of `WatchUsers`.
pub(crate) type UserEventStream =
    Pin<Box<dyn Stream<Item = Result<UserEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl UserService for UsersServer {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<ProtoUser>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<ProtoUser>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    async fn batch_get_users(
        &self,
        request: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        Ok(Response::new(self.batch_get(request).await?))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<ProtoUser>, Status> {
        Ok(Response::new(self.update(request).await?))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        self.delete(request).await?;
        Ok(Response::new(DeleteUserResponse {}))
    }

    type WatchUsersStream = UserEventStream;

    async fn watch_users(
        &self,
        request: Request<WatchUsersRequest>,
    ) -> Result<Response<Self::WatchUsersStream>, Status> {
        Ok(self.watch(request).await?)
    }
}

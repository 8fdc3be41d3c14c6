//! The tonic implementation of `mesh.aggregator.v1.AggregatorService`: check the caller, call
//! auth and users (concurrently where the calls are independent) with the caller's context,
//! and join or stream the results.

use std::{collections::HashSet, pin::Pin, sync::Arc, time::Duration};

use futures_util::{StreamExt as _, stream};
use mesh_authn::Claims;
use mesh_proto::{
    aggregator::v1::{
        DeleteAccountRequest, DeleteAccountResponse, GetMeRequest, GetMeResponse,
        GetProfilesRequest, ItemError, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
        LookupProfilesRequest, Profile, ProfileEvent, ProfileResult, RefreshRequest,
        RefreshResponse, Session, SignUpRequest, SignUpResponse, Tokens, UpdateProfileRequest,
        WatchProfilesRequest,
        aggregator_service_server::{AggregatorService, AggregatorServiceServer},
        profile_result,
    },
    auth::v1 as auth,
    codec::Encoded,
    users::v1 as users,
};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    downstream::{CallContext, Downstreams},
    edge::EdgeLimits,
    error::AggregatorError,
    slots::StreamSlots,
    watch::Fanout,
};

/// The most ids one `GetProfiles` takes.
pub const MAX_PROFILE_IDS: usize = 10_000;
/// Ids per `BatchGetUsers` call made by `GetProfiles`.
pub const PROFILE_BATCH: usize = 100;
/// `BatchGetUsers` calls in flight per `GetProfiles` stream.
pub const PROFILE_BATCHES_IN_FLIGHT: usize = 8;
/// Lookups in flight per `LookupProfiles` stream; the client's further ids wait (in HTTP/2 flow
/// control) until results are read.
pub const LOOKUPS_IN_FLIGHT: usize = 32;
/// Lookups in flight in all `LookupProfiles` streams of the process; beyond it, a stream's next
/// lookup waits for one to finish.
pub const LOOKUPS_IN_FLIGHT_IN_ALL: usize = 256;
/// `LookupProfiles` streams the process serves at once.
pub const MAX_LOOKUP_STREAMS: usize = 1000;
/// `LookupProfiles` streams one caller may hold at once.
pub const MAX_LOOKUP_STREAMS_PER_CALLER: usize = 16;
/// The largest request of each method, where the server-wide 4 MiB is far more than it needs:
/// an e-mail, a password and a display name fit in 4 KiB, a profile in 16 KiB, 10,000 ids of
/// 36 characters (with their framing) in 512 KiB.
pub const REQUEST_LIMITS: &[(&str, usize)] = &[
    ("SignUp", 4 * 1024),
    ("Login", 4 * 1024),
    ("Refresh", 1024),
    ("Logout", 1024),
    ("UpdateProfile", 16 * 1024),
    ("DeleteAccount", 4 * 1024),
    ("GetMe", 1024),
    ("GetProfiles", 512 * 1024),
    ("LookupProfiles", 1024),
    ("WatchProfiles", 1024),
];
/// How long undoing a half-made sign-up may take, whether or not the caller is still there.
const UNDO_TIMEOUT: Duration = Duration::from_secs(10);

/// The aggregator's gRPC handlers.
#[derive(Debug, Clone)]
pub struct AggregatorServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    downstream: Arc<Downstreams>,
    fanout: Arc<Fanout>,
    edge: Arc<EdgeLimits>,
    default_deadline: Duration,
    lookup_streams: Arc<StreamSlots>,
    lookups: Arc<tokio::sync::Semaphore>,
}

fn profile_of(user: users::User, viewer: Option<&str>) -> Profile {
    // Users already shows e-mail to the owner only; the viewer check keeps that true for
    // calls made with another identity (a service token).
    let email = if viewer == Some(user.id.as_str()) {
        user.email
    } else {
        String::new()
    };
    Profile {
        user_id: user.id,
        display_name: user.display_name,
        bio: user.bio,
        email,
        create_time: user.create_time,
        update_time: user.update_time,
        version: user.version,
    }
}

fn tokens_of(pair: auth::TokenPair) -> Tokens {
    Tokens {
        access_token: pair.access_token,
        refresh_token: pair.refresh_token,
        token_type: pair.token_type,
        access_token_expire_time: pair.access_token_expire_time,
        refresh_token_expire_time: pair.refresh_token_expire_time,
    }
}

fn session_of(session: auth::Session) -> Session {
    Session {
        session_id: session.session_id,
        create_time: session.create_time,
        last_use_time: session.last_use_time,
        expire_time: session.expire_time,
        current: session.current,
    }
}

fn claims<T>(request: &Request<T>) -> Result<Claims, AggregatorError> {
    request
        .extensions()
        .get::<Claims>()
        .cloned()
        .ok_or(AggregatorError::Unauthenticated)
}

/// The caller's claims, which must be a user's (the methods about "me").
fn user_claims<T>(request: &Request<T>) -> Result<Claims, AggregatorError> {
    let claims = claims(request)?;
    if claims.is_service() {
        return Err(AggregatorError::PermissionDenied(
            "a service token has no account or profile of its own",
        ));
    }
    Ok(claims)
}

fn item_error(user_id: String, code: Code, message: impl Into<String>) -> ProfileResult {
    ProfileResult {
        user_id,
        result: Some(profile_result::Result::Error(ItemError {
            code: code as i32,
            message: message.into(),
        })),
    }
}

/// `raw` as a result shows a malformed id: its first
/// [`mesh_proto::rules::SHOWN_ID_CHARS`] characters.
fn shown_id(raw: &str) -> String {
    mesh_proto::rules::shown(raw, mesh_proto::rules::SHOWN_ID_CHARS)
}

/// A user id as users accepts it (the contract's rule), lower-cased; `None` if malformed.
fn normalize_id(raw: &str) -> Option<String> {
    mesh_proto::rules::parse_user_id("user_id", raw).ok()
}

/// users' display-name rule, checked before anything is created.
fn check_display_name(raw: &str) -> Result<(), AggregatorError> {
    mesh_proto::rules::parse_display_name(raw)
        .map(drop)
        .map_err(|invalid| AggregatorError::InvalidArgument(invalid.0))
}

/// Runs `work` to its end on its own task, in the call's span (so its downstream calls belong
/// to the caller's trace), whether or not the caller waits for it.
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, AggregatorError>> + Send + 'static,
) -> Result<T, AggregatorError> {
    tokio::spawn(tracing::Instrument::in_current_span(work))
        .await
        .map_err(|_| AggregatorError::Internal("a call's task failed"))?
}

/// A boxed server stream of `T`.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl AggregatorServer {
    pub(crate) fn new(
        downstream: Arc<Downstreams>,
        fanout: Arc<Fanout>,
        edge: Arc<EdgeLimits>,
        default_deadline: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                downstream,
                fanout,
                edge,
                default_deadline,
                lookup_streams: StreamSlots::new(
                    "LookupProfiles",
                    MAX_LOOKUP_STREAMS,
                    MAX_LOOKUP_STREAMS_PER_CALLER,
                ),
                lookups: Arc::new(tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT_IN_ALL)),
            }),
        }
    }

    /// The tonic service, accepting request messages up to `limits.max_request_bytes` and
    /// sending responses up to `limits.max_response_bytes`.
    pub fn into_service(
        self,
        limits: &mesh_runtime::ServerConfig,
    ) -> AggregatorServiceServer<Self> {
        AggregatorServiceServer::new(self)
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes)
    }
}

impl Inner {
    fn context<T>(&self, request: &Request<T>) -> CallContext {
        CallContext::of(request, self.default_deadline)
    }

    /// `Register`, then `CreateUser` with the new token; if the profile cannot be made, the
    /// credentials are removed again. Runs to the end even if the caller goes away, so no
    /// half-made account is left behind.
    async fn sign_up(
        &self,
        request: Request<SignUpRequest>,
    ) -> Result<SignUpResponse, AggregatorError> {
        let working = self.edge.sign_up(peer_ip(&request))?;
        let ctx = self.context(&request);
        let SignUpRequest {
            email,
            password,
            display_name,
        } = request.into_inner();
        check_display_name(&display_name)?;
        let downstream = self.downstream.clone();
        to_completion(async move {
            // Held until the sign-up is done (its Argon2id hash is this address's work).
            let _working = working;
            let registered = downstream
                .register(
                    &ctx,
                    auth::RegisterRequest {
                        email,
                        password: password.clone(),
                    },
                )
                .await?;
            let pair = registered
                .tokens
                .ok_or(AggregatorError::Internal("Register answered no tokens"))?;
            let as_new_user = ctx.with_token(pair.access_token.clone());
            let user = users::User {
                display_name,
                ..users::User::default()
            };
            let created = downstream
                .create_user(
                    &as_new_user,
                    users::CreateUserRequest {
                        user: Some(user),
                        request_id: format!("signup-{}", registered.user_id),
                    },
                )
                .await;
            match created {
                Ok(user) => Ok(SignUpResponse {
                    profile: Some(profile_of(user, Some(&registered.user_id))),
                    tokens: Some(tokens_of(pair)),
                }),
                Err(failure) => {
                    let undo = as_new_user.detached(UNDO_TIMEOUT);
                    if let Err(err) = downstream.delete_credentials(&undo, password).await {
                        tracing::error!(user_id = %registered.user_id, error = %err,
                            "sign-up failed and its credentials could not be removed");
                    }
                    Err(failure)
                }
            }
        })
        .await
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<LoginResponse, AggregatorError> {
        let check = self.edge.check(peer_ip(&request))?;
        let ctx = self.context(&request);
        let LoginRequest { email, password } = request.into_inner();
        // Run to the end even if the caller goes away, so that the check is settled with
        // auth's real answer (auth settles its own count the same way).
        let downstream = self.downstream.clone();
        let login_ctx = ctx.clone();
        let reply = to_completion(async move {
            let answered = downstream
                .login(&login_ctx, auth::LoginRequest { email, password })
                .await;
            check.settle(&answered);
            answered.map_err(AggregatorError::auth)
        })
        .await?;
        let pair = reply
            .tokens
            .ok_or(AggregatorError::Internal("Login answered no tokens"))?;
        // The login has happened: a profile that cannot be read now is left unset rather than
        // failing the call (which would lose the new session's tokens); GetMe reads it again.
        let as_user = ctx.with_token(pair.access_token.clone());
        let profile = match self.downstream.get_user(&as_user, &reply.user_id).await {
            Ok(user) => Some(profile_of(user, Some(&reply.user_id))),
            Err(err) => {
                if !err.is_not_found() {
                    tracing::warn!(error = %err, "profile unavailable at login");
                }
                None
            }
        };
        Ok(LoginResponse {
            profile,
            tokens: Some(tokens_of(pair)),
        })
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<RefreshResponse, AggregatorError> {
        let ctx = self.context(&request);
        let refresh_token = request.into_inner().refresh_token;
        let reply = self
            .downstream
            .refresh(&ctx, auth::RefreshRequest { refresh_token })
            .await?;
        Ok(RefreshResponse {
            tokens: reply.tokens.map(tokens_of),
        })
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<LogoutResponse, AggregatorError> {
        let ctx = self.context(&request);
        let refresh_token = request.into_inner().refresh_token;
        self.downstream.logout(&ctx, refresh_token).await?;
        Ok(LogoutResponse {})
    }

    async fn update_profile(
        &self,
        request: Request<UpdateProfileRequest>,
    ) -> Result<Profile, AggregatorError> {
        let claims = user_claims(&request)?;
        let ctx = self.context(&request);
        let UpdateProfileRequest {
            profile,
            update_mask,
            expected_version,
        } = request.into_inner();
        let profile = profile.unwrap_or_default();
        if !profile.user_id.is_empty()
            && normalize_id(&profile.user_id).as_deref() != Some(claims.sub.as_str())
        {
            return Err(AggregatorError::PermissionDenied(
                "only the owner may update a profile",
            ));
        }
        let user = users::User {
            id: claims.sub.clone(),
            display_name: profile.display_name,
            bio: profile.bio,
            ..users::User::default()
        };
        let updated = self
            .downstream
            .update_user(
                &ctx,
                users::UpdateUserRequest {
                    user: Some(user),
                    update_mask,
                    expected_version,
                },
            )
            .await?;
        Ok(profile_of(updated, Some(&claims.sub)))
    }

    /// Checks the password (a login that removes nothing), removes the profile, then the
    /// credentials. A retry after a partial failure finds the profile gone and finishes.
    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<DeleteAccountResponse, AggregatorError> {
        let claims = user_claims(&request)?;
        let check = self.edge.check(peer_ip(&request))?;
        let ctx = self.context(&request);
        let password = request.into_inner().password;
        let email = claims.email.clone().unwrap_or_default();
        let downstream = self.downstream.clone();
        // Once begun, the steps run to the end even if the caller goes away.
        to_completion(async move {
            let checked = downstream
                .login(
                    &ctx,
                    auth::LoginRequest {
                        email,
                        password: password.clone(),
                    },
                )
                .await;
            check.settle(&checked);
            let checked = checked.map_err(AggregatorError::auth)?;
            // The check made a session of its own: end it at once (best effort), so checks do
            // not pile up sessions (or push the account's oldest out).
            if let Some(tokens) = checked.tokens
                && let Err(err) = downstream.logout(&ctx, tokens.refresh_token).await
            {
                tracing::debug!(error = %err, "the password check's session stays");
            }
            match downstream.delete_user(&ctx, claims.sub.clone()).await {
                Err(err) if !err.is_not_found() => return Err(err),
                _ => {}
            }
            downstream.delete_credentials(&ctx, password).await?;
            Ok(DeleteAccountResponse {})
        })
        .await
    }

    /// The profile (users) and the sessions (auth), fetched concurrently.
    async fn get_me(
        &self,
        request: Request<GetMeRequest>,
    ) -> Result<GetMeResponse, AggregatorError> {
        let claims = user_claims(&request)?;
        let ctx = self.context(&request);
        let (profile, sessions) = tokio::join!(
            self.downstream.get_user(&ctx, &claims.sub),
            self.downstream.list_sessions(&ctx),
        );
        let profile = match profile {
            Ok(user) => Some(profile_of(user, Some(&claims.sub))),
            Err(err) if err.is_not_found() => None,
            Err(err) => return Err(err),
        };
        Ok(GetMeResponse {
            profile,
            sessions: sessions?.sessions.into_iter().map(session_of).collect(),
            token_expire_time: Some(prost_types::Timestamp {
                seconds: claims.exp,
                nanos: 0,
            }),
        })
    }

    /// Looks `ids` up in batches, at most [`PROFILE_BATCHES_IN_FLIGHT`] at once, yielding each
    /// result as soon as its batch answers. Dropping the stream drops the calls in flight.
    fn get_profiles(
        &self,
        request: Request<GetProfilesRequest>,
    ) -> Result<BoxStream<ProfileResult>, AggregatorError> {
        let claims = claims(&request)?;
        let ctx = self.context(&request);
        let raw = request.into_inner().user_ids;
        if raw.len() > MAX_PROFILE_IDS {
            return Err(AggregatorError::InvalidArgument(format!(
                "user_ids: at most {MAX_PROFILE_IDS} per call (got {})",
                raw.len()
            )));
        }
        let downstream = self.downstream.clone();
        let viewer = claims.sub;
        // Lazily: ids are taken from the request as results are read, so a client that reads
        // nothing makes the server hold its request and a few batches, not every result.
        let results = stream::iter(Batches::new(raw))
            .map(move |work| {
                let (downstream, ctx, viewer) = (downstream.clone(), ctx.clone(), viewer.clone());
                async move {
                    match work {
                        Work::Malformed(id) => {
                            vec![item_error(
                                id,
                                Code::InvalidArgument,
                                "user_id is not a UUID",
                            )]
                        }
                        Work::Batch(ids) => batch_results(&downstream, &ctx, ids, &viewer).await,
                    }
                }
            })
            .buffer_unordered(PROFILE_BATCHES_IN_FLIGHT)
            .flat_map(|results| stream::iter(results.into_iter().map(Ok)));
        Ok(Box::pin(results))
    }

    /// Each id the client sends is looked up concurrently with the others (at most
    /// [`LOOKUPS_IN_FLIGHT`] per stream) and answered when ready.
    fn lookup_profiles(
        &self,
        request: Request<Streaming<LookupProfilesRequest>>,
    ) -> Result<BoxStream<ProfileResult>, AggregatorError> {
        let claims = claims(&request)?;
        let slot = self
            .lookup_streams
            .take(mesh_runtime::bounded::key16(&[claims.sub.as_bytes()]))?;
        let ctx = self.context(&request);
        // The caller's deadline bounds the whole stream; without one, each lookup gets the
        // default deadline of its own (the stream may stay open far longer).
        let own_deadline = request
            .metadata()
            .get(mesh_proto::headers::GRPC_TIMEOUT)
            .is_none();
        let default_deadline = self.default_deadline;
        let downstream = self.downstream.clone();
        let lookups = self.lookups.clone();
        let viewer = claims.sub;
        let input = request.into_inner();
        let results = input
            .map(move |item| {
                // The stream's place goes with the stream (this closure lives as long).
                let _place = &slot;
                let (downstream, ctx, viewer, lookups) = (
                    downstream.clone(),
                    ctx.clone(),
                    viewer.clone(),
                    lookups.clone(),
                );
                async move {
                    let raw = item?.user_id;
                    let Some(id) = normalize_id(&raw) else {
                        return Ok(item_error(
                            shown_id(&raw),
                            Code::InvalidArgument,
                            "user_id is not a UUID",
                        ));
                    };
                    let _lookup = lookups.acquire_owned().await.map_err(|_| {
                        Status::from(AggregatorError::Unavailable(
                            "the server is shutting down".into(),
                        ))
                    })?;
                    let ctx = if own_deadline {
                        ctx.detached(default_deadline)
                    } else {
                        ctx
                    };
                    let mut results =
                        batch_results(&downstream, &ctx, vec![id.clone()], &viewer).await;
                    Ok(results
                        .pop()
                        .unwrap_or_else(|| item_error(id, Code::Internal, "internal error")))
                }
            })
            .buffer_unordered(LOOKUPS_IN_FLIGHT);
        Ok(Box::pin(results))
    }

    async fn watch_profiles(
        &self,
        request: Request<WatchProfilesRequest>,
    ) -> Result<BoxStream<Encoded<ProfileEvent>>, AggregatorError> {
        let caller = claims(&request)?;
        let connection = mesh_runtime::peer_addr(request.extensions());
        let after = request.into_inner().after_sequence;
        let events = self
            .fanout
            .subscribe(
                mesh_runtime::bounded::key16(&[caller.sub.as_bytes()]),
                connection,
                after,
            )
            .await?;
        tracing::debug!(
            subscribers = self.fanout.subscribers(),
            ?after,
            "watch started"
        );
        Ok(events)
    }
}

/// The client address of `request`, for the per-address limits.
fn peer_ip<T>(request: &Request<T>) -> Option<std::net::IpAddr> {
    mesh_runtime::peer_addr(request.extensions()).map(|a| a.ip())
}

/// What one step of a `GetProfiles` does.
enum Work {
    /// Answer a malformed id (as shown) with INVALID_ARGUMENT.
    Malformed(String),
    /// Look up these distinct, normalised ids in one `BatchGetUsers`.
    Batch(Vec<String>),
}

/// The steps of a `GetProfiles`, made from its ids as they are needed: duplicates collapsed,
/// valid ids in batches of [`PROFILE_BATCH`].
struct Batches {
    raw: std::vec::IntoIter<String>,
    seen: HashSet<String>,
    batch: Vec<String>,
}

impl Batches {
    fn new(raw: Vec<String>) -> Self {
        Self {
            seen: HashSet::with_capacity(raw.len()),
            raw: raw.into_iter(),
            batch: Vec::with_capacity(PROFILE_BATCH),
        }
    }
}

impl Iterator for Batches {
    type Item = Work;

    fn next(&mut self) -> Option<Work> {
        for id in self.raw.by_ref() {
            match normalize_id(&id) {
                Some(normal) => {
                    if self.seen.insert(normal.clone()) {
                        self.batch.push(normal);
                        if self.batch.len() == PROFILE_BATCH {
                            return Some(Work::Batch(std::mem::take(&mut self.batch)));
                        }
                    }
                }
                None => {
                    let shown = shown_id(&id);
                    if self.seen.insert(id) {
                        return Some(Work::Malformed(shown));
                    }
                }
            }
        }
        (!self.batch.is_empty()).then(|| Work::Batch(std::mem::take(&mut self.batch)))
    }
}

/// One `BatchGetUsers` call's results, one per id: the profile, NOT_FOUND, or the call's
/// failure (as the caller would see it) as each item's error.
async fn batch_results(
    downstream: &Downstreams,
    ctx: &CallContext,
    ids: Vec<String>,
    viewer: &str,
) -> Vec<ProfileResult> {
    match downstream.batch_get_users(ctx, ids.clone()).await {
        Ok(reply) => {
            let mut results: Vec<ProfileResult> = reply
                .users
                .into_iter()
                .map(|user| ProfileResult {
                    user_id: user.id.clone(),
                    result: Some(profile_result::Result::Profile(profile_of(
                        user,
                        Some(viewer),
                    ))),
                })
                .collect();
            results.extend(
                reply
                    .not_found_ids
                    .into_iter()
                    .map(|id| item_error(id, Code::NotFound, "no such user")),
            );
            results
        }
        Err(err) => {
            let status = Status::from(err);
            ids.into_iter()
                .map(|id| item_error(id, status.code(), status.message()))
                .collect()
        }
    }
}

/// Each method: the handler of the same name on `Inner`, its error mapped by
/// [`From<AggregatorError> for Status`].
#[tonic::async_trait]
impl AggregatorService for AggregatorServer {
    async fn sign_up(
        &self,
        request: Request<SignUpRequest>,
    ) -> Result<Response<SignUpResponse>, Status> {
        Ok(Response::new(self.inner.sign_up(request).await?))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        Ok(Response::new(self.inner.login(request).await?))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        Ok(Response::new(self.inner.refresh(request).await?))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        Ok(Response::new(self.inner.logout(request).await?))
    }

    async fn update_profile(
        &self,
        request: Request<UpdateProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        Ok(Response::new(self.inner.update_profile(request).await?))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        Ok(Response::new(self.inner.delete_account(request).await?))
    }

    async fn get_me(
        &self,
        request: Request<GetMeRequest>,
    ) -> Result<Response<GetMeResponse>, Status> {
        Ok(Response::new(self.inner.get_me(request).await?))
    }

    type GetProfilesStream = BoxStream<ProfileResult>;

    async fn get_profiles(
        &self,
        request: Request<GetProfilesRequest>,
    ) -> Result<Response<Self::GetProfilesStream>, Status> {
        Ok(Response::new(self.inner.get_profiles(request)?))
    }

    type LookupProfilesStream = BoxStream<ProfileResult>;

    async fn lookup_profiles(
        &self,
        request: Request<Streaming<LookupProfilesRequest>>,
    ) -> Result<Response<Self::LookupProfilesStream>, Status> {
        Ok(Response::new(self.inner.lookup_profiles(request)?))
    }

    /// Events encoded once by the relay, shared by every subscriber it serves them to.
    type WatchProfilesStream = BoxStream<Encoded<ProfileEvent>>;

    async fn watch_profiles(
        &self,
        request: Request<WatchProfilesRequest>,
    ) -> Result<Response<Self::WatchProfilesStream>, Status> {
        Ok(Response::new(self.inner.watch_profiles(request).await?))
    }
}

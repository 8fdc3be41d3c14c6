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
    users::v1 as users,
};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    downstream::{CallContext, Downstreams, relay},
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
    default_deadline: Duration,
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

fn claims<T>(request: &Request<T>) -> Result<Claims, Status> {
    request
        .extensions()
        .get::<Claims>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing or invalid access token"))
}

/// The caller's claims, which must be a user's (the methods about "me").
fn user_claims<T>(request: &Request<T>) -> Result<Claims, Status> {
    let claims = claims(request)?;
    if claims.is_service() {
        return Err(Status::permission_denied(
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

/// A user id as users accepts it (a UUID, either case), lower-cased; `None` if malformed.
fn normalize_id(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    let valid = trimmed.len() == 36
        && trimmed.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    valid.then(|| trimmed.to_ascii_lowercase())
}

/// The display name rule of users (1–64 characters after trimming), checked before anything
/// is created.
fn check_display_name(raw: &str) -> Result<(), Status> {
    let chars = raw.trim().chars().count();
    if chars == 0 || chars > 64 {
        return Err(Status::invalid_argument(
            "display_name must be 1 to 64 characters after trimming",
        ));
    }
    Ok(())
}

/// A boxed server stream of `T`.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl AggregatorServer {
    pub(crate) fn new(
        downstream: Arc<Downstreams>,
        fanout: Arc<Fanout>,
        default_deadline: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                downstream,
                fanout,
                default_deadline,
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

    fn context<T>(&self, request: &Request<T>) -> CallContext {
        CallContext::of(request, self.inner.default_deadline)
    }

    /// `Register`, then `CreateUser` with the new token; if the profile cannot be made, the
    /// credentials are removed again. Runs to the end even if the caller goes away, so no
    /// half-made account is left behind.
    async fn sign_up(&self, request: Request<SignUpRequest>) -> Result<SignUpResponse, Status> {
        let ctx = self.context(&request);
        let SignUpRequest {
            email,
            password,
            display_name,
        } = request.into_inner();
        check_display_name(&display_name)?;
        let downstream = self.inner.downstream.clone();
        let work = async move {
            let registered = downstream
                .auth()
                .register(ctx.request(auth::RegisterRequest {
                    email,
                    password: password.clone(),
                })?)
                .await
                .map_err(|s| relay("auth", s))?
                .into_inner();
            let pair = registered
                .tokens
                .ok_or_else(|| Status::internal("internal error"))?;
            let as_new_user = ctx.with_token(pair.access_token.clone());
            let created = match as_new_user.request(users::CreateUserRequest {
                user: Some(users::User {
                    display_name,
                    ..users::User::default()
                }),
                request_id: format!("signup-{}", registered.user_id),
            }) {
                Ok(request) => downstream.users().create_user(request).await,
                Err(status) => Err(status),
            };
            match created {
                Ok(user) => Ok(SignUpResponse {
                    profile: Some(profile_of(user.into_inner(), Some(&registered.user_id))),
                    tokens: Some(tokens_of(pair)),
                }),
                Err(failure) => {
                    let undo = as_new_user.detached(UNDO_TIMEOUT);
                    let undone = match undo.request(auth::DeleteAccountRequest { password }) {
                        Ok(request) => downstream.auth().delete_account(request).await.map(drop),
                        Err(status) => Err(status),
                    };
                    if let Err(err) = undone {
                        tracing::error!(user_id = %registered.user_id, error = %err,
                            "sign-up failed and its credentials could not be removed");
                    }
                    Err(relay("users", failure))
                }
            }
        };
        // In the call's span, so its downstream calls belong to the caller's trace.
        tokio::spawn(tracing::Instrument::in_current_span(work))
            .await
            .map_err(|_| Status::internal("internal error"))?
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<LoginResponse, Status> {
        let ctx = self.context(&request);
        let LoginRequest { email, password } = request.into_inner();
        let reply = self
            .inner
            .downstream
            .auth()
            .login(ctx.request(auth::LoginRequest { email, password })?)
            .await
            .map_err(|s| relay("auth", s))?
            .into_inner();
        let pair = reply
            .tokens
            .ok_or_else(|| Status::internal("internal error"))?;
        let as_user = ctx.with_token(pair.access_token.clone());
        // The login has happened: a profile that cannot be read now is left unset rather than
        // failing the call (which would lose the new session's tokens); GetMe reads it again.
        let downstream = &self.inner.downstream;
        let profile = match as_user
            .read(
                downstream.budget(),
                users::GetUserRequest {
                    id: reply.user_id.clone(),
                },
                |request| {
                    let mut client = downstream.users();
                    async move { client.get_user(request).await }
                },
            )
            .await
        {
            Ok(user) => Some(profile_of(user, Some(&reply.user_id))),
            Err(status) => {
                if status.code() != Code::NotFound {
                    tracing::warn!(error = %status, "profile unavailable at login");
                }
                None
            }
        };
        Ok(LoginResponse {
            profile,
            tokens: Some(tokens_of(pair)),
        })
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<RefreshResponse, Status> {
        let ctx = self.context(&request);
        let reply = self
            .inner
            .downstream
            .auth()
            .refresh(ctx.request(auth::RefreshRequest {
                refresh_token: request.into_inner().refresh_token,
            })?)
            .await
            .map_err(|s| relay("auth", s))?
            .into_inner();
        Ok(RefreshResponse {
            tokens: reply.tokens.map(tokens_of),
        })
    }

    async fn logout(&self, request: Request<LogoutRequest>) -> Result<LogoutResponse, Status> {
        let ctx = self.context(&request);
        self.inner
            .downstream
            .auth()
            .logout(ctx.request(auth::LogoutRequest {
                refresh_token: request.into_inner().refresh_token,
            })?)
            .await
            .map_err(|s| relay("auth", s))?;
        Ok(LogoutResponse {})
    }

    async fn update_profile(
        &self,
        request: Request<UpdateProfileRequest>,
    ) -> Result<Profile, Status> {
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
            return Err(Status::permission_denied(
                "only the owner may update a profile",
            ));
        }
        let user = self
            .inner
            .downstream
            .users()
            .update_user(ctx.request(users::UpdateUserRequest {
                user: Some(users::User {
                    id: claims.sub.clone(),
                    display_name: profile.display_name,
                    bio: profile.bio,
                    ..users::User::default()
                }),
                update_mask,
                expected_version,
            })?)
            .await
            .map_err(|s| relay("users", s))?
            .into_inner();
        Ok(profile_of(user, Some(&claims.sub)))
    }

    /// Checks the password (a login that removes nothing), removes the profile, then the
    /// credentials. A retry after a partial failure finds the profile gone and finishes.
    async fn delete_account(&self, request: Request<DeleteAccountRequest>) -> Result<(), Status> {
        let claims = user_claims(&request)?;
        let ctx = self.context(&request);
        let password = request.into_inner().password;
        let email = claims.email.clone().unwrap_or_default();
        let downstream = self.inner.downstream.clone();
        let work = async move {
            downstream
                .auth()
                .login(ctx.request(auth::LoginRequest {
                    email,
                    password: password.clone(),
                })?)
                .await
                .map_err(|s| relay("auth", s))?;
            match downstream
                .users()
                .delete_user(ctx.request(users::DeleteUserRequest {
                    id: claims.sub.clone(),
                })?)
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(relay("users", status)),
            }
            downstream
                .auth()
                .delete_account(ctx.request(auth::DeleteAccountRequest { password })?)
                .await
                .map_err(|s| relay("auth", s))?;
            Ok(())
        };
        // Once begun, the steps run to the end even if the caller goes away.
        // In the call's span, so its downstream calls belong to the caller's trace.
        tokio::spawn(tracing::Instrument::in_current_span(work))
            .await
            .map_err(|_| Status::internal("internal error"))?
    }

    /// The profile (users) and the sessions (auth), fetched concurrently.
    async fn get_me(&self, request: Request<GetMeRequest>) -> Result<GetMeResponse, Status> {
        let claims = user_claims(&request)?;
        let ctx = self.context(&request);
        let downstream = &self.inner.downstream;
        ctx.remaining()?;
        let (profile, sessions) = tokio::join!(
            ctx.read(
                downstream.budget(),
                users::GetUserRequest {
                    id: claims.sub.clone(),
                },
                |request| {
                    let mut client = downstream.users();
                    async move { client.get_user(request).await }
                },
            ),
            ctx.read(
                downstream.budget(),
                auth::ListSessionsRequest {},
                |request| {
                    let mut client = downstream.auth();
                    async move { client.list_sessions(request).await }
                },
            ),
        );
        let profile = match profile {
            Ok(user) => Some(profile_of(user, Some(&claims.sub))),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(relay("users", status)),
        };
        let sessions = sessions.map_err(|s| relay("auth", s))?.sessions;
        Ok(GetMeResponse {
            profile,
            sessions: sessions.into_iter().map(session_of).collect(),
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
    ) -> Result<BoxStream<ProfileResult>, Status> {
        let claims = claims(&request)?;
        let ctx = self.context(&request);
        let raw = request.into_inner().user_ids;
        if raw.len() > MAX_PROFILE_IDS {
            return Err(Status::invalid_argument(format!(
                "user_ids: at most {MAX_PROFILE_IDS} per call (got {})",
                raw.len()
            )));
        }
        let mut seen = HashSet::with_capacity(raw.len());
        let mut malformed = Vec::new();
        let mut valid = Vec::new();
        for id in raw {
            match normalize_id(&id) {
                Some(normal) => {
                    if seen.insert(normal.clone()) {
                        valid.push(normal);
                    }
                }
                None => {
                    if seen.insert(id.clone()) {
                        malformed.push(item_error(
                            id,
                            Code::InvalidArgument,
                            "user_id is not a UUID",
                        ));
                    }
                }
            }
        }
        let downstream = self.inner.downstream.clone();
        let viewer = claims.sub;
        let batches: Vec<Vec<String>> = valid
            .chunks(PROFILE_BATCH)
            .map(<[String]>::to_vec)
            .collect();
        let looked_up = stream::iter(batches)
            .map(move |ids| {
                let (downstream, ctx, viewer) = (downstream.clone(), ctx.clone(), viewer.clone());
                async move { batch_results(&downstream, &ctx, ids, &viewer).await }
            })
            .buffer_unordered(PROFILE_BATCHES_IN_FLIGHT)
            .flat_map(|results| stream::iter(results.into_iter().map(Ok)));
        Ok(Box::pin(
            stream::iter(malformed.into_iter().map(Ok)).chain(looked_up),
        ))
    }

    /// Each id the client sends is looked up concurrently with the others (at most
    /// [`LOOKUPS_IN_FLIGHT`] per stream) and answered when ready.
    fn lookup_profiles(
        &self,
        request: Request<Streaming<LookupProfilesRequest>>,
    ) -> Result<BoxStream<ProfileResult>, Status> {
        let claims = claims(&request)?;
        let ctx = self.context(&request);
        let downstream = self.inner.downstream.clone();
        let viewer = claims.sub;
        let input = request.into_inner();
        let results = input
            .map(move |item| {
                let (downstream, ctx, viewer) = (downstream.clone(), ctx.clone(), viewer.clone());
                async move {
                    let raw = item?.user_id;
                    let Some(id) = normalize_id(&raw) else {
                        return Ok(item_error(
                            raw,
                            Code::InvalidArgument,
                            "user_id is not a UUID",
                        ));
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
}

/// One `BatchGetUsers` call's results, one per id: the profile, NOT_FOUND, or the call's
/// failure as each item's error.
async fn batch_results(
    downstream: &Downstreams,
    ctx: &CallContext,
    ids: Vec<String>,
    viewer: &str,
) -> Vec<ProfileResult> {
    let reply = ctx
        .read(
            downstream.budget(),
            users::BatchGetUsersRequest { ids: ids.clone() },
            |request| {
                let mut client = downstream.users();
                async move { client.batch_get_users(request).await }
            },
        )
        .await
        .map_err(|s| relay("users", s));
    match reply {
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
        Err(status) => ids
            .into_iter()
            .map(|id| item_error(id, status.code(), status.message()))
            .collect(),
    }
}

#[tonic::async_trait]
impl AggregatorService for AggregatorServer {
    async fn sign_up(
        &self,
        request: Request<SignUpRequest>,
    ) -> Result<Response<SignUpResponse>, Status> {
        Ok(Response::new(
            AggregatorServer::sign_up(self, request).await?,
        ))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        Ok(Response::new(AggregatorServer::login(self, request).await?))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        Ok(Response::new(
            AggregatorServer::refresh(self, request).await?,
        ))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        Ok(Response::new(
            AggregatorServer::logout(self, request).await?,
        ))
    }

    async fn update_profile(
        &self,
        request: Request<UpdateProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        Ok(Response::new(
            AggregatorServer::update_profile(self, request).await?,
        ))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        AggregatorServer::delete_account(self, request).await?;
        Ok(Response::new(DeleteAccountResponse {}))
    }

    async fn get_me(
        &self,
        request: Request<GetMeRequest>,
    ) -> Result<Response<GetMeResponse>, Status> {
        Ok(Response::new(
            AggregatorServer::get_me(self, request).await?,
        ))
    }

    type GetProfilesStream = BoxStream<ProfileResult>;

    async fn get_profiles(
        &self,
        request: Request<GetProfilesRequest>,
    ) -> Result<Response<Self::GetProfilesStream>, Status> {
        Ok(Response::new(AggregatorServer::get_profiles(
            self, request,
        )?))
    }

    type LookupProfilesStream = BoxStream<ProfileResult>;

    async fn lookup_profiles(
        &self,
        request: Request<Streaming<LookupProfilesRequest>>,
    ) -> Result<Response<Self::LookupProfilesStream>, Status> {
        Ok(Response::new(AggregatorServer::lookup_profiles(
            self, request,
        )?))
    }

    type WatchProfilesStream = BoxStream<ProfileEvent>;

    async fn watch_profiles(
        &self,
        request: Request<WatchProfilesRequest>,
    ) -> Result<Response<Self::WatchProfilesStream>, Status> {
        claims(&request)?;
        let after = request.into_inner().after_sequence;
        let events = self.inner.fanout.subscribe(after).await?;
        tracing::debug!(
            subscribers = self.inner.fanout.subscribers(),
            ?after,
            "watch started"
        );
        Ok(Response::new(events))
    }
}

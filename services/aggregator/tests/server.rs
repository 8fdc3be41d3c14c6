//! The aggregator in-process, through the generated client: against real auth and users (on
//! SQLite) for the happy paths, and against test doubles of auth or users where a test needs a
//! barrier, a delay or a failure.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_authn::{AuthnConfig, Claims, bearer_request as bearer};
use mesh_proto::{
    aggregator::v1::{
        DeleteAccountRequest, GetMeRequest, GetProfilesRequest, LoginRequest, LogoutRequest,
        LookupProfilesRequest, Profile, ProfileEvent, ProfileEventKind, ProfileResult,
        RefreshRequest, SignUpRequest, UpdateProfileRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient, profile_result,
    },
    auth::v1::{self as auth, auth_service_client::AuthServiceClient, auth_service_server},
    users::v1::{self as users, user_service_client::UserServiceClient, user_service_server},
};
use mesh_runtime::{
    Lifecycle, ServerConfig, ServiceSpec,
    testing::{TestServer, assert_standard_server, connect, health_status},
};
use mesh_token::KeyRing;
use tokio::sync::{Barrier, mpsc};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Code, Request, Response, Status, Streaming, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

const CLIENT_SECRET: &str = "aggregator-test-secret";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

/// A signing key shared by the test and auth (or the auth double).
fn dev_key(data: &std::path::Path) -> KeyRing {
    KeyRing::load_or_create_dev_key(&data.join("auth").join("dev-signing-key.pem"))
        .expect("signing key")
        .0
}

fn mint(ring: &KeyRing, sub: &str, email: Option<&str>) -> String {
    let now = unix_now();
    ring.sign(&Claims {
        iss: "mesh-auth".into(),
        aud: vec!["mesh".into()],
        sub: sub.into(),
        email: email.map(Into::into),
        sid: email.map(|_| uuid::Uuid::now_v7().to_string()),
        iat: now,
        nbf: now,
        exp: now + 900,
        jti: uuid::Uuid::now_v7().to_string(),
    })
}

async fn start_auth(data: &std::path::Path) -> TestServer {
    let mut config = mesh_auth::Config::new(([127, 0, 0, 1], 0).into(), data.into());
    config.service_clients = vec![
        format!("aggregator=plain:{CLIENT_SECRET}")
            .parse()
            .expect("client"),
    ];
    TestServer::start(move |listener, shutdown| async move {
        mesh_auth::serve(&config, listener, shutdown).await
    })
    .await
}

fn users_config(data: &std::path::Path, auth: std::net::SocketAddr) -> mesh_users::Config {
    let authn = AuthnConfig::new(format!("http://{auth}").parse().expect("url"));
    mesh_users::Config::new(([127, 0, 0, 1], 0).into(), data.into(), authn)
}

async fn start_users_on(
    addr: std::net::SocketAddr,
    data: &std::path::Path,
    auth: std::net::SocketAddr,
) -> TestServer {
    let config = users_config(data, auth);
    TestServer::start_on(addr, move |listener, shutdown| async move {
        mesh_users::serve(&config, listener, shutdown).await
    })
    .await
}

async fn start_aggregator(auth: std::net::SocketAddr, users: std::net::SocketAddr) -> TestServer {
    start_aggregator_with(auth, users, |_| {}).await
}

async fn start_aggregator_with(
    auth: std::net::SocketAddr,
    users: std::net::SocketAddr,
    tweak: impl FnOnce(&mut mesh_aggregator::Config),
) -> TestServer {
    let authn = AuthnConfig::new(format!("http://{auth}").parse().expect("url"));
    let mut config = mesh_aggregator::Config::new(
        ([127, 0, 0, 1], 0).into(),
        authn,
        format!("http://{users}").parse().expect("url"),
    );
    config.client_secret = Some(CLIENT_SECRET.into());
    config.dependency_check_interval = Duration::from_millis(100);
    config.watch_buffer = 16;
    tweak(&mut config);
    let server = TestServer::start(move |listener, shutdown| async move {
        mesh_aggregator::serve(&config, listener, shutdown).await
    })
    .await;
    wait_for_health(&server, ServingStatus::Serving).await;
    server
}

async fn wait_for_health(server: &TestServer, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health_status(&server.channel, mesh_aggregator::SERVICE_NAME).await;
        if status.as_ref().ok() == Some(&(want as i32)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "aggregator health stayed {status:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Real auth, users and the aggregator, sharing a data folder and a signing key.
struct Mesh {
    ring: KeyRing,
    data: tempfile::TempDir,
    auth: TestServer,
    users: TestServer,
    aggregator: TestServer,
}

impl Mesh {
    async fn start() -> Self {
        let data = tempfile::tempdir().expect("data");
        let ring = dev_key(data.path());
        let auth = start_auth(data.path()).await;
        let users = start_users_on(([127, 0, 0, 1], 0).into(), data.path(), auth.addr).await;
        let aggregator = start_aggregator(auth.addr, users.addr).await;
        Self {
            ring,
            data,
            auth,
            users,
            aggregator,
        }
    }

    fn client(&self) -> AggregatorServiceClient<Channel> {
        AggregatorServiceClient::new(self.aggregator.channel.clone())
    }

    async fn sign_up(&self, email: &str, name: &str) -> (Profile, String, String) {
        let reply = self
            .client()
            .sign_up(SignUpRequest {
                email: email.into(),
                password: "correct horse battery".into(),
                display_name: name.into(),
            })
            .await
            .expect("sign up")
            .into_inner();
        let tokens = reply.tokens.expect("tokens");
        (
            reply.profile.expect("profile"),
            tokens.access_token,
            tokens.refresh_token,
        )
    }

    /// A profile made directly on users for a minted user (no Argon2id), and its token.
    async fn profile(&self, name: &str) -> (String, String) {
        let id = uuid::Uuid::now_v7().to_string();
        let token = mint(&self.ring, &id, Some(&format!("{id}@example.com")));
        UserServiceClient::new(self.users.channel.clone())
            .create_user(bearer(
                &token,
                users::CreateUserRequest {
                    user: Some(users::User {
                        display_name: name.into(),
                        ..users::User::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("create");
        (id, token)
    }

    fn service_token(&self) -> String {
        mint(&self.ring, "service:test", None)
    }

    async fn stop(self) {
        self.aggregator.shutdown().await.expect("aggregator stops");
        self.users.shutdown().await.expect("users stops");
        self.auth.shutdown().await.expect("auth stops");
    }
}

/// Health and reflection as on every server; NOT_SERVING while users is down, SERVING again
/// once it is back, with no restart.
#[tokio::test]
async fn health_follows_the_dependencies() {
    let mesh = Mesh::start().await;
    assert_standard_server(&mesh.aggregator.channel, mesh_aggregator::SERVICE_NAME).await;
    let Mesh {
        ring,
        data,
        auth,
        users,
        aggregator,
    } = mesh;
    let users_addr = users.addr;
    users.shutdown().await.expect("users stops");
    wait_for_health(&aggregator, ServingStatus::NotServing).await;
    assert_eq!(
        health_status(&aggregator.channel, "liveness").await.ok(),
        Some(ServingStatus::Serving as i32),
        "not ready is not dead"
    );
    let users = start_users_on(users_addr, data.path(), auth.addr).await;
    let mesh = Mesh {
        ring,
        data,
        auth,
        users,
        aggregator,
    };
    wait_for_health(&mesh.aggregator, ServingStatus::Serving).await;
    mesh.stop().await;
}

/// The whole life of an account through the facade: sign up, GetMe, update, login, refresh,
/// logout, a delete with the wrong password (nothing removed), the delete, and signing up
/// again with the same e-mail.
#[tokio::test]
async fn an_account_from_sign_up_to_deletion() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client();
    let (profile, access, refresh) = mesh.sign_up(" Ada@Example.com ", " Ada ").await;
    assert_eq!(
        (
            profile.display_name.as_str(),
            profile.email.as_str(),
            profile.version
        ),
        ("Ada", "ada@example.com", 1)
    );

    let me = client
        .get_me(bearer(&access, GetMeRequest {}))
        .await
        .expect("get me")
        .into_inner();
    assert_eq!(
        me.profile.as_ref().map(|p| &p.user_id),
        Some(&profile.user_id)
    );
    assert_eq!(me.sessions.len(), 1);
    assert!(me.sessions[0].current);
    assert!(me.token_expire_time.expect("expiry").seconds > unix_now());

    let updated = client
        .update_profile(bearer(
            &access,
            UpdateProfileRequest {
                profile: Some(Profile {
                    bio: "Analyst".into(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 1,
            },
        ))
        .await
        .expect("update")
        .into_inner();
    assert_eq!((updated.bio.as_str(), updated.version), ("Analyst", 2));
    let stale = client
        .update_profile(bearer(
            &access,
            UpdateProfileRequest {
                profile: Some(Profile {
                    bio: "x".into(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 1,
            },
        ))
        .await;
    assert_code(stale, Code::Aborted);
    let other = client
        .update_profile(bearer(
            &access,
            UpdateProfileRequest {
                profile: Some(Profile {
                    user_id: uuid::Uuid::now_v7().to_string(),
                    bio: "x".into(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 0,
            },
        ))
        .await;
    assert_code(other, Code::PermissionDenied);

    let login = client
        .login(LoginRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await
        .expect("login")
        .into_inner();
    assert_eq!(login.profile.expect("profile").bio, "Analyst");
    // The sign-up's session ends below (refresh-token reuse revokes it); go on with the
    // login's.
    let access = login.tokens.expect("tokens").access_token;
    let wrong = client
        .login(LoginRequest {
            email: "ada@example.com".into(),
            password: "wrong password!".into(),
        })
        .await;
    assert_code(wrong, Code::Unauthenticated);

    let refreshed = client
        .refresh(RefreshRequest {
            refresh_token: refresh.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    assert_eq!(refreshed.token_type, "Bearer");
    assert_code(
        client
            .refresh(RefreshRequest {
                refresh_token: refresh,
            })
            .await,
        Code::Unauthenticated,
    );
    client
        .logout(LogoutRequest {
            refresh_token: refreshed.refresh_token,
        })
        .await
        .expect("logout");

    let bad = client
        .delete_account(bearer(
            &access,
            DeleteAccountRequest {
                password: "not the password".into(),
            },
        ))
        .await;
    assert_code(bad, Code::Unauthenticated);
    let still = client
        .get_me(bearer(&access, GetMeRequest {}))
        .await
        .expect("nothing was removed")
        .into_inner();
    assert!(still.profile.is_some());

    client
        .delete_account(bearer(
            &access,
            DeleteAccountRequest {
                password: "correct horse battery".into(),
            },
        ))
        .await
        .expect("delete");
    assert_code(
        client
            .login(LoginRequest {
                email: "ada@example.com".into(),
                password: "correct horse battery".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    let missing = UserServiceClient::new(mesh.users.channel.clone())
        .get_user(bearer(
            &mesh.service_token(),
            users::GetUserRequest {
                id: profile.user_id.clone(),
            },
        ))
        .await;
    assert_code(missing, Code::NotFound);
    let (again, _, _) = mesh.sign_up("ada@example.com", "Ada again").await;
    assert_ne!(again.user_id, profile.user_id);

    // Public methods need no token; the others do; "me" methods need a user's token.
    assert_code(client.get_me(GetMeRequest {}).await, Code::Unauthenticated);
    assert_code(
        client
            .get_me(bearer(&mesh.service_token(), GetMeRequest {}))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        client
            .sign_up(SignUpRequest {
                email: "x@example.com".into(),
                password: "long enough pw".into(),
                display_name: "  ".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    mesh.stop().await;
}

/// A retried delete after a partial failure (profile gone, credentials left) finishes.
#[tokio::test]
async fn a_retried_delete_finishes_the_job() {
    let mesh = Mesh::start().await;
    let (profile, access, _) = mesh.sign_up("bob@example.com", "Bob").await;
    // The first attempt got as far as removing the profile.
    UserServiceClient::new(mesh.users.channel.clone())
        .delete_user(bearer(
            &access,
            users::DeleteUserRequest {
                id: profile.user_id.clone(),
            },
        ))
        .await
        .expect("profile removed");
    mesh.client()
        .delete_account(bearer(
            &access,
            DeleteAccountRequest {
                password: "correct horse battery".into(),
            },
        ))
        .await
        .expect("the retry completes");
    let gone = AuthServiceClient::new(mesh.auth.channel.clone())
        .login(auth::LoginRequest {
            email: "bob@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await;
    assert_code(gone, Code::Unauthenticated);
    mesh.stop().await;
}

// ---- test doubles -------------------------------------------------------------------------

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of this double"))
}

/// Counts calls in flight while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>, max: &Arc<AtomicUsize>) -> Self {
        let now = counter.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A users service whose answers a test controls.
#[derive(Clone, Default)]
struct UsersDouble {
    /// GetUser waits on it before answering.
    barrier: Option<Arc<Barrier>>,
    /// CreateUser fails with UNAVAILABLE.
    fail_create: bool,
    /// BatchGetUsers and GetUser sleep this long first.
    delay: Option<Duration>,
    /// BatchGetUsers fails with UNAVAILABLE when its first id starts with this.
    fail_prefix: Option<String>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    /// The metadata of every GetUser call.
    seen: Arc<std::sync::Mutex<Vec<tonic::metadata::MetadataMap>>>,
    /// GetUser calls still to fail with UNAVAILABLE (`usize::MAX`: all of them).
    fail_get: Arc<AtomicUsize>,
}

fn double_user(id: &str) -> users::User {
    users::User {
        id: id.into(),
        display_name: format!("double {id}"),
        version: 1,
        ..users::User::default()
    }
}

#[tonic::async_trait]
impl user_service_server::UserService for UsersDouble {
    async fn create_user(
        &self,
        _: Request<users::CreateUserRequest>,
    ) -> Result<Response<users::User>, Status> {
        if self.fail_create {
            return Err(Status::unavailable("users double: storage unavailable"));
        }
        unimplemented()
    }

    async fn get_user(
        &self,
        request: Request<users::GetUserRequest>,
    ) -> Result<Response<users::User>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(request.metadata().clone());
        }
        let failing = self
            .fail_get
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                usize::MAX => Some(usize::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if failing {
            return Err(Status::unavailable("users double: unavailable"));
        }
        let _guard = InFlight::enter(&self.in_flight, &self.max_in_flight);
        if let Some(barrier) = &self.barrier {
            barrier.wait().await;
        }
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        Ok(Response::new(double_user(&request.get_ref().id)))
    }

    async fn batch_get_users(
        &self,
        request: Request<users::BatchGetUsersRequest>,
    ) -> Result<Response<users::BatchGetUsersResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight::enter(&self.in_flight, &self.max_in_flight);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        let ids = request.into_inner().ids;
        if let Some(prefix) = &self.fail_prefix
            && ids
                .first()
                .is_some_and(|id| id.starts_with(prefix.as_str()))
        {
            return Err(Status::unavailable("users double: down for this batch"));
        }
        Ok(Response::new(users::BatchGetUsersResponse {
            users: ids.iter().map(|id| double_user(id)).collect(),
            not_found_ids: Vec::new(),
        }))
    }

    async fn list_users(
        &self,
        _: Request<users::ListUsersRequest>,
    ) -> Result<Response<users::ListUsersResponse>, Status> {
        unimplemented()
    }

    async fn update_user(
        &self,
        _: Request<users::UpdateUserRequest>,
    ) -> Result<Response<users::User>, Status> {
        unimplemented()
    }

    async fn delete_user(
        &self,
        _: Request<users::DeleteUserRequest>,
    ) -> Result<Response<users::DeleteUserResponse>, Status> {
        unimplemented()
    }

    type WatchUsersStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<users::UserEvent, Status>> + Send>,
    >;

    async fn watch_users(
        &self,
        _: Request<users::WatchUsersRequest>,
    ) -> Result<Response<Self::WatchUsersStream>, Status> {
        unimplemented()
    }
}

/// An auth service that publishes the test's key and answers ListSessions after a barrier.
#[derive(Clone)]
struct AuthDouble {
    jwks_json: String,
    barrier: Arc<Barrier>,
}

#[tonic::async_trait]
impl auth_service_server::AuthService for AuthDouble {
    async fn register(
        &self,
        _: Request<auth::RegisterRequest>,
    ) -> Result<Response<auth::RegisterResponse>, Status> {
        unimplemented()
    }
    async fn login(
        &self,
        _: Request<auth::LoginRequest>,
    ) -> Result<Response<auth::LoginResponse>, Status> {
        unimplemented()
    }
    async fn refresh(
        &self,
        _: Request<auth::RefreshRequest>,
    ) -> Result<Response<auth::RefreshResponse>, Status> {
        unimplemented()
    }
    async fn logout(
        &self,
        _: Request<auth::LogoutRequest>,
    ) -> Result<Response<auth::LogoutResponse>, Status> {
        unimplemented()
    }
    async fn validate_token(
        &self,
        _: Request<auth::ValidateTokenRequest>,
    ) -> Result<Response<auth::ValidateTokenResponse>, Status> {
        unimplemented()
    }
    async fn get_jwks(
        &self,
        _: Request<auth::GetJwksRequest>,
    ) -> Result<Response<auth::GetJwksResponse>, Status> {
        Ok(Response::new(auth::GetJwksResponse {
            keys: Vec::new(),
            jwks_json: self.jwks_json.clone(),
        }))
    }
    async fn list_sessions(
        &self,
        _: Request<auth::ListSessionsRequest>,
    ) -> Result<Response<auth::ListSessionsResponse>, Status> {
        self.barrier.wait().await;
        Ok(Response::new(auth::ListSessionsResponse {
            sessions: vec![auth::Session {
                session_id: "s1".into(),
                current: true,
                ..auth::Session::default()
            }],
        }))
    }
    async fn delete_account(
        &self,
        _: Request<auth::DeleteAccountRequest>,
    ) -> Result<Response<auth::DeleteAccountResponse>, Status> {
        unimplemented()
    }
    async fn issue_service_token(
        &self,
        _: Request<auth::IssueServiceTokenRequest>,
    ) -> Result<Response<auth::IssueServiceTokenResponse>, Status> {
        unimplemented()
    }
}

/// Serves a double with health (SERVING) and reflection.
async fn serve_double<S>(service: S, descriptors: &'static [u8], name: &'static str) -> TestServer
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    TestServer::start(move |listener, shutdown| async move {
        let lifecycle = Lifecycle::new(name);
        lifecycle.health().set_ready(true);
        mesh_runtime::serve(
            listener,
            ServiceSpec::new(service, descriptors),
            &lifecycle,
            &ServerConfig::default(),
            shutdown,
        )
        .await
    })
    .await
}

async fn serve_users_double(double: UsersDouble) -> TestServer {
    serve_double(
        user_service_server::UserServiceServer::new(double),
        mesh_proto::descriptor_sets::USERS,
        mesh_proto::service_names::USERS,
    )
    .await
}

/// GetMe fetches the profile and the sessions concurrently: both doubles wait on one
/// two-party barrier before answering, which a sequential implementation can never pass.
#[tokio::test]
async fn get_me_asks_both_services_at_once() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let barrier = Arc::new(Barrier::new(2));
    let auth = serve_double(
        auth_service_server::AuthServiceServer::new(AuthDouble {
            jwks_json: ring.jwks().to_json(),
            barrier: barrier.clone(),
        }),
        mesh_proto::descriptor_sets::AUTH,
        mesh_proto::service_names::AUTH,
    )
    .await;
    let users = serve_users_double(UsersDouble {
        barrier: Some(barrier),
        ..UsersDouble::default()
    })
    .await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let id = uuid::Uuid::now_v7().to_string();
    let token = mint(&ring, &id, Some("me@example.com"));
    let mut request = bearer(&token, GetMeRequest {});
    request.set_timeout(Duration::from_secs(20));
    let me = AggregatorServiceClient::new(aggregator.channel.clone())
        .get_me(request)
        .await
        .expect("both answered: the calls were concurrent")
        .into_inner();
    assert_eq!(me.profile.expect("profile").user_id, id);
    assert_eq!(me.sessions.len(), 1);
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

/// If users cannot create the profile, SignUp removes the credentials again: no half-made
/// account remains and the same e-mail can register again.
#[tokio::test]
async fn a_failed_sign_up_leaves_no_credentials() {
    let data = tempfile::tempdir().expect("data");
    let auth = start_auth(data.path()).await;
    let users = serve_users_double(UsersDouble {
        fail_create: true,
        ..UsersDouble::default()
    })
    .await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let failed = AggregatorServiceClient::new(aggregator.channel.clone())
        .sign_up(SignUpRequest {
            email: "carol@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Carol".into(),
        })
        .await;
    let status = assert_code(failed, Code::Unavailable);
    assert!(
        !status.message().contains("double"),
        "no internals: {status:?}"
    );
    let mut auth_client = AuthServiceClient::new(auth.channel.clone());
    assert_code(
        auth_client
            .login(auth::LoginRequest {
                email: "carol@example.com".into(),
                password: "correct horse battery".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    auth_client
        .register(auth::RegisterRequest {
            email: "carol@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await
        .expect("the e-mail is free again");
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

async fn collect(mut stream: Streaming<ProfileResult>) -> Vec<ProfileResult> {
    let mut results = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("stream makes progress")
    {
        results.push(item.expect("result"));
    }
    results
}

/// GetProfiles with 10,000 mixed ids: every distinct id answered exactly once — profiles,
/// NOT_FOUND, INVALID_ARGUMENT — and more than 10,000 is refused.
#[tokio::test]
async fn get_profiles_answers_every_id_once() {
    let mesh = Mesh::start().await;
    let mut existing = Vec::new();
    for n in 0..20 {
        existing.push(mesh.profile(&format!("P{n}")).await.0);
    }
    let (_, reader) = mesh.profile("Reader").await;
    let mut ids: Vec<String> = Vec::new();
    let mut expected: HashMap<String, Option<Code>> = HashMap::new();
    for id in &existing {
        ids.push(id.to_uppercase());
        ids.push(id.clone());
        expected.insert(id.clone(), None);
    }
    for n in 0..100 {
        let bad = format!("not-a-uuid-{n}");
        ids.push(bad.clone());
        expected.insert(bad, Some(Code::InvalidArgument));
    }
    while ids.len() < 10_000 {
        let unknown = uuid::Uuid::now_v7().to_string();
        ids.push(unknown.clone());
        expected.insert(unknown, Some(Code::NotFound));
    }
    let stream = mesh
        .client()
        .get_profiles(bearer(
            &reader,
            GetProfilesRequest {
                user_ids: ids.clone(),
            },
        ))
        .await
        .expect("get profiles")
        .into_inner();
    let results = collect(stream).await;
    assert_eq!(results.len(), expected.len(), "one result per distinct id");
    let mut seen = BTreeSet::new();
    for result in results {
        assert!(
            seen.insert(result.user_id.clone()),
            "{} twice",
            result.user_id
        );
        let want = expected.get(&result.user_id).expect("asked for");
        match (result.result.expect("result"), want) {
            (profile_result::Result::Profile(p), None) => {
                assert!(p.email.is_empty(), "another's e-mail is never shown");
            }
            (profile_result::Result::Error(e), Some(code)) => assert_eq!(e.code, *code as i32),
            (got, want) => panic!("{}: got {got:?}, wanted {want:?}", result.user_id),
        }
    }

    let empty = mesh
        .client()
        .get_profiles(bearer(&reader, GetProfilesRequest { user_ids: vec![] }))
        .await
        .expect("empty")
        .into_inner();
    assert!(collect(empty).await.is_empty());
    ids.push(uuid::Uuid::now_v7().to_string());
    let status = mesh
        .client()
        .get_profiles(bearer(&reader, GetProfilesRequest { user_ids: ids }))
        .await;
    assert_code(status, Code::InvalidArgument);
    let anonymous = mesh
        .client()
        .get_profiles(GetProfilesRequest { user_ids: vec![] })
        .await;
    assert_code(anonymous, Code::Unauthenticated);
    mesh.stop().await;
}

/// A batch users fails is UNAVAILABLE on each of its items and the stream goes on; a client
/// that drops the stream early leaves no downstream call running; in-flight batches are
/// bounded.
#[tokio::test]
async fn get_profiles_failures_and_cancellation() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let auth = start_auth(data.path()).await;
    let double = UsersDouble {
        delay: Some(Duration::from_millis(200)),
        fail_prefix: Some("00000000".into()),
        ..UsersDouble::default()
    };
    let users = serve_users_double(double.clone()).await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let token = mint(&ring, "service:test", None);
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());

    // The first batch (ids sorted first) fails, the other goes through.
    let mut ids: Vec<String> = (0..100)
        .map(|n| format!("00000000-0000-7000-8000-{n:012}"))
        .collect();
    ids.extend((0..100).map(|n| format!("11111111-0000-7000-8000-{n:012}")));
    let results = collect(
        client
            .get_profiles(bearer(&token, GetProfilesRequest { user_ids: ids }))
            .await
            .expect("get profiles")
            .into_inner(),
    )
    .await;
    assert_eq!(results.len(), 200);
    for result in &results {
        match result.result.as_ref().expect("result") {
            profile_result::Result::Error(e) => {
                assert!(result.user_id.starts_with("00000000"));
                assert_eq!(e.code, Code::Unavailable as i32);
            }
            profile_result::Result::Profile(_) => assert!(result.user_id.starts_with("11111111")),
        }
    }

    // 10,000 ids: 100 batches of which at most 8 are in flight; the client reads one result
    // and goes away.
    let ids: Vec<String> = (0..10_000)
        .map(|n| format!("22222222-0000-7000-8000-{n:012}"))
        .collect();
    double.max_in_flight.store(0, Ordering::SeqCst);
    let calls_before = double.calls.load(Ordering::SeqCst);
    let mut stream = client
        .get_profiles(bearer(&token, GetProfilesRequest { user_ids: ids }))
        .await
        .expect("get profiles")
        .into_inner();
    stream.next().await.expect("one result").expect("ok");
    assert!(
        double.in_flight.load(Ordering::SeqCst) > 0,
        "calls are in flight"
    );
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while double.in_flight.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "downstream calls still running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let max = double.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= mesh_aggregator::PROFILE_BATCHES_IN_FLIGHT,
        "{max} batches in flight"
    );
    let calls = double.calls.load(Ordering::SeqCst) - calls_before;
    assert!(calls < 100, "only {calls} of 100 batches were ever started");
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

/// LookupProfiles answers each id as it arrives while the stream stays open; a client that
/// writes fast and never reads is held back: the server takes only a bounded number of its
/// ids, and runs at most LOOKUPS_IN_FLIGHT lookups at once.
#[tokio::test]
async fn lookup_profiles_streams_and_holds_back_a_fast_writer() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let auth = start_auth(data.path()).await;
    let double = UsersDouble::default();
    let users = serve_users_double(double.clone()).await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let token = mint(&ring, "service:test", None);

    // Interactive: send, read, send again on the same open stream.
    let (tx, rx) = mpsc::channel(4);
    let mut results = AggregatorServiceClient::new(aggregator.channel.clone())
        .lookup_profiles(bearer(&token, ReceiverStream::new(rx)))
        .await
        .expect("lookup")
        .into_inner();
    let first = uuid::Uuid::now_v7().to_string();
    tx.send(LookupProfilesRequest {
        user_id: first.clone(),
    })
    .await
    .expect("send");
    let got = results.next().await.expect("result").expect("ok");
    assert_eq!(got.user_id, first);
    tx.send(LookupProfilesRequest {
        user_id: "bad".into(),
    })
    .await
    .expect("send");
    let got = results.next().await.expect("result").expect("ok");
    assert!(
        matches!(got.result, Some(profile_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
    drop(tx);
    assert!(results.next().await.is_none(), "ends when the client ends");

    // A writer that never reads, on its own connection.
    const SENT: usize = 200_000;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let ids = tokio_stream::iter(0..SENT).map(move |n| {
        counter.fetch_add(1, Ordering::SeqCst);
        LookupProfilesRequest {
            user_id: format!("33333333-0000-7000-8000-{n:012}"),
        }
    });
    let channel = connect(aggregator.addr).await;
    let _unread = AggregatorServiceClient::new(channel)
        .lookup_profiles(bearer(&token, ids))
        .await
        .expect("lookup")
        .into_inner();
    // Let it run until the windows are full and nothing moves any more.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = pulled.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < SENT / 4,
        "the server took {last} of {SENT} ids from a client that reads nothing"
    );
    let max = double.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= mesh_aggregator::LOOKUPS_IN_FLIGHT,
        "{max} lookups at once"
    );
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

async fn take(stream: &mut Streaming<ProfileEvent>, n: usize) -> Vec<ProfileEvent> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} events", events.len()))
            .expect("stream open")
            .expect("event");
        events.push(event);
    }
    events
}

/// Makes `changes` updates to a profile of its own, one at a time.
fn writer(mesh: &Mesh, token: String, changes: usize) -> tokio::task::JoinHandle<()> {
    let mut client = UserServiceClient::new(mesh.users.channel.clone());
    tokio::spawn(async move {
        client
            .create_user(bearer(
                &token,
                users::CreateUserRequest {
                    user: Some(users::User {
                        display_name: "Writer".into(),
                        ..users::User::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("create");
        for n in 0..changes {
            client
                .update_user(bearer(
                    &token,
                    users::UpdateUserRequest {
                        user: Some(users::User {
                            bio: format!("change {n}"),
                            ..users::User::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["bio".into()],
                        }),
                        expected_version: 0,
                    },
                ))
                .await
                .expect("update");
        }
    })
}

/// WatchProfiles: 1,000 subscribers on the one relay all get the same complete, ordered
/// sequence while writes run; one that starts mid-way from the beginning of the log gets the
/// replay and then the live events with no gap or duplicate; errors as in users.
#[tokio::test]
async fn watch_profiles_fans_out_without_gaps() {
    let mesh = Mesh::start().await;
    let service = mesh.service_token();
    // A first live subscriber (retried until the relay has connected to users) sees the
    // existing profile's event: the relay has passed it before the others subscribe.
    let mut first = loop {
        match mesh
            .client()
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    };
    mesh.profile("Existing").await;
    assert_eq!(take(&mut first, 1).await[0].sequence, 1);
    let channels: Vec<Channel> = futures_join(10, mesh.aggregator.addr).await;
    let mut subscribers = Vec::new();
    for n in 0..1000 {
        let mut client = AggregatorServiceClient::new(channels[n % channels.len()].clone());
        let stream = client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
            .expect("watch");
        subscribers.push(stream.into_inner());
    }
    // Let the subscriptions settle before the first change.
    tokio::time::sleep(Duration::from_millis(200)).await;
    const WRITERS: usize = 4;
    const CHANGES: usize = 25;
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            writer(&mesh, mint(&mesh.ring, &id, Some("w@example.com")), CHANGES)
        })
        .collect();
    // Mid-way, from the start of the log.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut from_start = mesh
        .client()
        .watch_profiles(bearer(
            &service,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch from the start")
        .into_inner();
    let total = WRITERS * (CHANGES + 1);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut s| tokio::spawn(async move { take(&mut s, total).await }))
        .collect();
    let replayed = take(&mut from_start, total + 1).await;
    for w in writers {
        w.await.expect("writer");
    }
    let log: Vec<i64> = replayed.iter().map(|e| e.sequence).collect();
    assert!(log.windows(2).all(|w| w[0] < w[1]), "ordered: {log:?}");
    assert_eq!(replayed[0].kind(), ProfileEventKind::Created);
    assert!(
        replayed
            .iter()
            .all(|e| e.profile.as_ref().is_some_and(|p| p.email.is_empty()))
    );
    for reader in readers {
        let events = reader.await.expect("reader");
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(
            sequences,
            log[1..],
            "a live subscriber sees every change after it joined"
        );
    }

    let mut client = mesh.client();
    assert_code(
        client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: Some(-1),
                },
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: Some(1_000_000),
                },
            ))
            .await,
        Code::OutOfRange,
    );
    mesh.stop().await;
}

async fn futures_join(n: usize, addr: std::net::SocketAddr) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(connect(addr).await);
    }
    channels
}

/// When users restarts, the relay reconnects and resumes from the last sequence it saw:
/// subscribers that stay connected to the aggregator miss nothing. A slow subscriber is caught
/// up from users' log.
#[tokio::test]
async fn watch_profiles_survives_a_users_restart() {
    let mesh = Mesh::start().await;
    let service = mesh.service_token();
    let mut client = mesh.client();
    let mut live = loop {
        match client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    };
    // A slow subscriber on its own connection, not read until the end.
    let mut slow = AggregatorServiceClient::new(connect(mesh.aggregator.addr).await)
        .watch_profiles(bearer(
            &service,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("slow")
        .into_inner();
    let id = uuid::Uuid::now_v7().to_string();
    let token = mint(&mesh.ring, &id, Some("r@example.com"));
    writer(&mesh, token.clone(), 30)
        .await
        .expect("before the restart");
    let before = take(&mut live, 31).await;

    // Stop users and bring it back on its address with the same database.
    let Mesh {
        ring,
        data,
        auth,
        users,
        aggregator,
    } = mesh;
    let addr = users.addr;
    users.shutdown().await.expect("users stops");
    let users = start_users_on(addr, data.path(), auth.addr).await;
    let mesh = Mesh {
        ring,
        data,
        auth,
        users,
        aggregator,
    };

    let mut users_client = UserServiceClient::new(mesh.users.channel.clone());
    for n in 0..30 {
        users_client
            .update_user(bearer(
                &token,
                users::UpdateUserRequest {
                    user: Some(users::User {
                        bio: format!("after restart {n}"),
                        ..users::User::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update after restart");
    }
    let after = take(&mut live, 30).await;
    let sequences: Vec<i64> = before.iter().chain(&after).map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=61).collect::<Vec<i64>>(),
        "no gap across the restart"
    );
    let last = after
        .last()
        .and_then(|e| e.profile.as_ref())
        .expect("profile");
    assert_eq!(last.bio, "after restart 29");

    let slow_events = take(&mut slow, 61).await;
    let slow_sequences: Vec<i64> = slow_events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        slow_sequences, sequences,
        "the slow subscriber is caught up, not skipped"
    );
    mesh.stop().await;
}

/// Every downstream call carries the caller's remaining deadline (less a margin, or the
/// default when the caller set none), bearer token, request id and trace context; a call whose
/// deadline has already passed does no downstream work.
#[tokio::test]
async fn downstream_calls_carry_the_callers_context() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let auth = serve_double(
        auth_service_server::AuthServiceServer::new(AuthDouble {
            jwks_json: ring.jwks().to_json(),
            barrier: Arc::new(Barrier::new(1)),
        }),
        mesh_proto::descriptor_sets::AUTH,
        mesh_proto::service_names::AUTH,
    )
    .await;
    let double = UsersDouble::default();
    let users = serve_users_double(double.clone()).await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let id = uuid::Uuid::now_v7().to_string();
    let token = mint(&ring, &id, Some("me@example.com"));
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let mut request = bearer(&token, GetMeRequest {});
    request.set_timeout(Duration::from_secs(5));
    request
        .metadata_mut()
        .insert("x-request-id", "req-42".parse().expect("id"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("tp"));
    client.get_me(request).await.expect("get me");
    client
        .get_me(bearer(&token, GetMeRequest {}))
        .await
        .expect("no deadline");
    let seen = double.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 2);
    let timeout = |m: &tonic::metadata::MetadataMap| {
        m.get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (n, unit) = v.split_at(v.len() - 1);
                let n: u64 = n.parse().ok()?;
                Some(match unit {
                    "S" => Duration::from_secs(n),
                    "m" => Duration::from_millis(n),
                    "u" => Duration::from_micros(n),
                    "n" => Duration::from_nanos(n),
                    _ => return None,
                })
            })
            .expect("a grpc-timeout")
    };
    let first = timeout(&seen[0]);
    assert!(
        first < Duration::from_secs(5) && first > Duration::from_secs(4),
        "{first:?}"
    );
    assert_eq!(
        seen[0].get("authorization").and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(
        seen[0].get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("req-42")
    );
    assert_eq!(
        seen[0].get("traceparent").and_then(|v| v.to_str().ok()),
        Some(traceparent)
    );
    let second = timeout(&seen[1]);
    assert!(
        second <= Duration::from_secs(10) && second > Duration::from_secs(9),
        "{second:?}"
    );
    assert!(
        seen[1].get("x-request-id").is_some(),
        "a generated request id is passed on too"
    );

    let calls = double.calls.load(Ordering::SeqCst);
    let mut expired = bearer(&token, GetMeRequest {});
    expired.set_timeout(Duration::from_millis(5));
    let status = client.get_me(expired).await.expect_err("no time left");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert_eq!(
        double.calls.load(Ordering::SeqCst),
        calls,
        "no downstream work"
    );
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

/// Subscribers that read nothing while hundreds of large changes go by (far more than the
/// relay's buffer of 16 and the client connection's 5 MiB HTTP/2 window) fall behind the relay; they are caught up from
/// users' log, not skipped: each still gets every event, in order.
#[tokio::test]
async fn lagging_subscribers_are_caught_up_from_users_log() {
    let mesh = Mesh::start().await;
    let service = mesh.service_token();
    let watcher = connect(mesh.aggregator.addr).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut client = AggregatorServiceClient::new(watcher.clone());
        let stream = loop {
            match client
                .watch_profiles(bearer(
                    &service,
                    WatchProfilesRequest {
                        after_sequence: None,
                    },
                ))
                .await
            {
                Ok(stream) => break stream.into_inner(),
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("watch: {status:?}"),
            }
        };
        streams.push(stream);
    }
    const CHANGES: usize = 600;
    let id = uuid::Uuid::now_v7().to_string();
    let token = mint(&mesh.ring, &id, Some("l@example.com"));
    let mut users_client = UserServiceClient::new(mesh.users.channel.clone());
    users_client
        .create_user(bearer(
            &token,
            users::CreateUserRequest {
                user: Some(users::User {
                    display_name: "Lag".into(),
                    ..users::User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create");
    let bio = "x".repeat(500);
    for n in 0..CHANGES {
        users_client
            .update_user(bearer(
                &token,
                users::UpdateUserRequest {
                    user: Some(users::User {
                        bio: format!("{n} {bio}"),
                        ..users::User::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
    }
    // Read them all at once now (unread streams hold back their shared connection).
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| tokio::spawn(async move { take(&mut s, CHANGES + 1).await }))
        .collect();
    for reader in readers {
        let sequences: Vec<i64> = reader
            .await
            .expect("reader")
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(sequences, (1..=(CHANGES as i64 + 1)).collect::<Vec<_>>());
    }
    mesh.stop().await;
}

/// The relay renews its service token before it expires: with 2-second tokens and no leeway at
/// users, a replay opened after the first token has expired still works.
#[tokio::test]
async fn the_relay_renews_its_service_token() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let mut auth_config = mesh_auth::Config::new(([127, 0, 0, 1], 0).into(), data.path().into());
    auth_config.access_token_ttl = Duration::from_secs(2);
    auth_config.service_clients = vec![
        format!("aggregator=plain:{CLIENT_SECRET}")
            .parse()
            .expect("client"),
    ];
    let auth = TestServer::start(move |listener, shutdown| async move {
        mesh_auth::serve(&auth_config, listener, shutdown).await
    })
    .await;
    let mut config = users_config(data.path(), auth.addr);
    config.authn.leeway = Duration::ZERO;
    let users = TestServer::start(move |listener, shutdown| async move {
        mesh_users::serve(&config, listener, shutdown).await
    })
    .await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let id = uuid::Uuid::now_v7().to_string();
    let token = mint(&ring, &id, Some("t@example.com"));
    UserServiceClient::new(users.channel.clone())
        .create_user(bearer(
            &token,
            users::CreateUserRequest {
                user: Some(users::User {
                    display_name: "T".into(),
                    ..users::User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create");
    let service = mint(&ring, "service:test", None);
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());
    let open = |client: &mut AggregatorServiceClient<Channel>| {
        let mut client = client.clone();
        let service = service.clone();
        async move {
            client
                .watch_profiles(bearer(
                    &service,
                    WatchProfilesRequest {
                        after_sequence: Some(0),
                    },
                ))
                .await
        }
    };
    let mut first = open(&mut client).await.expect("replay").into_inner();
    assert_eq!(take(&mut first, 1).await[0].sequence, 1);
    // Well past the first token's expiry.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut later = open(&mut client)
        .await
        .expect("a replay with a renewed token")
        .into_inner();
    assert_eq!(take(&mut later, 1).await[0].sequence, 1);
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

/// The aggregator serves at most `--max-watch-streams` WatchProfiles streams; one more is
/// RESOURCE_EXHAUSTED, and a place that frees up can be taken again.
#[tokio::test]
async fn watch_streams_are_capped() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let auth = start_auth(data.path()).await;
    let users = start_users_on(([127, 0, 0, 1], 0).into(), data.path(), auth.addr).await;
    let aggregator =
        start_aggregator_with(auth.addr, users.addr, |c| c.max_watch_streams = 3).await;
    let service = mint(&ring, "service:test", None);
    let client = AggregatorServiceClient::new(aggregator.channel.clone());
    let open = || {
        let mut client = client.clone();
        let service = service.clone();
        async move {
            client
                .watch_profiles(bearer(
                    &service,
                    WatchProfilesRequest {
                        after_sequence: None,
                    },
                ))
                .await
        }
    };
    let mut streams = Vec::new();
    while streams.len() < 3 {
        match open().await {
            Ok(stream) => streams.push(stream.into_inner()),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    }
    let refused = assert_code(open().await, Code::ResourceExhausted);
    assert!(refused.message().contains("maximum of 3"), "{refused:?}");
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open().await {
            Ok(stream) => {
                streams.push(stream.into_inner());
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place never freed up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    }
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Duration {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (n, unit) = v.split_at(v.len() - 1);
            let n: u64 = n.parse().ok()?;
            Some(match unit {
                "S" => Duration::from_secs(n),
                "m" => Duration::from_millis(n),
                "u" => Duration::from_micros(n),
                "n" => Duration::from_nanos(n),
                _ => return None,
            })
        })
        .expect("a grpc-timeout")
}

/// Reads are retried on UNAVAILABLE within the caller's deadline (each retry gets what is
/// left), and the shared budget keeps a failing users from seeing much more than one call per
/// request.
#[tokio::test]
async fn reads_are_retried_within_the_deadline_and_the_budget() {
    let data = tempfile::tempdir().expect("data");
    let ring = dev_key(data.path());
    let auth = serve_double(
        auth_service_server::AuthServiceServer::new(AuthDouble {
            jwks_json: ring.jwks().to_json(),
            barrier: Arc::new(Barrier::new(1)),
        }),
        mesh_proto::descriptor_sets::AUTH,
        mesh_proto::service_names::AUTH,
    )
    .await;
    let double = UsersDouble::default();
    let users = serve_users_double(double.clone()).await;
    let aggregator = start_aggregator(auth.addr, users.addr).await;
    let token = mint(
        &ring,
        &uuid::Uuid::now_v7().to_string(),
        Some("r@example.com"),
    );
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());

    // Two failures, then an answer: three attempts, each with less of the caller's 5 s.
    double.fail_get.store(2, Ordering::SeqCst);
    let mut request = bearer(&token, GetMeRequest {});
    request.set_timeout(Duration::from_secs(5));
    client.get_me(request).await.expect("recovered by retrying");
    let timeouts: Vec<Duration> = double
        .seen
        .lock()
        .expect("seen")
        .iter()
        .map(grpc_timeout)
        .collect();
    assert_eq!(timeouts.len(), mesh_aggregator::MAX_ATTEMPTS as usize);
    assert!(timeouts[0] <= Duration::from_secs(5));
    assert!(
        timeouts.windows(2).all(|w| w[1] < w[0]),
        "retries share the caller's deadline: {timeouts:?}"
    );

    // Users always failing: 50 requests cost at most 50 calls plus what the budget allows.
    double.fail_get.store(usize::MAX, Ordering::SeqCst);
    let before = double.calls.load(Ordering::SeqCst);
    const REQUESTS: usize = 50;
    for _ in 0..REQUESTS {
        let status = client
            .get_me(bearer(&token, GetMeRequest {}))
            .await
            .expect_err("users is down");
        assert_eq!(status.code(), Code::Unavailable);
    }
    let calls = double.calls.load(Ordering::SeqCst) - before;
    // Each GetMe makes two reads, each earning a fifth of a retry.
    let allowed = REQUESTS
        + mesh_aggregator::RETRY_RESERVE as usize
        + (2.0 * REQUESTS as f64 * mesh_aggregator::RETRY_RATIO) as usize;
    assert!(calls > REQUESTS, "some retries were made: {calls}");
    assert!(
        calls <= allowed,
        "{calls} calls for {REQUESTS} requests (budget allows {allowed}, unbounded would be {})",
        REQUESTS * mesh_aggregator::MAX_ATTEMPTS as usize
    );
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

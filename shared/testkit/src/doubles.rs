//! Service doubles: auth and users whose every method answers `UNIMPLEMENTED` unless a test
//! gives it a handler. A new RPC is added here once; no test that does not use it changes.

use std::{future::Future, pin::Pin, sync::Arc};

use futures_util::future::BoxFuture;
use mesh_proto::{auth::v1 as auth, users::v1 as users};
use mesh_runtime::{Lifecycle, ServerConfig, ServiceSpec, testing::TestServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// A boxed server stream, as doubles' streaming handlers return it.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

type Handler<Req, Res> =
    Arc<dyn Fn(Request<Req>) -> BoxFuture<'static, Result<Res, Status>> + Send + Sync>;

fn unimplemented<T>(method: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{method} is not part of this double"
    )))
}

macro_rules! double {
    (
        $(#[$meta:meta])*
        $name:ident: $trait:path {
            unary { $($method:ident($req:ty) -> $res:ty;)* }
            streaming { $($smethod:ident($sreq:ty) -> $sres:ty as $stream:ident;)* }
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Default)]
        pub struct $name {
            $($method: Option<Handler<$req, $res>>,)*
            $($smethod: Option<Handler<$sreq, BoxStream<$sres>>>,)*
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }

        impl $name {
            /// A double answering every method `UNIMPLEMENTED`.
            pub fn new() -> Self {
                Self::default()
            }

            $(
                #[doc = concat!("Answers `", stringify!($method), "` with `handler`.")]
                pub fn $method<F, Fut>(mut self, handler: F) -> Self
                where
                    F: Fn(Request<$req>) -> Fut + Send + Sync + 'static,
                    Fut: Future<Output = Result<$res, Status>> + Send + 'static,
                {
                    self.$method = Some(Arc::new(move |request| Box::pin(handler(request))));
                    self
                }
            )*

            $(
                #[doc = concat!("Answers `", stringify!($smethod), "` with the stream `handler` makes.")]
                pub fn $smethod<F, Fut>(mut self, handler: F) -> Self
                where
                    F: Fn(Request<$sreq>) -> Fut + Send + Sync + 'static,
                    Fut: Future<Output = Result<BoxStream<$sres>, Status>> + Send + 'static,
                {
                    self.$smethod = Some(Arc::new(move |request| Box::pin(handler(request))));
                    self
                }
            )*
        }

        #[tonic::async_trait]
        impl $trait for $name {
            $(
                async fn $method(&self, request: Request<$req>) -> Result<Response<$res>, Status> {
                    match &self.$method {
                        Some(handler) => handler(request).await.map(Response::new),
                        None => unimplemented(stringify!($method)),
                    }
                }
            )*

            $(
                type $stream = BoxStream<$sres>;

                async fn $smethod(
                    &self,
                    request: Request<$sreq>,
                ) -> Result<Response<Self::$stream>, Status> {
                    match &self.$smethod {
                        Some(handler) => handler(request).await.map(Response::new),
                        None => unimplemented(stringify!($smethod)),
                    }
                }
            )*
        }
    };
}

double! {
    /// An auth service double.
    AuthDouble: auth::auth_service_server::AuthService {
        unary {
            register(auth::RegisterRequest) -> auth::RegisterResponse;
            login(auth::LoginRequest) -> auth::LoginResponse;
            refresh(auth::RefreshRequest) -> auth::RefreshResponse;
            logout(auth::LogoutRequest) -> auth::LogoutResponse;
            validate_token(auth::ValidateTokenRequest) -> auth::ValidateTokenResponse;
            get_jwks(auth::GetJwksRequest) -> auth::GetJwksResponse;
            list_sessions(auth::ListSessionsRequest) -> auth::ListSessionsResponse;
            delete_account(auth::DeleteAccountRequest) -> auth::DeleteAccountResponse;
            issue_service_token(auth::IssueServiceTokenRequest) -> auth::IssueServiceTokenResponse;
        }
        streaming {
            watch_revocations(auth::WatchRevocationsRequest) -> auth::WatchRevocationsResponse
                as WatchRevocationsStream;
        }
    }
}

double! {
    /// A users service double.
    UsersDouble: users::user_service_server::UserService {
        unary {
            create_user(users::CreateUserRequest) -> users::User;
            get_user(users::GetUserRequest) -> users::User;
            batch_get_users(users::BatchGetUsersRequest) -> users::BatchGetUsersResponse;
            list_users(users::ListUsersRequest) -> users::ListUsersResponse;
            update_user(users::UpdateUserRequest) -> users::User;
            delete_user(users::DeleteUserRequest) -> users::DeleteUserResponse;
        }
        streaming {
            watch_users(users::WatchUsersRequest) -> users::UserEvent as WatchUsersStream;
        }
    }
}

impl AuthDouble {
    /// A double that publishes `jwks_json` (GetJwks), as every verifier needs.
    pub fn publishing(jwks_json: String) -> Self {
        Self::new().get_jwks(move |_| {
            let jwks_json = jwks_json.clone();
            async move {
                Ok(auth::GetJwksResponse {
                    keys: Vec::new(),
                    jwks_json,
                })
            }
        })
    }

    /// Serves the double with health (SERVING) and reflection, as a real auth server would.
    pub async fn serve(self) -> TestServer {
        serve_double(
            auth::auth_service_server::AuthServiceServer::new(self),
            mesh_proto::descriptor_sets::AUTH,
            mesh_proto::service_names::AUTH,
        )
        .await
    }
}

impl UsersDouble {
    /// Serves the double with health (SERVING) and reflection, as a real users server would.
    pub async fn serve(self) -> TestServer {
        serve_double(
            users::user_service_server::UserServiceServer::new(self),
            mesh_proto::descriptor_sets::USERS,
            mesh_proto::service_names::USERS,
        )
        .await
    }
}

/// Serves a double (any generated server) with the mesh runtime: health SERVING, reflection,
/// limits, on `127.0.0.1:0`.
pub async fn serve_double<S>(
    service: S,
    descriptors: &'static [u8],
    name: &'static str,
) -> TestServer
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
    serve_double_on(([127, 0, 0, 1], 0).into(), service, descriptors, name).await
}

/// [`serve_double`] on `addr` (another loopback address, or a stopped server's address).
pub async fn serve_double_on<S>(
    addr: std::net::SocketAddr,
    service: S,
    descriptors: &'static [u8],
    name: &'static str,
) -> TestServer
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
    TestServer::start_on(addr, move |listener, shutdown| async move {
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

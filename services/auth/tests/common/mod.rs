//! Shared set-up of the auth integration tests: an in-process server on each database backend.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;

use mesh_proto::auth::v1::{RegisterRequest, TokenPair, auth_service_client::AuthServiceClient};
use mesh_runtime::testing::TestServer;
use tonic::{Request, transport::Channel};

/// The database backends to run a test on: SQLite always, PostgreSQL when available (required
/// in CI).
pub async fn backends(test: &str) -> Vec<Backend> {
    let mut list = vec![Backend::Sqlite];
    if let Some(url) = mesh_store::testing::postgres_for("auth", test).await {
        list.push(Backend::Postgres(url));
    }
    list
}

/// A database backend for one test.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded SQLite file in the test's data folder.
    Sqlite,
    /// A fresh PostgreSQL database at this URL.
    Postgres(String),
}

/// A configuration for `backend` with state under `data`.
pub fn config(backend: &Backend, data: &Path) -> mesh_auth::Config {
    let mut config = mesh_auth::Config::new(([127, 0, 0, 1], 0).into(), data.to_owned());
    if let Backend::Postgres(url) = backend {
        config.database_url = Some(url.clone());
    }
    config.service_clients = vec!["svc=plain:svc-secret".parse().expect("client")];
    config
}

/// Starts auth with `config`.
pub async fn start(config: mesh_auth::Config) -> TestServer {
    TestServer::start(move |listener, shutdown| async move {
        mesh_auth::serve(&config, listener, shutdown).await
    })
    .await
}

/// A client of `server`.
pub fn client(server: &TestServer) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(server.channel.clone())
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// Registers `email` with `password` and returns the user id and tokens.
pub async fn register(
    client: &mut AuthServiceClient<Channel>,
    email: &str,
    password: &str,
) -> (String, TokenPair) {
    let reply = client
        .register(RegisterRequest {
            email: email.into(),
            password: password.into(),
        })
        .await
        .expect("register")
        .into_inner();
    (reply.user_id, reply.tokens.expect("tokens"))
}

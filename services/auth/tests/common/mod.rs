//! Shared set-up of the auth integration tests: an in-process server on each database backend.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;

use mesh_proto::auth::v1::{RegisterRequest, TokenPair, auth_service_client::AuthServiceClient};
use mesh_runtime::testing::TestServer;
use sqlx::Connection as _;
use tonic::{Request, transport::Channel};

/// The environment variable naming a PostgreSQL server the tests may create databases on.
pub const PG_ENV: &str = "MESH_TEST_DATABASE_URL";

/// The database backends to run a test on: SQLite always, PostgreSQL when available (required
/// in CI).
pub async fn backends(test: &str) -> Vec<Backend> {
    let mut list = vec![Backend::Sqlite];
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => {
            list.push(Backend::Postgres(fresh_database(&url, test).await))
        }
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{PG_ENV} must name a PostgreSQL server in CI (scripts/test sets it)")
        }
        _ => eprintln!(
            "\n*** {test}: PostgreSQL SKIPPED ({PG_ENV} is not set; scripts/test sets it). \
             CI never skips it. ***\n"
        ),
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

/// Creates an empty database for one test on the server at `admin_url`, named after the test
/// process, and drops those that earlier test processes left behind.
async fn fresh_database(admin_url: &str, test: &str) -> String {
    let prefix = format!("mesh_auth_{}_", std::process::id());
    let name = format!(
        "{prefix}{}_{}",
        test.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(20)
            .collect::<String>(),
        uuid::Uuid::now_v7().simple()
    )
    .to_lowercase();
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to the test PostgreSQL server");
    let stale: Vec<(String,)> = sqlx::query_as(
        "SELECT datname FROM pg_database WHERE datname LIKE 'mesh!_auth!_%' ESCAPE '!' \
         AND datname NOT LIKE $1",
    )
    .bind(format!("{prefix}%"))
    .fetch_all(&mut admin)
    .await
    .unwrap_or_default();
    for (stale,) in stale {
        // A database still in use by another test process stays until a later run.
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {stale}"))
            .execute(&mut admin)
            .await;
    }
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("URL with a database path");
    format!("{base}/{name}")
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

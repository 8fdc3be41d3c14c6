//! [`TestMesh`]: any of auth, users and the aggregator, in-process on `127.0.0.1:0`, over
//! SQLite or PostgreSQL, talking over real gRPC on loopback.

use std::{net::SocketAddr, time::Duration};

use mesh_authn::AuthnConfig;
use mesh_proto::{
    aggregator::v1::aggregator_service_client::AggregatorServiceClient,
    auth::v1::{RegisterRequest, TokenPair, auth_service_client::AuthServiceClient},
    users::v1::user_service_client::UserServiceClient,
};
use mesh_runtime::testing::{TestServer, health_status};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::tokens::Minter;

/// The aggregator's client secret at auth in a test mesh.
pub const CLIENT_SECRET: &str = "aggregator-test-secret";

/// A database for a test's services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// Each service's embedded SQLite file in the mesh's data folder.
    Sqlite,
    /// PostgreSQL: a fresh database per service on the server at this admin URL.
    Postgres(String),
}

/// The databases a test runs on: SQLite always, PostgreSQL when the environment names a server
/// (`MESH_TEST_DATABASE_URL`; required in CI, skipped loudly elsewhere).
pub fn databases() -> Vec<Database> {
    let mut list = vec![Database::Sqlite];
    match std::env::var(mesh_store::testing::PG_ENV) {
        Ok(url) if !url.is_empty() => list.push(Database::Postgres(url)),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "{} must name a PostgreSQL server in CI (scripts/test sets it)",
            mesh_store::testing::PG_ENV
        ),
        _ => eprintln!(
            "\n*** PostgreSQL SKIPPED ({} is not set; scripts/test sets it). CI never skips \
             it. ***\n",
            mesh_store::testing::PG_ENV
        ),
    }
    list
}

type Tweak<C> = Box<dyn FnOnce(&mut C) + Send>;

/// Which services a [`TestMesh`] runs, on which database, with which settings.
pub struct MeshBuilder {
    database: Database,
    users: bool,
    aggregator: bool,
    auth_tweaks: Vec<Tweak<mesh_auth::Config>>,
    users_tweaks: Vec<Tweak<mesh_users::Config>>,
    aggregator_tweaks: Vec<Tweak<mesh_aggregator::Config>>,
}

impl std::fmt::Debug for MeshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBuilder")
            .field("database", &self.database)
            .field("users", &self.users)
            .field("aggregator", &self.aggregator)
            .finish_non_exhaustive()
    }
}

impl MeshBuilder {
    /// Also users.
    pub fn users(mut self) -> Self {
        self.users = true;
        self
    }

    /// Also users and the aggregator.
    pub fn aggregator(mut self) -> Self {
        self.users = true;
        self.aggregator = true;
        self
    }

    /// On `database`.
    pub fn database(mut self, database: Database) -> Self {
        self.database = database;
        self
    }

    /// Changes auth's configuration.
    pub fn auth_config(
        mut self,
        tweak: impl FnOnce(&mut mesh_auth::Config) + Send + 'static,
    ) -> Self {
        self.auth_tweaks.push(Box::new(tweak));
        self
    }

    /// Changes users' configuration.
    pub fn users_config(
        mut self,
        tweak: impl FnOnce(&mut mesh_users::Config) + Send + 'static,
    ) -> Self {
        self.users_tweaks.push(Box::new(tweak));
        self
    }

    /// Changes the aggregator's configuration.
    pub fn aggregator_config(
        mut self,
        tweak: impl FnOnce(&mut mesh_aggregator::Config) + Send + 'static,
    ) -> Self {
        self.aggregator_tweaks.push(Box::new(tweak));
        self
    }

    /// Starts the services (auth first), each once its dependencies are up; returns when the
    /// aggregator (if any) reports SERVING.
    pub async fn start(self) -> TestMesh {
        let data = tempfile::tempdir().expect("data folder");
        let keys = Minter::for_data_dir(data.path());
        let test = uuid::Uuid::now_v7().simple().to_string();
        let pg = |service: &'static str| {
            let database = self.database.clone();
            let test = test.clone();
            async move {
                match database {
                    Database::Sqlite => None,
                    Database::Postgres(admin) => {
                        Some(mesh_store::testing::fresh_database(&admin, service, &test).await)
                    }
                }
            }
        };

        let mut auth_config = auth_config(data.path());
        auth_config.database_url = pg("auth").await.map(Into::into);
        for tweak in self.auth_tweaks {
            tweak(&mut auth_config);
        }
        let auth = start_auth(auth_config).await;

        let (users, started_users_config) = if self.users {
            let mut config = users_config(data.path(), auth.addr);
            config.database_url = pg("users").await.map(Into::into);
            for tweak in self.users_tweaks {
                tweak(&mut config);
            }
            let server = start_users(config.clone()).await;
            // A restart binds the address it got.
            config.listen = server.addr;
            (Some(server), Some(config))
        } else {
            (None, None)
        };

        let aggregator = match (&users, self.aggregator) {
            (Some(users), true) => {
                let mut config = aggregator_config(auth.addr, users.addr);
                for tweak in self.aggregator_tweaks {
                    tweak(&mut config);
                }
                Some(start_aggregator(config).await)
            }
            _ => None,
        };
        TestMesh {
            keys,
            auth,
            users,
            aggregator,
            data,
            users_config: started_users_config,
        }
    }
}

/// Auth's test configuration: state under `data`, the aggregator's service client.
pub fn auth_config(data: &std::path::Path) -> mesh_auth::Config {
    let mut config = mesh_auth::Config::new(([127, 0, 0, 1], 0).into(), data.to_owned());
    config.service_clients = vec![
        format!("aggregator=plain:{CLIENT_SECRET}")
            .parse()
            .expect("service client"),
    ];
    config
}

/// Users' test configuration: state under `data`, auth at `auth`.
pub fn users_config(data: &std::path::Path, auth: SocketAddr) -> mesh_users::Config {
    mesh_users::Config::new(([127, 0, 0, 1], 0).into(), data.to_owned(), authn(auth))
}

/// The aggregator's test configuration: auth and users at these addresses, its service
/// secret, dependency checks every 100 ms, a relay buffer of 16 events.
pub fn aggregator_config(auth: SocketAddr, users: SocketAddr) -> mesh_aggregator::Config {
    let mut config = mesh_aggregator::Config::new(
        ([127, 0, 0, 1], 0).into(),
        authn(auth),
        format!("http://{users}").parse().expect("users URL"),
    );
    config.client_secret = Some(CLIENT_SECRET.into());
    config.dependency_check_interval = Duration::from_millis(100);
    config.watch_buffer = 16;
    config
}

/// Where a verifier finds auth at `addr`.
pub fn authn(addr: SocketAddr) -> AuthnConfig {
    AuthnConfig::new(format!("http://{addr}").parse().expect("auth URL"))
}

/// Starts auth with `config` on its listen address (port 0: a free one).
pub async fn start_auth(config: mesh_auth::Config) -> TestServer {
    TestServer::start_on(config.listen, move |listener, shutdown| async move {
        mesh_auth::serve(&config, listener, shutdown).await
    })
    .await
}

/// Starts users with `config` on its listen address.
pub async fn start_users(config: mesh_users::Config) -> TestServer {
    TestServer::start_on(config.listen, move |listener, shutdown| async move {
        mesh_users::serve(&config, listener, shutdown).await
    })
    .await
}

/// Starts the aggregator with `config` and waits until it reports SERVING.
pub async fn start_aggregator(config: mesh_aggregator::Config) -> TestServer {
    let server = spawn_aggregator(config).await;
    wait_for_health(
        &server,
        mesh_aggregator::SERVICE_NAME,
        ServingStatus::Serving,
    )
    .await;
    server
}

/// Starts the aggregator with `config` without waiting for it to report SERVING: for one
/// that serves TLS (see [`crate::start_aggregator_tls`]) or is meant not to get there.
pub async fn spawn_aggregator(config: mesh_aggregator::Config) -> TestServer {
    TestServer::start_on(config.listen, move |listener, shutdown| async move {
        mesh_aggregator::serve(&config, listener, shutdown).await
    })
    .await
}

/// Waits (at most 20 s) until `server` reports `want` for `name`.
pub async fn wait_for_health(server: &TestServer, name: &str, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health_status(&server.channel, name).await;
        if status.as_ref().ok() == Some(&(want as i32)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed {status:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Running services of one test, sharing a data folder and a signing key.
#[derive(Debug)]
pub struct TestMesh {
    /// Mints tokens auth's keys verify.
    pub keys: Minter,
    /// Auth.
    pub auth: TestServer,
    /// Users, if started.
    pub users: Option<TestServer>,
    /// The aggregator, if started.
    pub aggregator: Option<TestServer>,
    /// The data folder (removed when the mesh is dropped).
    pub data: tempfile::TempDir,
    /// Users' configuration as started (its listen address the one it got), if started: what
    /// [`TestMesh::restart_users`] starts it with again.
    pub users_config: Option<mesh_users::Config>,
}

impl TestMesh {
    /// A builder for auth alone, on SQLite; add services and settings to it.
    pub fn builder() -> MeshBuilder {
        MeshBuilder {
            database: Database::Sqlite,
            users: false,
            aggregator: false,
            auth_tweaks: Vec::new(),
            users_tweaks: Vec::new(),
            aggregator_tweaks: Vec::new(),
        }
    }

    /// The users server; panics if the mesh has none.
    pub fn users(&self) -> &TestServer {
        self.users.as_ref().expect("this mesh runs users")
    }

    /// The aggregator; panics if the mesh has none.
    pub fn aggregator(&self) -> &TestServer {
        self.aggregator
            .as_ref()
            .expect("this mesh runs the aggregator")
    }

    /// A client of auth.
    pub fn auth_client(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.auth.channel.clone())
    }

    /// A client of users.
    pub fn users_client(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.users().channel.clone())
    }

    /// A client of the aggregator.
    pub fn aggregator_client(&self) -> AggregatorServiceClient<Channel> {
        AggregatorServiceClient::new(self.aggregator().channel.clone())
    }

    /// Registers `email` with `password` at auth: the new user's id and tokens.
    pub async fn register(&self, email: &str, password: &str) -> (String, TokenPair) {
        let reply = self
            .auth_client()
            .register(RegisterRequest {
                email: email.into(),
                password: password.into(),
            })
            .await
            .expect("register")
            .into_inner();
        (reply.user_id, reply.tokens.expect("tokens"))
    }

    /// Stops users and waits for it to finish (the aggregator, if any, stays up and sees it
    /// go). [`TestMesh::restart_users`] brings it back.
    pub async fn stop_users(&mut self) {
        if let Some(users) = self.users.take() {
            users.shutdown().await.expect("users stops cleanly");
        }
    }

    /// Stops users if it runs, then starts it again on the same address with the same
    /// configuration and database: what it stored survives, and its clients reconnect.
    pub async fn restart_users(&mut self) {
        self.stop_users().await;
        let config = self.users_config.clone().expect("this mesh runs users");
        self.users = Some(start_users(config).await);
    }

    /// Stops every service (the aggregator first) and waits for each to finish.
    pub async fn stop(self) {
        if let Some(aggregator) = self.aggregator {
            aggregator
                .shutdown()
                .await
                .expect("aggregator stops cleanly");
        }
        if let Some(users) = self.users {
            users.shutdown().await.expect("users stops cleanly");
        }
        self.auth.shutdown().await.expect("auth stops cleanly");
    }
}

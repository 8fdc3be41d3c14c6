//! What the scenarios share: the test kit's servers (on the servers' runtime, with the bench's
//! server settings) and processes, minted tokens, a population of profiles.

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use mesh_proto::users::v1::{CreateUserRequest, User, user_service_client::UserServiceClient};
use mesh_testkit::{Minter, ServiceProcess, TestMesh, TestPki, TestServer};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{BenchError, channels};

pub(super) fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

pub(super) use mesh_authn::bearer_request as bearer;
pub(super) use mesh_proto::time::unix_now_ms as unix_ms_now;

/// Runs `start` (one of the kit's start functions, say) on the servers' runtime, so that the
/// server it spawns runs there and not on the load generator's threads.
pub(super) async fn start_server<F>(start: F) -> Result<TestServer, BenchError>
where
    F: Future<Output = TestServer> + Send + 'static,
{
    super::on_servers(async move { Ok(start.await) }).await
}

/// Stops `server` and waits for it.
pub(super) async fn stop(server: TestServer) {
    let addr = server.addr;
    if let Err(err) = server.shutdown().await {
        eprintln!("server at {addr} failed: {err}");
    }
}

/// The server settings of the services a benchmark starts: every bench client comes from this
/// one machine, so the bounds per client address (meant for the public edge) are lifted.
pub(super) fn bench_server_config() -> mesh_runtime::ServerConfig {
    mesh_runtime::ServerConfig {
        max_connections_per_peer: 0,
        peer_share_percent: 100,
        max_connections: 100_000,
        max_concurrent_streams: 1000,
        tls_handshakes_per_peer: 0,
        ..mesh_runtime::ServerConfig::default()
    }
}

/// The same as flags, for a service started as its own process.
pub(super) fn bench_server_args() -> Vec<String> {
    bench_server_config().to_args()
}

/// `http://addr`, or `https://addr` in a TLS run.
pub(super) fn url(addr: SocketAddr, tls: Option<&TestPki>) -> Result<http::Uri, BenchError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}").parse().map_err(setup)
}

/// Auth with state under `data` (the kit's test configuration) and the bench's server
/// settings; in a TLS run (`tls`: every server serves the run's certificate, auth and users
/// require a client certificate from its CA, and every client presents the same one), mutual
/// TLS.
pub(super) async fn start_auth(
    data: &Path,
    tls: Option<&TestPki>,
) -> Result<TestServer, BenchError> {
    let mut config = mesh_testkit::auth_config(data);
    config.server = bench_server_config();
    if let Some(tls) = tls {
        tls.serve(&mut config.server, true);
    }
    start_server(mesh_testkit::start_auth(config)).await
}

/// Users' configuration in a benchmark: state under `data`, auth at `auth`, on
/// `database_url` (unset: SQLite), its write bounds lifted, the bench's server settings;
/// mutual TLS in a TLS run.
pub(super) fn users_config(
    data: &Path,
    auth: SocketAddr,
    database_url: Option<String>,
    tls: Option<&TestPki>,
) -> Result<mesh_users::Config, BenchError> {
    let mut config = mesh_testkit::users_config(data, auth);
    config.database_url = database_url.map(Into::into);
    // The write scenarios change one profile as fast as they can.
    config.profile_writes_burst = u32::MAX;
    config.profile_writes_per_second = 1e9;
    config.server = bench_server_config();
    if let Some(tls) = tls {
        config.authn.auth_url = url(auth, Some(tls))?;
        config.authn.tls = tls.client_config();
        tls.serve(&mut config.server, true);
    }
    Ok(config)
}

/// The aggregator's configuration in a benchmark: auth and users at these addresses, the
/// kit's service secret, the production defaults otherwise (not the kit's quick dependency
/// checks and small relay buffer) with the bench's server settings and per-caller bounds
/// lifted; TLS (asking for no client certificate, as in production) in a TLS run.
fn aggregator_config(
    auth: SocketAddr,
    users: SocketAddr,
    tls: Option<&TestPki>,
) -> Result<mesh_aggregator::Config, BenchError> {
    let mut authn = mesh_testkit::authn(auth);
    if let Some(tls) = tls {
        authn.auth_url = url(auth, Some(tls))?;
        authn.tls = tls.client_config();
    }
    let mut config =
        mesh_aggregator::Config::new(([127, 0, 0, 1], 0).into(), authn, url(users, tls)?);
    config.client_secret = Some(mesh_testkit::CLIENT_SECRET.into());
    config.server = bench_server_config();
    if let Some(tls) = tls {
        // The facade asks for no client certificate, as in production.
        tls.serve(&mut config.server, false);
    }
    // Bench callers share a few identities and one address.
    config.max_watch_streams_per_caller = 10_000_000;
    config.login_failures_per_address = 0;
    config.signups_per_address = 0;
    Ok(config)
}

/// Starts an aggregator in front of auth and users at these addresses and waits until it is
/// SERVING (over TLS in a TLS run).
pub(super) async fn start_aggregator(
    auth: SocketAddr,
    users: SocketAddr,
    tls: Option<&TestPki>,
) -> Result<TestServer, BenchError> {
    let config = aggregator_config(auth, users, tls)?;
    match tls {
        None => start_server(mesh_testkit::start_aggregator(config)).await,
        Some(tls) => {
            let client = tls.mesh_client();
            start_server(async move { mesh_testkit::start_aggregator_tls(config, &client).await })
                .await
        }
    }
}

/// Auth and users for the scenario `name`, in a data folder of their own (removed when the
/// mesh is dropped) whose signing key the mesh's [`Minter`] mints with: the kit's
/// [`TestMesh`], with the bench's settings, no aggregator yet.
pub(super) async fn start_mesh(
    name: &str,
    database_url: Option<String>,
    tls: Option<&TestPki>,
) -> Result<TestMesh, BenchError> {
    let data = tempfile::Builder::new()
        .prefix(&format!("mesh-bench-{name}-"))
        .tempdir()
        .map_err(setup)?;
    // Made before auth starts, so auth signs with it too: the benchmark mints tokens for a
    // population of users without paying an Argon2id hash for each.
    let keys = Minter::for_data_dir(data.path());
    let auth = start_auth(data.path(), tls).await?;
    let mut config = users_config(data.path(), auth.addr, database_url, tls)?;
    let users = start_server(mesh_testkit::start_users(config.clone())).await?;
    config.listen = users.addr;
    Ok(TestMesh {
        keys,
        auth,
        users: Some(users),
        aggregator: None,
        data,
        users_config: Some(config),
    })
}

/// `command` (a `mesh` service listening on `addr`) as the kit's [`ServiceProcess`], killed
/// when dropped, once its service `name` reports SERVING.
pub(super) async fn service_process(
    mut command: tokio::process::Command,
    addr: SocketAddr,
    name: &str,
) -> Result<ServiceProcess, BenchError> {
    let child = command.kill_on_drop(true).spawn().map_err(setup)?;
    let process = ServiceProcess {
        child,
        addr,
        channel: mesh_testkit::connect(addr).await,
    };
    process.wait_for(name, ServingStatus::Serving).await;
    Ok(process)
}

/// `mesh <args>`, its standard input closed, for [`service_process`].
pub(super) fn mesh_command(
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> Result<tokio::process::Command, BenchError> {
    let mut command = tokio::process::Command::new(std::env::current_exe().map_err(setup)?);
    command.args(args).stdin(std::process::Stdio::null());
    Ok(command)
}

/// A user id and a token for it.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) id: String,
    pub(super) token: String,
}

/// A user token for `sub` from the kit's `keys`, valid for an hour.
pub(super) fn mint(keys: &Minter, sub: &str) -> String {
    let mut claims = keys.user_claims(sub, &format!("{sub}@bench.example"));
    // Long enough for any run.
    claims.exp = claims.iat + 3600;
    keys.sign(&claims)
}

/// `n` users with minted tokens and profiles created on users (16 at a time) over `channels`.
pub(super) async fn populate(
    keys: &Minter,
    channels: &Arc<Vec<Channel>>,
    n: usize,
) -> Result<Arc<Vec<Caller>>, BenchError> {
    // The population, created concurrently.
    let population: Vec<Caller> = (0..n)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            Caller {
                token: mint(keys, &id),
                id,
            }
        })
        .collect();
    let population = Arc::new(population);
    let next = Arc::new(AtomicUsize::new(0));
    let creators: Vec<_> = (0..16)
        .map(|worker| {
            let (population, next, channel) = (
                population.clone(),
                next.clone(),
                channels[worker % channels.len()].clone(),
            );
            tokio::spawn(async move {
                let mut client = UserServiceClient::new(channel);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(caller) = population.get(i) else {
                        return Ok(());
                    };
                    let request = CreateUserRequest {
                        user: Some(User {
                            display_name: format!("Bench user {i}"),
                            bio: "A profile made by mesh bench users.".into(),
                            ..User::default()
                        }),
                        request_id: String::new(),
                    };
                    client
                        .create_user(bearer(&caller.token, request))
                        .await
                        .map_err(|e| format!("create: {e}"))?;
                }
            })
        })
        .collect();
    for creator in creators {
        creator.await.map_err(setup)?.map_err(BenchError::Setup)?;
    }
    Ok(population)
}

pub(super) async fn channels_one(addr: std::net::SocketAddr) -> Result<Channel, BenchError> {
    channels(addr, 1)
        .await?
        .pop()
        .ok_or_else(|| BenchError::Setup("no channel".into()))
}

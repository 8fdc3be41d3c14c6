//! What the scenarios share: servers in-process on loopback, minted tokens, a population of
//! profiles.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use mesh_authn::{AuthnConfig, Claims};
use mesh_proto::users::v1::{CreateUserRequest, User, user_service_client::UserServiceClient};
use mesh_token::KeyRing;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::{BenchError, channels};

pub(super) fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(super) fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(super) use mesh_authn::bearer_request as bearer;

/// A server task on a loopback port and the means to stop it.
pub(super) struct Running {
    pub(super) addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Runs `serve(stopped)` (a server already bound to `addr`) as a task.
    pub(super) fn spawn<F, Fut>(addr: std::net::SocketAddr, serve: F) -> Result<Self, BenchError>
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let served = serve(Box::pin(async move {
            let _ = stopped.await;
        }));
        let task = tokio::spawn(async move {
            if let Err(err) = served.await {
                eprintln!("server at {addr} failed: {err}");
            }
        });
        Ok(Self { addr, stop, task })
    }

    /// Stops the server and waits for it.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

pub(super) async fn loopback() -> Result<(tokio::net::TcpListener, std::net::SocketAddr), BenchError>
{
    let listener = mesh_runtime::bind(([127, 0, 0, 1], 0).into())
        .await
        .map_err(setup)?;
    let addr = listener.local_addr().map_err(setup)?;
    Ok((listener, addr))
}

pub(super) async fn start_auth(
    data: &std::path::Path,
    service_clients: Vec<mesh_auth::ServiceClientSpec>,
) -> Result<Running, BenchError> {
    let data = data.to_owned();
    super::on_servers(async move { auth_here(&data, service_clients).await }).await
}

async fn auth_here(
    data: &std::path::Path,
    service_clients: Vec<mesh_auth::ServiceClientSpec>,
) -> Result<Running, BenchError> {
    let (listener, addr) = loopback().await?;
    let mut config = mesh_auth::Config::new(addr, data.to_owned());
    config.service_clients = service_clients;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(err) = mesh_auth::serve(&config, listener, async {
            let _ = stopped.await;
        })
        .await
        {
            eprintln!("auth failed: {err}");
        }
    });
    Ok(Running { addr, stop, task })
}

pub(super) async fn start_users(
    data: &std::path::Path,
    auth: std::net::SocketAddr,
    database_url: Option<String>,
) -> Result<Running, BenchError> {
    let data = data.to_owned();
    super::on_servers(async move { users_here(&data, auth, database_url).await }).await
}

async fn users_here(
    data: &std::path::Path,
    auth: std::net::SocketAddr,
    database_url: Option<String>,
) -> Result<Running, BenchError> {
    let (listener, addr) = loopback().await?;
    let authn = AuthnConfig::new(format!("http://{auth}").parse().map_err(setup)?);
    let mut config = mesh_users::Config::new(addr, data.to_owned(), authn);
    config.database_url = database_url;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(err) = mesh_users::serve(&config, listener, async {
            let _ = stopped.await;
        })
        .await
        {
            eprintln!("users failed: {err}");
        }
    });
    Ok(Running { addr, stop, task })
}

/// A user id and a token for it.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) id: String,
    pub(super) token: String,
}

pub(super) fn mint(ring: &KeyRing, sub: &str) -> String {
    let now = unix_now();
    ring.sign(&Claims {
        iss: "mesh-auth".into(),
        aud: vec!["mesh".into()],
        sub: sub.into(),
        email: Some(format!("{sub}@bench.example")),
        sid: Some(sub.into()),
        iat: now,
        nbf: now,
        // Long enough for any run.
        exp: now + 3600,
        jti: sub.into(),
    })
}

/// `n` users with minted tokens and profiles created on users (16 at a time) over `channels`.
pub(super) async fn populate(
    ring: &KeyRing,
    channels: &Arc<Vec<Channel>>,
    n: usize,
) -> Result<Arc<Vec<Caller>>, BenchError> {
    // The population, created concurrently.
    let population: Vec<Caller> = (0..n)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            Caller {
                token: mint(ring, &id),
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

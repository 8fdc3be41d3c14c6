//! `grpc.health.v1.Health` with the names and meanings of the mesh's contract.
//!
//! Four names are known:
//! - `""` (the whole server) and the server's own fully qualified service name share one
//!   status: `NOT_SERVING` while starting, `SERVING` once the server takes calls and the service
//!   says its dependencies are there, `NOT_SERVING` again while a dependency is down or while
//!   draining on shutdown — for monitoring;
//! - `readiness` is `SERVING` from the moment the server takes calls until it starts draining,
//!   whatever its dependencies say — for readiness probes: one dependency's outage must not take
//!   every replica out of its Service (calls that need the missing dependency answer
//!   `UNAVAILABLE` at once);
//! - `liveness` is `SERVING` for as long as the process works at all, so a liveness probe never
//!   restarts a pod that is merely not ready.
//!
//! Any other name is `NOT_FOUND` for `Check` (the name is not echoed whole: at most its first
//! 64 characters); for `Watch` it is a `SERVICE_UNKNOWN` message on an open stream, as the
//! health protocol says (tonic-health's own service ends the stream with `NOT_FOUND` instead,
//! which is why the mesh has its own).
//!
//! `Watch` streams are long-lived: they end when the server drains, after they have sent the
//! final `NOT_SERVING`.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt as _};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_server::HealthServer,
};

use crate::drain::Drain;

/// The health name a liveness probe asks for.
pub const LIVENESS: &str = "liveness";
/// The health name a readiness probe asks for.
pub const READINESS: &str = "readiness";
/// How much of an unknown name an error message shows.
const SHOWN_NAME_CHARS: usize = 64;

/// What the statuses are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct State {
    /// The server takes calls.
    started: bool,
    /// The service's dependencies are there (as it last said).
    dependencies: bool,
    /// Draining on shutdown: for good.
    draining: bool,
}

impl State {
    fn overall(self) -> ServingStatus {
        serving(self.started && self.dependencies && !self.draining)
    }

    fn readiness(self) -> ServingStatus {
        serving(self.started && !self.draining)
    }
}

fn serving(yes: bool) -> ServingStatus {
    if yes {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The health state of one server, cheap to clone and share with the service that owns it.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service_name: &'static str,
    state: watch::Sender<State>,
    drain: Drain,
}

impl Health {
    /// A new health state for `service_name`: not serving (still starting), live.
    pub fn new(service_name: &'static str, drain: Drain) -> Self {
        let (state, _) = watch::channel(State::default());
        Self {
            inner: Arc::new(Inner {
                service_name,
                state,
                drain,
            }),
        }
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        self.inner.state.send_if_modified(|state| {
            let before = *state;
            change(state);
            *state != before
        });
    }

    /// Says whether the service's dependencies are there: `""` and the service name are
    /// `SERVING` while they are (and the server takes calls). Once draining has begun the
    /// server stays `NOT_SERVING`, whatever is said here.
    pub fn set_ready(&self, ready: bool) {
        self.update(|state| state.dependencies = ready);
    }

    /// Marks the server as taking calls (done by [`crate::serve`] once it listens): `readiness`
    /// turns `SERVING`.
    pub fn mark_started(&self) {
        self.update(|state| state.started = true);
    }

    /// Whether `""` and the service name currently say `SERVING`.
    pub fn is_ready(&self) -> bool {
        self.inner.state.borrow().overall() == ServingStatus::Serving
    }

    /// Flips every name but `liveness` to `NOT_SERVING` for good: the server is draining.
    pub fn begin_draining(&self) {
        self.update(|state| state.draining = true);
    }

    /// The service name this health state reports for.
    pub fn service_name(&self) -> &'static str {
        self.inner.service_name
    }

    /// The tonic service answering `grpc.health.v1.Health`.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService {
            health: self.clone(),
        })
    }

    fn lookup(&self, name: &str) -> Option<Known> {
        if name == LIVENESS {
            Some(Known::Liveness)
        } else if name == READINESS {
            Some(Known::Readiness)
        } else if name.is_empty() || name == self.inner.service_name {
            Some(Known::Overall)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Known {
    Liveness,
    Readiness,
    Overall,
}

impl Known {
    fn status(self, state: State) -> ServingStatus {
        match self {
            Self::Liveness => ServingStatus::Serving,
            Self::Readiness => state.readiness(),
            Self::Overall => state.overall(),
        }
    }
}

/// At most the first [`SHOWN_NAME_CHARS`] characters of a name, for an error message.
fn shown(name: &str) -> String {
    let mut chars = name.chars();
    let head: String = chars.by_ref().take(SHOWN_NAME_CHARS).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

/// The `grpc.health.v1.Health` implementation made by [`Health::service`].
#[derive(Debug, Clone)]
pub struct HealthService {
    health: Health,
}

/// The stream type of `Watch`.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

fn reply(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let name = request.into_inner().service;
        match self.health.lookup(&name) {
            Some(known) => {
                let state = *self.health.inner.state.borrow();
                Ok(Response::new(reply(known.status(state))))
            }
            None => Err(Status::not_found(format!(
                "unknown service name `{}`",
                shown(&name)
            ))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let name = request.into_inner().service;
        let drain = self.health.inner.drain.clone();
        let stream: WatchStream = match self.health.lookup(&name) {
            Some(Known::Liveness) => Box::pin(once_then_hold(ServingStatus::Serving, drain)),
            Some(known) => Box::pin(watch_status(
                self.health.inner.state.subscribe(),
                known,
                drain,
            )),
            None => Box::pin(once_then_hold(ServingStatus::ServiceUnknown, drain)),
        };
        Ok(Response::new(stream))
    }
}

/// Sends the current status of `known` and every change; after the drain began, sends the last
/// status (if not yet sent) and ends.
fn watch_status(
    rx: watch::Receiver<State>,
    known: Known,
    drain: Drain,
) -> impl Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static {
    struct Watching {
        rx: watch::Receiver<State>,
        known: Known,
        drain: Drain,
        last: Option<ServingStatus>,
        ending: bool,
    }
    let state = Watching {
        rx,
        known,
        drain,
        last: None,
        ending: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            let current = st.known.status(*st.rx.borrow_and_update());
            if st.last != Some(current) {
                st.last = Some(current);
                return Some((Ok(reply(current)), st));
            }
            if st.ending {
                return None;
            }
            tokio::select! {
                changed = st.rx.changed() => {
                    if changed.is_err() {
                        st.ending = true;
                    }
                }
                () = st.drain.draining() => st.ending = true,
            }
        }
    })
}

/// Sends one status, then holds the stream open until the drain.
fn once_then_hold(
    status: ServingStatus,
    drain: Drain,
) -> impl Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static {
    let first = futures_util::stream::once(std::future::ready(Ok(reply(status))));
    let hold = futures_util::stream::once(async move { drain.draining().await })
        .filter_map(|()| std::future::ready(None));
    first.chain(hold)
}

/// Keeps `health` ready exactly while `check` passes, asking every `interval` (at least 50 ms)
/// until the task is dropped; logs each change. For the dependencies a server cannot serve
/// without (its database, or its downstream services).
pub async fn follow<F, Fut>(
    health: Health,
    interval: std::time::Duration,
    what: &'static str,
    check: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut was = None;
    loop {
        let ok = check().await;
        if was != Some(ok) {
            if ok {
                tracing::info!(dependency = what, "reachable: SERVING");
            } else {
                tracing::warn!(dependency = what, "unreachable: NOT_SERVING");
            }
            was = Some(ok);
        }
        health.set_ready(ok);
        tokio::time::sleep(interval.max(std::time::Duration::from_millis(50))).await;
    }
}

/// How often [`follow_database`] asks the database whether it answers.
pub const DATABASE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `health` ready while `ping` (e.g. `SELECT 1`) succeeds within 2 s, asking every
/// [`DATABASE_CHECK_INTERVAL`]: a service is NOT_SERVING while its database is away.
pub async fn follow_database<F, Fut, E>(health: Health, ping: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    follow(health, DATABASE_CHECK_INTERVAL, "database", move || {
        let pinged = ping();
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(2), pinged)
                .await
                .is_ok_and(|pinged| pinged.is_ok())
        }
    })
    .await;
}

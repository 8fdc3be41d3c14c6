//! Graceful shutdown: the drain signal that long-lived streams listen to, and the count of
//! in-flight calls the server waits for.
//!
//! On SIGTERM the server (see [`crate::serve`]) first marks health `NOT_SERVING` and fires the
//! [`Drain`], so that streams which would otherwise never end (health `Watch`, change-log
//! subscriptions) finish; it keeps accepting calls while [`InFlight`] says calls are still
//! running, up to the grace period; then it closes its connections.

use std::{
    future::Future as _,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::{Layer, Service};

/// Tells long-lived work that the server is shutting down. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
}

impl Drain {
    /// A drain that has not begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins the drain: every [`Drain::draining`] future completes.
    pub fn begin(&self) {
        self.token.cancel();
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once the drain has begun; use it to end long-lived streams.
    pub async fn draining(&self) {
        self.token.cancelled().await;
    }
}

/// Counts the calls in flight, from the arrival of a request until its response body has been
/// sent or dropped (so a server stream counts for as long as it streams), and cuts them off
/// when the grace period is over.
#[derive(Debug, Clone)]
pub struct InFlight {
    count: watch::Sender<usize>,
    cut_off: CancellationToken,
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl InFlight {
    /// A counter at zero.
    pub fn new() -> Self {
        Self {
            count: watch::channel(0).0,
            cut_off: CancellationToken::new(),
        }
    }

    /// Ends every counted call now: one still waiting for its handler is answered
    /// `UNAVAILABLE`, a streaming one ends with `UNAVAILABLE` trailers. Both are retryable, and
    /// the connection stays usable for the closing handshake.
    pub fn cut_off(&self) {
        self.cut_off.cancel();
    }

    /// How many calls are in flight now.
    pub fn current(&self) -> usize {
        *self.count.borrow()
    }

    /// Completes when no call is in flight.
    pub async fn idle(&self) {
        let mut rx = self.count.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn enter(&self) -> Guard {
        self.count.send_modify(|n| *n += 1);
        Guard {
            count: self.count.clone(),
        }
    }
}

/// Decrements the in-flight count when dropped.
#[derive(Debug)]
struct Guard {
    count: watch::Sender<usize>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Load shedding: at most `limit` calls of the service at once, not counting its long-lived
/// streaming methods; one more is answered `RESOURCE_EXHAUSTED` at once instead of queueing.
#[derive(Debug, Clone)]
pub struct Shed {
    permits: Arc<Semaphore>,
    /// Full paths (`/package.Service/Method`) of the methods not limited.
    exempt: Arc<[String]>,
}

impl Shed {
    /// At most `limit` calls at once, except those to the `exempt` full paths.
    pub fn new(limit: usize, exempt: Vec<String>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
            exempt: exempt.into(),
        }
    }
}

/// A tower layer counting the calls of the server's own service in an [`InFlight`], and
/// shedding those beyond the bound of a [`Shed`].
///
/// Health and reflection calls are neither counted nor shed: a health `Watch` must not hold the
/// drain open, and probes must be answered even under overload.
#[derive(Debug, Clone)]
pub struct InFlightLayer {
    in_flight: InFlight,
    shed: Option<Shed>,
}

impl InFlightLayer {
    /// Counts into `in_flight`, and sheds per `shed`.
    pub fn new(in_flight: InFlight, shed: Option<Shed>) -> Self {
        Self { in_flight, shed }
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService {
            inner,
            in_flight: self.in_flight.clone(),
            shed: self.shed.clone(),
        }
    }
}

/// The service made by [`InFlightLayer`].
#[derive(Debug, Clone)]
pub struct InFlightService<S> {
    inner: S,
    in_flight: InFlight,
    shed: Option<Shed>,
}

fn overloaded_status() -> tonic::Status {
    tonic::Status::resource_exhausted("the server is at its concurrency limit; retry later")
}

fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// How long a shed call's request may take to arrive in full before it is answered anyway.
const SHED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(100);
/// How much of a shed call's request is read (and thrown away) at most.
const SHED_DRAIN_BYTES: usize = 64 * 1024;

/// Reads and drops what is left of a shed call's request (at most [`SHED_DRAIN_BYTES`]).
///
/// Answered while the client is still sending, the stream would have to be reset; HTTP/2
/// servers count the streams they reset and send away a connection that makes them reset many
/// (the rapid-reset defence), taking the calls already accepted on it along. A refused request
/// read to its end closes normally.
async fn drain_request<B: Body + Unpin>(mut body: B) {
    let mut read = 0;
    while read < SHED_DRAIN_BYTES {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                read += frame.data_ref().map_or(0, bytes::Buf::remaining);
            }
            _ => return,
        }
    }
}

impl<S, B> Service<Request<B>> for InFlightService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
{
    type Response = Response<GuardedBody<tonic::body::Body>>;
    type Error = S::Error;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if is_infrastructure(path) {
            let future = self.inner.call(request);
            return Box::pin(async move {
                Ok(future.await?.map(|inner| GuardedBody {
                    inner,
                    guard: None,
                    permit: None,
                    cut_off: None,
                    ended: false,
                }))
            });
        }
        let permit = match &self.shed {
            Some(shed) if !shed.exempt.iter().any(|p| p == path) => {
                match shed.permits.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        let response = overloaded_status().into_http();
                        let body = request.into_body();
                        return Box::pin(async move {
                            let _ =
                                tokio::time::timeout(SHED_DRAIN_TIME, drain_request(body)).await;
                            Ok(response.map(|inner| GuardedBody {
                                inner,
                                guard: None,
                                permit: None,
                                cut_off: None,
                                ended: false,
                            }))
                        });
                    }
                }
            }
            _ => None,
        };
        let guard = self.in_flight.enter();
        let cut_off = self.in_flight.cut_off.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = tokio::select! {
                response = future => response?,
                () = cut_off.cancelled() => cut_off_status().into_http(),
            };
            Ok(response.map(|inner| GuardedBody {
                inner,
                guard: Some(guard),
                permit,
                cut_off: Some(Box::pin(cut_off.cancelled_owned())),
                ended: false,
            }))
        })
    }
}

fn cut_off_status() -> tonic::Status {
    tonic::Status::unavailable("the server is shutting down; retry")
}

pin_project_lite::pin_project! {
    /// A response body that holds its call's in-flight count (and its load-shedding permit)
    /// until it is done or dropped, and ends early with `UNAVAILABLE` trailers if the call is
    /// cut off.
    pub struct GuardedBody<B> {
        #[pin]
        inner: B,
        guard: Option<Guard>,
        permit: Option<OwnedSemaphorePermit>,
        cut_off: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        ended: bool,
    }
}

impl<B> std::fmt::Debug for GuardedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBody")
            .field("counted", &self.guard.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = bytes::Bytes>> Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(cut_off) = this.cut_off.as_mut()
            && cut_off.as_mut().poll(cx).is_ready()
        {
            // Cut off by the end of the grace period: finish the call with retryable trailers.
            *this.ended = true;
            this.guard.take();
            this.permit.take();
            let mut trailers = http::HeaderMap::new();
            if cut_off_status().add_header(&mut trailers).is_ok() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // The body is complete: the call is no longer in flight.
            *this.ended = true;
            this.guard.take();
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count follows guards, and `idle` completes only at zero.
    #[tokio::test]
    async fn in_flight_counts_guards() {
        let in_flight = InFlight::new();
        let a = in_flight.enter();
        let b = in_flight.enter();
        assert_eq!(in_flight.current(), 2);
        drop(a);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.expect("idle completes");
        assert_eq!(in_flight.current(), 0);
    }

    /// Health and reflection paths are infrastructure; the mesh's own are not.
    #[test]
    fn infrastructure_paths() {
        assert!(is_infrastructure("/grpc.health.v1.Health/Watch"));
        assert!(is_infrastructure(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_infrastructure("/mesh.auth.v1.AuthService/Login"));
    }

    /// A drain wakes every waiter.
    #[tokio::test]
    async fn drain_wakes_waiters() {
        let drain = Drain::new();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.draining().await }
        });
        assert!(!drain.is_draining());
        drain.begin();
        waiter.await.expect("drained");
        assert!(drain.is_draining());
    }
}

//! Admission: what a call may hold before and while it is served, and for how long.
//!
//! One tower layer ([`AdmissionLayer`]) decides, per call:
//!
//! - **the request first, the permit after.** For every method whose client sends one message
//!   (unary and server-streaming), the request is read in full before the call is counted
//!   against the concurrency limit: a client that sends headers and no body holds no permit.
//!   The request must arrive within the request timeout (`--request-timeout`), or the call is
//!   answered `DEADLINE_EXCEEDED` and everything it held is returned;
//! - **sizes per method.** Each method has its own largest request ([`MethodLimits`]), checked
//!   against the length each gRPC frame announces, before its payload is read:
//!   `RESOURCE_EXHAUSTED`, never tonic's `OUT_OF_RANGE`;
//! - **a budget of request bytes in flight** (a [`Quota`] of bytes): the bytes of requests read
//!   and not yet answered, in all and per peer address, so that concurrency × size fits the
//!   process's memory;
//! - **load shedding.** Beyond `--concurrency-limit` calls (a [`Quota`] of calls, a quarter of
//!   it per peer address, so no one address can take them all), one more is
//!   `RESOURCE_EXHAUSTED` at once rather than queued; long-lived streams, health and reflection
//!   are not counted. A unary call gives its permit and its request bytes back as soon as its
//!   handler has answered — a client that then never reads the answer (a zero HTTP/2 window)
//!   holds neither; a server stream holds them while it streams;
//! - **the caller's deadline.** A call whose `grpc-timeout` passes before its handler answers
//!   ends `DEADLINE_EXCEEDED`, and so does a server stream still open at its deadline (its
//!   trailers say so, at the next poll of its body: a client that stops reading leaves the
//!   body unpolled, and holds its stream until flow control or the connection's age ends it). tonic's own server timeout answers such a
//!   call `CANCELLED` ("Timeout expired") and ignores streams already answering; this layer's
//!   deadline is taken first, so it always wins that race;
//! - **the drain.** Calls are counted in the server's [`InFlight`], and cut off with
//!   `UNAVAILABLE` when the grace period ends.
//!
//! Methods whose client streams (bidirectional `LookupProfiles`, reflection) pass their body
//! through, each message limited as above; they are long-lived and not shed.
//!
//! tower's `ConcurrencyLimit` and `LoadShed` take their permit when the request's headers
//! arrive, which is exactly what the HTTP/2 slowloris attack exploits; tower-http's body limit
//! answers 413 rather than a gRPC status, so the mesh admits calls itself.

use std::{
    collections::HashMap,
    future::Future as _,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tonic::Status;
use tower::{Layer, Service};

use crate::{
    conn::{CallOnConn, PeerKey, conn_info},
    drain::{InFlight, InFlightGuard},
    limits::{HEADER_LEN, LimitedBody},
};

/// What admission knows of one method.
#[derive(Debug, Clone, Copy)]
pub struct MethodPolicy {
    /// The largest request message, in bytes.
    pub max_request_bytes: usize,
    /// The client streams messages: the body passes through, each message limited.
    pub client_streaming: bool,
    /// The server streams messages: the call holds what it was admitted with until its
    /// stream ends (a unary call only until its handler answers).
    pub server_streaming: bool,
    /// Counted against the concurrency limit (false for long-lived streams, health and
    /// reflection).
    pub shed: bool,
    /// Counted in the drain's in-flight calls and the byte budget (false for health and
    /// reflection, which must answer whatever else the server holds).
    pub counted: bool,
}

/// Per-method policies, by full path (`/package.Service/Method`).
#[derive(Debug, Clone, Default)]
pub struct MethodLimits {
    by_path: HashMap<String, MethodPolicy>,
}

impl MethodLimits {
    /// Adds (or replaces) the policy of `path`.
    pub fn insert(&mut self, path: String, policy: MethodPolicy) {
        self.by_path.insert(path, policy);
    }

    /// The policy of `path`; `None` for a path no service serves (tonic answers it
    /// UNIMPLEMENTED without reading it).
    pub fn get(&self, path: &str) -> Option<&MethodPolicy> {
        self.by_path.get(path)
    }
}

/// A quantity held by calls in flight — request bytes, concurrency permits — bounded in all
/// and per peer address (a share of the total each).
#[derive(Debug, Clone)]
pub struct Quota {
    total: Arc<Semaphore>,
    per_peer: Arc<Mutex<HashMap<PeerKey, usize>>>,
    per_peer_max: usize,
}

impl Quota {
    /// At most `total` in all, and `peer_percent` % of that per peer.
    pub fn new(total: usize, peer_percent: u8) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        let share = (total as u128 * u128::from(peer_percent.clamp(1, 100)) / 100) as usize;
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_peer: Arc::default(),
            per_peer_max: share.max(1),
        }
    }

    /// How much is free now.
    pub fn available(&self) -> usize {
        self.total.available_permits()
    }

    /// Takes `amount` for `peer`; `None` when either bound would be passed.
    fn take(&self, peer: Option<IpAddr>, amount: usize) -> Option<Held1> {
        let key = peer.map(PeerKey::of);
        if let Some(key) = key {
            let mut held = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
            let of_peer = held.entry(key).or_insert(0);
            if *of_peer + amount > self.per_peer_max {
                if *of_peer == 0 {
                    held.remove(&key);
                }
                return None;
            }
            *of_peer += amount;
        }
        let permit = u32::try_from(amount)
            .ok()
            .and_then(|n| self.total.clone().try_acquire_many_owned(n).ok());
        let taken = Held1 {
            _permit: permit,
            quota: self.clone(),
            key,
            amount,
        };
        // Dropping what was taken without its permit still returns the peer's share.
        taken._permit.is_some().then_some(taken)
    }
}

/// An amount of a [`Quota`] held by one call, returned when dropped.
#[derive(Debug)]
struct Held1 {
    _permit: Option<OwnedSemaphorePermit>,
    quota: Quota,
    key: Option<PeerKey>,
    amount: usize,
}

impl Drop for Held1 {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut held = self
                .quota
                .per_peer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(of_peer) = held.get_mut(&key) {
                *of_peer = of_peer.saturating_sub(self.amount);
                if *of_peer == 0 {
                    held.remove(&key);
                }
            }
        }
    }
}

/// The settings of [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission {
    /// Per-method policies.
    pub methods: Arc<MethodLimits>,
    /// The concurrency limit's permits.
    pub permits: Quota,
    /// Request bytes in flight.
    pub budget: Quota,
    /// How long a request message may take to arrive.
    pub request_timeout: Duration,
    /// The server's in-flight calls, for the drain.
    pub in_flight: InFlight,
}

/// The tower layer that admits calls (see the module docs).
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    admission: Admission,
}

impl AdmissionLayer {
    /// Admits calls per `admission`.
    pub fn new(admission: Admission) -> Self {
        Self { admission }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: self.admission.clone(),
        }
    }
}

/// The service made by [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Admission,
}

fn overloaded() -> Status {
    Status::resource_exhausted("the server is at its concurrency limit; retry later")
}

fn budget_exhausted() -> Status {
    Status::resource_exhausted("the server holds too many request bytes; retry later")
}

fn too_large(len: u64, max: usize) -> Status {
    Status::resource_exhausted(format!(
        "request message of {len} bytes is larger than this method's limit of {max} bytes"
    ))
}

fn deadline_passed() -> Status {
    Status::deadline_exceeded("the call's deadline passed")
}

fn cut_off_status() -> Status {
    Status::unavailable("the server is shutting down; retry")
}

/// The caller's `grpc-timeout` (`<1–8 digits><H|M|S|m|u|n>`), if valid: the same rule tonic
/// and every gRPC implementation read it with.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline a request's `grpc-timeout` sets, from now.
pub fn request_deadline(headers: &http::HeaderMap) -> Option<Instant> {
    let timeout = headers
        .get(mesh_proto::headers::GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)?;
    Instant::now().checked_add(timeout)
}

/// Reads a one-message request body in full: each frame's announced length checked against
/// `max` before its payload arrives, and the bytes reserved in `budget` as they come.
async fn read_request<B>(
    mut body: B,
    max: usize,
    budget: Option<(&Quota, Option<IpAddr>)>,
) -> Result<(Bytes, Option<Held1>), Status>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    let mut reservation = None;
    // One message (header and payload) at most.
    let mut expected: Option<usize> = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(frame) = frame else {
            return Err(Status::cancelled("the request body was not completed"));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if expected.is_none() && buf.len() >= HEADER_LEN {
            let len = u64::from((&buf[1..HEADER_LEN]).get_u32());
            if len > max as u64 {
                return Err(too_large(len, max));
            }
            let total = HEADER_LEN + len as usize;
            if let Some((budget, peer)) = budget {
                reservation = Some(budget.take(peer, total).ok_or_else(budget_exhausted)?);
            }
            expected = Some(total);
        }
        if buf.len() > expected.unwrap_or(HEADER_LEN) {
            return Err(Status::resource_exhausted(format!(
                "this method takes one request message of at most {max} bytes"
            )));
        }
    }
    Ok((buf.freeze(), reservation))
}

/// What a call holds until its response body has been sent or dropped (each returned by its
/// `Drop`).
#[derive(Debug, Default)]
struct Held {
    _in_flight: Option<InFlightGuard>,
    permit: Option<Held1>,
    reservation: Option<Held1>,
    _on_conn: Option<CallOnConn>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S> Service<Request<tonic::body::Body>> for AdmissionService<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<HeldBody<tonic::body::Body>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        // The deadline is read before anything else, so it is never later than tonic's own.
        let deadline = request_deadline(request.headers());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(policy) = self.admission.methods.get(request.uri().path()).copied() else {
            let future = inner.call(request);
            return Box::pin(async move { Ok(future.await?.map(HeldBody::bare)) });
        };
        let admission = self.admission.clone();
        let info = conn_info(request.extensions());
        let peer = info.map(|info| info.remote.ip());
        let mut held = Held {
            _on_conn: info.map(crate::conn::ConnInfo::open_call),
            _in_flight: policy.counted.then(|| admission.in_flight.enter()),
            ..Held::default()
        };
        let cut_off = admission.in_flight.cut_off_token();
        let cut_off_wait = admission.in_flight.cut_off_wait();
        Box::pin(async move {
            let admitted = async {
                if policy.client_streaming {
                    let limit = policy.max_request_bytes;
                    let request =
                        request.map(|body| tonic::body::Body::new(LimitedBody::new(body, limit)));
                    return Ok(inner.call(request).await);
                }
                let (parts, body) = request.into_parts();
                let budget = policy.counted.then_some((&admission.budget, peer));
                let read = tokio::time::timeout(
                    admission.request_timeout,
                    read_request(body, policy.max_request_bytes, budget),
                )
                .await;
                let (bytes, reservation) = match read {
                    Ok(Ok(read)) => read,
                    Ok(Err(status)) => return Err(status),
                    Err(_) => {
                        return Err(Status::deadline_exceeded(format!(
                            "the request message did not arrive within {:?}",
                            admission.request_timeout
                        )));
                    }
                };
                held.reservation = reservation;
                if policy.shed {
                    held.permit = Some(admission.permits.take(peer, 1).ok_or_else(overloaded)?);
                }
                let body = tonic::body::Body::new(http_body_util::Full::new(bytes));
                Ok(inner.call(Request::from_parts(parts, body)).await)
            };
            let answered = async {
                match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, admitted)
                        .await
                        .unwrap_or_else(|_| Err(deadline_passed())),
                    None => admitted.await,
                }
            };
            let outcome = tokio::select! {
                outcome = answered => outcome,
                () = cut_off.clone().cancelled_owned() => Err(cut_off_status()),
            };
            let response = match outcome {
                Ok(response) => response?,
                Err(status) => {
                    // Nothing more is held for a call answered here.
                    return Ok(status.into_http().map(HeldBody::bare));
                }
            };
            if !policy.server_streaming {
                // A unary call's work is done once its handler has answered: sending the answer
                // is flow control's business, and a client that never reads it must not keep
                // the permit or the request bytes.
                held.permit = None;
                held.reservation = None;
            }
            // A stream ends at the caller's deadline too, as gRPC has it: the client asked for
            // nothing later, and what the stream holds is given back.
            let deadline = deadline
                .filter(|_| policy.server_streaming)
                .map(|at| Box::pin(tokio::time::sleep_until(at)));
            Ok(response.map(|inner| HeldBody {
                inner,
                held,
                cut_off: Some(cut_off_wait),
                deadline,
                ended: false,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds what its call was admitted with — its in-flight count, its
    /// concurrency permit, its request bytes, its place on the connection — until it is done
    /// or dropped, and ends early with `UNAVAILABLE` trailers if the call is cut off.
    pub struct HeldBody<B> {
        #[pin]
        inner: B,
        held: Held,
        cut_off: Option<crate::drain::CutOffWait>,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        ended: bool,
    }
}

impl<B> HeldBody<B> {
    fn bare(inner: B) -> Self {
        Self {
            inner,
            held: Held::default(),
            cut_off: None,
            deadline: None,
            ended: false,
        }
    }

    /// Ends the call here with `status` in the trailers; it holds nothing any more.
    fn finish(
        ended: &mut bool,
        held: &mut Held,
        status: &Status,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
    where
        B: Body<Data = Bytes>,
    {
        *ended = true;
        *held = Held::default();
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_ok() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }
}

impl<B> std::fmt::Debug for HeldBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldBody")
            .field("held", &self.held)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for HeldBody<B> {
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
            && cut_off.poll_cut_off(cx).is_ready()
        {
            // Cut off by the end of the grace period: finish the call with retryable trailers.
            return Self::finish(this.ended, this.held, &cut_off_status());
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Self::finish(this.ended, this.held, &deadline_passed());
        }
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // The body is complete: the call holds nothing any more.
            *this.ended = true;
            *this.held = Held::default();
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

    /// Every unit of grpc-timeout, and malformed values refused.
    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "１S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    /// A quota holds in all and per peer, and gives back what a dropped reservation held.
    #[test]
    fn quota_bounds() {
        let budget = Quota::new(400, 25);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = budget.take(Some(a), 100).expect("within a's share");
        assert!(budget.take(Some(a), 1).is_none(), "a's share is a quarter");
        let b1 = budget.take(Some(b), 100).expect("b has its own share");
        let c = budget
            .take(None, 200)
            .expect("unknown peers share the rest");
        assert!(budget.take(None, 1).is_none(), "total reached");
        drop((a1, b1, c));
        assert_eq!(budget.available(), 400);
        assert!(budget.per_peer.lock().expect("lock").is_empty());
        // An IPv6 /64 is one peer.
        let v6a: IpAddr = "2001:db8::1".parse().expect("ip");
        let v6b: IpAddr = "2001:db8::2".parse().expect("ip");
        let _x = budget.take(Some(v6a), 100).expect("first");
        assert!(budget.take(Some(v6b), 1).is_none(), "same /64");
    }

    fn frame(len: u32) -> Bytes {
        let mut f = vec![0u8];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len as usize));
        f.into()
    }

    /// One message within the limit is read whole; an announced oversize or a second message
    /// is refused before it is read.
    #[tokio::test]
    async fn request_reading() {
        let ok = http_body_util::Full::new(frame(10));
        let (bytes, _) = read_request(ok, 16, None).await.expect("read");
        assert_eq!(bytes.len(), 15);
        let big = http_body_util::Full::new(frame(17));
        let err = read_request(big, 16, None).await.expect_err("too big");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let mut two = BytesMut::from(&frame(3)[..]);
        two.extend_from_slice(&frame(3));
        let err = read_request(http_body_util::Full::new(two.freeze()), 16, None)
            .await
            .expect_err("two messages");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let budget = Quota::new(40, 100);
        let err = read_request(
            http_body_util::Full::new(frame(16)),
            16,
            Some((&budget, None)),
        )
        .await
        .expect("fits");
        assert_eq!(budget.available(), 40 - 21);
        drop(err);
        assert_eq!(budget.available(), 40);
    }
}

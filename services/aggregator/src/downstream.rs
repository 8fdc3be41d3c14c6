//! Calls to auth and users: long-lived shared connections, and the context every downstream
//! call carries for its caller — the remaining deadline, the bearer token, the request id and
//! the trace context.
//!
//! Cancellation needs no code of its own: a downstream call is a future owned by the handler
//! (or the stream) serving the caller; when the caller goes away or its deadline passes, tonic
//! drops that handler and with it every outstanding call, whose HTTP/2 streams are reset.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use http::Uri;
use mesh_proto::{
    auth::v1::auth_service_client::AuthServiceClient,
    users::v1::user_service_client::UserServiceClient,
};
use tokio::time::Instant;
use tonic::{Code, Request, Status, metadata::MetadataValue, transport::Channel};

/// Attempts of one idempotent read, the first included.
pub const MAX_ATTEMPTS: u32 = 3;
/// The first retry waits about this long (with jitter); each further one twice as long.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Retries allowed per first attempt, over time: retries add at most this share of load to a
/// failing downstream.
pub const RETRY_RATIO: f64 = 0.2;
/// Retries that may be spent at once (and the budget a fresh process starts with).
pub const RETRY_RESERVE: f64 = 10.0;

/// Between `base` and 1.5 × `base`, so retrying callers do not move in step.
pub(crate) fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// A retry budget shared by all calls to the downstreams: each first attempt earns
/// [`RETRY_RATIO`] of a retry, each retry spends one, and at most [`RETRY_RESERVE`] can be
/// saved up — so a failing downstream sees at most about 20 % more calls, not three times as
/// many.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    balance: std::sync::Mutex<f64>,
}

impl RetryBudget {
    pub(crate) fn new() -> Self {
        Self {
            balance: std::sync::Mutex::new(RETRY_RESERVE),
        }
    }

    fn deposit(&self) {
        if let Ok(mut balance) = self.balance.lock() {
            *balance = (*balance + RETRY_RATIO).min(RETRY_RESERVE);
        }
    }

    fn try_withdraw(&self) -> bool {
        match self.balance.lock() {
            Ok(mut balance) if *balance >= 1.0 => {
                *balance -= 1.0;
                true
            }
            _ => false,
        }
    }
}

/// Time kept back from the caller's remaining deadline for each downstream call, so the answer
/// (or the deadline error) can still reach the caller in time.
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_millis(10);

/// A channel whose calls are traced: each gets a client span, sent as the callee's
/// `traceparent` (see [`mesh_telemetry::rpc`]).
pub(crate) type Traced = mesh_telemetry::ClientTrace<Channel>;

/// A few long-lived HTTP/2 connections to one service, used in turn: one connection's lock and
/// flow-control window are then not the ceiling.
#[derive(Debug)]
pub(crate) struct Pool {
    channels: Vec<Traced>,
    next: AtomicUsize,
}

impl Pool {
    /// `connections` channels to `uri`, each balanced over every address its host name resolves
    /// to (one connection per endpoint; see [`mesh_authn::balance`]).
    pub(crate) fn new(uri: &Uri, connections: usize) -> Self {
        let trace = mesh_telemetry::ClientTraceLayer::new(uri);
        let channels = (0..connections.max(1))
            .map(|_| tower::Layer::layer(&trace, mesh_authn::balance::balanced_channel(uri)))
            .collect();
        Self {
            channels,
            next: AtomicUsize::new(0),
        }
    }

    /// The next channel in turn.
    pub(crate) fn channel(&self) -> Traced {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
}

/// The two downstream services.
#[derive(Debug)]
pub(crate) struct Downstreams {
    auth: Pool,
    users: Pool,
    budget: RetryBudget,
}

impl Downstreams {
    pub(crate) fn new(auth: Pool, users: Pool) -> Self {
        Self {
            auth,
            users,
            budget: RetryBudget::new(),
        }
    }

    /// The retry budget all reads share.
    pub(crate) fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    pub(crate) fn auth(&self) -> AuthServiceClient<Traced> {
        AuthServiceClient::new(self.auth.channel())
    }

    pub(crate) fn users(&self) -> UserServiceClient<Traced> {
        UserServiceClient::new(self.users.channel())
    }

    pub(crate) fn auth_channel(&self) -> Traced {
        self.auth.channel()
    }

    pub(crate) fn users_channel(&self) -> Traced {
        self.users.channel()
    }
}

/// Metadata passed on from the caller to every downstream call made for it.
const FORWARDED: [&str; 3] = ["x-request-id", "traceparent", "tracestate"];

/// What every downstream call made for one caller carries.
#[derive(Debug, Clone)]
pub(crate) struct CallContext {
    deadline: Instant,
    token: Option<String>,
    forwarded: Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>,
}

/// The caller's `grpc-timeout` (`<1–8 digits><H|M|S|m|u|n>`), if valid.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
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

impl CallContext {
    /// The context of `request`: its deadline (`grpc-timeout`, else `default_deadline`, from
    /// now), its verified bearer token if any, and its request id and trace context.
    pub(crate) fn of<T>(request: &Request<T>, default_deadline: Duration) -> Self {
        let metadata = request.metadata();
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default_deadline);
        let mut forwarded = Vec::new();
        for key in FORWARDED {
            if let Some(value) = metadata.get(key) {
                forwarded.push((key, value.clone()));
            }
        }
        // A request id the caller did not send was generated by the request-id layer.
        if !forwarded.iter().any(|(k, _)| *k == "x-request-id")
            && let Some(id) = request.extensions().get::<mesh_telemetry::RequestId>()
            && let Ok(value) = id.as_str().parse()
        {
            forwarded.push(("x-request-id", value));
        }
        Self {
            deadline: Instant::now() + timeout,
            token: request
                .extensions()
                .get::<mesh_authn::BearerToken>()
                .map(|t| t.0.clone()),
            forwarded,
        }
    }

    /// The same call with another bearer token (e.g. the one a sign-up just got).
    pub(crate) fn with_token(&self, token: String) -> Self {
        Self {
            token: Some(token),
            ..self.clone()
        }
    }

    /// The same caller with a fresh deadline of `timeout`: for work that must finish even
    /// when the caller has gone (undoing a half-made sign-up).
    pub(crate) fn detached(&self, timeout: Duration) -> Self {
        Self {
            deadline: Instant::now() + timeout,
            ..self.clone()
        }
    }

    /// Time left, less the margin; `DEADLINE_EXCEEDED` when none is left, so an expired call
    /// does no downstream work.
    pub(crate) fn remaining(&self) -> Result<Duration, Status> {
        self.deadline
            .checked_duration_since(Instant::now())
            .and_then(|left| left.checked_sub(DEADLINE_MARGIN))
            .filter(|left| !left.is_zero())
            .ok_or_else(|| Status::deadline_exceeded("the call's deadline has passed"))
    }

    /// An idempotent read: `call` with a request for `message`, tried again on UNAVAILABLE
    /// (at most [`MAX_ATTEMPTS`] in all) after a growing, jittered pause — only while the
    /// caller's deadline leaves time for it and the shared [`RetryBudget`] allows. Never used
    /// for calls that change something.
    pub(crate) async fn read<M, T, F, Fut>(
        &self,
        budget: &RetryBudget,
        message: M,
        mut call: F,
    ) -> Result<T, Status>
    where
        M: Clone,
        F: FnMut(Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        budget.deposit();
        let mut attempt = 1;
        loop {
            let failure = match call(self.request(message.clone())?).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if !(failure.code() == Code::Unavailable || never_sent(&failure))
                || attempt >= MAX_ATTEMPTS
            {
                return Err(failure);
            }
            let pause = jitter(BACKOFF_BASE * 2u32.pow(attempt - 1));
            let time_left = self.remaining().is_ok_and(|left| left > pause);
            if !time_left || !budget.try_withdraw() {
                return Err(failure);
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// A downstream request for `message`, with the remaining deadline, the token, the
    /// request id and the trace context.
    pub(crate) fn request<T>(&self, message: T) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        request.set_timeout(self.remaining()?);
        let metadata = request.metadata_mut();
        for (key, value) in &self.forwarded {
            metadata.insert(*key, value.clone());
        }
        if let Some(token) = &self.token {
            mesh_authn::set_bearer(&mut request, token);
        }
        Ok(request)
    }
}

/// Whether a failed downstream call never reached the downstream: the connection closed (a
/// GOAWAY from a draining server) while the request still waited to be written. tonic reports
/// that as CANCELLED (hyper's "connection closed"), but nothing was cancelled and nothing ran:
/// it is as retryable as UNAVAILABLE. Every mesh server echoes `x-request-id`, so a status
/// without it was not the downstream's answer.
pub(crate) fn never_sent(status: &Status) -> bool {
    status.code() == Code::Cancelled && status.metadata().get("x-request-id").is_none()
}

/// A downstream failure as the caller sees it: the codes that mean something to a client pass
/// through with the downstream's message (the mesh's own, safe to show); anything else is
/// INTERNAL, logged here and never shown.
pub(crate) fn relay(what: &'static str, status: Status) -> Status {
    if never_sent(&status) {
        return Status::unavailable(format!("{what} is unavailable; retry"));
    }
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Aborted
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::OutOfRange
        | Code::Cancelled => {
            let mut relayed = Status::new(status.code(), status.message());
            if let Some(retry_after) = status.metadata().get("retry-after") {
                relayed
                    .metadata_mut()
                    .insert("retry-after", retry_after.clone());
            }
            relayed
        }
        Code::DeadlineExceeded => Status::deadline_exceeded(format!("{what}: deadline exceeded")),
        Code::Unavailable => {
            tracing::warn!(
                downstream = what,
                message = status.message(),
                "downstream unavailable"
            );
            Status::unavailable(format!("{what} is unavailable; retry"))
        }
        code => {
            tracing::error!(
                downstream = what,
                ?code,
                message = status.message(),
                "downstream failed"
            );
            Status::internal("internal error")
        }
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

    /// Internals never reach the caller; meaningful codes pass through.
    #[test]
    fn relayed_statuses() {
        let internal = relay("users", Status::internal("db exploded at /var/lib/x"));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("db"));
        let unknown = relay("users", Status::unknown("panic at foo.rs:12"));
        assert_eq!(
            (unknown.code(), unknown.message()),
            (Code::Internal, "internal error")
        );
        let not_found = relay("users", Status::not_found("no user with id x"));
        assert_eq!(
            (not_found.code(), not_found.message()),
            (Code::NotFound, "no user with id x")
        );
        let down = relay(
            "users",
            Status::unavailable("tcp connect error 127.0.0.1:50053"),
        );
        assert_eq!(down.code(), Code::Unavailable);
        assert!(!down.message().contains("127.0.0.1"));
        // A request the closing connection never sent is retryable, not the caller's cancel.
        let unsent = relay("users", Status::cancelled("operation was canceled"));
        assert_eq!(unsent.code(), Code::Unavailable);
        let mut answered = Status::cancelled("the call was cancelled");
        answered
            .metadata_mut()
            .insert("x-request-id", "abc".parse().expect("ascii"));
        assert_eq!(relay("users", answered).code(), Code::Cancelled);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    /// The budget starts with the reserve, earns a fifth of a retry per call and never saves
    /// more than the reserve.
    #[test]
    fn retry_budget() {
        let budget = RetryBudget::new();
        let spent = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(spent, RETRY_RESERVE as usize);
        for _ in 0..100 {
            budget.deposit();
        }
        let spent = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(spent, RETRY_RESERVE as usize, "capped at the reserve");
        for _ in 0..5 {
            budget.deposit();
        }
        assert!(budget.try_withdraw(), "five calls earn one retry");
        assert!(!budget.try_withdraw());
    }
}

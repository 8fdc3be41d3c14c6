//! Bearer-token authentication for the mesh's servers (users and the aggregator).
//!
//! Tokens are verified locally — no auth round trip per request — against the public keys auth
//! publishes with `GetJwks`. [`JwksCache`] fetches them on first use, keeps them, and fetches
//! again when a token names an unknown `kid` (a key rotation), at most once per
//! [`JwksCache::MIN_REFETCH`] so a flood of made-up key ids cannot hammer auth.
//!
//! [`AuthLayer`] wraps a generated server: every method not declared public needs
//! `authorization: Bearer <token>`; a missing, malformed, expired, tampered or wrongly-signed
//! token is `UNAUTHENTICATED`, and when auth's keys cannot be fetched the call is `UNAVAILABLE`
//! (retryable). On success the typed [`Claims`] and the raw [`BearerToken`] (for downstream
//! calls made for the caller) are put into the request's extensions.

pub mod balance;
mod config;

pub use config::{AuthnConfig, DEFAULT_AUTH_URL, parse_url};

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_proto::auth::v1::{GetJwksRequest, auth_service_client::AuthServiceClient};
use mesh_token::{Jwks, TokenError, Verifier};
use tokio::sync::{Mutex, RwLock};
use tonic::{Status, server::NamedService, transport::Channel};
use tower::{Layer, Service};

pub use mesh_token::Claims;

/// The caller's raw access token, kept for calls made downstream on the caller's behalf.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    /// No `authorization: Bearer …` metadata.
    #[error("missing bearer token")]
    Missing,
    /// The token failed verification.
    #[error("invalid token: {0}")]
    Invalid(#[from] TokenError),
    /// auth's keys could not be fetched.
    #[error("cannot fetch auth's signing keys")]
    KeysUnavailable(#[source] Status),
}

impl From<AuthnError> for Status {
    fn from(err: AuthnError) -> Self {
        match err {
            AuthnError::Missing | AuthnError::Invalid(_) => {
                Status::unauthenticated("missing or invalid access token")
            }
            AuthnError::KeysUnavailable(_) => {
                Status::unavailable("cannot verify tokens right now; retry")
            }
        }
    }
}

/// auth's public keys, fetched with `GetJwks` and cached.
#[derive(Debug)]
pub struct JwksCache {
    client: AuthServiceClient<mesh_telemetry::ClientTrace<Channel>>,
    issuer: String,
    audience: String,
    verifier: RwLock<Option<Verifier>>,
    /// When keys were last fetched; also serialises fetches.
    last_fetch: Mutex<Option<Instant>>,
    min_refetch: Duration,
    leeway_secs: i64,
    fetches: std::sync::atomic::AtomicU64,
    /// Tokens already verified with the current keys, by their exact text: a client sends the
    /// same token for its whole life, and an Ed25519 check costs far more than a lookup. Only
    /// valid tokens get in (garbage cannot fill it), times are checked again on every use, and
    /// new keys empty it.
    verified: std::sync::Mutex<HashMap<Box<str>, Claims>>,
    verified_hits: std::sync::atomic::AtomicU64,
}

/// Verified tokens kept at most; when full, the cache starts again empty.
pub const MAX_VERIFIED_TOKENS: usize = 10_000;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl JwksCache {
    /// The default shortest time between two fetches triggered by unknown key ids.
    pub const MIN_REFETCH: Duration = Duration::from_secs(5);
    /// Clock skew allowed on `exp` and `nbf` by default.
    pub const LEEWAY_SECS: i64 = 30;

    /// A cache of the keys of the auth service behind `channel`, for tokens from `issuer` to
    /// `audience`.
    pub fn new(channel: Channel, issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            // Key fetches are traced like any outgoing call (a child of the call that needed
            // the keys).
            client: AuthServiceClient::new(tower::Layer::layer(
                &mesh_telemetry::ClientTraceLayer::default(),
                channel,
            )),
            issuer: issuer.into(),
            audience: audience.into(),
            verifier: RwLock::new(None),
            last_fetch: Mutex::new(None),
            min_refetch: Self::MIN_REFETCH,
            leeway_secs: Self::LEEWAY_SECS,
            fetches: std::sync::atomic::AtomicU64::new(0),
            verified: std::sync::Mutex::new(HashMap::new()),
            verified_hits: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many verifications were answered from the verified-token cache.
    pub fn verified_hits(&self) -> u64 {
        self.verified_hits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The same cache allowing `leeway` of clock skew on `exp` and `nbf`.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway_secs = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// The same cache with another bound between fetches triggered by unknown key ids.
    pub fn with_min_refetch(mut self, min_refetch: Duration) -> Self {
        self.min_refetch = min_refetch;
        self
    }

    /// How many times keys were fetched (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fetches the keys unless another caller did so within `min_interval`.
    async fn refresh(&self, min_interval: Duration) -> Result<(), AuthnError> {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < min_interval) {
            return Ok(());
        }
        *last = Some(Instant::now());
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(GetJwksRequest {});
        request.set_timeout(Duration::from_secs(5));
        let reply = client
            .get_jwks(request)
            .await
            .map_err(AuthnError::KeysUnavailable)?
            .into_inner();
        let jwks = Jwks::from_json(&reply.jwks_json)
            .map_err(|_| AuthnError::KeysUnavailable(Status::internal("bad JWKS document")))?;
        let verifier = Verifier::new(&jwks, &self.issuer, &self.audience, self.leeway_secs)
            .map_err(|_| AuthnError::KeysUnavailable(Status::internal("bad key in JWKS")))?;
        tracing::info!(keys = jwks.keys.len(), "fetched auth's signing keys");
        let mut current = self.verifier.write().await;
        // Tokens verified with the old keys are verified again: a key may have been withdrawn.
        if let Ok(mut verified) = self.verified.lock() {
            verified.clear();
        }
        *current = Some(verifier);
        Ok(())
    }

    /// Verifies `token`, fetching keys first if none are known and again (rate-limited) if the
    /// token names a key not yet seen.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthnError> {
        if self.verifier.read().await.is_none() {
            // The first fetch is not rate-limited, but a failed one is retried at most every
            // second.
            self.refresh(Duration::from_secs(1)).await?;
        }
        let result = self.verify_now(token).await;
        match result {
            Err(AuthnError::Invalid(TokenError::UnknownKey(_))) => {
                self.refresh(self.min_refetch).await?;
                self.verify_now(token).await
            }
            other => other,
        }
    }

    async fn verify_now(&self, token: &str) -> Result<Claims, AuthnError> {
        let guard = self.verifier.read().await;
        let verifier = guard
            .as_ref()
            .ok_or_else(|| AuthnError::KeysUnavailable(Status::unavailable("no keys yet")))?;
        let now = unix_now();
        let known = self
            .verified
            .lock()
            .ok()
            .and_then(|verified| verified.get(token).cloned());
        if let Some(claims) = known {
            verifier.check_time(&claims, now)?;
            self.verified_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(claims);
        }
        let claims = verifier.verify(token, now)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= MAX_VERIFIED_TOKENS {
                verified.clear();
            }
            verified.insert(token.into(), claims.clone());
        }
        Ok(claims)
    }
}

/// Puts `authorization: Bearer <token>` on an outgoing request. A token that cannot be a
/// header value (auth never issues one) is left off, so the call is refused as
/// unauthenticated instead of panicking.
pub fn set_bearer<T>(request: &mut tonic::Request<T>, token: &str) {
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
}

/// `message` as an outgoing request carrying `token` (see [`set_bearer`]).
pub fn bearer_request<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    set_bearer(&mut request, token);
    request
}

/// The bearer token of `headers`, if well-formed (`Bearer <token>`, scheme case-insensitive).
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A tower layer requiring a valid bearer token on every method but the public ones.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    cache: Arc<JwksCache>,
    public: &'static [&'static str],
}

impl AuthLayer {
    /// Verifies with `cache`; `public` lists the methods (by name, e.g. `Login`) that need no
    /// token.
    pub fn new(cache: Arc<JwksCache>, public: &'static [&'static str]) -> Self {
        Self { cache, public }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            cache: self.cache.clone(),
            public: self.public,
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    cache: Arc<JwksCache>,
    public: &'static [&'static str],
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        if self.public.contains(&method) {
            return Box::pin(self.inner.call(request));
        }
        // The service that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cache = self.cache.clone();
        Box::pin(async move {
            let token = bearer_token(request.headers()).map(str::to_owned);
            let verified = match token {
                None => Err(AuthnError::Missing),
                Some(token) => cache.verify(&token).await.map(|claims| (claims, token)),
            };
            match verified {
                Ok((claims, token)) => {
                    request.extensions_mut().insert(claims);
                    request.extensions_mut().insert(BearerToken(token));
                    inner.call(request).await
                }
                Err(err) => {
                    tracing::debug!(reason = %err, "request refused");
                    Ok(Status::from(err).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `Bearer <token>` (any case of the scheme) yields a token.
    #[test]
    fn bearer_parsing() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        for (value, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("abc", None),
        ] {
            headers.insert(http::header::AUTHORIZATION, value.parse().expect("header"));
            assert_eq!(bearer_token(&headers), want, "{value}");
        }
    }
}

//! Bearer-token authentication for the mesh's servers (users and the aggregator).
//!
//! Tokens are verified locally — no auth round trip per request — against the public keys auth
//! publishes with `GetJwks`. [`JwksCache`] fetches them on first use, keeps them, and fetches
//! again when a token names an unknown `kid` (a key rotation), at most once per
//! [`JwksCache::MIN_REFETCH`] so a flood of made-up key ids cannot hammer auth, and every
//! [`KEY_REFETCH`] in any case.
//!
//! Local verification alone would keep accepting a logged-out session's tokens until they
//! expire. So each verifier also follows auth's `WatchRevocations` stream ([`JwksCache::follow`]):
//! the sessions ended by Logout, refresh-token reuse or account deletion, and the current key
//! set. A token whose `sid` is revoked, or whose key was withdrawn, is refused within moments of
//! the change (the stream's latency), each revocation kept until the tokens it covers have
//! expired.
//!
//! [`AuthLayer`] wraps a generated server: every method not declared public needs
//! `authorization: Bearer <token>`; a missing, malformed, expired, tampered or wrongly-signed
//! token is `UNAUTHENTICATED`, and when auth's keys cannot be fetched the call is `UNAVAILABLE`
//! (retryable). On success the typed [`Claims`] and the raw [`BearerToken`] (for downstream
//! calls made for the caller) are put into the request's extensions.

mod config;

pub use config::{AuthnConfig, DEFAULT_AUTH_URL, parse_url};

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use mesh_proto::auth::v1::{
    GetJwksRequest, WatchRevocationsRequest, auth_service_client::AuthServiceClient,
};
use mesh_runtime::bounded::{BoundedMap, key16};
use mesh_runtime::client::Traced;
use mesh_token::{Jwks, TokenError, Verifier};
use sha2::Digest as _;
use tokio::sync::{Mutex, RwLock};
use tonic::{Status, server::NamedService};
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
    /// The token's session has ended (logout, refresh-token reuse, account deletion).
    #[error("the token's session is revoked")]
    Revoked,
}

impl From<AuthnError> for Status {
    fn from(err: AuthnError) -> Self {
        match err {
            AuthnError::Missing | AuthnError::Invalid(_) | AuthnError::Revoked => {
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
    client: AuthServiceClient<Traced>,
    issuer: String,
    audience: String,
    verifier: RwLock<Option<Verifier>>,
    /// When keys were last fetched; also serialises fetches.
    last_fetch: Mutex<Option<Instant>>,
    min_refetch: Duration,
    leeway_secs: i64,
    max_lifetime_secs: i64,
    fetches: std::sync::atomic::AtomicU64,
    /// The JWK Set the verifier was built from, to tell a changed key set from the same one.
    jwks_json: std::sync::Mutex<String>,
    /// Tokens already verified with the current keys (revocation is checked again on every
    /// use; new keys empty it).
    verified: VerifiedTokens,
    /// Revoked sessions (by [`key16`] of their id) and when each may be forgotten (Unix ms),
    /// from auth's `WatchRevocations`.
    revoked: std::sync::RwLock<HashMap<[u8; 16], i64>>,
    /// Whether the revocation stream's snapshot has arrived since start-up.
    following: AtomicBool,
}

/// Tokens already verified, by the SHA-256 of their text: a client sends the same token for
/// its whole life, and an Ed25519 check costs far more than a lookup. Only valid tokens get in
/// (garbage cannot fill it), their times are checked again on every use, and it is a
/// [`BoundedMap`]: at most [`MAX_VERIFIED_TOKENS`], each for at most [`VERIFIED_TOKEN_AGE`],
/// the oldest going first. Used by every [`JwksCache`], and by auth for the tokens it checks
/// itself.
#[derive(Debug)]
pub struct VerifiedTokens {
    tokens: std::sync::Mutex<BoundedMap<[u8; 32], Claims>>,
    hits: std::sync::atomic::AtomicU64,
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        Self::new()
    }
}

impl VerifiedTokens {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            tokens: std::sync::Mutex::new(BoundedMap::new(MAX_VERIFIED_TOKENS, VERIFIED_TOKEN_AGE)),
            hits: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `token`'s claims at `now` (Unix seconds): from the cache, with their times checked
    /// again, or verified with `verifier` and kept if valid. Use one cache per key set.
    pub fn verify(&self, verifier: &Verifier, token: &str, now: i64) -> Result<Claims, TokenError> {
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let at = tokio::time::Instant::now();
        let known = self
            .tokens
            .lock()
            .ok()
            .and_then(|mut tokens| tokens.get_mut(&key, at).cloned());
        if let Some(claims) = known {
            verifier.check_time(&claims, now)?;
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(claims);
        }
        let claims = verifier.verify(token, now)?;
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.get_or_insert_with(key, at, || claims.clone());
        }
        Ok(claims)
    }

    /// Forgets every token (the keys they were verified with have changed).
    pub fn clear(&self) {
        if let Ok(mut tokens) = self.tokens.lock() {
            *tokens = BoundedMap::new(MAX_VERIFIED_TOKENS, VERIFIED_TOKEN_AGE);
        }
    }

    /// How many verifications the cache answered.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Verified tokens kept at most (about 5 MiB of claims and keys); when full, the oldest go.
pub const MAX_VERIFIED_TOKENS: usize = 10_000;
/// How long a verified token is kept in the cache (it is still checked on each use).
pub const VERIFIED_TOKEN_AGE: Duration = Duration::from_secs(15 * 60);
/// How often keys are fetched again even when no token names an unknown one: a key withdrawn
/// from auth stops being trusted within this long even if the revocation stream is down.
pub const KEY_REFETCH: Duration = Duration::from_secs(60);
/// The longest wait between two attempts to follow auth's revocations.
const MAX_FOLLOW_BACKOFF: Duration = Duration::from_secs(2);

use mesh_proto::time::unix_now;

impl JwksCache {
    /// The default shortest time between two fetches triggered by unknown key ids.
    pub const MIN_REFETCH: Duration = Duration::from_secs(5);

    /// A cache of the keys of the auth service behind `channel` (traced like every outgoing
    /// call: a key fetch is a child of the call that needed the keys), for tokens from
    /// `issuer` to `audience`.
    pub fn new(channel: Traced, issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            client: AuthServiceClient::new(channel),
            issuer: issuer.into(),
            audience: audience.into(),
            verifier: RwLock::new(None),
            last_fetch: Mutex::new(None),
            min_refetch: Self::MIN_REFETCH,
            leeway_secs: mesh_token::DEFAULT_LEEWAY_SECS,
            max_lifetime_secs: mesh_token::DEFAULT_MAX_LIFETIME_SECS,
            fetches: std::sync::atomic::AtomicU64::new(0),
            jwks_json: std::sync::Mutex::new(String::new()),
            verified: VerifiedTokens::new(),
            revoked: std::sync::RwLock::new(HashMap::new()),
            following: AtomicBool::new(false),
        }
    }

    /// The same cache accepting token lifetimes (`exp` − `iat`) of at most `lifetime`.
    pub fn with_max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime_secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Whether the revocation stream's snapshot has arrived (revocations are being followed).
    pub fn is_following(&self) -> bool {
        self.following.load(Ordering::SeqCst)
    }

    /// How many revoked sessions are known.
    pub fn revoked_sessions(&self) -> usize {
        self.revoked.read().map_or(0, |revoked| revoked.len())
    }

    fn is_revoked(&self, sid: &str) -> bool {
        self.revoked
            .read()
            .is_ok_and(|revoked| revoked.contains_key(&key16(&[sid.as_bytes()])))
    }

    /// Forgets revoked sessions whose tokens have all expired (every [`KEY_REFETCH`]).
    fn forget_expired(&self) {
        let now_ms = unix_now().saturating_mul(1000);
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.retain(|_, forget_at| *forget_at > now_ms);
        }
    }

    /// Adds revoked sessions.
    fn add_revoked(&self, sessions: &[mesh_proto::auth::v1::RevokedSession]) {
        if sessions.is_empty() {
            return;
        }
        if let Ok(mut revoked) = self.revoked.write() {
            for session in sessions {
                let forget_at = session
                    .expire_time
                    .as_ref()
                    .map_or(i64::MAX, |t| t.seconds.saturating_mul(1000));
                revoked.insert(key16(&[session.session_id.as_bytes()]), forget_at);
            }
        }
    }

    /// Makes `jwks_json` the key set, if it differs from the current one: tokens verified with
    /// the old set are verified again (a key may have been withdrawn).
    async fn apply_jwks(&self, jwks_json: &str) -> Result<(), AuthnError> {
        if self
            .jwks_json
            .lock()
            .is_ok_and(|current| current.as_str() == jwks_json)
            && self.verifier.read().await.is_some()
        {
            return Ok(());
        }
        let jwks = Jwks::from_json(jwks_json)
            .map_err(|_| AuthnError::KeysUnavailable(Status::internal("bad JWKS document")))?;
        let verifier = Verifier::new(&jwks, &self.issuer, &self.audience, self.leeway_secs)
            .map_err(|_| AuthnError::KeysUnavailable(Status::internal("bad key in JWKS")))?
            .with_max_lifetime(self.max_lifetime_secs);
        let mut current = self.verifier.write().await;
        self.verified.clear();
        if let Ok(mut json) = self.jwks_json.lock() {
            *json = jwks_json.to_owned();
        }
        *current = Some(verifier);
        tracing::info!(keys = jwks.keys.len(), "auth's signing keys set");
        Ok(())
    }

    /// Follows auth's `WatchRevocations` until dropped: revoked sessions and key-set changes,
    /// reconnecting with backoff when the stream ends; and fetches the keys again every
    /// [`KEY_REFETCH`]. Spawn it beside the server that uses this cache.
    pub async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut refetch = tokio::time::interval(KEY_REFETCH);
        refetch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut said_down = false;
        loop {
            let mut client = self.client.clone();
            let opened = tokio::select! {
                opened = client.watch_revocations(WatchRevocationsRequest {}) => opened,
                _ = refetch.tick() => {
                    self.refetch_keys().await;
                    continue;
                }
            };
            match opened {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        let message = tokio::select! {
                            message = stream.message() => message,
                            _ = refetch.tick() => {
                                self.refetch_keys().await;
                                continue;
                            }
                        };
                        let Ok(Some(message)) = message else {
                            break;
                        };
                        if !message.jwks_json.is_empty()
                            && let Err(err) = self.apply_jwks(&message.jwks_json).await
                        {
                            tracing::warn!(error = %err, "bad key set on the revocation stream");
                        }
                        self.add_revoked(&message.sessions);
                        if message.snapshot_complete {
                            self.following.store(true, Ordering::SeqCst);
                            if said_down {
                                tracing::info!("following auth's revocations again");
                                said_down = false;
                            }
                            backoff = Duration::from_millis(100);
                        }
                    }
                }
                Err(status) => {
                    if !said_down {
                        tracing::warn!(error = %status, "cannot follow auth's revocations; retrying");
                        said_down = true;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_FOLLOW_BACKOFF);
        }
    }

    async fn refetch_keys(&self) {
        self.forget_expired();
        if let Err(err) = self.refresh(Duration::ZERO).await {
            tracing::debug!(error = %err, "periodic key fetch failed");
        }
    }

    /// How many verifications were answered from the verified-token cache.
    pub fn verified_hits(&self) -> u64 {
        self.verified.hits()
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
        self.apply_jwks(&reply.jwks_json).await
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
        let claims = self.verified.verify(verifier, token, unix_now())?;
        if claims
            .sid
            .as_deref()
            .is_some_and(|sid| self.is_revoked(sid))
        {
            return Err(AuthnError::Revoked);
        }
        Ok(claims)
    }
}

/// Puts `authorization: Bearer <token>` on an outgoing request. A token that cannot be a
/// header value (auth never issues one) is left off, so the call is refused as
/// unauthenticated instead of panicking.
pub fn set_bearer<T>(request: &mut tonic::Request<T>, token: &str) {
    if let Ok(value) = format!("Bearer {token}").parse() {
        request
            .metadata_mut()
            .insert(mesh_proto::headers::AUTHORIZATION, value);
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
    mesh_token::parse_bearer(headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
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

//! The tonic implementation of `mesh.auth.v1.AuthService`: parse and validate each request,
//! call the domain and the store, map the result back.

use std::{sync::Arc, time::Duration};

use mesh_proto::auth::v1::{
    DeleteAccountRequest, DeleteAccountResponse, GetJwksRequest, GetJwksResponse,
    IssueServiceTokenRequest, IssueServiceTokenResponse, Jwk, ListSessionsRequest,
    ListSessionsResponse, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
    RefreshRequest, RefreshResponse, RegisterRequest, RegisterResponse, Session, TokenPair,
    ValidateTokenRequest, ValidateTokenResponse, WatchRevocationsRequest,
    auth_service_server::{AuthService, AuthServiceServer},
};
use mesh_proto::time::{timestamp_from_unix_ms as timestamp_ms, unix_now_ms as now_ms};
use mesh_token::Claims;
use tonic::{Request, Response, Status};

use crate::{
    clients::ServiceClients,
    domain::{self, Email, MAX_EMAIL_CHARS, PasswordHasher, Throttle, account_key},
    error::AuthError,
    revocations::{RevocationFeed, RevocationStream},
    store::{AuthStore, Credentials, NewSession, Revoking, Rotation},
    tokens::{TokenIssuer, unix_now},
};

/// How long a session lasts from its login; rotation does not extend it.
pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Failed password checks per account allowed within [`THROTTLE_WINDOW`].
pub(crate) const LOGIN_FAILURE_LIMIT: u32 = 5;
/// The window of the failure throttle.
pub(crate) const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Live sessions one account may have; a login beyond it ends the oldest.
pub const MAX_SESSIONS_PER_ACCOUNT: usize = 50;
/// How long past the access-token lifetime a revocation is published: verifiers allow some
/// clock skew on `exp` (30 s by default), and clocks differ.
pub(crate) const REVOCATION_MARGIN: Duration = Duration::from_secs(5 * 60);
/// `WatchRevocations` followers one auth process serves (a few per users or aggregator
/// process); one more is RESOURCE_EXHAUSTED.
pub const MAX_REVOCATION_FOLLOWERS: usize = 1024;

/// The longest client id or secret looked at; anything longer cannot be a configured one.
const MAX_CLIENT_FIELD_BYTES: usize = 1024;
/// The longest refresh token looked at; real ones are 43 characters.
const MAX_REFRESH_TOKEN_BYTES: usize = 256;

/// The largest request of each method, where the server-wide 4 MiB is far more than it needs:
/// an e-mail (254 characters of up to 4 bytes) and a password (1024 bytes) fit in 4 KiB, a
/// refresh token (43 characters) in 1 KiB, an access token (at most 8 KiB) in 16 KiB.
pub const REQUEST_LIMITS: &[(&str, usize)] = &[
    ("Register", 4 * 1024),
    ("Login", 4 * 1024),
    ("Refresh", 1024),
    ("Logout", 1024),
    ("ValidateToken", 16 * 1024),
    ("GetJwks", 1024),
    ("ListSessions", 1024),
    ("DeleteAccount", 4 * 1024),
    ("IssueServiceToken", 4 * 1024),
    ("WatchRevocations", 1024),
];

/// The auth service's gRPC handlers.
#[derive(Debug, Clone)]
pub struct AuthServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    issuer: TokenIssuer,
    clients: ServiceClients,
    store: Arc<dyn AuthStore>,
    hasher: PasswordHasher,
    throttle: Arc<Throttle>,
    revocations: Arc<RevocationFeed>,
}

fn timestamp(unix_seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_seconds,
        nanos: 0,
    }
}

fn lifetime_ms() -> i64 {
    i64::try_from(SESSION_LIFETIME.as_millis()).unwrap_or(i64::MAX)
}

/// The bearer token of a request's metadata (one parser for the whole mesh).
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    mesh_token::parse_bearer(
        request
            .metadata()
            .get(mesh_proto::headers::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())?,
    )
}

impl AuthServer {
    pub(crate) fn new(
        issuer: TokenIssuer,
        clients: ServiceClients,
        store: Arc<dyn AuthStore>,
        hasher: PasswordHasher,
        revocations: Arc<RevocationFeed>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                clients,
                store,
                hasher,
                throttle: Arc::new(Throttle::new(LOGIN_FAILURE_LIMIT, THROTTLE_WINDOW)),
                revocations,
            }),
        }
    }

    /// The tonic service, accepting request messages up to `limits.max_request_bytes` and
    /// sending responses up to `limits.max_response_bytes`.
    pub fn into_service(self, limits: &mesh_runtime::ServerConfig) -> AuthServiceServer<Self> {
        AuthServiceServer::new(self)
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes)
    }

    /// How many password hash operations are queued or running (for metrics).
    pub fn hash_queue_depth(&self) -> usize {
        self.inner.hasher.queued()
    }
}

impl Inner {
    /// Now, and when revocations made now may be forgotten.
    fn revoking(&self) -> Revoking {
        let now = now_ms();
        let cover = self.issuer.ttl() + REVOCATION_MARGIN;
        Revoking {
            now,
            forget_at: now.saturating_add(i64::try_from(cover.as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// Starts a session for `credentials` and issues its tokens.
    async fn start_session(
        &self,
        credentials: &Credentials,
        create_account: bool,
    ) -> Result<TokenPair, AuthError> {
        let revoking = self.revoking();
        let now = revoking.now;
        let session_id = uuid::Uuid::now_v7().to_string();
        let (refresh_token, refresh_hash) = domain::new_refresh_token()?;
        let session = NewSession {
            session_id: session_id.clone(),
            user_id: credentials.user_id.clone(),
            refresh_hash,
            now,
            expire_time: now.saturating_add(lifetime_ms()),
        };
        if create_account {
            self.store
                .create_account(credentials, now, &session)
                .await?;
        } else {
            let ended = self
                .store
                .create_session(&session, MAX_SESSIONS_PER_ACCOUNT, revoking)
                .await?;
            if ended > 0 {
                tracing::info!(ended, "oldest sessions ended: too many live sessions");
                self.revocations.wake();
            }
        }
        Ok(self.token_pair(credentials, &session_id, refresh_token, session.expire_time))
    }

    fn token_pair(
        &self,
        credentials: &Credentials,
        session_id: &str,
        refresh_token: String,
        session_expire_ms: i64,
    ) -> TokenPair {
        let access = self.issuer.issue_user(
            &credentials.user_id,
            &credentials.email,
            session_id,
            unix_now(),
        );
        TokenPair {
            access_token: access.token,
            refresh_token,
            token_type: "Bearer".to_owned(),
            access_token_expire_time: Some(timestamp(access.expires_at)),
            refresh_token_expire_time: Some(timestamp_ms(session_expire_ms)),
        }
    }

    /// Verifies an access token online: signature, claims, and (for a user) a live session.
    /// The token's claims if its signature, issuer, audience and times are right; its session
    /// is not looked at.
    fn verify_signature(&self, token: &str) -> Result<Claims, AuthError> {
        self.issuer.verify(token, unix_now()).map_err(|err| {
            tracing::debug!(reason = %err, "access token refused");
            AuthError::BadToken
        })
    }

    async fn validate(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.verify_signature(token)?;
        if claims.is_service() {
            return Ok(claims);
        }
        let sid = claims.sid.as_deref().ok_or(AuthError::BadToken)?;
        if self.store.session_live(sid, now_ms()).await? {
            Ok(claims)
        } else {
            Err(AuthError::BadToken)
        }
    }

    /// The caller's claims from `authorization: Bearer …`, checked online; a user's only.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Claims, AuthError> {
        let token = bearer(request).ok_or(AuthError::BadToken)?;
        let claims = self.validate(token).await?;
        if claims.is_service() {
            return Err(AuthError::PermissionDenied(
                "a service token has no account or sessions",
            ));
        }
        Ok(claims)
    }

    async fn register(&self, request: RegisterRequest) -> Result<RegisterResponse, AuthError> {
        let RegisterRequest { email, password } = request;
        let email = Email::parse(&email)?;
        domain::check_password(&password)?;
        let password_hash = self.hasher.hash(password).await?;
        let credentials = Credentials {
            user_id: uuid::Uuid::now_v7().to_string(),
            email: email.as_str().to_owned(),
            password_hash,
        };
        let tokens = self.start_session(&credentials, true).await?;
        tracing::info!(user_id = %credentials.user_id, "registered");
        Ok(RegisterResponse {
            user_id: credentials.user_id,
            tokens: Some(tokens),
        })
    }

    /// Checks the e-mail and password for their bounds, then the password against the account
    /// within its failure throttle (reserved before the Argon2id check, settled after).
    async fn login(&self, request: LoginRequest) -> Result<LoginResponse, AuthError> {
        let LoginRequest { email, password } = request;
        let trimmed = email.trim();
        if trimmed.is_empty() {
            return Err(AuthError::InvalidArgument("email must not be empty".into()));
        }
        // Bounded before it is used as a key or compared with anything.
        if trimmed.chars().count() > MAX_EMAIL_CHARS {
            return Err(AuthError::InvalidArgument(format!(
                "email must be at most {MAX_EMAIL_CHARS} characters"
            )));
        }
        if password.is_empty() || password.len() > *domain::PASSWORD_BYTES.end() {
            return Err(AuthError::InvalidArgument(
                "password must be 1 to 1024 bytes".into(),
            ));
        }
        let attempt = self
            .throttle
            .reserve(account_key(trimmed))
            .map_err(AuthError::Throttled)?;
        let credentials = match self
            .store
            .credentials_by_email(&Email::throttle_key(trimmed))
            .await
        {
            Ok(credentials) => credentials,
            Err(err) => {
                attempt.abandoned();
                return Err(err.into());
            }
        };
        let phc = credentials.as_ref().map(|c| c.password_hash.clone());
        // Unknown e-mails are verified against a dummy hash: the same time, the same answer.
        let matches = match self.hasher.verify(password, phc).await {
            Ok(matches) => matches,
            Err(err) => {
                attempt.abandoned();
                return Err(err);
            }
        };
        let Some(credentials) = credentials.filter(|_| matches) else {
            attempt.failed();
            tracing::info!("login refused: bad credentials");
            return Err(AuthError::BadCredentials);
        };
        attempt.succeeded();
        let tokens = self.start_session(&credentials, false).await?;
        tracing::info!(user_id = %credentials.user_id, "logged in");
        Ok(LoginResponse {
            user_id: credentials.user_id,
            tokens: Some(tokens),
        })
    }

    async fn refresh(&self, request: RefreshRequest) -> Result<RefreshResponse, AuthError> {
        let token = request.refresh_token;
        if token.is_empty() || token.len() > MAX_REFRESH_TOKEN_BYTES {
            return Err(AuthError::BadCredentials);
        }
        let (new_token, new_hash) = domain::new_refresh_token()?;
        let outcome = self
            .store
            .rotate(&domain::refresh_hash(&token), &new_hash, self.revoking())
            .await?;
        match outcome {
            Rotation::Rotated(session, email) => {
                let credentials = Credentials {
                    user_id: session.user_id.clone(),
                    email,
                    password_hash: String::new(),
                };
                let tokens = self.token_pair(
                    &credentials,
                    &session.session_id,
                    new_token,
                    session.expire_time,
                );
                Ok(RefreshResponse {
                    tokens: Some(tokens),
                })
            }
            Rotation::Reused => {
                tracing::warn!("refresh token reused: its session is revoked");
                self.revocations.wake();
                Err(AuthError::BadCredentials)
            }
            Rotation::Invalid => Err(AuthError::BadCredentials),
        }
    }

    async fn logout(&self, request: LogoutRequest) -> Result<LogoutResponse, AuthError> {
        let token = request.refresh_token;
        if !token.is_empty() && token.len() <= MAX_REFRESH_TOKEN_BYTES {
            let hash = domain::refresh_hash(&token);
            let ended = self.store.revoke_by_refresh(&hash, self.revoking()).await?;
            if ended {
                self.revocations.wake();
            }
            tracing::info!(ended, "logout");
        }
        Ok(LogoutResponse {})
    }

    async fn validate_token(
        &self,
        request: ValidateTokenRequest,
    ) -> Result<ValidateTokenResponse, AuthError> {
        let claims = self.validate(&request.access_token).await?;
        Ok(ValidateTokenResponse {
            user_id: claims.sub,
            email: claims.email.unwrap_or_default(),
            session_id: claims.sid.unwrap_or_default(),
            expire_time: Some(timestamp(claims.exp)),
        })
    }

    fn get_jwks(&self) -> GetJwksResponse {
        let jwks = self.issuer.jwks();
        let keys = jwks
            .keys
            .iter()
            .map(|k| Jwk {
                kid: k.kid.clone(),
                kty: k.kty.clone(),
                crv: k.crv.clone(),
                x: k.x.clone(),
                alg: k.alg.clone(),
                r#use: k.use_.clone(),
            })
            .collect();
        GetJwksResponse {
            keys,
            jwks_json: jwks.to_json(),
        }
    }

    /// One query: the caller's live sessions, which must hold the token's own (the token is
    /// refused otherwise, as [`Self::validate`] would: the same rule, without its query).
    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<ListSessionsResponse, AuthError> {
        let token = bearer(&request).ok_or(AuthError::BadToken)?;
        let claims = self.verify_signature(token)?;
        if claims.is_service() {
            return Err(AuthError::PermissionDenied(
                "a service token has no account or sessions",
            ));
        }
        let current = claims.sid.ok_or(AuthError::BadToken)?;
        let live = self.store.live_sessions(&claims.sub, now_ms()).await?;
        if !live.iter().any(|s| s.session_id == current) {
            return Err(AuthError::BadToken);
        }
        let sessions = live
            .into_iter()
            .map(|s| Session {
                current: s.session_id == current,
                session_id: s.session_id,
                create_time: Some(timestamp_ms(s.create_time)),
                last_use_time: Some(timestamp_ms(s.last_use_time)),
                expire_time: Some(timestamp_ms(s.expire_time)),
            })
            .collect();
        Ok(ListSessionsResponse { sessions })
    }

    /// Needs the caller's token and password, within the account's failure throttle.
    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<DeleteAccountResponse, AuthError> {
        let claims = self.caller(&request).await?;
        let password = request.into_inner().password;
        if password.len() > *domain::PASSWORD_BYTES.end() {
            return Err(AuthError::BadCredentials);
        }
        let account = claims.email.as_deref().unwrap_or(claims.sub.as_str());
        let attempt = self
            .throttle
            .reserve(account_key(account))
            .map_err(AuthError::Throttled)?;
        let credentials = match self.store.credentials_by_user(&claims.sub).await {
            Ok(credentials) => credentials,
            Err(err) => {
                attempt.abandoned();
                return Err(err.into());
            }
        };
        let phc = credentials.map(|c| c.password_hash);
        match self.hasher.verify(password, phc).await {
            Ok(true) => attempt.succeeded(),
            Ok(false) => {
                attempt.failed();
                return Err(AuthError::BadCredentials);
            }
            Err(err) => {
                attempt.abandoned();
                return Err(err);
            }
        }
        self.store
            .delete_account(&claims.sub, self.revoking())
            .await?;
        self.revocations.wake();
        tracing::info!(user_id = %claims.sub, "account deleted");
        Ok(DeleteAccountResponse {})
    }

    fn issue_service_token(
        &self,
        request: IssueServiceTokenRequest,
    ) -> Result<IssueServiceTokenResponse, AuthError> {
        let IssueServiceTokenRequest {
            client_id,
            client_secret,
        } = request;
        let client_id = client_id.trim();
        if client_id.is_empty() {
            return Err(AuthError::InvalidArgument(
                "client_id must not be empty".into(),
            ));
        }
        if client_id.len() > MAX_CLIENT_FIELD_BYTES || client_secret.len() > MAX_CLIENT_FIELD_BYTES
        {
            return Err(AuthError::BadCredentials);
        }
        if !self.clients.verify(client_id, &client_secret) {
            tracing::info!(client_id, "service token refused: bad client credentials");
            return Err(AuthError::BadCredentials);
        }
        let issued = self.issuer.issue_service(client_id, unix_now());
        tracing::info!(client_id, "service token issued");
        Ok(IssueServiceTokenResponse {
            access_token: issued.token,
            expire_time: Some(timestamp(issued.expires_at)),
        })
    }

    async fn watch_revocations(&self) -> Result<RevocationStream, AuthError> {
        if self.revocations.subscribers() >= MAX_REVOCATION_FOLLOWERS {
            return Err(AuthError::Exhausted(
                "this auth process serves its maximum of WatchRevocations followers",
            ));
        }
        Ok(self.revocations.subscribe(self.issuer.jwks().to_json()))
    }
}

/// Runs `work` in a task of its own, to its end even if the caller goes away (the aggregator
/// has the same helper for its multi-step calls).
async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, AuthError>> + Send + 'static,
) -> Result<T, AuthError> {
    tokio::spawn(tracing::Instrument::in_current_span(work))
        .await
        .map_err(|_| AuthError::Internal("a call's task failed".into()))?
}

#[tonic::async_trait]
impl AuthService for AuthServer {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(
            self.inner.register(request.into_inner()).await?,
        ))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        // Run to the end even if the caller goes away: the attempt is settled with its real
        // outcome, so cancelling calls neither locks an account nor escapes the count.
        let inner = self.inner.clone();
        let request = request.into_inner();
        Ok(Response::new(
            to_completion(async move { inner.login(request).await }).await?,
        ))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        Ok(Response::new(
            self.inner.refresh(request.into_inner()).await?,
        ))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        Ok(Response::new(
            self.inner.logout(request.into_inner()).await?,
        ))
    }

    async fn validate_token(
        &self,
        request: Request<ValidateTokenRequest>,
    ) -> Result<Response<ValidateTokenResponse>, Status> {
        Ok(Response::new(
            self.inner.validate_token(request.into_inner()).await?,
        ))
    }

    async fn get_jwks(
        &self,
        _request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(self.inner.get_jwks()))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        Ok(Response::new(self.inner.list_sessions(request).await?))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        // As for Login: the password check is settled whether or not the caller waits.
        let inner = self.inner.clone();
        Ok(Response::new(
            to_completion(async move { inner.delete_account(request).await }).await?,
        ))
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<IssueServiceTokenResponse>, Status> {
        Ok(Response::new(
            self.inner.issue_service_token(request.into_inner())?,
        ))
    }

    type WatchRevocationsStream = RevocationStream;

    async fn watch_revocations(
        &self,
        _request: Request<WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        Ok(Response::new(self.inner.watch_revocations().await?))
    }
}

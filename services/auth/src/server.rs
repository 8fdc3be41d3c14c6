//! The tonic implementation of `mesh.auth.v1.AuthService`: parse and validate each request,
//! call the domain and the store, map the result back.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_proto::auth::v1::{
    DeleteAccountRequest, DeleteAccountResponse, GetJwksRequest, GetJwksResponse,
    IssueServiceTokenRequest, IssueServiceTokenResponse, Jwk, ListSessionsRequest,
    ListSessionsResponse, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
    RefreshRequest, RefreshResponse, RegisterRequest, RegisterResponse, Session, TokenPair,
    ValidateTokenRequest, ValidateTokenResponse,
    auth_service_server::{AuthService, AuthServiceServer},
};
use mesh_proto::time::{timestamp_from_unix_ms as timestamp_ms, unix_now_ms as now_ms};
use mesh_token::Claims;
use tonic::{Request, Response, Status};

use crate::{
    clients::ServiceClients,
    domain::{self, Email, PasswordHasher, Throttle},
    error::AuthError,
    store::{AuthStore, Credentials, NewSession, Rotation},
    tokens::{TokenIssuer, unix_now},
};

/// How long a session lasts from its login; rotation does not extend it.
pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Failed logins per e-mail allowed within [`THROTTLE_WINDOW`].
pub(crate) const LOGIN_FAILURE_LIMIT: u32 = 5;
/// Failed logins per peer address allowed within [`THROTTLE_WINDOW`] (many users may share one
/// address, so the bound is looser).
pub(crate) const PEER_FAILURE_LIMIT: u32 = 100;
/// The window of login throttling.
pub(crate) const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The longest client id or secret looked at; anything longer cannot be a configured one.
const MAX_CLIENT_FIELD_BYTES: usize = 1024;
/// The longest refresh token looked at; real ones are 43 characters.
const MAX_REFRESH_TOKEN_BYTES: usize = 256;

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
    by_email: Throttle,
    by_peer: Throttle,
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

impl AuthServer {
    pub(crate) fn new(
        issuer: TokenIssuer,
        clients: ServiceClients,
        store: Arc<dyn AuthStore>,
        hasher: PasswordHasher,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                clients,
                store,
                hasher,
                by_email: Throttle::new(LOGIN_FAILURE_LIMIT, THROTTLE_WINDOW),
                by_peer: Throttle::new(PEER_FAILURE_LIMIT, THROTTLE_WINDOW),
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
    /// Starts a session for `credentials` and issues its tokens.
    async fn start_session(
        &self,
        credentials: &Credentials,
        create_account: bool,
    ) -> Result<TokenPair, AuthError> {
        let now = now_ms();
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
            self.store.create_session(&session).await?;
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
    async fn validate(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.issuer.verify(token, unix_now()).map_err(|err| {
            tracing::debug!(reason = %err, "access token refused");
            AuthError::BadToken
        })?;
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
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::BadToken)?;
        let claims = self.validate(token).await?;
        if claims.is_service() {
            return Err(AuthError::PermissionDenied(
                "a service token has no account or sessions",
            ));
        }
        Ok(claims)
    }
}

fn peer_key<T>(request: &Request<T>) -> Option<String> {
    request
        .remote_addr()
        .map(|addr| format!("peer:{}", addr.ip()))
}

#[tonic::async_trait]
impl AuthService for AuthServer {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let RegisterRequest { email, password } = request.into_inner();
        let email = Email::parse(&email)?;
        domain::check_password(&password)?;
        let password_hash = self.inner.hasher.hash(password).await?;
        let credentials = Credentials {
            user_id: uuid::Uuid::now_v7().to_string(),
            email: email.as_str().to_owned(),
            password_hash,
        };
        let tokens = self.inner.start_session(&credentials, true).await?;
        tracing::info!(user_id = %credentials.user_id, "registered");
        Ok(Response::new(RegisterResponse {
            user_id: credentials.user_id,
            tokens: Some(tokens),
        }))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let peer = peer_key(&request);
        let LoginRequest { email, password } = request.into_inner();
        if email.trim().is_empty() {
            return Err(AuthError::InvalidArgument("email must not be empty".into()).into());
        }
        if password.is_empty() || password.len() > *domain::PASSWORD_BYTES.end() {
            return Err(
                AuthError::InvalidArgument("password must be 1 to 1024 bytes".into()).into(),
            );
        }
        let inner = &self.inner;
        let key = Email::throttle_key(&email);
        let now = Instant::now();
        inner
            .by_email
            .check(&key, now)
            .map_err(AuthError::Throttled)?;
        if let Some(peer) = &peer {
            inner
                .by_peer
                .check(peer, now)
                .map_err(AuthError::Throttled)?;
        }
        let credentials = inner
            .store
            .credentials_by_email(&key)
            .await
            .map_err(AuthError::from)?;
        let phc = credentials.as_ref().map(|c| c.password_hash.clone());
        // Unknown e-mails are verified against a dummy hash: the same time, the same answer.
        let matches = inner.hasher.verify(password, phc).await?;
        let Some(credentials) = credentials.filter(|_| matches) else {
            inner.by_email.fail(&key, Instant::now());
            if let Some(peer) = &peer {
                inner.by_peer.fail(peer, Instant::now());
            }
            tracing::info!("login refused: bad credentials");
            return Err(AuthError::BadCredentials.into());
        };
        inner.by_email.clear(&key);
        let tokens = inner.start_session(&credentials, false).await?;
        tracing::info!(user_id = %credentials.user_id, "logged in");
        Ok(Response::new(LoginResponse {
            user_id: credentials.user_id,
            tokens: Some(tokens),
        }))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        let token = request.into_inner().refresh_token;
        if token.is_empty() || token.len() > MAX_REFRESH_TOKEN_BYTES {
            return Err(AuthError::BadCredentials.into());
        }
        let (new_token, new_hash) = domain::new_refresh_token()?;
        let outcome = self
            .inner
            .store
            .rotate(&domain::refresh_hash(&token), &new_hash, now_ms())
            .await
            .map_err(AuthError::from)?;
        match outcome {
            Rotation::Rotated(session, email) => {
                let credentials = Credentials {
                    user_id: session.user_id.clone(),
                    email,
                    password_hash: String::new(),
                };
                let tokens = self.inner.token_pair(
                    &credentials,
                    &session.session_id,
                    new_token,
                    session.expire_time,
                );
                Ok(Response::new(RefreshResponse {
                    tokens: Some(tokens),
                }))
            }
            Rotation::Reused => {
                tracing::warn!("refresh token reused: its session is revoked");
                Err(AuthError::BadCredentials.into())
            }
            Rotation::Invalid => Err(AuthError::BadCredentials.into()),
        }
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let token = request.into_inner().refresh_token;
        if !token.is_empty() && token.len() <= MAX_REFRESH_TOKEN_BYTES {
            let hash = domain::refresh_hash(&token);
            let ended = self
                .inner
                .store
                .revoke_by_refresh(&hash, now_ms())
                .await
                .map_err(AuthError::from)?;
            tracing::info!(ended, "logout");
        }
        Ok(Response::new(LogoutResponse {}))
    }

    async fn validate_token(
        &self,
        request: Request<ValidateTokenRequest>,
    ) -> Result<Response<ValidateTokenResponse>, Status> {
        let token = request.into_inner().access_token;
        let claims = self.inner.validate(&token).await?;
        Ok(Response::new(ValidateTokenResponse {
            user_id: claims.sub,
            email: claims.email.unwrap_or_default(),
            session_id: claims.sid.unwrap_or_default(),
            expire_time: Some(timestamp(claims.exp)),
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        let jwks = self.inner.issuer.jwks();
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
        Ok(Response::new(GetJwksResponse {
            keys,
            jwks_json: jwks.to_json(),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let claims = self.inner.caller(&request).await?;
        let current = claims.sid.unwrap_or_default();
        let sessions = self
            .inner
            .store
            .live_sessions(&claims.sub, now_ms())
            .await
            .map_err(AuthError::from)?
            .into_iter()
            .map(|s| Session {
                current: s.session_id == current,
                session_id: s.session_id,
                create_time: Some(timestamp_ms(s.create_time)),
                last_use_time: Some(timestamp_ms(s.last_use_time)),
                expire_time: Some(timestamp_ms(s.expire_time)),
            })
            .collect();
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        let claims = self.inner.caller(&request).await?;
        let password = request.into_inner().password;
        if password.len() > *domain::PASSWORD_BYTES.end() {
            return Err(AuthError::BadCredentials.into());
        }
        let credentials = self
            .inner
            .store
            .credentials_by_user(&claims.sub)
            .await
            .map_err(AuthError::from)?;
        let phc = credentials.map(|c| c.password_hash);
        if !self.inner.hasher.verify(password, phc).await? {
            return Err(AuthError::BadCredentials.into());
        }
        self.inner
            .store
            .delete_account(&claims.sub)
            .await
            .map_err(AuthError::from)?;
        tracing::info!(user_id = %claims.sub, "account deleted");
        Ok(Response::new(DeleteAccountResponse {}))
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<IssueServiceTokenResponse>, Status> {
        let IssueServiceTokenRequest {
            client_id,
            client_secret,
        } = request.into_inner();
        let client_id = client_id.trim();
        if client_id.is_empty() {
            return Err(AuthError::InvalidArgument("client_id must not be empty".into()).into());
        }
        if client_id.len() > MAX_CLIENT_FIELD_BYTES || client_secret.len() > MAX_CLIENT_FIELD_BYTES
        {
            return Err(AuthError::BadCredentials.into());
        }
        if !self.inner.clients.verify(client_id, &client_secret) {
            tracing::info!(client_id, "service token refused: bad client credentials");
            return Err(AuthError::BadCredentials.into());
        }
        let issued = self.inner.issuer.issue_service(client_id, unix_now());
        tracing::info!(client_id, "service token issued");
        Ok(Response::new(IssueServiceTokenResponse {
            access_token: issued.token,
            expire_time: Some(timestamp(issued.expires_at)),
        }))
    }
}

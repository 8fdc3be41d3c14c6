//! The tonic implementation of `mesh.auth.v1.AuthService`.

use mesh_proto::auth::v1::Jwk;
use mesh_proto::auth::v1::{
    DeleteAccountRequest, DeleteAccountResponse, GetJwksRequest, GetJwksResponse,
    IssueServiceTokenRequest, IssueServiceTokenResponse, ListSessionsRequest, ListSessionsResponse,
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, RefreshRequest, RefreshResponse,
    RegisterRequest, RegisterResponse, ValidateTokenRequest, ValidateTokenResponse,
    auth_service_server::{AuthService, AuthServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{
    clients::ServiceClients,
    error::AuthError,
    tokens::{TokenIssuer, unix_now},
};

/// The auth service's gRPC handlers.
#[derive(Debug, Clone)]
pub struct AuthServer {
    issuer: TokenIssuer,
    clients: ServiceClients,
}

/// The longest client id or secret looked at; anything longer cannot be a configured one.
const MAX_CLIENT_FIELD_BYTES: usize = 1024;

fn timestamp(unix_seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_seconds,
        nanos: 0,
    }
}

impl AuthServer {
    pub(crate) fn new(issuer: TokenIssuer, clients: ServiceClients) -> Self {
        Self { issuer, clients }
    }

    /// The tonic service, accepting request messages up to `max_request_bytes`.
    pub fn into_service(self, max_request_bytes: usize) -> AuthServiceServer<Self> {
        AuthServiceServer::new(self).max_decoding_message_size(max_request_bytes)
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "mesh.auth.v1.AuthService/{method} is not implemented yet"
    ))
}

#[tonic::async_trait]
impl AuthService for AuthServer {
    async fn register(
        &self,
        _request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(unimplemented("Register"))
    }

    async fn login(
        &self,
        _request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        Err(unimplemented("Login"))
    }

    async fn refresh(
        &self,
        _request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        Err(unimplemented("Refresh"))
    }

    async fn logout(
        &self,
        _request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        Err(unimplemented("Logout"))
    }

    async fn validate_token(
        &self,
        _request: Request<ValidateTokenRequest>,
    ) -> Result<Response<ValidateTokenResponse>, Status> {
        Err(unimplemented("ValidateToken"))
    }

    async fn get_jwks(
        &self,
        _request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
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
        Ok(Response::new(GetJwksResponse {
            keys,
            jwks_json: jwks.to_json(),
        }))
    }

    async fn list_sessions(
        &self,
        _request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        Err(unimplemented("ListSessions"))
    }

    async fn delete_account(
        &self,
        _request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        Err(unimplemented("DeleteAccount"))
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
        if !self.clients.verify(client_id, &client_secret) {
            tracing::info!(client_id, "service token refused: bad client credentials");
            return Err(AuthError::BadCredentials.into());
        }
        let issued = self.issuer.issue_service(client_id, unix_now());
        tracing::info!(client_id, "service token issued");
        Ok(Response::new(IssueServiceTokenResponse {
            access_token: issued.token,
            expire_time: Some(timestamp(issued.expires_at)),
        }))
    }
}

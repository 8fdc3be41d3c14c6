//! The tonic implementation of `mesh.auth.v1.AuthService`.

use mesh_proto::auth::v1::{
    DeleteAccountRequest, DeleteAccountResponse, GetJwksRequest, GetJwksResponse,
    IssueServiceTokenRequest, IssueServiceTokenResponse, ListSessionsRequest, ListSessionsResponse,
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, RefreshRequest, RefreshResponse,
    RegisterRequest, RegisterResponse, ValidateTokenRequest, ValidateTokenResponse,
    auth_service_server::{AuthService, AuthServiceServer},
};
use tonic::{Request, Response, Status};

/// The auth service's gRPC handlers.
#[derive(Debug, Clone, Default)]
pub struct AuthServer {}

impl AuthServer {
    /// A new handler set.
    pub fn new() -> Self {
        Self::default()
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
        Err(unimplemented("GetJwks"))
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
        _request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<IssueServiceTokenResponse>, Status> {
        Err(unimplemented("IssueServiceToken"))
    }
}

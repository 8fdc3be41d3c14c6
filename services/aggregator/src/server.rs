//! The tonic implementation of `mesh.aggregator.v1.AggregatorService`.

use std::pin::Pin;

use mesh_proto::aggregator::v1::{
    DeleteAccountRequest, DeleteAccountResponse, GetMeRequest, GetMeResponse, GetProfilesRequest,
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, LookupProfilesRequest, Profile,
    ProfileEvent, ProfileResult, RefreshRequest, RefreshResponse, SignUpRequest, SignUpResponse,
    UpdateProfileRequest, WatchProfilesRequest,
    aggregator_service_server::{AggregatorService, AggregatorServiceServer},
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The aggregator's gRPC handlers.
#[derive(Debug, Clone, Default)]
pub struct AggregatorServer {}

impl AggregatorServer {
    /// A new handler set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tonic service, accepting request messages up to `max_request_bytes`.
    pub fn into_service(self, max_request_bytes: usize) -> AggregatorServiceServer<Self> {
        AggregatorServiceServer::new(self).max_decoding_message_size(max_request_bytes)
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "mesh.aggregator.v1.AggregatorService/{method} is not implemented yet"
    ))
}

/// A boxed server stream of `T`.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatorService for AggregatorServer {
    async fn sign_up(
        &self,
        _request: Request<SignUpRequest>,
    ) -> Result<Response<SignUpResponse>, Status> {
        Err(unimplemented("SignUp"))
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

    async fn update_profile(
        &self,
        _request: Request<UpdateProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        Err(unimplemented("UpdateProfile"))
    }

    async fn delete_account(
        &self,
        _request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        Err(unimplemented("DeleteAccount"))
    }

    async fn get_me(
        &self,
        _request: Request<GetMeRequest>,
    ) -> Result<Response<GetMeResponse>, Status> {
        Err(unimplemented("GetMe"))
    }

    type GetProfilesStream = BoxStream<ProfileResult>;

    async fn get_profiles(
        &self,
        _request: Request<GetProfilesRequest>,
    ) -> Result<Response<Self::GetProfilesStream>, Status> {
        Err(unimplemented("GetProfiles"))
    }

    type LookupProfilesStream = BoxStream<ProfileResult>;

    async fn lookup_profiles(
        &self,
        _request: Request<Streaming<LookupProfilesRequest>>,
    ) -> Result<Response<Self::LookupProfilesStream>, Status> {
        Err(unimplemented("LookupProfiles"))
    }

    type WatchProfilesStream = BoxStream<ProfileEvent>;

    async fn watch_profiles(
        &self,
        _request: Request<WatchProfilesRequest>,
    ) -> Result<Response<Self::WatchProfilesStream>, Status> {
        Err(unimplemented("WatchProfiles"))
    }
}

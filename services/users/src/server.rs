//! The tonic implementation of `mesh.users.v1.UserService`.

use std::pin::Pin;

use mesh_proto::users::v1::{
    BatchGetUsersRequest, BatchGetUsersResponse, CreateUserRequest, DeleteUserRequest,
    DeleteUserResponse, GetUserRequest, ListUsersRequest, ListUsersResponse, UpdateUserRequest,
    User, UserEvent, WatchUsersRequest,
    user_service_server::{UserService, UserServiceServer},
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The users service's gRPC handlers.
#[derive(Debug, Clone, Default)]
pub struct UsersServer {}

impl UsersServer {
    /// A new handler set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tonic service, accepting request messages up to `max_request_bytes`.
    pub fn into_service(self, max_request_bytes: usize) -> UserServiceServer<Self> {
        UserServiceServer::new(self).max_decoding_message_size(max_request_bytes)
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "mesh.users.v1.UserService/{method} is not implemented yet"
    ))
}

/// The stream type of `WatchUsers`.
pub(crate) type UserEventStream =
    Pin<Box<dyn Stream<Item = Result<UserEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl UserService for UsersServer {
    async fn create_user(
        &self,
        _request: Request<CreateUserRequest>,
    ) -> Result<Response<User>, Status> {
        Err(unimplemented("CreateUser"))
    }

    async fn get_user(&self, _request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        Err(unimplemented("GetUser"))
    }

    async fn batch_get_users(
        &self,
        _request: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        Err(unimplemented("BatchGetUsers"))
    }

    async fn list_users(
        &self,
        _request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Err(unimplemented("ListUsers"))
    }

    async fn update_user(
        &self,
        _request: Request<UpdateUserRequest>,
    ) -> Result<Response<User>, Status> {
        Err(unimplemented("UpdateUser"))
    }

    async fn delete_user(
        &self,
        _request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        Err(unimplemented("DeleteUser"))
    }

    type WatchUsersStream = UserEventStream;

    async fn watch_users(
        &self,
        _request: Request<WatchUsersRequest>,
    ) -> Result<Response<Self::WatchUsersStream>, Status> {
        Err(unimplemented("WatchUsers"))
    }
}

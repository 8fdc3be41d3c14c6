//! Calls to auth and users: long-lived shared connections ([`mesh_runtime::client::Pool`]),
//! one typed method per downstream call the handlers make, the context each carries
//! ([`context`]) and the retries of reads ([`retry`]).
//!
//! Cancellation needs no code of its own: a downstream call is a future owned by the handler
//! (or the stream) serving the caller; when the caller goes away or its deadline passes, tonic
//! drops that handler and with it every outstanding call, whose HTTP/2 streams are reset.

pub(crate) mod context;
pub(crate) mod retry;

use mesh_proto::{
    auth::v1::{self as auth, auth_service_client::AuthServiceClient},
    users::v1::{self as users, user_service_client::UserServiceClient},
};
use mesh_runtime::client::{Pool, Traced};

pub(crate) use context::CallContext;
use retry::RetryBudget;

use crate::error::AggregatorError;

/// The two downstream services, and the retry budget all reads of them share.
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

    // Auth's methods. Only ListSessions is a read (retried); the rest are made once.

    pub(crate) async fn register(
        &self,
        ctx: &CallContext,
        message: auth::RegisterRequest,
    ) -> Result<auth::RegisterResponse, AggregatorError> {
        let mut auth = self.auth();
        let reply = ctx.write(message, |r| auth.register(r)).await;
        reply.map_err(AggregatorError::auth)
    }

    /// A password check. Its raw status is returned: the caller settles its address's count
    /// with it before relaying.
    pub(crate) async fn login(
        &self,
        ctx: &CallContext,
        message: auth::LoginRequest,
    ) -> Result<auth::LoginResponse, tonic::Status> {
        let mut auth = self.auth();
        ctx.write(message, |r| auth.login(r)).await
    }

    pub(crate) async fn refresh(
        &self,
        ctx: &CallContext,
        message: auth::RefreshRequest,
    ) -> Result<auth::RefreshResponse, AggregatorError> {
        let mut auth = self.auth();
        let reply = ctx.write(message, |r| auth.refresh(r)).await;
        reply.map_err(AggregatorError::auth)
    }

    pub(crate) async fn logout(
        &self,
        ctx: &CallContext,
        refresh_token: String,
    ) -> Result<(), AggregatorError> {
        let mut auth = self.auth();
        let message = auth::LogoutRequest { refresh_token };
        let reply = ctx.write(message, |r| auth.logout(r)).await;
        reply.map(drop).map_err(AggregatorError::auth)
    }

    pub(crate) async fn delete_credentials(
        &self,
        ctx: &CallContext,
        password: String,
    ) -> Result<(), AggregatorError> {
        let mut auth = self.auth();
        let message = auth::DeleteAccountRequest { password };
        let reply = ctx.write(message, |r| auth.delete_account(r)).await;
        reply.map(drop).map_err(AggregatorError::auth)
    }

    pub(crate) async fn list_sessions(
        &self,
        ctx: &CallContext,
    ) -> Result<auth::ListSessionsResponse, AggregatorError> {
        let reply = ctx
            .read(&self.budget, auth::ListSessionsRequest {}, |request| {
                let mut client = self.auth();
                async move { client.list_sessions(request).await }
            })
            .await;
        reply.map_err(AggregatorError::auth)
    }

    // Users' methods: GetUser and BatchGetUsers are reads (retried).

    pub(crate) async fn create_user(
        &self,
        ctx: &CallContext,
        message: users::CreateUserRequest,
    ) -> Result<users::User, AggregatorError> {
        let mut users = self.users();
        let reply = ctx.write(message, |r| users.create_user(r)).await;
        reply.map_err(AggregatorError::users)
    }

    pub(crate) async fn get_user(
        &self,
        ctx: &CallContext,
        id: &str,
    ) -> Result<users::User, AggregatorError> {
        let message = users::GetUserRequest { id: id.to_owned() };
        let reply = ctx
            .read(&self.budget, message, |request| {
                let mut client = self.users();
                async move { client.get_user(request).await }
            })
            .await;
        reply.map_err(AggregatorError::users)
    }

    pub(crate) async fn batch_get_users(
        &self,
        ctx: &CallContext,
        ids: Vec<String>,
    ) -> Result<users::BatchGetUsersResponse, AggregatorError> {
        let message = users::BatchGetUsersRequest { ids };
        let reply = ctx
            .read(&self.budget, message, |request| {
                let mut client = self.users();
                async move { client.batch_get_users(request).await }
            })
            .await;
        reply.map_err(AggregatorError::users)
    }

    pub(crate) async fn update_user(
        &self,
        ctx: &CallContext,
        message: users::UpdateUserRequest,
    ) -> Result<users::User, AggregatorError> {
        let mut users = self.users();
        let reply = ctx.write(message, |r| users.update_user(r)).await;
        reply.map_err(AggregatorError::users)
    }

    pub(crate) async fn delete_user(
        &self,
        ctx: &CallContext,
        id: String,
    ) -> Result<(), AggregatorError> {
        let mut users = self.users();
        let message = users::DeleteUserRequest { id };
        let reply = ctx.write(message, |r| users.delete_user(r)).await;
        reply.map(drop).map_err(AggregatorError::users)
    }
}

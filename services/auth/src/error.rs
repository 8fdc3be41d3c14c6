//! The auth service's errors and their one mapping to gRPC statuses.

use tonic::Status;

/// What can go wrong in an auth call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The request is invalid; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// Bad credentials of any kind. The message is the same whatever was wrong.
    #[error("invalid credentials")]
    BadCredentials,
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::InvalidArgument(message) => Status::invalid_argument(message),
            AuthError::BadCredentials => Status::unauthenticated("invalid credentials"),
        }
    }
}

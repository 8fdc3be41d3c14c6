//! The auth service's errors and their one mapping to gRPC statuses.

use std::time::Duration;

use tonic::Status;

use crate::store::StoreError;

/// What can go wrong in an auth call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The request is invalid; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// Bad credentials of any kind. The message is the same whatever was wrong.
    #[error("invalid credentials")]
    BadCredentials,
    /// The bearer token is missing, malformed, expired, or its session is over.
    #[error("missing or invalid access token")]
    BadToken,
    /// A valid token that may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// Too many failed logins: retry after the given time.
    #[error("too many failed logins")]
    Throttled(Duration),
    /// A bound of the server is reached (e.g. followers of a stream).
    #[error("{0}")]
    Exhausted(&'static str),
    /// The database is unreachable: retryable.
    #[error("storage unavailable")]
    Store(#[from] StoreError),
    /// A bug or an environment failure; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::InvalidArgument(message) => Status::invalid_argument(message),
            AuthError::BadCredentials => Status::unauthenticated("invalid email or password"),
            AuthError::BadToken => Status::unauthenticated("missing or invalid access token"),
            AuthError::PermissionDenied(why) => Status::permission_denied(why),
            AuthError::Throttled(retry_after) => mesh_proto::headers::resource_exhausted(
                format!(
                    "too many failed password checks for this account; retry in {} s",
                    mesh_proto::headers::retry_seconds(retry_after)
                ),
                Some(retry_after),
            ),
            AuthError::Exhausted(why) => Status::resource_exhausted(why),
            AuthError::Store(StoreError::EmailTaken) => {
                Status::already_exists("an account with this email already exists")
            }
            AuthError::Store(err) => {
                tracing::error!(error = %mesh_telemetry::error_chain(&err), "storage failure");
                Status::unavailable("storage unavailable; retry")
            }
            AuthError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Database errors and internal faults reach the client without their text: a real SQLite
    /// error (naming the table and column) is UNAVAILABLE, an internal fault INTERNAL, both
    /// with a fixed message.
    #[tokio::test]
    async fn storage_and_internal_errors_carry_no_detail() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        let err = sqlx::query("INSERT INTO credentials_missing (password_hash) VALUES ('x')")
            .execute(&pool)
            .await
            .expect_err("no such table");
        assert!(err.to_string().contains("credentials_missing"), "{err}");
        let status = Status::from(AuthError::Store(StoreError::Database(err)));
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unavailable, "storage unavailable; retry")
        );
        let status = Status::from(AuthError::Internal(
            "hashing: argon2 failed at SELECT * FROM credentials".into(),
        ));
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Internal, "internal error")
        );
        assert!(status.metadata().is_empty());
    }
}

//! The users service's errors and their one mapping to gRPC statuses.

use tonic::Status;

use crate::{domain::Invalid, store::StoreError};

/// What can go wrong in a users call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UsersError {
    /// The request is invalid; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such profile.
    #[error("{0}")]
    NotFound(String),
    /// The caller's profile exists already.
    #[error("the caller's profile already exists")]
    AlreadyExists,
    /// A valid token that may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// `expected_version` is not the stored version.
    #[error("version conflict")]
    Conflict {
        /// The version the caller expected.
        expected: i64,
        /// The stored version.
        stored: i64,
    },
    /// A watch position beyond the log.
    #[error("{0}")]
    OutOfRange(String),
    /// The request carried no verified token (the authentication layer was bypassed).
    #[error("missing or invalid access token")]
    Unauthenticated,
    /// The database failed: retryable.
    #[error("storage unavailable")]
    Store(#[from] StoreError),
    /// A status made where its words are known (e.g. the retained log's start).
    /// Too much at once: the message, and when known how long to wait.
    #[error("{message}")]
    Exhausted {
        /// What was refused, for the caller.
        message: String,
        /// How long to wait before trying again, when known.
        retry_after: Option<std::time::Duration>,
    },
}

impl From<Invalid> for UsersError {
    fn from(Invalid(message): Invalid) -> Self {
        Self::InvalidArgument(message)
    }
}

impl From<UsersError> for Status {
    fn from(err: UsersError) -> Self {
        match err {
            UsersError::InvalidArgument(message) => Status::invalid_argument(message),
            UsersError::NotFound(message) => Status::not_found(message),
            UsersError::AlreadyExists => Status::already_exists(
                "the caller's profile already exists (retry with the same request_id to get it)",
            ),
            UsersError::PermissionDenied(why) => Status::permission_denied(why),
            UsersError::Conflict { expected, stored } => Status::aborted(format!(
                "expected_version {expected} does not match the stored version {stored}"
            )),
            UsersError::OutOfRange(message) => Status::out_of_range(message),
            UsersError::Exhausted {
                message,
                retry_after,
            } => mesh_proto::headers::resource_exhausted(message, retry_after),
            UsersError::Unauthenticated => {
                Status::unauthenticated("missing or invalid access token")
            }
            UsersError::Store(err) => {
                tracing::error!(error = %mesh_telemetry::error_chain(&err), "storage failure");
                Status::unavailable("storage unavailable; retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real database error (SQLite's own message, naming the table and the SQL) reaches the
    /// client as UNAVAILABLE with none of its text; the same holds for every store error.
    #[tokio::test]
    async fn database_errors_never_reach_the_client() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        let err = sqlx::query("SELECT secret_column FROM no_such_table WHERE id = 'x'")
            .execute(&pool)
            .await
            .expect_err("no such table");
        assert!(err.to_string().contains("no_such_table"), "{err}");
        for store in [
            StoreError::Database(err),
            StoreError::Database(sqlx::Error::PoolTimedOut),
            StoreError::UnknownKind(9),
        ] {
            let detail = mesh_telemetry::error_chain(&store);
            let status = Status::from(UsersError::Store(store));
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert_eq!(status.message(), "storage unavailable; retry");
            assert!(!status.message().contains("SELECT"), "{detail}");
            assert!(status.metadata().is_empty());
        }
    }
}

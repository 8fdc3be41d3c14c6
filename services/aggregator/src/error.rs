//! The aggregator's errors and their one mapping to gRPC statuses — including the policy for
//! relaying a downstream's failure to the caller.

use std::time::Duration;

use tonic::{Code, Status};

/// What can go wrong in an aggregator call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AggregatorError {
    /// The request is invalid; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The call carried no verified token (the authentication layer was bypassed).
    #[error("missing or invalid access token")]
    Unauthenticated,
    /// A valid token that may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The method cannot work in this deployment (e.g. no service credentials).
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// A bound of the server is reached; with the time after which a retry may succeed, if
    /// known.
    #[error("{message}")]
    Exhausted {
        /// What was reached, for the caller.
        message: String,
        /// Sent as `retry-after` (whole seconds, at least 1).
        retry_after: Option<Duration>,
    },
    /// The server (or a part of it) cannot serve now: retryable.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's deadline has passed (or leaves no time for downstream work).
    #[error("the call's deadline has passed")]
    DeadlineExceeded,
    /// A downstream call failed; [`From<AggregatorError> for Status`] decides what the caller
    /// sees.
    #[error("{service}: {status}")]
    Downstream {
        /// `auth` or `users`.
        service: &'static str,
        /// The downstream's status, as tonic returned it.
        status: Status,
    },
    /// A bug or an environment failure; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl AggregatorError {
    /// A failed call to auth.
    pub(crate) fn auth(status: Status) -> Self {
        Self::Downstream {
            service: "auth",
            status,
        }
    }

    /// A failed call to users.
    pub(crate) fn users(status: Status) -> Self {
        Self::Downstream {
            service: "users",
            status,
        }
    }

    /// Whether this is a downstream's NOT_FOUND.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Downstream { status, .. } if status.code() == Code::NotFound)
    }

    /// RESOURCE_EXHAUSTED with no known time to wait.
    pub(crate) fn exhausted(message: impl Into<String>) -> Self {
        Self::Exhausted {
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<AggregatorError> for Status {
    fn from(err: AggregatorError) -> Self {
        match err {
            AggregatorError::InvalidArgument(message) => Status::invalid_argument(message),
            AggregatorError::Unauthenticated => {
                Status::unauthenticated("missing or invalid access token")
            }
            AggregatorError::PermissionDenied(why) => Status::permission_denied(why),
            AggregatorError::FailedPrecondition(why) => Status::failed_precondition(why),
            AggregatorError::Exhausted {
                message,
                retry_after,
            } => mesh_proto::headers::resource_exhausted(message, retry_after),
            AggregatorError::Unavailable(message) => Status::unavailable(message),
            AggregatorError::DeadlineExceeded => {
                Status::deadline_exceeded("the call's deadline has passed")
            }
            AggregatorError::Downstream { service, status } => relayed(service, status),
            AggregatorError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Whether a failed downstream call never reached the downstream: the connection closed (a
/// GOAWAY from a draining server) while the request still waited to be written. tonic reports
/// that as CANCELLED (hyper's "connection closed"), but nothing was cancelled and nothing ran:
/// it is as retryable as UNAVAILABLE. Every mesh server echoes `x-request-id`, so a status
/// without it was not the downstream's answer.
pub(crate) fn never_sent(status: &Status) -> bool {
    status.code() == Code::Cancelled
        && status
            .metadata()
            .get(mesh_proto::headers::REQUEST_ID)
            .is_none()
}

/// A downstream failure as the caller sees it: the codes that mean something to a client pass
/// through with the downstream's message (the mesh's own, safe to show) and its `retry-after`;
/// anything else is INTERNAL, logged here and never shown.
fn relayed(service: &'static str, status: Status) -> Status {
    if never_sent(&status) {
        return Status::unavailable(format!("{service} is unavailable; retry"));
    }
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Aborted
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::OutOfRange
        | Code::Cancelled => {
            let mut relayed = Status::new(status.code(), status.message());
            if let Some(retry_after) = status.metadata().get(mesh_proto::headers::RETRY_AFTER) {
                relayed
                    .metadata_mut()
                    .insert(mesh_proto::headers::RETRY_AFTER, retry_after.clone());
            }
            relayed
        }
        Code::DeadlineExceeded => {
            Status::deadline_exceeded(format!("{service}: deadline exceeded"))
        }
        Code::Unavailable => {
            tracing::warn!(
                downstream = service,
                message = status.message(),
                "downstream unavailable"
            );
            Status::unavailable(format!("{service} is unavailable; retry"))
        }
        code => {
            tracing::error!(
                downstream = service,
                ?code,
                message = status.message(),
                "downstream failed"
            );
            Status::internal("internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(status: Status) -> Status {
        AggregatorError::users(status).into()
    }

    /// Internals never reach the caller; meaningful codes pass through.
    #[test]
    fn relayed_statuses() {
        let internal = relay(Status::internal("db exploded at /var/lib/x"));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("db"));
        let unknown = relay(Status::unknown("panic at foo.rs:12"));
        assert_eq!(
            (unknown.code(), unknown.message()),
            (Code::Internal, "internal error")
        );
        let not_found = relay(Status::not_found("no user with id x"));
        assert_eq!(
            (not_found.code(), not_found.message()),
            (Code::NotFound, "no user with id x")
        );
        let down = relay(Status::unavailable("tcp connect error 127.0.0.1:50053"));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(!down.message().contains("127.0.0.1"));
        // A request the closing connection never sent is retryable, not the caller's cancel.
        let unsent = relay(Status::cancelled("operation was canceled"));
        assert_eq!(unsent.code(), Code::Unavailable);
        let mut answered = Status::cancelled("the call was cancelled");
        answered.metadata_mut().insert(
            mesh_proto::headers::REQUEST_ID,
            "abc".parse().expect("ascii"),
        );
        assert_eq!(relay(answered).code(), Code::Cancelled);
    }

    /// A downstream's `retry-after` reaches the caller with its code; the aggregator's own
    /// bounds send theirs in whole seconds, never 0.
    #[test]
    fn retry_after_is_sent() {
        let mut throttled = Status::resource_exhausted("too many failed password checks");
        throttled.metadata_mut().insert(
            mesh_proto::headers::RETRY_AFTER,
            "42".parse().expect("ascii"),
        );
        let relayed = Status::from(AggregatorError::auth(throttled));
        assert_eq!(relayed.code(), Code::ResourceExhausted);
        assert_eq!(
            relayed.metadata().get(mesh_proto::headers::RETRY_AFTER),
            Some(&"42".parse().expect("ascii"))
        );
        let own = Status::from(AggregatorError::Exhausted {
            message: "too many sign-ups".into(),
            retry_after: Some(Duration::from_millis(300)),
        });
        assert_eq!(
            own.metadata().get(mesh_proto::headers::RETRY_AFTER),
            Some(&"1".parse().expect("ascii"))
        );
        let internal = Status::from(AggregatorError::Internal("join failed at lib.rs:3"));
        assert_eq!(
            (internal.code(), internal.message()),
            (Code::Internal, "internal error")
        );
    }
}

//! The mesh's protobuf contracts, compiled once for every crate of the workspace.
//!
//! One crate owns all generated code so that `users` and the aggregator share one `User` type,
//! and so that reflection serves the same descriptors the servers were built from. Lints are
//! relaxed on the generated modules only.

pub mod codec;
pub mod rules;

/// Metadata keys of the mesh's calls, spelled once.
pub mod headers {
    /// The bearer token: `authorization: Bearer <access token>`.
    pub const AUTHORIZATION: &str = "authorization";
    /// The request id, taken from the caller or made, echoed, passed downstream.
    pub const REQUEST_ID: &str = "x-request-id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// The caller's deadline (`<digits><unit>`).
    pub const GRPC_TIMEOUT: &str = "grpc-timeout";
    /// Seconds to wait before retrying a RESOURCE_EXHAUSTED call.
    pub const RETRY_AFTER: &str = "retry-after";
    /// Response metadata of users' `WatchUsers`: the log's position when the stream began.
    pub const LOG_HEAD: &str = "x-mesh-log-head";
    /// The gRPC status code, in trailers (or headers of a trailers-only answer).
    pub const GRPC_STATUS: &str = "grpc-status";

    /// The same names as typed HTTP header names, for tower and http layers.
    pub mod name {
        use tonic::codegen::http::HeaderName;

        /// [`super::AUTHORIZATION`].
        pub const AUTHORIZATION: HeaderName = HeaderName::from_static(super::AUTHORIZATION);
        /// [`super::REQUEST_ID`].
        pub const REQUEST_ID: HeaderName = HeaderName::from_static(super::REQUEST_ID);
        /// [`super::TRACEPARENT`].
        pub const TRACEPARENT: HeaderName = HeaderName::from_static(super::TRACEPARENT);
        /// [`super::TRACESTATE`].
        pub const TRACESTATE: HeaderName = HeaderName::from_static(super::TRACESTATE);
        /// [`super::GRPC_TIMEOUT`].
        pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static(super::GRPC_TIMEOUT);
        /// [`super::GRPC_STATUS`].
        pub const GRPC_STATUS: HeaderName = HeaderName::from_static(super::GRPC_STATUS);
        /// [`super::RETRY_AFTER`].
        pub const RETRY_AFTER: HeaderName = HeaderName::from_static(super::RETRY_AFTER);
        /// [`super::LOG_HEAD`].
        pub const LOG_HEAD: HeaderName = HeaderName::from_static(super::LOG_HEAD);
    }

    /// `RESOURCE_EXHAUSTED` with `message`, and, when the caller may try again after a known
    /// wait, its whole seconds (at least 1) in [`RETRY_AFTER`]: how every mesh service says
    /// "slow down".
    pub fn resource_exhausted(
        message: impl Into<String>,
        retry_after: Option<std::time::Duration>,
    ) -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted(message);
        if let Some(wait) = retry_after
            && let Ok(value) = wait.as_secs().max(1).to_string().parse()
        {
            status.metadata_mut().insert(RETRY_AFTER, value);
        }
        status
    }

    /// Whole seconds of a wait as a caller is told it (at least 1).
    pub fn retry_seconds(wait: std::time::Duration) -> u64 {
        wait.as_secs().max(1)
    }
}

/// `mesh.auth.v1`: credentials, sessions, signing keys and tokens.
pub mod auth {
    /// Version 1 of the auth contract.
    #[allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms
    )]
    pub mod v1 {
        tonic::include_proto!("mesh.auth.v1");
    }
}

/// `mesh.users.v1`: profiles and their change log.
pub mod users {
    /// Version 1 of the users contract.
    #[allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms
    )]
    pub mod v1 {
        tonic::include_proto!("mesh.users.v1");
    }
}

/// `mesh.aggregator.v1`: the public facade.
pub mod aggregator {
    /// Version 1 of the aggregator contract.
    #[allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms
    )]
    pub mod v1 {
        tonic::include_proto!("mesh.aggregator.v1");
    }
}

/// `mesh.bench.v1`: the bare echo `mesh bench` measures the mesh against (not a public API).
pub mod bench {
    /// Version 1 of the benchmark baseline.
    #[allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        rust_2018_idioms
    )]
    pub mod v1 {
        tonic::include_proto!("mesh.bench.v1");
    }
}

/// The encoded `FileDescriptorSet` of every mesh `.proto` file and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mesh_descriptor.bin"));

/// Encoded `FileDescriptorSet`s of one package each (its file and the well-known types it
/// imports), for the reflection service of the server that implements it.
pub mod descriptor_sets {
    /// `mesh/auth/v1/auth.proto` and its imports.
    pub const AUTH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/auth_descriptor.bin"));
    /// `mesh/users/v1/users.proto` and its imports.
    pub const USERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/users_descriptor.bin"));
    /// `mesh/aggregator/v1/aggregator.proto` and its imports.
    pub const AGGREGATOR: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/aggregator_descriptor.bin"));
}

/// Times as the services keep them (Unix milliseconds) and as the contracts send them.
pub mod time {
    /// `unix_ms` as a `google.protobuf.Timestamp`.
    pub fn timestamp_from_unix_ms(unix_ms: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: unix_ms.div_euclid(1000),
            nanos: i32::try_from(unix_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }
    }

    /// Now, in Unix seconds.
    pub fn unix_now() -> i64 {
        unix_now_ms().div_euclid(1000)
    }

    /// Now, in Unix milliseconds.
    pub fn unix_now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    #[cfg(test)]
    mod tests {
        /// Milliseconds split into seconds and nanoseconds, before the epoch too.
        #[test]
        fn timestamps() {
            let t = super::timestamp_from_unix_ms(1_500);
            assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
            let t = super::timestamp_from_unix_ms(-1);
            assert_eq!((t.seconds, t.nanos), (-1, 999_000_000));
        }
    }
}

/// Fully qualified gRPC service names, as health checking and reflection spell them.
pub mod service_names {
    /// `mesh.auth.v1.AuthService`.
    pub const AUTH: &str = "mesh.auth.v1.AuthService";
    /// `mesh.users.v1.UserService`.
    pub const USERS: &str = "mesh.users.v1.UserService";
    /// `mesh.aggregator.v1.AggregatorService`.
    pub const AGGREGATOR: &str = "mesh.aggregator.v1.AggregatorService";
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// The descriptor set names every mesh file and the well-known types they import.
    #[test]
    fn descriptor_set_holds_every_contract() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decodes");
        let names: Vec<_> = fds.file.iter().filter_map(|f| f.name.clone()).collect();
        for want in [
            "mesh/auth/v1/auth.proto",
            "mesh/users/v1/users.proto",
            "mesh/aggregator/v1/aggregator.proto",
            "google/protobuf/timestamp.proto",
            "google/protobuf/field_mask.proto",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }

    /// Each package's own descriptor set holds its file and no other mesh file.
    #[test]
    fn per_package_sets_hold_only_their_package() {
        for (set, want) in [
            (descriptor_sets::AUTH, "mesh/auth/v1/auth.proto"),
            (descriptor_sets::USERS, "mesh/users/v1/users.proto"),
            (
                descriptor_sets::AGGREGATOR,
                "mesh/aggregator/v1/aggregator.proto",
            ),
        ] {
            let fds = prost_types::FileDescriptorSet::decode(set).expect("decodes");
            let mesh: Vec<_> = fds
                .file
                .iter()
                .map(|f| f.name())
                .filter(|n| n.starts_with("mesh/"))
                .collect();
            assert_eq!(mesh, [want]);
        }
    }

    /// The service name constants match the generated servers' own names.
    #[test]
    fn service_names_match_generated_code() {
        assert_eq!(
            auth::v1::auth_service_server::SERVICE_NAME,
            service_names::AUTH
        );
        assert_eq!(
            users::v1::user_service_server::SERVICE_NAME,
            service_names::USERS
        );
        assert_eq!(
            aggregator::v1::aggregator_service_server::SERVICE_NAME,
            service_names::AGGREGATOR
        );
    }
}

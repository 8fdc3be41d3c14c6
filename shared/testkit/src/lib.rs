//! The mesh's one test kit: a dev-dependency of every test, and the harness of `mesh bench`
//! (an optional dependency of the `mesh` binary, behind its `bench` feature; the image is
//! built without it).
//!
//! - [`TestMesh`]: auth, users and the aggregator — any of them — in-process on `127.0.0.1:0`
//!   over SQLite or PostgreSQL ([`databases`] gives the ones a test must run on), talking over
//!   real gRPC on loopback;
//! - [`Minter`]: tokens signed with the test mesh's own keys, with the mesh's issuer and
//!   audience;
//! - [`AuthDouble`] and [`UsersDouble`]: services whose every method answers `UNIMPLEMENTED`
//!   unless the test gives it a handler, for tests that need a barrier, a delay or a failure;
//! - [`ProcessMesh`] and [`ServiceProcess`]: the real binaries as processes, for what only a
//!   process shows (its memory, its signals);
//! - [`sign_up`]: an account made through the aggregator;
//! - [`web_aggregator`]: a gRPC-Web client of the aggregator over HTTP/1.1, as a browser calls;
//! - [`TestPki`]: a CA made for the test, its certificates (also expired ones) and the TLS
//!   settings of servers and clients that use them;
//! - everything of [`mesh_runtime::testing`] (health and reflection probes, `connect`).

mod doubles;
mod mesh;
mod process;
mod tls;
mod tokens;
mod web;

pub use doubles::{AuthDouble, BoxStream, UsersDouble, serve_double, serve_double_on};
pub use mesh::{
    CLIENT_SECRET, Database, MeshBuilder, TestMesh, aggregator_config, auth_config, authn,
    databases, spawn_aggregator, start_aggregator, start_auth, start_users, users_config,
    wait_for_health,
};
pub use mesh_authn::{bearer_request as bearer, set_bearer};
pub use mesh_runtime::testing::*;
pub use process::{
    ProcessMesh, ServiceProcess, aggregator_args, auth_args, free_addr, proc_status_kib, users_args,
};
pub use tls::{TestPki, https, serve_tls, start_aggregator_tls, tls_channel, wait_for_health_tls};
pub use tokens::{Minter, TOKEN_LIFETIME_SECS, claims, unix_now};
pub use web::{WebHttp, web_aggregator};

use mesh_proto::aggregator::v1::{
    SignUpRequest, SignUpResponse, Tokens, aggregator_service_client::AggregatorServiceClient,
};
use tonic::transport::Channel;

/// Asserts that `result` failed with `code`, and returns the status.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> tonic::Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

/// Asserts that `result` failed with `code` and a message containing `needle`, and returns the
/// status.
#[track_caller]
pub fn assert_code_contains<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) -> tonic::Status {
    let status = assert_code(result, code);
    assert!(
        status.message().contains(needle),
        "message {:?} should contain {needle:?}",
        status.message()
    );
    status
}

/// The password [`sign_up`] gives every account.
pub const PASSWORD: &str = "correct horse battery";

/// Signs `email` up through the aggregator with `password`, shown as `display_name`, with
/// `metadata` added to the call (a `traceparent`, …): the reply, or the status it failed with.
pub async fn try_sign_up(
    client: &mut AggregatorServiceClient<Channel>,
    email: &str,
    password: &str,
    display_name: &str,
    metadata: &[(&'static str, &str)],
) -> Result<SignUpResponse, tonic::Status> {
    let mut request = tonic::Request::new(SignUpRequest {
        email: email.into(),
        password: password.into(),
        display_name: display_name.into(),
    });
    for (name, value) in metadata {
        request
            .metadata_mut()
            .insert(*name, value.parse().expect("an ASCII metadata value"));
    }
    client
        .sign_up(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Signs `email` up through the aggregator with [`PASSWORD`], shown as `display_name` (panics
/// if refused): the new user's id and tokens.
pub async fn sign_up(
    client: &mut AggregatorServiceClient<Channel>,
    email: &str,
    display_name: &str,
) -> (String, Tokens) {
    let reply = try_sign_up(client, email, PASSWORD, display_name, &[])
        .await
        .expect("sign up");
    (
        reply.profile.expect("profile").user_id,
        reply.tokens.expect("tokens"),
    )
}

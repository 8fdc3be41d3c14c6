//! The server as a whole: health, reflection, and a refused empty request.

use mesh_proto::auth::v1::LoginRequest;
use mesh_testkit::{Database, assert_standard_server};
use tonic::Code;

use crate::start;

/// Health (`""`, the service name, `liveness`) is SERVING after start, and reflection v1 and
/// v1alpha list and describe the auth service, health and themselves.
#[tokio::test]
async fn health_and_reflection() {
    let mesh = start(Database::Sqlite).await;
    assert_standard_server(&mesh.auth.channel, mesh_auth::SERVICE_NAME).await;
    mesh.stop().await;
}

/// An empty Login is refused as INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn empty_login_is_invalid() {
    let mesh = start(Database::Sqlite).await;
    let status = mesh
        .auth_client()
        .login(LoginRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("email"), "{status:?}");
    mesh.stop().await;
}

//! Readiness that does not cascade: a users outage does not take the aggregator out of its
//! Service — Login, Refresh and Logout need only auth.

use std::time::Duration;

use mesh_proto::aggregator::v1::LoginRequest;
use mesh_testkit::{PASSWORD, TestMesh, health_status, sign_up, wait_for_health};
use tonic_health::pb::health_check_response::ServingStatus;

/// With users stopped, the aggregator's own name turns NOT_SERVING (for monitoring) while
/// `readiness` stays SERVING (for the probe) and Login still works.
#[tokio::test]
async fn a_users_outage_keeps_the_aggregator_ready() {
    let mut mesh = TestMesh::builder().aggregator().start().await;
    let mut client = mesh.aggregator_client();
    sign_up(&mut client, "ready@example.com", "Ready").await;
    let users = mesh.users.take().expect("users");
    users.shutdown().await.expect("users stops");
    let aggregator = mesh.aggregator();
    wait_for_health(
        aggregator,
        mesh_proto::service_names::AGGREGATOR,
        ServingStatus::NotServing,
    )
    .await;
    assert_eq!(
        health_status(&aggregator.channel, "readiness").await.ok(),
        Some(ServingStatus::Serving as i32),
        "readiness follows the server, not its dependencies"
    );
    assert_eq!(
        health_status(&aggregator.channel, "liveness").await.ok(),
        Some(ServingStatus::Serving as i32)
    );
    let mut request = tonic::Request::new(LoginRequest {
        email: "ready@example.com".into(),
        password: PASSWORD.into(),
    });
    request.set_timeout(Duration::from_secs(10));
    let reply = client
        .login(request)
        .await
        .expect("Login needs only auth")
        .into_inner();
    assert!(reply.tokens.is_some());
    assert!(
        reply.profile.is_none(),
        "the profile is left unset while users is away"
    );
    mesh.stop().await;
}

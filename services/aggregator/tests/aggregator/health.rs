//! The aggregator's health: standard, and following its dependencies.

use mesh_testkit::{assert_standard_server, health_status, wait_for_health};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::start;

/// Health and reflection as on every server; NOT_SERVING while users is down, SERVING again
/// once it is back, with no restart.
#[tokio::test]
async fn health_follows_the_dependencies() {
    let mut mesh = start().await;
    assert_standard_server(&mesh.aggregator().channel, mesh_aggregator::SERVICE_NAME).await;
    mesh.stop_users().await;
    wait_for_health(
        mesh.aggregator(),
        mesh_aggregator::SERVICE_NAME,
        ServingStatus::NotServing,
    )
    .await;
    assert_eq!(
        health_status(&mesh.aggregator().channel, "liveness")
            .await
            .ok(),
        Some(ServingStatus::Serving as i32),
        "not ready is not dead"
    );
    mesh.restart_users().await;
    wait_for_health(
        mesh.aggregator(),
        mesh_aggregator::SERVICE_NAME,
        ServingStatus::Serving,
    )
    .await;
    mesh.stop().await;
}

//! The aggregator in-process on port 0, through the generated clients.

use mesh_proto::aggregator::v1::{
    GetMeRequest, aggregator_service_client::AggregatorServiceClient,
};
use mesh_runtime::testing::{TestServer, assert_standard_server};

async fn start() -> TestServer {
    let config = mesh_aggregator::Config::with_listen(([127, 0, 0, 1], 0).into());
    TestServer::start(move |listener, shutdown| async move {
        mesh_aggregator::serve(&config, listener, shutdown).await
    })
    .await
}

/// Health (`""`, the service name, `liveness`) is SERVING after start, and reflection v1 and
/// v1alpha list and describe the aggregator service, health and themselves.
#[tokio::test]
async fn health_and_reflection() {
    let server = start().await;
    assert_standard_server(&server.channel, mesh_aggregator::SERVICE_NAME).await;
    server.shutdown().await.expect("clean shutdown");
}

/// A method of the contract is routed and answers with a clean gRPC status.
#[tokio::test]
async fn methods_are_routed() {
    let server = start().await;
    let status = AggregatorServiceClient::new(server.channel.clone())
        .get_me(GetMeRequest {})
        .await
        .expect_err("not implemented yet");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("GetMe"), "{status:?}");
    server.shutdown().await.expect("clean shutdown");
}

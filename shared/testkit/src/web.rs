//! gRPC-Web clients of the aggregator, as a browser would call it: HTTP/1.1, `application/grpc-web`
//! framing with the trailers as the last frame (tonic-web's client layer over hyper's client).

use std::net::SocketAddr;

use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use mesh_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use tonic_web::{GrpcWebCall, GrpcWebClientLayer, GrpcWebClientService};

/// The HTTP/1.1 client under a gRPC-Web client.
pub type WebHttp = GrpcWebClientService<Client<HttpConnector, GrpcWebCall<tonic::body::Body>>>;

/// An aggregator client that speaks gRPC-Web over HTTP/1.1 (plaintext), keeping up to
/// `connections` idle connections (one call at a time on each, as HTTP/1.1 allows).
pub fn web_aggregator(addr: SocketAddr, connections: usize) -> AggregatorServiceClient<WebHttp> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build(connector);
    let service = tower::Layer::layer(&GrpcWebClientLayer::new(), http);
    let origin = format!("http://{addr}")
        .parse()
        .expect("a socket address makes a URI");
    AggregatorServiceClient::with_origin(service, origin)
}

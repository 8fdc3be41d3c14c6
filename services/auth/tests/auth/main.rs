//! The auth service's integration tests, one binary (but for `log_secrets`, which needs a
//! process of its own): every auth method and error code through the generated client against
//! an in-process server (the test kit's [`TestMesh`], or [`start_auth`] where a test needs the
//! data folder as auth alone leaves it), on SQLite and on PostgreSQL; and property tests of any
//! request.

mod accounts;
mod keys;
mod properties;
mod server;
mod service_tokens;
mod sessions;

use std::path::Path;

use mesh_proto::auth::v1::{
    GetJwksRequest, GetJwksResponse, ValidateTokenRequest, ValidateTokenResponse,
    auth_service_client::AuthServiceClient,
};
use mesh_testkit::{Database, TestMesh, TestServer, auth_config};
use mesh_token::Jwks;
use tonic::{Status, transport::Channel};

/// The password of the tests' accounts.
const PASSWORD: &str = "correct horse battery";

/// Auth alone on `database`, with a service client `svc` (secret `svc-secret`) besides the
/// mesh's aggregator.
async fn start(database: Database) -> TestMesh {
    TestMesh::builder()
        .database(database)
        .auth_config(|config| {
            config
                .service_clients
                .push("svc=plain:svc-secret".parse().expect("client"));
        })
        .start()
        .await
}

/// Auth's test configuration under `data` with two service clients: `aggregator`, whose
/// secret (`s3cret`) is configured as its SHA-256 digest, and `dev` (plain `letmein`).
fn configured(data: &Path) -> mesh_auth::Config {
    let mut config = auth_config(data);
    config.service_clients = vec![
        "aggregator=sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
            .parse()
            .expect("hashed client"),
        "dev=plain:letmein".parse().expect("plain client"),
    ];
    config
}

/// The JWK Set `server` publishes, parsed, and its GetJwks reply.
async fn jwks(server: &TestServer) -> (Jwks, GetJwksResponse) {
    let reply = AuthServiceClient::new(server.channel.clone())
        .get_jwks(GetJwksRequest {})
        .await
        .expect("GetJwks")
        .into_inner();
    (Jwks::from_json(&reply.jwks_json).expect("JWK Set"), reply)
}

/// What ValidateToken says of `token`.
async fn validate(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
) -> Result<ValidateTokenResponse, Status> {
    client
        .validate_token(ValidateTokenRequest {
            access_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

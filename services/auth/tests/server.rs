//! The auth server in-process on port 0, through the generated clients.

use std::path::Path;

use mesh_proto::auth::v1::{
    GetJwksRequest, IssueServiceTokenRequest, LoginRequest, auth_service_client::AuthServiceClient,
};
use mesh_runtime::testing::{TestServer, assert_standard_server};
use mesh_token::{Jwks, Verifier};
use tonic::Code;

fn config(data_dir: &Path) -> mesh_auth::Config {
    let mut config = mesh_auth::Config::new(([127, 0, 0, 1], 0).into(), data_dir.to_owned());
    config.service_clients = vec![
        "aggregator=sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
            .parse()
            .expect("hashed client"),
        "dev=plain:letmein".parse().expect("plain client"),
    ];
    config
}

async fn start(config: mesh_auth::Config) -> TestServer {
    TestServer::start(move |listener, shutdown| async move {
        mesh_auth::serve(&config, listener, shutdown).await
    })
    .await
}

async fn jwks(server: &TestServer) -> (Jwks, mesh_proto::auth::v1::GetJwksResponse) {
    let reply = AuthServiceClient::new(server.channel.clone())
        .get_jwks(GetJwksRequest {})
        .await
        .expect("GetJwks")
        .into_inner();
    (Jwks::from_json(&reply.jwks_json).expect("JWK Set"), reply)
}

/// Health (`""`, the service name, `liveness`) is SERVING after start, and reflection v1 and
/// v1alpha list and describe the auth service, health and themselves.
#[tokio::test]
async fn health_and_reflection() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(config(data.path())).await;
    assert_standard_server(&server.channel, mesh_auth::SERVICE_NAME).await;
    server.shutdown().await.expect("clean shutdown");
}

/// An empty Login is refused as INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn empty_login_is_invalid() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(config(data.path())).await;
    let status = AuthServiceClient::new(server.channel.clone())
        .login(LoginRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("email"), "{status:?}");
    server.shutdown().await.expect("clean shutdown");
}

/// With no key configured, a development key is created in the data folder, published by
/// GetJwks (the `keys` list and `jwks_json` agree), and reused after a restart.
#[tokio::test]
async fn jwks_publishes_the_persisted_dev_key() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(config(data.path())).await;
    let (doc, reply) = jwks(&server).await;
    server.shutdown().await.expect("clean shutdown");

    assert_eq!(reply.keys.len(), 1);
    let key = &reply.keys[0];
    assert_eq!(
        (
            key.kty.as_str(),
            key.crv.as_str(),
            key.alg.as_str(),
            key.r#use.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    assert_eq!(doc.keys[0].kid, key.kid);
    assert_eq!(doc.keys[0].x, key.x);
    assert!(data.path().join("auth/dev-signing-key.pem").is_file());

    let restarted = start(config(data.path())).await;
    let (_, again) = jwks(&restarted).await;
    assert_eq!(again.keys[0].kid, key.kid, "the same key after a restart");
    restarted.shutdown().await.expect("clean shutdown");
}

/// Configured PEM keys: all are published, the last one signs.
#[tokio::test]
async fn configured_keys_are_all_published_and_the_newest_signs() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut paths = Vec::new();
    for name in ["old.pem", "new.pem"] {
        let path = data.path().join(name);
        mesh_token::KeyRing::load_or_create_dev_key(&path).expect("write key");
        paths.push(path);
    }
    let newest = mesh_token::KeyRing::load_pem_files(&paths[1..]).expect("newest");
    let mut cfg = config(data.path());
    cfg.signing_keys = paths;
    let server = start(cfg).await;
    let (doc, _) = jwks(&server).await;
    assert_eq!(doc.keys.len(), 2);

    let token = AuthServiceClient::new(server.channel.clone())
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "dev".into(),
            client_secret: "letmein".into(),
        })
        .await
        .expect("token")
        .into_inner()
        .access_token;
    assert_eq!(
        mesh_token::peek_kid(&token).as_deref(),
        Some(newest.signing_kid())
    );
    assert!(!data.path().join("auth/dev-signing-key.pem").exists());
    server.shutdown().await.expect("clean shutdown");
}

/// A service token from configured client credentials verifies locally against the JWKS:
/// `sub` = `service:<client_id>`, no e-mail, no session, 15 minutes by default.
#[tokio::test]
async fn issue_service_token_for_a_configured_client() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(config(data.path())).await;
    let reply = AuthServiceClient::new(server.channel.clone())
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "aggregator".into(),
            client_secret: "s3cret".into(),
        })
        .await
        .expect("IssueServiceToken")
        .into_inner();
    let (doc, _) = jwks(&server).await;
    let verifier = Verifier::new(&doc, "mesh-auth", "mesh", 5).expect("verifier");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let claims = verifier.verify(&reply.access_token, now).expect("verifies");
    assert_eq!(claims.sub, "service:aggregator");
    assert!(claims.is_service());
    assert_eq!((claims.email, claims.sid), (None, None));
    assert_eq!(claims.exp - claims.iat, 15 * 60);
    assert_eq!(reply.expire_time.expect("expire_time").seconds, claims.exp);
    server.shutdown().await.expect("clean shutdown");
}

/// Wrong secret and unknown client are the same UNAUTHENTICATED; an empty id is
/// INVALID_ARGUMENT naming the field; an oversized secret is refused without work.
#[tokio::test]
async fn bad_client_credentials_are_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(config(data.path())).await;
    let mut client = AuthServiceClient::new(server.channel.clone());
    let mut call = async |id: &str, secret: String| {
        client
            .issue_service_token(IssueServiceTokenRequest {
                client_id: id.into(),
                client_secret: secret,
            })
            .await
            .expect_err("refused")
    };
    let wrong = call("aggregator", "letmein".into()).await;
    let unknown = call("nobody", "s3cret".into()).await;
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(wrong.message(), unknown.message());
    let huge = call("aggregator", "x".repeat(100_000)).await;
    assert_eq!(huge.code(), Code::Unauthenticated);
    let empty = call("  ", "s3cret".into()).await;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("client_id"), "{empty:?}");
    server.shutdown().await.expect("clean shutdown");
}

/// A key file that is not an Ed25519 key stops start-up with an error naming the file.
#[tokio::test]
async fn bad_signing_key_fails_start_up() {
    let data = tempfile::tempdir().expect("tempdir");
    let bad = data.path().join("bad.pem");
    std::fs::write(&bad, "not a key").expect("write");
    let mut cfg = config(data.path());
    cfg.signing_keys = vec![bad];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = mesh_auth::serve(&cfg, listener, std::future::pending())
        .await
        .expect_err("refuses to start");
    let chain = mesh_runtime::cli::error_chain(&err);
    assert!(chain.contains("bad.pem"), "{chain}");
}

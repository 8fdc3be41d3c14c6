//! Signing keys: the persisted development key, configured PEM keys (all published, the newest
//! signs), and a bad key file stopping start-up.

use mesh_proto::auth::v1::{IssueServiceTokenRequest, auth_service_client::AuthServiceClient};
use mesh_testkit::start_auth;

use crate::{configured, jwks};

/// With no key configured, a development key is created in the data folder, published by
/// GetJwks (the `keys` list and `jwks_json` agree), and reused after a restart.
#[tokio::test]
async fn jwks_publishes_the_persisted_dev_key() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start_auth(configured(data.path())).await;
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

    let restarted = start_auth(configured(data.path())).await;
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
    let mut cfg = configured(data.path());
    cfg.signing_keys = paths;
    let server = start_auth(cfg).await;
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

/// A key file that is not an Ed25519 key stops start-up with an error naming the file.
#[tokio::test]
async fn bad_signing_key_fails_start_up() {
    let data = tempfile::tempdir().expect("tempdir");
    let bad = data.path().join("bad.pem");
    std::fs::write(&bad, "not a key").expect("write");
    let mut cfg = configured(data.path());
    cfg.signing_keys = vec![bad];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = mesh_auth::serve(&cfg, listener, std::future::pending())
        .await
        .expect_err("refuses to start");
    let chain = mesh_telemetry::error_chain(&err);
    assert!(chain.contains("bad.pem"), "{chain}");
}

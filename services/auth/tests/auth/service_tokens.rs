//! Service tokens: IssueServiceToken for configured clients, refused credentials, and what a
//! service token may and may not do.

use mesh_proto::auth::v1::{
    DeleteAccountRequest, IssueServiceTokenRequest, ListSessionsRequest,
    auth_service_client::AuthServiceClient,
};
use mesh_testkit::{bearer, databases, start_auth, unix_now};
use mesh_token::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, Verifier};
use tonic::Code;

use crate::{PASSWORD, configured, jwks, start, validate};

/// A service token validates (empty e-mail and session) but has no sessions to list.
#[tokio::test]
async fn service_tokens() {
    for database in databases() {
        let mesh = start(database).await;
        let mut c = mesh.auth_client();
        let token = c
            .issue_service_token(IssueServiceTokenRequest {
                client_id: "svc".into(),
                client_secret: "svc-secret".into(),
            })
            .await
            .expect("service token")
            .into_inner()
            .access_token;
        let v = validate(&mut c, &token).await.expect("valid");
        assert_eq!(v.user_id, "service:svc");
        assert!(v.email.is_empty() && v.session_id.is_empty());
        let denied = c
            .list_sessions(bearer(&token, ListSessionsRequest {}))
            .await
            .expect_err("service");
        assert_eq!(denied.code(), Code::PermissionDenied);
        let anonymous = c
            .list_sessions(ListSessionsRequest {})
            .await
            .expect_err("no token");
        assert_eq!(anonymous.code(), Code::Unauthenticated);
        let forged = c
            .list_sessions(bearer("not.a.token", ListSessionsRequest {}))
            .await
            .expect_err("bad token");
        assert_eq!(forged.code(), Code::Unauthenticated);
        let denied = c
            .delete_account(bearer(
                &token,
                DeleteAccountRequest {
                    password: PASSWORD.into(),
                },
            ))
            .await
            .expect_err("service");
        assert_eq!(denied.code(), Code::PermissionDenied);
        mesh.stop().await;
    }
}

/// A service token from configured client credentials verifies locally against the JWKS:
/// `sub` = `service:<client_id>`, no e-mail, no session, 15 minutes by default.
#[tokio::test]
async fn issue_service_token_for_a_configured_client() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start_auth(configured(data.path())).await;
    let reply = AuthServiceClient::new(server.channel.clone())
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "aggregator".into(),
            client_secret: "s3cret".into(),
        })
        .await
        .expect("IssueServiceToken")
        .into_inner();
    let (doc, _) = jwks(&server).await;
    let verifier = Verifier::new(&doc, DEFAULT_ISSUER, DEFAULT_AUDIENCE, 5).expect("verifier");
    let claims = verifier
        .verify(&reply.access_token, unix_now())
        .expect("verifies");
    assert_eq!(claims.sub, "service:aggregator");
    assert!(claims.is_service());
    assert_eq!((claims.email, claims.sid), (None, None));
    assert_eq!(claims.exp - claims.iat, 15 * 60);
    assert_eq!(reply.expire_time.expect("expire_time").seconds, claims.exp);
    server.shutdown().await.expect("clean shutdown");
}

/// Wrong secret and unknown client are the same UNAUTHENTICATED; an empty id is
/// INVALID_ARGUMENT naming the field; an over-long secret is refused without work, and a
/// request beyond the method's 4 KiB limit is RESOURCE_EXHAUSTED before it is read.
#[tokio::test]
async fn bad_client_credentials_are_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start_auth(configured(data.path())).await;
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
    let long = call("aggregator", "x".repeat(2_000)).await;
    assert_eq!(long.code(), Code::Unauthenticated);
    let huge = call("aggregator", "x".repeat(100_000)).await;
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    let empty = call("  ", "s3cret".into()).await;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("client_id"), "{empty:?}");
    server.shutdown().await.expect("clean shutdown");
}

//! Every auth method and error code of the contract, through the generated client against an
//! in-process server, on SQLite and on PostgreSQL.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Backend, backends, bearer, client, config, register, start};
use mesh_proto::auth::v1::{
    DeleteAccountRequest, GetJwksRequest, IssueServiceTokenRequest, ListSessionsRequest,
    LoginRequest, LogoutRequest, RefreshRequest, RegisterRequest, ValidateTokenRequest,
};
use mesh_runtime::testing::health_status;
use tonic::Code;

const PASSWORD: &str = "correct horse battery";

async fn validate(
    client: &mut mesh_proto::auth::v1::auth_service_client::AuthServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
) -> Result<mesh_proto::auth::v1::ValidateTokenResponse, tonic::Status> {
    client
        .validate_token(ValidateTokenRequest {
            access_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Register, login, list sessions, refresh, reuse detection, logout: the whole session life.
#[tokio::test]
async fn session_lifecycle() {
    for backend in backends("session_lifecycle").await {
        let data = tempfile::tempdir().expect("tempdir");
        let server = start(config(&backend, data.path())).await;
        let mut c = client(&server);

        let (user_id, first) = register(&mut c, "  Ada@Example.com ", PASSWORD).await;
        assert!(uuid::Uuid::parse_str(&user_id).is_ok(), "{user_id}");
        assert_eq!(first.token_type, "Bearer");
        assert!(first.refresh_token.len() >= 43, "256 bits in base64url");
        let v = validate(&mut c, &first.access_token).await.expect("valid");
        assert_eq!(
            (v.user_id.as_str(), v.email.as_str()),
            (user_id.as_str(), "ada@example.com")
        );
        assert!(!v.session_id.is_empty());
        let first_session = v.session_id.clone();
        let refresh_expiry = first.refresh_token_expire_time.expect("expiry").seconds;
        let access_expiry = first.access_token_expire_time.expect("expiry").seconds;
        assert!((refresh_expiry - access_expiry - 30 * 24 * 3600 + 15 * 60).abs() < 5);

        // A second session by logging in (e-mail compared case-insensitively).
        let second = c
            .login(LoginRequest {
                email: "ADA@example.COM".into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("login")
            .into_inner();
        assert_eq!(second.user_id, user_id);
        let second = second.tokens.expect("tokens");
        let sessions = c
            .list_sessions(bearer(&second.access_token, ListSessionsRequest {}))
            .await
            .expect("list")
            .into_inner()
            .sessions;
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions.iter().filter(|s| s.current).count(), 1);
        assert!(
            sessions
                .iter()
                .any(|s| s.session_id == first_session && !s.current)
        );

        // Rotation: a new pair; the session's expiry is unchanged; last use moves.
        let rotated = c
            .refresh(RefreshRequest {
                refresh_token: first.refresh_token.clone(),
            })
            .await
            .expect("refresh")
            .into_inner()
            .tokens
            .expect("tokens");
        assert_ne!(rotated.refresh_token, first.refresh_token);
        assert_eq!(
            rotated.refresh_token_expire_time.expect("expiry").seconds,
            refresh_expiry
        );
        let v = validate(&mut c, &rotated.access_token)
            .await
            .expect("valid");
        assert_eq!(v.session_id, first_session);

        // Reusing the old refresh token revokes the whole session.
        let reuse = c
            .refresh(RefreshRequest {
                refresh_token: first.refresh_token.clone(),
            })
            .await
            .expect_err("reuse");
        assert_eq!(reuse.code(), Code::Unauthenticated);
        let after = validate(&mut c, &rotated.access_token)
            .await
            .expect_err("revoked");
        assert_eq!(after.code(), Code::Unauthenticated);
        let stale = c
            .refresh(RefreshRequest {
                refresh_token: rotated.refresh_token.clone(),
            })
            .await
            .expect_err("session revoked");
        assert_eq!(stale.code(), Code::Unauthenticated);
        // The other session is untouched.
        validate(&mut c, &second.access_token)
            .await
            .expect("other session live");

        // Logout ends the session at once; it is idempotent, also for unknown tokens.
        for token in [
            second.refresh_token.as_str(),
            second.refresh_token.as_str(),
            "unknown",
            "",
        ] {
            c.logout(LogoutRequest {
                refresh_token: token.into(),
            })
            .await
            .expect("logout is OK");
        }
        let gone = validate(&mut c, &second.access_token)
            .await
            .expect_err("logged out");
        assert_eq!(gone.code(), Code::Unauthenticated);
        let refresh = c
            .refresh(RefreshRequest {
                refresh_token: second.refresh_token.clone(),
            })
            .await
            .expect_err("logged out");
        assert_eq!(refresh.code(), Code::Unauthenticated);
        server.shutdown().await.expect("clean shutdown");
    }
}

/// Input validation names the field; a duplicate e-mail (any case, any spacing) is
/// ALREADY_EXISTS; wrong password and unknown e-mail are the same UNAUTHENTICATED.
#[tokio::test]
async fn validation_and_bad_credentials() {
    for backend in backends("validation_and_bad_credentials").await {
        let data = tempfile::tempdir().expect("tempdir");
        let server = start(config(&backend, data.path())).await;
        let mut c = client(&server);
        for (email, password, field) in [
            ("not-an-email", PASSWORD, "email"),
            ("", PASSWORD, "email"),
            ("a@example.com", "short", "password"),
            ("a@example.com", &"x".repeat(1025), "password"),
        ] {
            let err = c
                .register(RegisterRequest {
                    email: email.into(),
                    password: password.into(),
                })
                .await
                .expect_err("invalid");
            assert_eq!(err.code(), Code::InvalidArgument, "{email}");
            assert!(err.message().contains(field), "{err:?}");
        }
        register(&mut c, "bob@example.com", PASSWORD).await;
        let dup = c
            .register(RegisterRequest {
                email: " BOB@example.com".into(),
                password: PASSWORD.into(),
            })
            .await
            .expect_err("duplicate");
        assert_eq!(dup.code(), Code::AlreadyExists);

        let wrong = c
            .login(LoginRequest {
                email: "bob@example.com".into(),
                password: "wrong password".into(),
            })
            .await
            .expect_err("wrong password");
        let unknown = c
            .login(LoginRequest {
                email: "nobody@example.com".into(),
                password: PASSWORD.into(),
            })
            .await
            .expect_err("unknown e-mail");
        assert_eq!(wrong.code(), Code::Unauthenticated);
        assert_eq!(unknown.code(), Code::Unauthenticated);
        assert_eq!(wrong.message(), unknown.message());
        let garbage = validate(&mut c, "garbage").await.expect_err("garbage");
        assert_eq!(garbage.code(), Code::Unauthenticated);
        server.shutdown().await.expect("clean shutdown");
    }
}

/// After 5 failures every attempt for that e-mail, even right, is RESOURCE_EXHAUSTED with a
/// retry hint; other e-mails are unaffected; a success before the limit clears the count.
#[tokio::test]
async fn failed_logins_are_throttled() {
    for backend in backends("failed_logins_are_throttled").await {
        let data = tempfile::tempdir().expect("tempdir");
        let server = start(config(&backend, data.path())).await;
        let mut c = client(&server);
        register(&mut c, "carol@example.com", PASSWORD).await;
        register(&mut c, "dave@example.com", PASSWORD).await;
        let mut login = async |email: &str, password: &str| {
            c.login(LoginRequest {
                email: email.into(),
                password: password.into(),
            })
            .await
        };
        // Four failures, a success (clears), four more failures: still allowed.
        for _ in 0..4 {
            assert_eq!(
                login("carol@example.com", "nope-nope")
                    .await
                    .expect_err("bad")
                    .code(),
                Code::Unauthenticated
            );
        }
        login("carol@example.com", PASSWORD)
            .await
            .expect("success clears the count");
        for _ in 0..5 {
            assert_eq!(
                login("carol@example.com", "nope-nope")
                    .await
                    .expect_err("bad")
                    .code(),
                Code::Unauthenticated
            );
        }
        let throttled = login("Carol@example.com", PASSWORD)
            .await
            .expect_err("throttled");
        assert_eq!(throttled.code(), Code::ResourceExhausted);
        let retry: u64 = throttled
            .metadata()
            .get("retry-after")
            .expect("retry hint")
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!((1..=900).contains(&retry), "{retry}");
        // Unknown e-mails are throttled the same way.
        for _ in 0..5 {
            let _ = login("ghost@example.com", "nope-nope").await;
        }
        assert_eq!(
            login("ghost@example.com", "x-x-x-x-x")
                .await
                .expect_err("t")
                .code(),
            Code::ResourceExhausted
        );
        login("dave@example.com", PASSWORD)
            .await
            .expect("another e-mail is unaffected");
        server.shutdown().await.expect("clean shutdown");
    }
}

/// Two concurrent refreshes with the same token: at most one succeeds.
#[tokio::test]
async fn concurrent_refresh_rotates_once() {
    for backend in backends("concurrent_refresh_rotates_once").await {
        let data = tempfile::tempdir().expect("tempdir");
        let server = start(config(&backend, data.path())).await;
        let mut c = client(&server);
        for round in 0..5 {
            let (_, tokens) = register(&mut c, &format!("race{round}@example.com"), PASSWORD).await;
            let attempts = (0..2).map(|_| {
                let mut c = c.clone();
                let token = tokens.refresh_token.clone();
                tokio::spawn(async move {
                    c.refresh(RefreshRequest {
                        refresh_token: token,
                    })
                    .await
                })
            });
            let mut ok = 0;
            for attempt in attempts {
                match attempt.await.expect("task") {
                    Ok(_) => ok += 1,
                    Err(status) => assert_eq!(status.code(), Code::Unauthenticated),
                }
            }
            assert!(ok <= 1, "round {round}: {ok} refreshes succeeded");
        }
        server.shutdown().await.expect("clean shutdown");
    }
}

/// DeleteAccount needs the token and the password: a wrong password removes nothing; the
/// right one removes credentials and sessions, and the e-mail can register again.
#[tokio::test]
async fn delete_account() {
    for backend in backends("delete_account").await {
        let data = tempfile::tempdir().expect("tempdir");
        let server = start(config(&backend, data.path())).await;
        let mut c = client(&server);
        let (_, tokens) = register(&mut c, "erin@example.com", PASSWORD).await;
        let no_token = c
            .delete_account(DeleteAccountRequest {
                password: PASSWORD.into(),
            })
            .await
            .expect_err("no token");
        assert_eq!(no_token.code(), Code::Unauthenticated);
        let wrong = c
            .delete_account(bearer(
                &tokens.access_token,
                DeleteAccountRequest {
                    password: "wrong-password".into(),
                },
            ))
            .await
            .expect_err("wrong password");
        assert_eq!(wrong.code(), Code::Unauthenticated);
        validate(&mut c, &tokens.access_token)
            .await
            .expect("still there");

        c.delete_account(bearer(
            &tokens.access_token,
            DeleteAccountRequest {
                password: PASSWORD.into(),
            },
        ))
        .await
        .expect("deleted");
        assert_eq!(
            validate(&mut c, &tokens.access_token)
                .await
                .expect_err("gone")
                .code(),
            Code::Unauthenticated
        );
        let login = c
            .login(LoginRequest {
                email: "erin@example.com".into(),
                password: PASSWORD.into(),
            })
            .await
            .expect_err("no account");
        assert_eq!(login.code(), Code::Unauthenticated);
        register(&mut c, "erin@example.com", PASSWORD).await;
        server.shutdown().await.expect("clean shutdown");
    }
}

/// A service token validates (empty e-mail and session) but has no sessions to list.
#[tokio::test]
async fn service_tokens() {
    for backend in backends("service_tokens").await {
        let data = tempfile::tempdir().expect("tempdir");
        let server = start(config(&backend, data.path())).await;
        let mut c = client(&server);
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
        server.shutdown().await.expect("clean shutdown");
    }
}

/// Argon2 runs on the blocking pool behind a bound: while a burst of logins is still hashing,
/// a health check and GetJwks are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_fast_during_a_login_storm() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = start(config(&Backend::Sqlite, data.path())).await;
    let mut c = client(&server);
    register(&mut c, "storm@example.com", PASSWORD).await;

    const LOGINS: usize = 32;
    let done = Arc::new(AtomicUsize::new(0));
    let storm: Vec<_> = (0..LOGINS)
        .map(|i| {
            let mut c = c.clone();
            let done = done.clone();
            tokio::spawn(async move {
                // Different e-mails, so throttling stays out of the way.
                let _ = c
                    .login(LoginRequest {
                        email: format!("storm{i}@example.com"),
                        password: PASSWORD.into(),
                    })
                    .await;
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    // Let the storm reach the server before probing.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let status = health_status(&server.channel, "")
        .await
        .expect("health answers");
    assert_eq!(status, 1);
    c.get_jwks(GetJwksRequest {})
        .await
        .expect("GetJwks answers");
    let finished = done.load(Ordering::SeqCst);
    assert!(
        finished < LOGINS,
        "all {LOGINS} logins finished before health answered: hashing blocks the runtime"
    );
    for login in storm {
        login.await.expect("login task");
    }
    server.shutdown().await.expect("clean shutdown");
}

//! Accounts: validation, bad credentials, throttled logins, deletion, and Argon2id kept off the
//! runtime during a login storm.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::auth::v1::{DeleteAccountRequest, GetJwksRequest, LoginRequest, RegisterRequest};
use mesh_testkit::{Database, bearer, databases, health_status};
use tonic::Code;

use crate::{PASSWORD, start, validate};

/// Input validation names the field; a duplicate e-mail (any case, any spacing) is
/// ALREADY_EXISTS; wrong password and unknown e-mail are the same UNAUTHENTICATED.
#[tokio::test]
async fn validation_and_bad_credentials() {
    for database in databases() {
        let mesh = start(database).await;
        let mut c = mesh.auth_client();
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
        mesh.register("bob@example.com", PASSWORD).await;
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
        mesh.stop().await;
    }
}

/// After 5 failures every attempt for that e-mail, even right, is RESOURCE_EXHAUSTED with a
/// retry hint; other e-mails are unaffected; a success before the limit clears the count.
#[tokio::test]
async fn failed_logins_are_throttled() {
    for database in databases() {
        let mesh = start(database).await;
        let mut c = mesh.auth_client();
        mesh.register("carol@example.com", PASSWORD).await;
        mesh.register("dave@example.com", PASSWORD).await;
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
        mesh.stop().await;
    }
}

/// DeleteAccount needs the token and the password: a wrong password removes nothing; the
/// right one removes credentials and sessions, and the e-mail can register again.
#[tokio::test]
async fn delete_account() {
    for database in databases() {
        let mesh = start(database).await;
        let mut c = mesh.auth_client();
        let (_, tokens) = mesh.register("erin@example.com", PASSWORD).await;
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
        mesh.register("erin@example.com", PASSWORD).await;
        mesh.stop().await;
    }
}

/// Argon2 runs on the blocking pool behind a bound: while a burst of logins is still hashing,
/// a health check and GetJwks are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_fast_during_a_login_storm() {
    let mesh = start(Database::Sqlite).await;
    let mut c = mesh.auth_client();
    mesh.register("storm@example.com", PASSWORD).await;

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
    let status = health_status(&mesh.auth.channel, "")
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
    mesh.stop().await;
}

//! Sessions: register, login, list, refresh with rotation and reuse detection, logout, and
//! concurrent refreshes.

use mesh_proto::auth::v1::{ListSessionsRequest, LoginRequest, LogoutRequest, RefreshRequest};
use mesh_testkit::{bearer, databases};
use tonic::Code;

use crate::{PASSWORD, start, validate};

/// Register, login, list sessions, refresh, reuse detection, logout: the whole session life.
#[tokio::test]
async fn session_lifecycle() {
    for database in databases() {
        let mesh = start(database).await;
        let mut c = mesh.auth_client();

        let (user_id, first) = mesh.register("  Ada@Example.com ", PASSWORD).await;
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
        // ListSessions refuses the tokens of ended sessions too (it checks the session in the
        // same query that lists them): a logged-out one and one revoked by reuse.
        for (ended, token) in [
            ("logged out", &second.access_token),
            ("revoked", &rotated.access_token),
        ] {
            let listed = c
                .list_sessions(bearer(token, ListSessionsRequest {}))
                .await
                .expect_err(ended);
            assert_eq!(listed.code(), Code::Unauthenticated, "{ended}");
        }
        let refresh = c
            .refresh(RefreshRequest {
                refresh_token: second.refresh_token.clone(),
            })
            .await
            .expect_err("logged out");
        assert_eq!(refresh.code(), Code::Unauthenticated);
        mesh.stop().await;
    }
}

/// Two concurrent refreshes with the same token: at most one succeeds.
#[tokio::test]
async fn concurrent_refresh_rotates_once() {
    for database in databases() {
        let mesh = start(database).await;
        let c = mesh.auth_client();
        for round in 0..5 {
            let (_, tokens) = mesh
                .register(&format!("race{round}@example.com"), PASSWORD)
                .await;
            // Both spawned before either is awaited, so they race.
            let attempts: Vec<_> = (0..2)
                .map(|_| {
                    let mut c = c.clone();
                    let token = tokens.refresh_token.clone();
                    tokio::spawn(async move {
                        c.refresh(RefreshRequest {
                            refresh_token: token,
                        })
                        .await
                    })
                })
                .collect();
            let mut ok = 0;
            for attempt in attempts {
                match attempt.await.expect("task") {
                    Ok(_) => ok += 1,
                    Err(status) => assert_eq!(status.code(), Code::Unauthenticated),
                }
            }
            assert_eq!(ok, 1, "round {round}: {ok} refreshes succeeded");
        }
        mesh.stop().await;
    }
}

//! Accounts through the facade: sign up, login, refresh, logout, update, delete.

use mesh_proto::{
    aggregator::v1::{
        DeleteAccountRequest, GetMeRequest, LoginRequest, LogoutRequest, Profile, RefreshRequest,
        SignUpRequest, UpdateProfileRequest, aggregator_service_client::AggregatorServiceClient,
    },
    auth::v1::{self as auth, auth_service_client::AuthServiceClient},
    users::v1 as users,
};
use mesh_testkit::{UsersDouble, assert_code, auth_config, bearer, start_auth, unix_now};
use tonic::{Code, Status};

use crate::{aggregator_for, sign_up, start, stop};

/// The whole life of an account through the facade: sign up, GetMe, update, login, refresh,
/// logout, a delete with the wrong password (nothing removed), the delete, and signing up
/// again with the same e-mail.
#[tokio::test]
async fn an_account_from_sign_up_to_deletion() {
    let mesh = start().await;
    let mut client = mesh.aggregator_client();
    let (profile, access, refresh) = sign_up(&mesh, " Ada@Example.com ", " Ada ").await;
    assert_eq!(
        (
            profile.display_name.as_str(),
            profile.email.as_str(),
            profile.version
        ),
        ("Ada", "ada@example.com", 1)
    );

    let me = client
        .get_me(bearer(&access, GetMeRequest {}))
        .await
        .expect("get me")
        .into_inner();
    assert_eq!(
        me.profile.as_ref().map(|p| &p.user_id),
        Some(&profile.user_id)
    );
    assert_eq!(me.sessions.len(), 1);
    assert!(me.sessions[0].current);
    assert!(me.token_expire_time.expect("expiry").seconds > unix_now());

    let updated = client
        .update_profile(bearer(
            &access,
            UpdateProfileRequest {
                profile: Some(Profile {
                    bio: "Analyst".into(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 1,
            },
        ))
        .await
        .expect("update")
        .into_inner();
    assert_eq!((updated.bio.as_str(), updated.version), ("Analyst", 2));
    let stale = client
        .update_profile(bearer(
            &access,
            UpdateProfileRequest {
                profile: Some(Profile {
                    bio: "x".into(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 1,
            },
        ))
        .await;
    assert_code(stale, Code::Aborted);
    let other = client
        .update_profile(bearer(
            &access,
            UpdateProfileRequest {
                profile: Some(Profile {
                    user_id: uuid::Uuid::now_v7().to_string(),
                    bio: "x".into(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 0,
            },
        ))
        .await;
    assert_code(other, Code::PermissionDenied);

    let login = client
        .login(LoginRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await
        .expect("login")
        .into_inner();
    assert_eq!(login.profile.expect("profile").bio, "Analyst");
    // The sign-up's session ends below (refresh-token reuse revokes it); go on with the
    // login's.
    let access = login.tokens.expect("tokens").access_token;
    let wrong = client
        .login(LoginRequest {
            email: "ada@example.com".into(),
            password: "wrong password!".into(),
        })
        .await;
    assert_code(wrong, Code::Unauthenticated);

    let refreshed = client
        .refresh(RefreshRequest {
            refresh_token: refresh.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    assert_eq!(refreshed.token_type, "Bearer");
    assert_code(
        client
            .refresh(RefreshRequest {
                refresh_token: refresh,
            })
            .await,
        Code::Unauthenticated,
    );
    client
        .logout(LogoutRequest {
            refresh_token: refreshed.refresh_token,
        })
        .await
        .expect("logout");

    let bad = client
        .delete_account(bearer(
            &access,
            DeleteAccountRequest {
                password: "not the password".into(),
            },
        ))
        .await;
    assert_code(bad, Code::Unauthenticated);
    let still = client
        .get_me(bearer(&access, GetMeRequest {}))
        .await
        .expect("nothing was removed")
        .into_inner();
    assert!(still.profile.is_some());

    client
        .delete_account(bearer(
            &access,
            DeleteAccountRequest {
                password: "correct horse battery".into(),
            },
        ))
        .await
        .expect("delete");
    assert_code(
        client
            .login(LoginRequest {
                email: "ada@example.com".into(),
                password: "correct horse battery".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    let missing = mesh
        .users_client()
        .get_user(bearer(
            &mesh.keys.service("test"),
            users::GetUserRequest {
                id: profile.user_id.clone(),
            },
        ))
        .await;
    assert_code(missing, Code::NotFound);
    let (again, _, _) = sign_up(&mesh, "ada@example.com", "Ada again").await;
    assert_ne!(again.user_id, profile.user_id);

    // Public methods need no token; the others do; "me" methods need a user's token.
    assert_code(client.get_me(GetMeRequest {}).await, Code::Unauthenticated);
    assert_code(
        client
            .get_me(bearer(&mesh.keys.service("test"), GetMeRequest {}))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        client
            .sign_up(SignUpRequest {
                email: "x@example.com".into(),
                password: "long enough pw".into(),
                display_name: "  ".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    mesh.stop().await;
}

/// A retried delete after a partial failure (profile gone, credentials left) finishes.
#[tokio::test]
async fn a_retried_delete_finishes_the_job() {
    let mesh = start().await;
    let (profile, access, _) = sign_up(&mesh, "bob@example.com", "Bob").await;
    // The first attempt got as far as removing the profile.
    mesh.users_client()
        .delete_user(bearer(
            &access,
            users::DeleteUserRequest {
                id: profile.user_id.clone(),
            },
        ))
        .await
        .expect("profile removed");
    mesh.aggregator_client()
        .delete_account(bearer(
            &access,
            DeleteAccountRequest {
                password: "correct horse battery".into(),
            },
        ))
        .await
        .expect("the retry completes");
    let gone = mesh
        .auth_client()
        .login(auth::LoginRequest {
            email: "bob@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await;
    assert_code(gone, Code::Unauthenticated);
    mesh.stop().await;
}

/// If users cannot create the profile, SignUp removes the credentials again: no half-made
/// account remains and the same e-mail can register again.
#[tokio::test]
async fn a_failed_sign_up_leaves_no_credentials() {
    let data = tempfile::tempdir().expect("data");
    let auth = start_auth(auth_config(data.path())).await;
    let users = UsersDouble::new()
        .create_user(|_| async { Err(Status::unavailable("users double: storage unavailable")) })
        .serve()
        .await;
    let aggregator = aggregator_for(auth.addr, users.addr).await;
    let failed = AggregatorServiceClient::new(aggregator.channel.clone())
        .sign_up(SignUpRequest {
            email: "carol@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Carol".into(),
        })
        .await;
    let status = assert_code(failed, Code::Unavailable);
    assert!(
        !status.message().contains("double"),
        "no internals: {status:?}"
    );
    let mut auth_client = AuthServiceClient::new(auth.channel.clone());
    assert_code(
        auth_client
            .login(auth::LoginRequest {
                email: "carol@example.com".into(),
                password: "correct horse battery".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    auth_client
        .register(auth::RegisterRequest {
            email: "carol@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await
        .expect("the e-mail is free again");
    stop(aggregator, users, auth).await;
}

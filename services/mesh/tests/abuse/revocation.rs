//! Revocation reaches every verifier: after Logout, refresh-token reuse, DeleteAccount or a
//! signing key's withdrawal, users and the aggregator refuse the affected tokens within about
//! a second (bounded here at 10 s; the latency is printed).

use std::time::Duration;

use mesh_proto::{
    aggregator::v1::{self as aggregator, UpdateProfileRequest},
    users::v1 as users,
};
use mesh_testkit::{
    Minter, PASSWORD, TestMesh, auth_config, bearer, free_addr, sign_up, start_auth, start_users,
    users_config,
};
use mesh_token::KeyRing;
use tonic::Code;

use crate::support::within;

const LIMIT: Duration = Duration::from_secs(10);

/// The code of users' GetUser and the aggregator's UpdateProfile made with `token`.
async fn codes(mesh: &TestMesh, token: &str, id: &str) -> (Code, Code) {
    let users = mesh
        .users_client()
        .get_user(bearer(token, users::GetUserRequest { id: id.into() }))
        .await
        .err()
        .map_or(Code::Ok, |s| s.code());
    let aggregator = mesh
        .aggregator_client()
        .update_profile(bearer(
            token,
            UpdateProfileRequest {
                profile: Some(aggregator::Profile {
                    bio: "still here".into(),
                    ..aggregator::Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 0,
            },
        ))
        .await
        .err()
        .map_or(Code::Ok, |s| s.code());
    (users, aggregator)
}

/// Both services refuse `token` within the limit; how long it took.
async fn refused_everywhere(mesh: &TestMesh, token: &str, id: &str) -> Duration {
    within(LIMIT, || async {
        codes(mesh, token, id).await == (Code::Unauthenticated, Code::Unauthenticated)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the token is still accepted {LIMIT:?} later: {:?}",
            futures_util::FutureExt::now_or_never(codes(mesh, token, id))
        )
    })
}

/// After Logout, the session's access token no longer changes anything through the
/// aggregator nor reads users.
#[tokio::test]
async fn logout_reaches_every_verifier() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let mut client = mesh.aggregator_client();
    let (id, tokens) = sign_up(&mut client, "leaving@example.com", "Someone").await;
    let (access, refresh) = (tokens.access_token, tokens.refresh_token);
    assert_eq!(codes(&mesh, &access, &id).await, (Code::Ok, Code::Ok));
    client
        .logout(aggregator::LogoutRequest {
            refresh_token: refresh,
        })
        .await
        .expect("logout");
    let took = refused_everywhere(&mesh, &access, &id).await;
    eprintln!("logout reached users and the aggregator in {took:?}");
    mesh.stop().await;
}

/// After DeleteAccount, the deleted account's token cannot make a new profile in users.
#[tokio::test]
async fn deleted_accounts_tokens_cannot_write() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let mut client = mesh.aggregator_client();
    let (id, tokens) = sign_up(&mut client, "deleted@example.com", "Someone").await;
    let access = tokens.access_token;
    client
        .delete_account(bearer(
            &access,
            aggregator::DeleteAccountRequest {
                password: PASSWORD.into(),
            },
        ))
        .await
        .expect("delete");
    let create = || async {
        mesh.users_client()
            .create_user(bearer(
                &access,
                users::CreateUserRequest {
                    user: Some(users::User {
                        display_name: "Back".into(),
                        ..users::User::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
    };
    let took = within(LIMIT, || async {
        matches!(create().await, Err(s) if s.code() == Code::Unauthenticated)
    })
    .await
    .expect("the deleted account's token is refused");
    eprintln!("account deletion reached users in {took:?}");
    assert_eq!(codes(&mesh, &access, &id).await.1, Code::Unauthenticated);
    mesh.stop().await;
}

/// Presenting a used refresh token revokes its session: the access token refreshed from it
/// is refused everywhere too.
#[tokio::test]
async fn refresh_token_reuse_reaches_every_verifier() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let mut client = mesh.aggregator_client();
    let (id, tokens) = sign_up(&mut client, "stolen@example.com", "Someone").await;
    let first = tokens.refresh_token;
    let rotated = client
        .refresh(aggregator::RefreshRequest {
            refresh_token: first.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    assert_eq!(
        codes(&mesh, &rotated.access_token, &id).await,
        (Code::Ok, Code::Ok)
    );
    let reused = client
        .refresh(aggregator::RefreshRequest {
            refresh_token: first,
        })
        .await;
    assert_eq!(reused.expect_err("reuse").code(), Code::Unauthenticated);
    let took = refused_everywhere(&mesh, &rotated.access_token, &id).await;
    eprintln!("refresh-token reuse reached users and the aggregator in {took:?}");
    mesh.stop().await;
}

/// A new Ed25519 key written to `dir/name` as PKCS#8 PEM, and its ring.
fn pem_file(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, KeyRing) {
    let path = dir.join(name);
    let (ring, created) = KeyRing::load_or_create_dev_key(&path).expect("key");
    assert!(created);
    (path, ring)
}

/// A signing key withdrawn from auth (auth restarted without it) stops being trusted by users
/// without restarting users.
#[tokio::test]
async fn withdrawn_keys_stop_being_trusted() {
    let data = tempfile::tempdir().expect("data");
    let (old_pem, old) = pem_file(data.path(), "old.pem");
    let (new_pem, new) = pem_file(data.path(), "new.pem");
    let addr = free_addr();
    let mut config = auth_config(data.path());
    config.listen = addr;
    config.signing_keys = vec![old_pem.clone(), new_pem.clone()];
    let auth = start_auth(config.clone()).await;
    let users = start_users(users_config(data.path(), addr)).await;
    let mut client = users::user_service_client::UserServiceClient::new(users.channel.clone());
    let (old, new) = (Minter::new(old), Minter::new(new));
    let get = |token: String| {
        let mut client = client.clone();
        async move {
            client
                .list_users(bearer(&token, users::ListUsersRequest::default()))
                .await
                .err()
                .map_or(Code::Ok, |s| s.code())
        }
    };
    let (_, with_old) = old.new_user();
    assert_eq!(get(with_old.clone()).await, Code::Ok, "both keys published");

    auth.shutdown().await.expect("auth stops");
    config.signing_keys = vec![new_pem];
    let auth = start_auth(config).await;
    let took = within(LIMIT, || async {
        get(with_old.clone()).await == Code::Unauthenticated
    })
    .await
    .expect("the withdrawn key's tokens are refused");
    eprintln!("a withdrawn key reached users in {took:?} (after auth's restart)");
    let (_, with_new) = new.new_user();
    assert_eq!(get(with_new).await, Code::Ok);
    client
        .list_users(bearer(
            &old.new_user().1,
            users::ListUsersRequest::default(),
        ))
        .await
        .expect_err("refused");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

//! Tokens: every method needs a valid one; auth's own tokens and minted ones both work.

use mesh_proto::users::v1::{
    CreateUserRequest, GetUserRequest, ListUsersRequest, WatchUsersRequest,
};
use mesh_testkit::{Database, Minter, assert_code_contains, bearer};
use tonic::{Code, Request};

use crate::{profile, start};

/// Every method needs a valid token: none, garbage, or one signed by another key is
/// UNAUTHENTICATED.
#[tokio::test]
async fn every_method_needs_a_valid_token() {
    let mesh = start(Database::Sqlite).await;
    let stranger = Minter::stranger();
    let forged = stranger.user(&uuid::Uuid::now_v7().to_string(), "x@example.com");
    let mut client = mesh.users_client();
    for token in [None, Some("not-a-jwt"), Some(forged.as_str())] {
        let id = uuid::Uuid::now_v7().to_string();
        let results = [
            client
                .get_user(maybe_bearer(token, GetUserRequest { id: id.clone() }))
                .await
                .map(drop),
            client
                .list_users(maybe_bearer(token, ListUsersRequest::default()))
                .await
                .map(drop),
            client
                .create_user(maybe_bearer(token, CreateUserRequest::default()))
                .await
                .map(drop),
            client
                .watch_users(maybe_bearer(token, WatchUsersRequest::default()))
                .await
                .map(drop),
        ];
        for result in results {
            assert_code_contains(result, Code::Unauthenticated, "access token");
        }
    }
    mesh.stop().await;
}

/// The whole path: register on auth, create the profile with auth's own token (id = `sub`,
/// e-mail from the token), read it back.
#[tokio::test]
async fn a_registered_user_creates_their_profile() {
    let mesh = start(Database::Sqlite).await;
    let (user_id, tokens) = mesh
        .register("  Ada@Example.com ", "correct horse battery")
        .await;
    let token = tokens.access_token;
    let created = mesh
        .users_client()
        .create_user(bearer(
            &token,
            CreateUserRequest {
                user: profile("  Ada Lovelace  ", " Analyst "),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.id, user_id);
    assert_eq!(created.email, "ada@example.com");
    assert_eq!(
        (created.display_name.as_str(), created.bio.as_str()),
        ("Ada Lovelace", "Analyst")
    );
    assert_eq!(created.version, 1);
    assert!(created.create_time.is_some() && created.create_time == created.update_time);
    let fetched = mesh
        .users_client()
        .get_user(bearer(
            &token,
            GetUserRequest {
                id: created.id.clone(),
            },
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(fetched, created);
    mesh.stop().await;
}

/// `message`, with `token` as its bearer token if there is one.
fn maybe_bearer<T>(token: Option<&str>, message: T) -> Request<T> {
    match token {
        Some(token) => bearer(token, message),
        None => Request::new(message),
    }
}

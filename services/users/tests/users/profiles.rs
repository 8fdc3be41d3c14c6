//! The profile methods' rules: CreateUser, GetUser and BatchGetUsers, UpdateUser, DeleteUser.

use mesh_proto::users::v1::{
    BatchGetUsersRequest, CreateUserRequest, DeleteUserRequest, EventKind, GetUserRequest,
    UpdateUserRequest, User, WatchUsersRequest,
};
use mesh_testkit::{assert_code_contains, bearer, databases};
use tonic::Code;

use crate::{create, mask, profile, service_token, start, take, user};

/// CreateUser: ALREADY_EXISTS on a second create, except a retry with the same request id,
/// which returns the profile as it is now; another id or a service token is
/// PERMISSION_DENIED; invalid fields are INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn create_user_rules() {
    for database in databases() {
        let mesh = start(database).await;
        let mut client = mesh.users_client();
        let alice = user(&mesh);
        let create = |request_id: &str, user: Option<User>| {
            bearer(
                &alice.token,
                CreateUserRequest {
                    user,
                    request_id: request_id.into(),
                },
            )
        };
        let first = client
            .create_user(create("req-1", profile("Alice", "")))
            .await
            .expect("create")
            .into_inner();
        assert_eq!(
            (first.id.as_str(), first.email.as_str()),
            (alice.id.as_str(), alice.email.as_str())
        );

        // The profile changes, then the original create is retried: the profile as it is now.
        client
            .update_user(bearer(
                &alice.token,
                UpdateUserRequest {
                    user: profile("Alice B.", ""),
                    update_mask: mask(&["display_name"]),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
        let retried = client
            .create_user(create("req-1", profile("Alice", "")))
            .await
            .expect("idempotent retry")
            .into_inner();
        assert_eq!(
            (retried.display_name.as_str(), retried.version),
            ("Alice B.", 2)
        );
        assert_code_contains(
            client
                .create_user(create("req-2", profile("Alice", "")))
                .await,
            Code::AlreadyExists,
            "already exists",
        );
        assert_code_contains(
            client.create_user(create("", profile("Alice", ""))).await,
            Code::AlreadyExists,
            "already exists",
        );

        // Someone else's id, with an explicit id in either case.
        let bob = user(&mesh);
        let mut other = profile("Bob", "").expect("user");
        other.id = alice.id.to_uppercase();
        assert_code_contains(
            client
                .create_user(bearer(
                    &bob.token,
                    CreateUserRequest {
                        user: Some(other),
                        request_id: String::new(),
                    },
                ))
                .await,
            Code::PermissionDenied,
            "owner",
        );
        let mut own = profile("Bob", "").expect("user");
        own.id = bob.id.to_uppercase();
        let made = client
            .create_user(bearer(
                &bob.token,
                CreateUserRequest {
                    user: Some(own),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("own id in upper case")
            .into_inner();
        assert_eq!(made.id, bob.id);

        assert_code_contains(
            client
                .create_user(bearer(
                    &service_token(&mesh),
                    CreateUserRequest {
                        user: profile("Svc", ""),
                        request_id: String::new(),
                    },
                ))
                .await,
            Code::PermissionDenied,
            "service token",
        );

        let carol = user(&mesh);
        let cases = [
            (profile("   ", ""), "display_name"),
            (profile(&"é".repeat(65), ""), "display_name"),
            (profile("Carol", &"b".repeat(513)), "bio"),
            (None, "display_name"),
        ];
        for (user, field) in cases {
            assert_code_contains(
                client
                    .create_user(bearer(
                        &carol.token,
                        CreateUserRequest {
                            user,
                            request_id: String::new(),
                        },
                    ))
                    .await,
                Code::InvalidArgument,
                field,
            );
        }
        assert_code_contains(
            client
                .create_user(bearer(
                    &carol.token,
                    CreateUserRequest {
                        user: profile("Carol", ""),
                        request_id: "r".repeat(129),
                    },
                ))
                .await,
            Code::InvalidArgument,
            "request_id",
        );
        // Limits count characters, not bytes: 64 two-byte characters and a 512-character bio
        // are fine.
        let carol_made = client
            .create_user(bearer(
                &carol.token,
                CreateUserRequest {
                    user: profile(&"é".repeat(64), &"ü".repeat(512)),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("limits are in characters")
            .into_inner();
        assert_eq!(carol_made.display_name.chars().count(), 64);
        mesh.stop().await;
    }
}

/// GetUser and BatchGetUsers: e-mail only for the owner, ids in either case, malformed ids
/// INVALID_ARGUMENT (the batch names the bad one), unknown ids NOT_FOUND or listed, request
/// order with duplicates collapsed, at most 1000 ids.
#[tokio::test]
async fn get_and_batch_get() {
    for database in databases() {
        let mesh = start(database).await;
        let mut client = mesh.users_client();
        let (alice, bob) = (user(&mesh), user(&mesh));
        create(&mesh, &alice, "Alice").await;
        create(&mesh, &bob, "Bob").await;

        let own = client
            .get_user(bearer(
                &alice.token,
                GetUserRequest {
                    id: alice.id.to_uppercase(),
                },
            ))
            .await
            .expect("own")
            .into_inner();
        assert_eq!(own.email, alice.email);
        let others = client
            .get_user(bearer(
                &bob.token,
                GetUserRequest {
                    id: alice.id.clone(),
                },
            ))
            .await
            .expect("another's")
            .into_inner();
        assert_eq!(
            (others.id.as_str(), others.email.as_str()),
            (alice.id.as_str(), "")
        );
        let by_service = client
            .get_user(bearer(
                &service_token(&mesh),
                GetUserRequest {
                    id: alice.id.clone(),
                },
            ))
            .await
            .expect("service")
            .into_inner();
        assert!(by_service.email.is_empty());

        assert_code_contains(
            client
                .get_user(bearer(&alice.token, GetUserRequest { id: "nope".into() }))
                .await,
            Code::InvalidArgument,
            "id",
        );
        let unknown = uuid::Uuid::now_v7().to_string();
        assert_code_contains(
            client
                .get_user(bearer(
                    &alice.token,
                    GetUserRequest {
                        id: unknown.clone(),
                    },
                ))
                .await,
            Code::NotFound,
            &unknown,
        );

        let ids = vec![
            bob.id.clone(),
            unknown.to_uppercase(),
            alice.id.to_uppercase(),
            bob.id.clone(),
            unknown.clone(),
            alice.id.clone(),
        ];
        let batch = client
            .batch_get_users(bearer(&alice.token, BatchGetUsersRequest { ids }))
            .await
            .expect("batch")
            .into_inner();
        let got: Vec<_> = batch
            .users
            .iter()
            .map(|u| (u.id.as_str(), u.email.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (bob.id.as_str(), ""),
                (alice.id.as_str(), alice.email.as_str())
            ]
        );
        assert_eq!(batch.not_found_ids, std::slice::from_ref(&unknown));

        let empty = client
            .batch_get_users(bearer(&alice.token, BatchGetUsersRequest { ids: vec![] }))
            .await
            .expect("empty batch")
            .into_inner();
        assert!(empty.users.is_empty() && empty.not_found_ids.is_empty());

        assert_code_contains(
            client
                .batch_get_users(bearer(
                    &alice.token,
                    BatchGetUsersRequest {
                        ids: vec![alice.id.clone(), "x-1".into()],
                    },
                ))
                .await,
            Code::InvalidArgument,
            "ids[1]",
        );
        let thousand: Vec<String> = (0..1000)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect();
        let full = client
            .batch_get_users(bearer(
                &alice.token,
                BatchGetUsersRequest {
                    ids: thousand.clone(),
                },
            ))
            .await
            .expect("1000 ids")
            .into_inner();
        assert_eq!(full.not_found_ids, thousand);
        let mut too_many = thousand;
        too_many.push(alice.id.clone());
        assert_code_contains(
            client
                .batch_get_users(bearer(&alice.token, BatchGetUsersRequest { ids: too_many }))
                .await,
            Code::InvalidArgument,
            "1000",
        );
        mesh.stop().await;
    }
}

/// UpdateUser: only the mask's paths change; empty, unknown and immutable paths and invalid
/// values are INVALID_ARGUMENT (before the version check); a stale `expected_version` is
/// ABORTED; an update that changes nothing keeps the version; only the owner may update.
#[tokio::test]
async fn update_user_rules() {
    for database in databases() {
        let mesh = start(database).await;
        let mut client = mesh.users_client();
        let alice = user(&mesh);
        create(&mesh, &alice, "Alice").await;
        let update = |user: Option<User>, paths: &[&str], expected_version: i64| {
            bearer(
                &alice.token,
                UpdateUserRequest {
                    user,
                    update_mask: mask(paths),
                    expected_version,
                },
            )
        };

        let v2 = client
            .update_user(update(profile("ignored", " New bio "), &["bio"], 1))
            .await
            .expect("bio")
            .into_inner();
        assert_eq!(
            (v2.display_name.as_str(), v2.bio.as_str(), v2.version),
            ("Alice", "New bio", 2)
        );
        assert_eq!(v2.email, alice.email);
        let v3 = client
            .update_user(update(profile(" Alice A. ", ""), &["display_name"], 0))
            .await
            .expect("display name")
            .into_inner();
        assert_eq!(
            (v3.display_name.as_str(), v3.bio.as_str(), v3.version),
            ("Alice A.", "New bio", 3)
        );
        let same = client
            .update_user(update(
                profile("Alice A.", "New bio"),
                &["display_name", "bio"],
                3,
            ))
            .await
            .expect("no-op")
            .into_inner();
        assert_eq!(same.version, 3, "a no-op changes no version");
        assert_eq!(same.update_time, v3.update_time);

        assert_code_contains(
            client
                .update_user(update(profile("X", ""), &["display_name"], 2))
                .await,
            Code::Aborted,
            "expected_version 2",
        );
        let bad = [
            (profile("X", ""), vec![], "update_mask"),
            (profile("X", ""), vec!["nickname"], "nickname"),
            (profile("X", ""), vec!["email"], "immutable"),
            (profile("X", ""), vec!["version"], "immutable"),
            (profile("X", ""), vec!["create_time"], "immutable"),
            (profile("", ""), vec!["display_name"], "display_name"),
            (profile("X", &"b".repeat(600)), vec!["bio"], "bio"),
        ];
        for (user, paths, needle) in bad {
            // Validation comes first: a stale version does not hide the invalid request.
            assert_code_contains(
                client.update_user(update(user, &paths, 1)).await,
                Code::InvalidArgument,
                needle,
            );
        }
        assert_code_contains(
            client
                .update_user(update(profile("X", ""), &["bio"], -1))
                .await,
            Code::InvalidArgument,
            "expected_version",
        );

        let bob = user(&mesh);
        create(&mesh, &bob, "Bob").await;
        let mut target = profile("Mallory", "").expect("user");
        target.id = alice.id.clone();
        assert_code_contains(
            client
                .update_user(bearer(
                    &bob.token,
                    UpdateUserRequest {
                        user: Some(target),
                        update_mask: mask(&["display_name"]),
                        expected_version: 0,
                    },
                ))
                .await,
            Code::PermissionDenied,
            "owner",
        );
        assert_code_contains(
            client
                .update_user(bearer(
                    &service_token(&mesh),
                    UpdateUserRequest {
                        user: profile("S", ""),
                        update_mask: mask(&["display_name"]),
                        expected_version: 0,
                    },
                ))
                .await,
            Code::PermissionDenied,
            "service token",
        );
        let nobody = user(&mesh);
        assert_code_contains(
            client
                .update_user(bearer(
                    &nobody.token,
                    UpdateUserRequest {
                        user: profile("N", ""),
                        update_mask: mask(&["display_name"]),
                        expected_version: 0,
                    },
                ))
                .await,
            Code::NotFound,
            &nobody.id,
        );
        let alice_now = client
            .get_user(bearer(
                &bob.token,
                GetUserRequest {
                    id: alice.id.clone(),
                },
            ))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            (alice_now.display_name.as_str(), alice_now.version),
            ("Alice A.", 3)
        );
        mesh.stop().await;
    }
}

/// DeleteUser: the owner only (another's id is PERMISSION_DENIED whether it exists or not);
/// afterwards the id is NOT_FOUND, and a second delete is NOT_FOUND; the DELETED event carries
/// the last state with version + 1.
#[tokio::test]
async fn delete_user_rules() {
    for database in databases() {
        let mesh = start(database).await;
        let mut client = mesh.users_client();
        let (alice, bob) = (user(&mesh), user(&mesh));
        create(&mesh, &alice, "Alice").await;
        create(&mesh, &bob, "Bob").await;
        for id in [alice.id.clone(), uuid::Uuid::now_v7().to_string()] {
            assert_code_contains(
                client
                    .delete_user(bearer(&bob.token, DeleteUserRequest { id }))
                    .await,
                Code::PermissionDenied,
                "owner",
            );
        }
        assert_code_contains(
            client
                .delete_user(bearer(&bob.token, DeleteUserRequest { id: "bad".into() }))
                .await,
            Code::InvalidArgument,
            "id",
        );
        let mut watch = client
            .watch_users(bearer(
                &bob.token,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch")
            .into_inner();
        client
            .delete_user(bearer(
                &alice.token,
                DeleteUserRequest {
                    id: alice.id.to_uppercase(),
                },
            ))
            .await
            .expect("delete own");
        assert_code_contains(
            client
                .get_user(bearer(
                    &bob.token,
                    GetUserRequest {
                        id: alice.id.clone(),
                    },
                ))
                .await,
            Code::NotFound,
            &alice.id,
        );
        assert_code_contains(
            client
                .delete_user(bearer(
                    &alice.token,
                    DeleteUserRequest {
                        id: alice.id.clone(),
                    },
                ))
                .await,
            Code::NotFound,
            &alice.id,
        );
        let events = take(&mut watch, 3).await;
        let last = &events[2];
        assert_eq!(last.kind(), EventKind::Deleted);
        let user = last.user.as_ref().expect("user");
        assert_eq!(
            (user.id.as_str(), user.display_name.as_str(), user.version),
            (alice.id.as_str(), "Alice", 2)
        );
        mesh.stop().await;
    }
}

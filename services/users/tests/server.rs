//! The users server in-process on port 0, with a real auth server beside it, through the
//! generated clients — on SQLite and on PostgreSQL.
//!
//! Auth runs with a signing key the test also holds, so tests can mint tokens for any subject
//! (many users, service tokens) and users verifies them against auth's real `GetJwks`.

use std::{collections::BTreeSet, time::Duration};

use mesh_authn::{AuthnConfig, Claims, bearer_request as bearer};
use mesh_proto::{
    auth::v1::{RegisterRequest, auth_service_client::AuthServiceClient},
    users::v1::{
        BatchGetUsersRequest, CreateUserRequest, DeleteUserRequest, EventKind, GetUserRequest,
        ListUsersRequest, UpdateUserRequest, User, UserEvent, WatchUsersRequest,
        user_service_client::UserServiceClient,
    },
};
use mesh_runtime::testing::{TestServer, assert_standard_server};
use mesh_token::KeyRing;
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Status, Streaming, transport::Channel};

/// Auth and users, in-process, sharing a data folder.
struct Mesh {
    ring: KeyRing,
    auth: TestServer,
    users: TestServer,
    _data: tempfile::TempDir,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite,
    Postgres(String),
}

async fn backends(test: &str) -> Vec<Backend> {
    let mut list = vec![Backend::Sqlite];
    if let Some(url) = mesh_store::testing::postgres_for("users_server", test).await {
        list.push(Backend::Postgres(url));
    }
    list
}

impl Mesh {
    async fn start(backend: &Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    async fn start_with(backend: &Backend, tweak: impl FnOnce(&mut mesh_users::Config)) -> Self {
        let data = tempfile::tempdir().expect("data dir");
        // Auth loads the development key the test creates here, so both sign with one key.
        let (ring, created) =
            KeyRing::load_or_create_dev_key(&data.path().join("auth").join("dev-signing-key.pem"))
                .expect("signing key");
        assert!(created);
        let auth_config = mesh_auth::Config::new(([127, 0, 0, 1], 0).into(), data.path().into());
        let auth = TestServer::start(move |listener, shutdown| async move {
            mesh_auth::serve(&auth_config, listener, shutdown).await
        })
        .await;
        let authn = AuthnConfig::new(format!("http://{}", auth.addr).parse().expect("auth URL"));
        let mut config =
            mesh_users::Config::new(([127, 0, 0, 1], 0).into(), data.path().into(), authn);
        if let Backend::Postgres(url) = backend {
            config.database_url = Some(url.clone());
        }
        tweak(&mut config);
        let users = TestServer::start(move |listener, shutdown| async move {
            mesh_users::serve(&config, listener, shutdown).await
        })
        .await;
        Self {
            ring,
            auth,
            users,
            _data: data,
        }
    }

    fn client(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.users.channel.clone())
    }

    /// A token for `sub` signed with auth's key.
    fn mint(&self, sub: &str, email: Option<&str>) -> String {
        let now = unix_now();
        self.ring.sign(&Claims {
            iss: "mesh-auth".into(),
            aud: vec!["mesh".into()],
            sub: sub.into(),
            email: email.map(Into::into),
            sid: email.map(|_| uuid::Uuid::now_v7().to_string()),
            iat: now,
            nbf: now,
            exp: now + 900,
            jti: uuid::Uuid::now_v7().to_string(),
        })
    }

    /// A new user (not yet with a profile) and their token.
    fn user(&self) -> Caller {
        self.user_with_id(&uuid::Uuid::now_v7().to_string())
    }

    fn user_with_id(&self, id: &str) -> Caller {
        let email = format!("{id}@example.com");
        Caller {
            id: id.to_owned(),
            email: email.clone(),
            token: self.mint(id, Some(&email)),
        }
    }

    fn service(&self) -> String {
        self.mint("service:aggregator", None)
    }

    /// Creates `caller`'s profile named `name`.
    async fn create(&self, caller: &Caller, name: &str) -> User {
        self.client()
            .create_user(bearer(
                &caller.token,
                CreateUserRequest {
                    user: Some(User {
                        display_name: name.into(),
                        ..User::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("create")
            .into_inner()
    }

    async fn stop(self) {
        self.users.shutdown().await.expect("users stops cleanly");
        self.auth.shutdown().await.expect("auth stops cleanly");
    }
}

#[derive(Debug, Clone)]
struct Caller {
    id: String,
    email: String,
    token: String,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn maybe_bearer<T>(token: Option<&str>, message: T) -> Request<T> {
    match token {
        Some(token) => bearer(token, message),
        None => Request::new(message),
    }
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should contain {needle:?}",
        status.message()
    );
}

fn profile(display_name: &str, bio: &str) -> Option<User> {
    Some(User {
        display_name: display_name.into(),
        bio: bio.into(),
        ..User::default()
    })
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// Health (`""`, the service name, `liveness`) is SERVING after start, and reflection v1 and
/// v1alpha list and describe the users service, health and themselves.
#[tokio::test]
async fn health_and_reflection() {
    let mesh = Mesh::start(&Backend::Sqlite).await;
    assert_standard_server(&mesh.users.channel, mesh_users::SERVICE_NAME).await;
    mesh.stop().await;
}

/// Every method needs a valid token: none, garbage, or one signed by another key is
/// UNAUTHENTICATED.
#[tokio::test]
async fn every_method_needs_a_valid_token() {
    let mesh = Mesh::start(&Backend::Sqlite).await;
    let stranger = KeyRing::generate().expect("key");
    let now = unix_now();
    let forged = stranger.sign(&Claims {
        iss: "mesh-auth".into(),
        aud: vec!["mesh".into()],
        sub: uuid::Uuid::now_v7().to_string(),
        email: Some("x@example.com".into()),
        sid: None,
        iat: now,
        nbf: now,
        exp: now + 900,
        jti: "j".into(),
    });
    let mut client = mesh.client();
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
            assert_code(result, Code::Unauthenticated, "access token");
        }
    }
    mesh.stop().await;
}

/// The whole path: register on auth, create the profile with auth's own token (id = `sub`,
/// e-mail from the token), read it back.
#[tokio::test]
async fn a_registered_user_creates_their_profile() {
    let mesh = Mesh::start(&Backend::Sqlite).await;
    let registered = AuthServiceClient::new(mesh.auth.channel.clone())
        .register(RegisterRequest {
            email: "  Ada@Example.com ".into(),
            password: "correct horse battery".into(),
        })
        .await
        .expect("register")
        .into_inner();
    let token = registered.tokens.expect("tokens").access_token;
    let created = mesh
        .client()
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
    assert_eq!(created.id, registered.user_id);
    assert_eq!(created.email, "ada@example.com");
    assert_eq!(
        (created.display_name.as_str(), created.bio.as_str()),
        ("Ada Lovelace", "Analyst")
    );
    assert_eq!(created.version, 1);
    assert!(created.create_time.is_some() && created.create_time == created.update_time);
    let fetched = mesh
        .client()
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

/// CreateUser: ALREADY_EXISTS on a second create, except a retry with the same request id,
/// which returns the profile as it is now; another id or a service token is
/// PERMISSION_DENIED; invalid fields are INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn create_user_rules() {
    for backend in backends("create_user_rules").await {
        let mesh = Mesh::start(&backend).await;
        let mut client = mesh.client();
        let alice = mesh.user();
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
        assert_code(
            client
                .create_user(create("req-2", profile("Alice", "")))
                .await,
            Code::AlreadyExists,
            "already exists",
        );
        assert_code(
            client.create_user(create("", profile("Alice", ""))).await,
            Code::AlreadyExists,
            "already exists",
        );

        // Someone else's id, with an explicit id in either case.
        let bob = mesh.user();
        let mut other = profile("Bob", "").expect("user");
        other.id = alice.id.to_uppercase();
        assert_code(
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

        assert_code(
            client
                .create_user(bearer(
                    &mesh.service(),
                    CreateUserRequest {
                        user: profile("Svc", ""),
                        request_id: String::new(),
                    },
                ))
                .await,
            Code::PermissionDenied,
            "service token",
        );

        let carol = mesh.user();
        let cases = [
            (profile("   ", ""), "display_name"),
            (profile(&"é".repeat(65), ""), "display_name"),
            (profile("Carol", &"b".repeat(513)), "bio"),
            (None, "display_name"),
        ];
        for (user, field) in cases {
            assert_code(
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
        assert_code(
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
    for backend in backends("get_and_batch_get").await {
        let mesh = Mesh::start(&backend).await;
        let mut client = mesh.client();
        let (alice, bob) = (mesh.user(), mesh.user());
        mesh.create(&alice, "Alice").await;
        mesh.create(&bob, "Bob").await;

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
                &mesh.service(),
                GetUserRequest {
                    id: alice.id.clone(),
                },
            ))
            .await
            .expect("service")
            .into_inner();
        assert!(by_service.email.is_empty());

        assert_code(
            client
                .get_user(bearer(&alice.token, GetUserRequest { id: "nope".into() }))
                .await,
            Code::InvalidArgument,
            "id",
        );
        let unknown = uuid::Uuid::now_v7().to_string();
        assert_code(
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

        assert_code(
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
        assert_code(
            client
                .batch_get_users(bearer(&alice.token, BatchGetUsersRequest { ids: too_many }))
                .await,
            Code::InvalidArgument,
            "1000",
        );
        mesh.stop().await;
    }
}

async fn list_page(
    client: &mut UserServiceClient<Channel>,
    token: &str,
    page_size: i32,
    page_token: &str,
) -> (Vec<String>, String) {
    let page = client
        .list_users(bearer(
            token,
            ListUsersRequest {
                page_size,
                page_token: page_token.into(),
            },
        ))
        .await
        .expect("list")
        .into_inner();
    (
        page.users.into_iter().map(|u| u.id).collect(),
        page.next_page_token,
    )
}

/// ListUsers pages through everyone by id, and resumes correctly while users are added and
/// deleted between pages: nothing is repeated, nothing that existed throughout is missed,
/// nothing deleted before its page shows up. Forged or altered tokens and negative sizes are
/// INVALID_ARGUMENT; 0 means 50; the last page has no next token.
#[tokio::test]
async fn list_users_pages_stay_correct_under_changes() {
    for backend in backends("list_users_pages_stay_correct_under_changes").await {
        let mesh = Mesh::start(&backend).await;
        let mut client = mesh.client();
        // Ids spread over the key space, so later inserts land both before and after the
        // position of the listing.
        let id_of = |n: u32| {
            format!(
                "{:08x}-0000-7000-8000-000000000000",
                n.wrapping_mul(0x9e37_79b9)
            )
        };
        let mut callers = Vec::new();
        for n in 0..60 {
            let caller = mesh.user_with_id(&id_of(n));
            mesh.create(&caller, &format!("User {n}")).await;
            callers.push(caller);
        }
        let reader = &callers[0].token;

        let (first, mut token) = list_page(&mut client, reader, 20, "").await;
        assert_eq!(first.len(), 20);
        let position = first.last().expect("page").clone();
        let mut seen = first.clone();

        // Between pages: delete two users not yet listed and one already listed, add users
        // before and after the position.
        let mut unlisted: Vec<&Caller> = callers.iter().filter(|c| c.id > position).collect();
        unlisted.sort_by(|a, b| a.id.cmp(&b.id));
        let deleted = [unlisted[0].clone(), unlisted[unlisted.len() - 1].clone()];
        let listed_then_deleted = callers
            .iter()
            .find(|c| c.id == first[3])
            .expect("listed")
            .clone();
        for caller in deleted.iter().chain([&listed_then_deleted]) {
            client
                .delete_user(bearer(
                    &caller.token,
                    DeleteUserRequest {
                        id: caller.id.clone(),
                    },
                ))
                .await
                .expect("delete");
        }
        let mut added = Vec::new();
        for n in 100..120 {
            let caller = mesh.user_with_id(&id_of(n));
            mesh.create(&caller, &format!("User {n}")).await;
            added.push(caller.id);
        }

        // The rest, with a page size that changes between pages.
        for size in [7, 0, 1000].into_iter().cycle() {
            if token.is_empty() {
                break;
            }
            let (ids, next) = list_page(&mut client, reader, size, &token).await;
            seen.extend(ids);
            token = next;
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "strictly by id, no repeats: {seen:?}"
        );
        let seen_set: BTreeSet<&String> = seen.iter().collect();
        for caller in &callers {
            let deleted_unlisted = deleted.iter().any(|d| d.id == caller.id);
            assert_eq!(
                seen_set.contains(&caller.id),
                !deleted_unlisted,
                "{} (deleted before its page: {deleted_unlisted})",
                caller.id
            );
        }
        for id in &added {
            // Inserted behind the position: not seen; ahead of it: seen.
            assert_eq!(seen_set.contains(id), *id > position, "{id}");
        }

        let (default_page, next) = list_page(&mut client, reader, 0, "").await;
        assert_eq!(default_page.len(), 50);
        assert!(!next.is_empty());
        let (everyone, last) = list_page(&mut client, reader, 5000, "").await;
        assert_eq!(everyone.len(), 60 - 3 + 20);
        assert!(last.is_empty(), "the last page has no next token");

        assert_code(
            client
                .list_users(bearer(
                    reader,
                    ListUsersRequest {
                        page_size: -1,
                        page_token: String::new(),
                    },
                ))
                .await,
            Code::InvalidArgument,
            "page_size",
        );
        let mut altered = next.clone();
        let flipped = if altered.ends_with('A') { 'B' } else { 'A' };
        altered.pop();
        altered.push(flipped);
        let forged = format!(
            "{}.{}",
            base64_url(&format!("v1.{}", id_of(5))),
            next.split_once('.').map(|(_, mac)| mac).unwrap_or_default()
        );
        for bad in [altered, forged, "garbage".into(), "a.b".into()] {
            assert_code(
                client
                    .list_users(bearer(
                        reader,
                        ListUsersRequest {
                            page_size: 10,
                            page_token: bad,
                        },
                    ))
                    .await,
                Code::InvalidArgument,
                "page_token",
            );
        }
        mesh.stop().await;
    }
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// A page token stays valid across a restart: the key lives in the database.
#[tokio::test]
async fn page_tokens_survive_a_restart() {
    let data = tempfile::tempdir().expect("data");
    let db = format!("sqlite://{}", data.path().join("shared.db").display());
    let token = {
        let mesh = Mesh::start_with(&Backend::Sqlite, |c| c.database_url = Some(db.clone())).await;
        let mut callers = Vec::new();
        for _ in 0..3 {
            let caller = mesh.user();
            mesh.create(&caller, "U").await;
            callers.push(caller);
        }
        let (_, token) = list_page(&mut mesh.client(), &callers[0].token, 1, "").await;
        mesh.stop().await;
        token
    };
    let mesh = Mesh::start_with(&Backend::Sqlite, |c| c.database_url = Some(db.clone())).await;
    let reader = mesh.user();
    let (ids, _) = list_page(&mut mesh.client(), &reader.token, 10, &token).await;
    assert_eq!(ids.len(), 2, "resumed after the first of three");
    mesh.stop().await;
}

/// UpdateUser: only the mask's paths change; empty, unknown and immutable paths and invalid
/// values are INVALID_ARGUMENT (before the version check); a stale `expected_version` is
/// ABORTED; an update that changes nothing keeps the version; only the owner may update.
#[tokio::test]
async fn update_user_rules() {
    for backend in backends("update_user_rules").await {
        let mesh = Mesh::start(&backend).await;
        let mut client = mesh.client();
        let alice = mesh.user();
        mesh.create(&alice, "Alice").await;
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

        assert_code(
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
            assert_code(
                client.update_user(update(user, &paths, 1)).await,
                Code::InvalidArgument,
                needle,
            );
        }
        assert_code(
            client
                .update_user(update(profile("X", ""), &["bio"], -1))
                .await,
            Code::InvalidArgument,
            "expected_version",
        );

        let bob = mesh.user();
        mesh.create(&bob, "Bob").await;
        let mut target = profile("Mallory", "").expect("user");
        target.id = alice.id.clone();
        assert_code(
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
        assert_code(
            client
                .update_user(bearer(
                    &mesh.service(),
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
        let nobody = mesh.user();
        assert_code(
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
    for backend in backends("delete_user_rules").await {
        let mesh = Mesh::start(&backend).await;
        let mut client = mesh.client();
        let (alice, bob) = (mesh.user(), mesh.user());
        mesh.create(&alice, "Alice").await;
        mesh.create(&bob, "Bob").await;
        for id in [alice.id.clone(), uuid::Uuid::now_v7().to_string()] {
            assert_code(
                client
                    .delete_user(bearer(&bob.token, DeleteUserRequest { id }))
                    .await,
                Code::PermissionDenied,
                "owner",
            );
        }
        assert_code(
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
        assert_code(
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
        assert_code(
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

async fn take(stream: &mut Streaming<UserEvent>, n: usize) -> Vec<UserEvent> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} events", events.len()))
            .expect("stream open")
            .expect("event");
        events.push(event);
    }
    events
}

/// WatchUsers: negative positions are INVALID_ARGUMENT, positions beyond the log OUT_OF_RANGE;
/// a service token may subscribe; events carry no e-mail; without a position the stream starts
/// at the live edge.
#[tokio::test]
async fn watch_users_rules() {
    for backend in backends("watch_users_rules").await {
        let mesh = Mesh::start(&backend).await;
        let mut client = mesh.client();
        let service = mesh.service();
        let alice = mesh.user();
        mesh.create(&alice, "Alice").await;
        assert_code(
            client
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(-1),
                    },
                ))
                .await,
            Code::InvalidArgument,
            "after_sequence",
        );
        assert_code(
            client
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(2),
                    },
                ))
                .await,
            Code::OutOfRange,
            "newest stored sequence 1",
        );
        let live = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: None,
                },
            ))
            .await
            .expect("live");
        assert_eq!(
            live.metadata()
                .get(mesh_users::LOG_HEAD_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "the stream names the log position it starts after"
        );
        let mut live = live.into_inner();
        let mut replay = client
            .watch_users(bearer(
                &alice.token,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("replay")
            .into_inner();
        // Give the live subscription time to be in place before the next change.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client
            .update_user(bearer(
                &alice.token,
                UpdateUserRequest {
                    user: profile("", "hi"),
                    update_mask: mask(&["bio"]),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
        let live_events = take(&mut live, 1).await;
        assert_eq!(
            live_events[0].sequence, 2,
            "the live edge starts after the existing event"
        );
        assert_eq!(live_events[0].kind(), EventKind::Updated);
        let replayed = take(&mut replay, 2).await;
        assert_eq!(
            replayed.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(replayed[0].kind(), EventKind::Created);
        for event in live_events.iter().chain(&replayed) {
            let user = event.user.as_ref().expect("user");
            assert!(user.email.is_empty(), "events carry no e-mail");
            assert_eq!(user.id, alice.id);
            assert!(event.occur_time.is_some());
        }
        mesh.stop().await;
    }
}

/// The seam under load: writers keep changing profiles while one subscriber starts mid-way
/// from the beginning of the log, and another reads a while, disconnects, and resumes from the
/// last sequence it saw. Each ends with exactly the whole log, in order: no gap, no duplicate.
#[tokio::test]
async fn watch_has_no_gap_or_duplicate_under_concurrent_writers() {
    for backend in backends("watch_has_no_gap_or_duplicate_under_concurrent_writers").await {
        let mesh = Mesh::start(&backend).await;
        const WRITERS: usize = 4;
        const CHANGES: usize = 40;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let caller = mesh.user();
                let client = mesh.client();
                tokio::spawn(async move {
                    let mut client = client;
                    client
                        .create_user(bearer(
                            &caller.token,
                            CreateUserRequest {
                                user: profile(&format!("W{w}"), ""),
                                request_id: String::new(),
                            },
                        ))
                        .await
                        .expect("create");
                    for n in 0..CHANGES {
                        client
                            .update_user(bearer(
                                &caller.token,
                                UpdateUserRequest {
                                    user: profile("", &format!("change {n}")),
                                    update_mask: mask(&["bio"]),
                                    expected_version: 0,
                                },
                            ))
                            .await
                            .expect("update");
                    }
                })
            })
            .collect();
        let total = WRITERS * (CHANGES + 1);
        let service = mesh.service();
        let mut client = mesh.client();

        // The resuming subscriber: a few events, then gone.
        let mut first_part = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch")
            .into_inner();
        let mut resumed: Vec<i64> = take(&mut first_part, 10)
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        drop(first_part);

        // Mid-way: both start while the writers are busy.
        let mut from_start = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch from start")
            .into_inner();
        let mut second_part = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: resumed.last().copied(),
                },
            ))
            .await
            .expect("resume")
            .into_inner();
        let from_start: Vec<i64> = take(&mut from_start, total)
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        resumed.extend(
            take(&mut second_part, total - 10)
                .await
                .iter()
                .map(|e| e.sequence),
        );
        for writer in writers {
            writer.await.expect("writer");
        }

        // The reference: the whole stored log.
        let log: Vec<i64> = {
            let mut all = client
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(0),
                    },
                ))
                .await
                .expect("watch")
                .into_inner();
            take(&mut all, total)
                .await
                .iter()
                .map(|e| e.sequence)
                .collect()
        };
        assert!(log.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(from_start, log, "subscriber from the start");
        assert_eq!(resumed, log, "subscriber that resumed");
        mesh.stop().await;
    }
}

/// Many subscribers share the one feed and each gets every change; one that does not read
/// while thousands of large events go by (far more than its buffer and HTTP/2 window) is
/// caught up from the log, not dropped: it still gets every event, in order.
#[tokio::test]
async fn slow_subscribers_are_caught_up_from_the_log() {
    let mesh = Mesh::start_with(&Backend::Sqlite, |c| c.watch_buffer = 8).await;
    let mut client = mesh.client();
    // The subscribers on their own connection: unread streams use up its HTTP/2 window, which
    // would hold back the writers' replies too if they shared it.
    let mut watcher = UserServiceClient::new(mesh_runtime::testing::connect(mesh.users.addr).await);
    let service = mesh.service();
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(
            watcher
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(0),
                    },
                ))
                .await
                .expect("watch")
                .into_inner(),
        );
    }
    let alice = mesh.user();
    mesh.create(&alice, "Alice").await;
    const CHANGES: usize = 600;
    let bio = "x".repeat(500);
    for n in 0..CHANGES {
        client
            .update_user(bearer(
                &alice.token,
                UpdateUserRequest {
                    user: profile("", &format!("{n} {bio}")),
                    update_mask: mask(&["bio"]),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
    }
    // Now read them all at once (each stream's unread data holds back the shared connection).
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| tokio::spawn(async move { take(&mut stream, CHANGES + 1).await }))
        .collect();
    for reader in readers {
        let events = reader.await.expect("reader");
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=(CHANGES as i64 + 1)).collect::<Vec<_>>());
        let last = events.last().and_then(|e| e.user.as_ref()).expect("user");
        assert_eq!(last.version, CHANGES as i64 + 1);
    }
    mesh.stop().await;
}

/// A graceful shutdown ends open WatchUsers streams with UNAVAILABLE (retryable), naming the
/// position to resume from.
#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable() {
    let mut mesh = Mesh::start(&Backend::Sqlite).await;
    let alice = mesh.user();
    mesh.create(&alice, "Alice").await;
    let mut stream = mesh
        .client()
        .watch_users(bearer(
            &alice.token,
            WatchUsersRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    take(&mut stream, 1).await;
    mesh.users.begin_shutdown();
    let end = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("the stream ends within the grace period");
    let status = end
        .expect("a final status")
        .expect_err("ends with an error status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("after_sequence = 1"),
        "{status:?}"
    );
    let Mesh { users, auth, .. } = mesh;
    users.join().await.expect("users stops cleanly");
    auth.shutdown().await.expect("auth stops");
}

/// The database going away (PostgreSQL refusing the service's connections, and those it had
/// terminated): calls fail with UNAVAILABLE and no driver text, health turns NOT_SERVING, and
/// both recover when the database comes back — without a restart.
#[tokio::test]
async fn the_database_going_away_and_coming_back() {
    use sqlx::Connection as _;
    let Some(url) =
        mesh_store::testing::postgres_for("users_server", "the_database_going_away").await
    else {
        return;
    };
    let admin_url = std::env::var(mesh_store::testing::PG_ENV).expect("server URL");
    let database = url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .expect("database name")
        .to_owned();
    let mesh = Mesh::start(&Backend::Postgres(url.clone())).await;
    let alice = mesh.user();
    mesh.create(&alice, "Alice").await;
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    let set_allowed =
        |allowed: bool| format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS {allowed}");
    sqlx::query(&set_allowed(false))
        .execute(&mut admin)
        .await
        .expect("refuse connections");
    let (terminated,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(&database)
    .fetch_one(&mut admin)
    .await
    .expect("terminate connections");
    assert!(terminated > 0, "the service had connections to {database}");

    let wait_for = |want: i32| {
        let channel = mesh.users.channel.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let now = mesh_runtime::testing::health_status(&channel, mesh_users::SERVICE_NAME)
                    .await
                    .ok();
                if now == Some(want) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "health stayed {now:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    wait_for(ServingStatus::NotServing as i32).await;

    let status = mesh
        .client()
        .get_user(bearer(
            &alice.token,
            GetUserRequest {
                id: alice.id.clone(),
            },
        ))
        .await
        .expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "storage unavailable; retry",
        "no driver text"
    );

    sqlx::query(&set_allowed(true))
        .execute(&mut admin)
        .await
        .expect("allow connections");
    wait_for(ServingStatus::Serving as i32).await;
    let back = mesh
        .client()
        .get_user(bearer(
            &alice.token,
            GetUserRequest {
                id: alice.id.clone(),
            },
        ))
        .await
        .expect("served again")
        .into_inner();
    assert_eq!(back.display_name, "Alice");
    mesh.stop().await;
}

/// Client-side balancing over real users servers: three on 127.0.0.1, .2 and .3, each with its
/// own database holding 1, 2 or 3 profiles (so ListUsers tells which one answered), behind one
/// name. Calls reach all three; when one stops and leaves the name, calls go on without a
/// failure and none reach it.
#[tokio::test]
async fn a_balanced_channel_spreads_over_users_servers() {
    let mesh = Mesh::start(&Backend::Sqlite).await;
    let mut servers = vec![(mesh.users.addr, None)];
    for ip in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        let data = tempfile::tempdir().expect("data");
        let authn = AuthnConfig::new(format!("http://{}", mesh.auth.addr).parse().expect("url"));
        let config = mesh_users::Config::new((ip, 0).into(), data.path().into(), authn);
        let server = TestServer::start_on((ip, 0).into(), move |listener, shutdown| async move {
            mesh_users::serve(&config, listener, shutdown).await
        })
        .await;
        servers.push((server.addr, Some((server, data))));
    }
    let reader = mesh.user();
    for (k, (addr, _)) in servers.iter().enumerate() {
        let mut client = UserServiceClient::new(mesh_runtime::testing::connect(*addr).await);
        for _ in 0..=k {
            let caller = mesh.user();
            client
                .create_user(bearer(
                    &caller.token,
                    CreateUserRequest {
                        user: profile("P", ""),
                        request_id: String::new(),
                    },
                ))
                .await
                .expect("create");
        }
    }
    let resolved = std::sync::Arc::new(std::sync::Mutex::new(
        servers.iter().map(|(addr, _)| *addr).collect::<Vec<_>>(),
    ));
    let answers = resolved.clone();
    let resolve: mesh_authn::balance::Resolve = Box::new(move |_host, _port| {
        let addrs = answers.lock().expect("lock").clone();
        Box::pin(async move { Ok(addrs) })
    });
    let channel = mesh_authn::balance::balanced_channel_with(
        &"http://users-headless.mesh.svc.cluster.local:50053"
            .parse()
            .expect("uri"),
        Duration::from_millis(100),
        resolve,
    );
    let client = UserServiceClient::new(channel);
    let answered_by = |n: usize| {
        let mut client = client.clone();
        let token = reader.token.clone();
        async move {
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let page = client
                    .list_users(bearer(&token, ListUsersRequest::default()))
                    .await
                    .expect("list")
                    .into_inner();
                counts[page.users.len()] += 1;
            }
            counts
        }
    };
    let counts = answered_by(300).await;
    assert!(
        counts[1..].iter().all(|&n| n > 0),
        "every server answers: {counts:?}"
    );

    // The third goes away.
    let (_, third) = servers.pop().expect("server");
    resolved.lock().expect("lock").pop();
    if let Some((server, _data)) = third {
        server.shutdown().await.expect("stops");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = answered_by(200).await;
    assert_eq!(counts[3], 0, "the stopped server gets nothing: {counts:?}");
    assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
    for (_, server) in servers {
        if let Some((server, _data)) = server {
            server.shutdown().await.expect("stops");
        }
    }
    mesh.stop().await;
}

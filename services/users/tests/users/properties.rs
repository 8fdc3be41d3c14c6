//! Property tests: any request message — random strings, ids, masks, page tokens and sizes,
//! with a valid, a foreign or no token — gets one of the codes its method may answer, never a
//! panic or an INTERNAL, and the server stays healthy. Real auth and users in-process on SQLite.

use std::{sync::OnceLock, time::Duration};

use mesh_proto::users::v1::{
    BatchGetUsersRequest, CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest,
    UpdateUserRequest, User,
};
use mesh_testkit::{Minter, TestMesh, bearer, health_status};
use proptest::prelude::*;
use tonic::Code;

/// Auth and users, started once for all cases, on a runtime of their own.
fn mesh() -> &'static (tokio::runtime::Runtime, TestMesh) {
    static MESH: OnceLock<(tokio::runtime::Runtime, TestMesh)> = OnceLock::new();
    MESH.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mesh = runtime.block_on(
            TestMesh::builder()
                .users()
                .users_config(|config| {
                    // Random requests may change one profile many times in a row.
                    config.profile_writes_burst = u32::MAX;
                    config.profile_writes_per_second = 1e9;
                })
                .start(),
        );
        (runtime, mesh)
    })
}

/// A token for `sub` (e-mail `<sub>@example.com`) signed with `keys`.
fn mint(keys: &Minter, sub: &str) -> String {
    keys.user(sub, &format!("{sub}@example.com"))
}

/// Who calls: a user with a valid token, a token signed by another key, or nobody.
#[derive(Debug, Clone)]
enum Caller {
    Valid(String),
    Foreign,
    Garbage(String),
    None,
}

fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![
        6 => id().prop_map(Caller::Valid),
        1 => Just(Caller::Foreign),
        1 => any::<String>().prop_map(Caller::Garbage),
        1 => Just(Caller::None),
    ]
}

/// Ids: mostly the shapes a client would send (UUIDs, either case), sometimes anything.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string().to_uppercase()),
        1 => "[ -~]{0,40}",
        1 => any::<String>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~]{0,80}",
        1 => any::<String>(),
        1 => proptest::collection::vec(any::<char>(), 0..1200).prop_map(|c| c.into_iter().collect()),
        1 => Just("x".repeat(5000)),
    ]
}

fn paths() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(
        prop_oneof![
            Just("display_name".to_owned()),
            Just("bio".to_owned()),
            Just("email".to_owned()),
            Just("id".to_owned()),
            "[a-z_.]{0,20}",
            any::<String>(),
        ],
        0..4,
    )
}

/// One request to one method.
#[derive(Debug, Clone)]
enum Call {
    Get(String),
    BatchGet(Vec<String>),
    List(i32, String),
    Create(String, String, String),
    Update(String, String, String, Vec<String>, i64),
    Delete(String),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        id().prop_map(Call::Get),
        prop_oneof![
            proptest::collection::vec(id(), 0..20),
            (id(), 990usize..1010).prop_map(|(id, n)| vec![id; n]),
        ]
        .prop_map(Call::BatchGet),
        (any::<i32>(), prop_oneof![Just(String::new()), text()])
            .prop_map(|(size, token)| Call::List(size, token)),
        (text(), text(), "[ -~]{0,140}").prop_map(|(n, b, r)| Call::Create(n, b, r)),
        (id(), text(), text(), paths(), any::<i64>())
            .prop_map(|(id, n, b, p, v)| Call::Update(id, n, b, p, v)),
        id().prop_map(Call::Delete),
    ]
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = if token.is_empty() {
        tonic::Request::new(message)
    } else {
        bearer(token, message)
    };
    request.set_timeout(Duration::from_secs(10));
    request
}

/// The codes each method may answer (the contract's), and the code it got.
fn run(call: Call, caller: Caller) -> (Code, &'static [Code]) {
    let (runtime, mesh) = mesh();
    let token = match &caller {
        Caller::Valid(sub) => mint(&mesh.keys, sub),
        Caller::Foreign => mint(&Minter::stranger(), "intruder"),
        Caller::Garbage(t) => t.clone(),
        Caller::None => String::new(),
    };
    use Code::*;
    let mut client = mesh.users_client();
    runtime.block_on(async move {
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Ok, |s| s.code());
        match call {
            Call::Get(id) => (
                code(
                    client
                        .get_user(with_token(&token, GetUserRequest { id }))
                        .await
                        .map(drop),
                ),
                &[
                    Ok,
                    InvalidArgument,
                    NotFound,
                    Unauthenticated,
                    ResourceExhausted,
                ][..],
            ),
            Call::BatchGet(ids) => (
                code(
                    client
                        .batch_get_users(with_token(&token, BatchGetUsersRequest { ids }))
                        .await
                        .map(drop),
                ),
                &[Ok, InvalidArgument, Unauthenticated, ResourceExhausted][..],
            ),
            Call::List(page_size, page_token) => (
                code(
                    client
                        .list_users(with_token(
                            &token,
                            ListUsersRequest {
                                page_size,
                                page_token,
                            },
                        ))
                        .await
                        .map(drop),
                ),
                &[Ok, InvalidArgument, Unauthenticated, ResourceExhausted][..],
            ),
            Call::Create(display_name, bio, request_id) => (
                code(
                    client
                        .create_user(with_token(
                            &token,
                            CreateUserRequest {
                                user: Some(User {
                                    display_name,
                                    bio,
                                    ..User::default()
                                }),
                                request_id,
                            },
                        ))
                        .await
                        .map(drop),
                ),
                &[
                    Ok,
                    InvalidArgument,
                    AlreadyExists,
                    PermissionDenied,
                    Unauthenticated,
                    ResourceExhausted,
                ][..],
            ),
            Call::Update(id, display_name, bio, paths, expected_version) => (
                code(
                    client
                        .update_user(with_token(
                            &token,
                            UpdateUserRequest {
                                user: Some(User {
                                    id,
                                    display_name,
                                    bio,
                                    ..User::default()
                                }),
                                update_mask: Some(prost_types::FieldMask { paths }),
                                expected_version,
                            },
                        ))
                        .await
                        .map(drop),
                ),
                &[
                    Ok,
                    InvalidArgument,
                    NotFound,
                    PermissionDenied,
                    Aborted,
                    Unauthenticated,
                    ResourceExhausted,
                ][..],
            ),
            Call::Delete(id) => (
                code(
                    client
                        .delete_user(with_token(&token, DeleteUserRequest { id }))
                        .await
                        .map(drop),
                ),
                &[
                    Ok,
                    InvalidArgument,
                    NotFound,
                    PermissionDenied,
                    Unauthenticated,
                    ResourceExhausted,
                ][..],
            ),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        // The servers are real: shrinking a failure re-runs calls against them.
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    /// Any request gets one of its method's codes: never INTERNAL, UNKNOWN or a broken stream.
    #[test]
    fn any_request_gets_an_allowed_code(call in call(), caller in caller()) {
        let shown = format!("{call:?}");
        let (got, allowed) = run(call, caller);
        prop_assert!(allowed.contains(&got), "{got:?} not in {allowed:?} for {}", &shown[..shown.len().min(300)]);
    }
}

/// After all the hostile requests the server still answers as it should.
#[test]
fn still_healthy_after_hostile_requests() {
    let (runtime, mesh) = mesh();
    let (got, _) = run(Call::Get("not an id".into()), Caller::Valid("x".into()));
    assert_eq!(got, Code::InvalidArgument);
    let health = runtime.block_on(health_status(
        &mesh.users().channel,
        "mesh.users.v1.UserService",
    ));
    assert_eq!(health.ok(), Some(1));
}

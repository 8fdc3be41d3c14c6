//! Property tests: any request message to any facade method — random e-mails, passwords, ids,
//! profiles, masks, versions, positions, with a valid, garbage or no bearer token — gets one of
//! the codes the contract gives that method (for streams: when it opens and when it ends), never
//! INTERNAL, UNKNOWN or a broken stream. Real auth, users and aggregator in-process on SQLite.

use std::{sync::OnceLock, time::Duration};

use mesh_proto::aggregator::v1::{
    DeleteAccountRequest, GetMeRequest, GetProfilesRequest, LoginRequest, LogoutRequest, Profile,
    RefreshRequest, SignUpRequest, UpdateProfileRequest, WatchProfilesRequest,
    aggregator_service_client::AggregatorServiceClient,
};
use mesh_testkit::{TestMesh, bearer};
use proptest::prelude::*;
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};

use crate::fast_writes;

struct Mesh {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// A signed-up account's access token.
    token: String,
    _mesh: TestMesh,
}

fn mesh() -> &'static Mesh {
    static MESH: OnceLock<Mesh> = OnceLock::new();
    MESH.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (mesh, channel, token) = runtime.block_on(async move {
            // Random requests may change one profile many times in a row.
            let mesh = TestMesh::builder()
                .aggregator()
                .users_config(fast_writes)
                .start()
                .await;
            let channel = mesh.aggregator().channel.clone();
            let token = AggregatorServiceClient::new(channel.clone())
                .sign_up(SignUpRequest {
                    email: "prop@example.com".into(),
                    password: "correct horse battery".into(),
                    display_name: "Prop".into(),
                })
                .await
                .expect("sign up")
                .into_inner()
                .tokens
                .expect("tokens")
                .access_token;
            (mesh, channel, token)
        });
        Mesh {
            runtime,
            channel,
            token,
            _mesh: mesh,
        }
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~]{0,60}",
        1 => any::<String>(),
        1 => Just("z".repeat(3000)),
    ]
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        1 => text(),
    ]
}

/// A bearer token: the signed-up account's (empty marks it), garbage, or none.
fn who() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(Some(String::new())),
        1 => text().prop_map(Some),
        1 => Just(None),
    ]
}

#[derive(Debug, Clone)]
enum Call {
    SignUp(String, String, String),
    Login(String, String),
    Refresh(String),
    Logout(String),
    Update(Option<String>, String, String, String, Vec<String>, i64),
    Delete(Option<String>, String),
    GetMe(Option<String>),
    GetProfiles(Option<String>, Vec<String>),
    Watch(Option<String>, Option<i64>),
}

fn call() -> impl Strategy<Value = Call> {
    let paths = proptest::collection::vec(
        prop_oneof![
            Just("display_name".to_owned()),
            Just("bio".to_owned()),
            Just("user_id".to_owned()),
            "[a-z_]{0,12}",
        ],
        0..3,
    );
    prop_oneof![
        (
            prop_oneof!["[a-z]{1,10}@example\\.com", text()],
            prop_oneof!["[ -~]{8,30}", text()],
            text()
        )
            .prop_map(|(e, p, n)| Call::SignUp(e, p, n)),
        (text(), text()).prop_map(|(e, p)| Call::Login(e, p)),
        text().prop_map(Call::Refresh),
        text().prop_map(Call::Logout),
        (who(), id(), text(), text(), paths, any::<i64>())
            .prop_map(|(w, id, n, b, p, v)| Call::Update(w, id, n, b, p, v)),
        // Never the right password: the one account must outlive the test.
        (who(), "[ -~]{0,20}").prop_map(|(w, p)| Call::Delete(w, p)),
        who().prop_map(Call::GetMe),
        (
            who(),
            prop_oneof![
                proptest::collection::vec(id(), 0..30),
                Just(vec!["x".to_owned(); 10_001]),
            ]
        )
            .prop_map(|(w, ids)| Call::GetProfiles(w, ids)),
        (who(), proptest::option::of(any::<i64>())).prop_map(|(w, a)| Call::Watch(w, a)),
    ]
}

fn request<T>(who: &Option<String>, message: T) -> tonic::Request<T> {
    let mut request = match who {
        Some(t) if t.is_empty() => bearer(&mesh().token, message),
        Some(t) => bearer(t, message),
        None => tonic::Request::new(message),
    };
    request.set_timeout(Duration::from_secs(30));
    request
}

/// The codes `call` got (when it opened and, for streams, when it ended) and those allowed.
fn run(call: Call) -> (Vec<Code>, &'static [Code]) {
    use Code::*;
    let m = mesh();
    let mut client = AggregatorServiceClient::new(m.channel.clone());
    m.runtime.block_on(async move {
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Ok, |s| s.code());
        match call {
            Call::SignUp(email, password, display_name) => (
                vec![code(
                    client
                        .sign_up(SignUpRequest {
                            email,
                            password,
                            display_name,
                        })
                        .await
                        .map(drop),
                )],
                &[Ok, InvalidArgument, AlreadyExists, ResourceExhausted][..],
            ),
            Call::Login(email, password) => (
                vec![code(
                    client
                        .login(LoginRequest { email, password })
                        .await
                        .map(drop),
                )],
                &[InvalidArgument, Unauthenticated, ResourceExhausted][..],
            ),
            Call::Refresh(refresh_token) => (
                vec![code(
                    client
                        .refresh(RefreshRequest { refresh_token })
                        .await
                        .map(drop),
                )],
                &[Unauthenticated, ResourceExhausted][..],
            ),
            Call::Logout(refresh_token) => (
                vec![code(
                    client
                        .logout(LogoutRequest { refresh_token })
                        .await
                        .map(drop),
                )],
                &[Ok, ResourceExhausted][..],
            ),
            Call::Update(who, user_id, display_name, bio, paths, expected_version) => (
                vec![code(
                    client
                        .update_profile(request(
                            &who,
                            UpdateProfileRequest {
                                profile: Some(Profile {
                                    user_id,
                                    display_name,
                                    bio,
                                    ..Profile::default()
                                }),
                                update_mask: Some(prost_types::FieldMask { paths }),
                                expected_version,
                            },
                        ))
                        .await
                        .map(drop),
                )],
                &[
                    Ok,
                    InvalidArgument,
                    PermissionDenied,
                    NotFound,
                    Aborted,
                    Unauthenticated,
                    ResourceExhausted,
                ][..],
            ),
            Call::Delete(who, password) => (
                vec![code(
                    client
                        .delete_account(request(&who, DeleteAccountRequest { password }))
                        .await
                        .map(drop),
                )],
                &[
                    InvalidArgument,
                    Unauthenticated,
                    PermissionDenied,
                    ResourceExhausted,
                ][..],
            ),
            Call::GetMe(who) => (
                vec![code(
                    client
                        .get_me(request(&who, GetMeRequest {}))
                        .await
                        .map(drop),
                )],
                &[Ok, Unauthenticated, ResourceExhausted][..],
            ),
            Call::GetProfiles(who, user_ids) => {
                let mut codes = Vec::new();
                match client
                    .get_profiles(request(&who, GetProfilesRequest { user_ids }))
                    .await
                {
                    Err(s) => codes.push(s.code()),
                    Result::Ok(reply) => {
                        codes.push(Ok);
                        let mut stream = reply.into_inner();
                        loop {
                            match stream.next().await {
                                Some(Result::Ok(item)) => {
                                    if let Some(
                                        mesh_proto::aggregator::v1::profile_result::Result::Error(
                                            e,
                                        ),
                                    ) = item.result
                                    {
                                        codes.push(Code::from(e.code));
                                    }
                                }
                                Some(Err(s)) => {
                                    codes.push(s.code());
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
                (
                    codes,
                    &[
                        Ok,
                        InvalidArgument,
                        NotFound,
                        Unauthenticated,
                        ResourceExhausted,
                    ][..],
                )
            }
            Call::Watch(who, after_sequence) => {
                let mut codes = Vec::new();
                match client
                    .watch_profiles(request(&who, WatchProfilesRequest { after_sequence }))
                    .await
                {
                    Err(s) => codes.push(s.code()),
                    Result::Ok(reply) => {
                        codes.push(Ok);
                        let mut stream = reply.into_inner();
                        // A live stream stays open: look at what comes within a moment.
                        if let Result::Ok(Some(Err(s))) =
                            tokio::time::timeout(Duration::from_millis(50), stream.next()).await
                        {
                            codes.push(s.code());
                        }
                    }
                }
                (
                    codes,
                    &[
                        Ok,
                        InvalidArgument,
                        OutOfRange,
                        Unauthenticated,
                        Unavailable,
                        ResourceExhausted,
                    ][..],
                )
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        max_shrink_iters: 100,
        .. ProptestConfig::default()
    })]

    /// Any request gets one of its method's codes: never INTERNAL, UNKNOWN or a broken stream.
    #[test]
    fn any_request_gets_an_allowed_code(call in call()) {
        let shown = format!("{call:?}");
        let (got, allowed) = run(call);
        prop_assert!(
            got.iter().all(|c| allowed.contains(c)),
            "{got:?} not all in {allowed:?} for {}", &shown[..shown.len().min(300)]
        );
    }
}

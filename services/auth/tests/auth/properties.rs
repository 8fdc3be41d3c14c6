//! Property tests: any request message to any auth method — random e-mails, passwords, refresh
//! tokens, client credentials, with a valid, garbage or no bearer token — gets one of the codes
//! the contract gives that method, never INTERNAL, UNKNOWN or a broken stream. A real auth
//! server in-process on SQLite.

use std::{sync::OnceLock, time::Duration};

use mesh_proto::auth::v1::{
    DeleteAccountRequest, GetJwksRequest, IssueServiceTokenRequest, ListSessionsRequest,
    LoginRequest, LogoutRequest, RefreshRequest, RegisterRequest, ValidateTokenRequest,
};
use mesh_testkit::{CLIENT_SECRET, TestMesh, bearer};
use proptest::prelude::*;
use tonic::Code;

/// Auth (with the mesh's `aggregator` client), started once for all cases, on a runtime of its
/// own.
fn mesh() -> &'static (tokio::runtime::Runtime, TestMesh) {
    static MESH: OnceLock<(tokio::runtime::Runtime, TestMesh)> = OnceLock::new();
    MESH.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mesh = runtime.block_on(TestMesh::builder().start());
        (runtime, mesh)
    })
}

/// E-mails: mostly address-shaped, sometimes anything.
fn email() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z]{1,12}@[a-z]{1,8}\\.(com|org)",
        1 => "[ -~]{0,30}",
        1 => any::<String>(),
        1 => Just(format!("{}@example.com", "a".repeat(300))),
    ]
}

/// Passwords: too short, fine, too long, or anything.
fn password() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => "[ -~]{0,7}",
        2 => "[ -~]{8,40}",
        1 => Just("p".repeat(1100)),
        1 => any::<String>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~]{0,80}",
        1 => any::<String>(),
        1 => Just("t".repeat(9000)),
    ]
}

#[derive(Debug, Clone)]
enum Call {
    Register(String, String),
    Login(String, String),
    Refresh(String),
    Logout(String),
    ValidateToken(String),
    GetJwks,
    ListSessions(Option<String>),
    DeleteAccount(Option<String>, String),
    IssueServiceToken(String, String),
}

/// A bearer token: a valid one (whose session does not exist), garbage, or none.
fn bearer_token() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        2 => Just(Some(String::new())),
        1 => text().prop_map(Some),
        1 => Just(None),
    ]
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        (email(), password()).prop_map(|(e, p)| Call::Register(e, p)),
        (email(), password()).prop_map(|(e, p)| Call::Login(e, p)),
        text().prop_map(Call::Refresh),
        text().prop_map(Call::Logout),
        text().prop_map(Call::ValidateToken),
        Just(Call::GetJwks),
        bearer_token().prop_map(Call::ListSessions),
        (bearer_token(), password()).prop_map(|(t, p)| Call::DeleteAccount(t, p)),
        (
            prop_oneof![Just("aggregator".to_owned()), text()],
            prop_oneof![Just(CLIENT_SECRET.to_owned()), text()]
        )
            .prop_map(|(id, secret)| Call::IssueServiceToken(id, secret)),
    ]
}

fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = match token {
        Some(t) => bearer(t, message),
        None => tonic::Request::new(message),
    };
    request.set_timeout(Duration::from_secs(30));
    request
}

/// The code `call` got, and the codes its method may answer (every method answers
/// RESOURCE_EXHAUSTED to a request over its size limit).
fn run(call: Call) -> (Code, &'static [Code]) {
    use Code::*;
    let (runtime, mesh) = mesh();
    // An empty bearer token stands for a valid one (for a user with no live session).
    let token = |t: Option<String>| {
        t.map(|t| {
            if t.is_empty() {
                let mut claims = mesh.keys.user_claims("someone", "someone@example.com");
                claims.sid = Some("no-such-session".into());
                mesh.keys.sign(&claims)
            } else {
                t
            }
        })
    };
    let mut client = mesh.auth_client();
    runtime.block_on(async move {
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Ok, |s| s.code());
        match call {
            Call::Register(email, password) => (
                code(
                    client
                        .register(RegisterRequest { email, password })
                        .await
                        .map(drop),
                ),
                &[Ok, InvalidArgument, AlreadyExists, ResourceExhausted][..],
            ),
            Call::Login(email, password) => (
                code(
                    client
                        .login(LoginRequest { email, password })
                        .await
                        .map(drop),
                ),
                &[Ok, InvalidArgument, Unauthenticated, ResourceExhausted][..],
            ),
            Call::Refresh(refresh_token) => (
                code(
                    client
                        .refresh(RefreshRequest { refresh_token })
                        .await
                        .map(drop),
                ),
                &[Unauthenticated, ResourceExhausted][..],
            ),
            Call::Logout(refresh_token) => (
                code(
                    client
                        .logout(LogoutRequest { refresh_token })
                        .await
                        .map(drop),
                ),
                &[Ok, ResourceExhausted][..],
            ),
            Call::ValidateToken(access_token) => (
                code(
                    client
                        .validate_token(ValidateTokenRequest { access_token })
                        .await
                        .map(drop),
                ),
                &[Unauthenticated, ResourceExhausted][..],
            ),
            Call::GetJwks => (
                code(client.get_jwks(GetJwksRequest {}).await.map(drop)),
                &[Ok, ResourceExhausted][..],
            ),
            Call::ListSessions(t) => (
                code(
                    client
                        .list_sessions(with_token(token(t).as_deref(), ListSessionsRequest {}))
                        .await
                        .map(drop),
                ),
                &[Unauthenticated, PermissionDenied, ResourceExhausted][..],
            ),
            Call::DeleteAccount(t, password) => (
                code(
                    client
                        .delete_account(with_token(
                            token(t).as_deref(),
                            DeleteAccountRequest { password },
                        ))
                        .await
                        .map(drop),
                ),
                &[
                    Unauthenticated,
                    PermissionDenied,
                    InvalidArgument,
                    ResourceExhausted,
                ][..],
            ),
            Call::IssueServiceToken(client_id, client_secret) => (
                code(
                    client
                        .issue_service_token(IssueServiceTokenRequest {
                            client_id,
                            client_secret,
                        })
                        .await
                        .map(drop),
                ),
                &[Ok, InvalidArgument, Unauthenticated, ResourceExhausted][..],
            ),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Register and Login hash with Argon2id (19 MiB, tens of milliseconds each).
        cases: 96,
        max_shrink_iters: 100,
        .. ProptestConfig::default()
    })]

    /// Any request gets one of its method's codes: never INTERNAL, UNKNOWN or a broken stream.
    #[test]
    fn any_request_gets_an_allowed_code(call in call()) {
        let shown = format!("{call:?}");
        let (got, allowed) = run(call);
        prop_assert!(allowed.contains(&got), "{got:?} not in {allowed:?} for {}", &shown[..shown.len().min(300)]);
    }
}

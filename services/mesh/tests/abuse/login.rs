//! Login throttling protects accounts without handing attackers a kill switch.

use futures_util::{StreamExt as _, stream};
use mesh_proto::{aggregator::v1 as aggregator, auth::v1 as auth};
use mesh_testkit::{OTHER_PEER, PASSWORD, TestMesh, assert_code, bearer, connect_from, sign_up};
use tonic::Code;

/// 1,000 failed logins for made-up e-mails from one client address leave a real user's correct
/// login working: the aggregator cuts that address off after 100 failures, and auth counts
/// failures per account only (never per the address every public login comes from).
#[tokio::test]
async fn random_failures_from_one_address_lock_nobody_out() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let addr = mesh.aggregator().addr;
    let mut honest = aggregator::aggregator_service_client::AggregatorServiceClient::new(
        connect_from(addr, OTHER_PEER),
    );
    sign_up(&mut honest, "real@example.com", "Someone").await;

    let attacker = mesh.aggregator_client();
    let codes: Vec<Code> = stream::iter(0..1000)
        .map(|n| {
            let mut client = attacker.clone();
            async move {
                let result = client
                    .login(aggregator::LoginRequest {
                        email: format!("made-up-{n}@example.com"),
                        password: "wrong password".into(),
                    })
                    .await;
                result.err().map_or(Code::Ok, |s| s.code())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let checked = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    let cut_off = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!(checked + cut_off, 1000, "{codes:?}");
    assert!(checked <= 100, "{checked} password checks for one address");

    honest
        .login(aggregator::LoginRequest {
            email: "real@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("the real user logs in");

    // At auth itself, 120 failures from one address (auth used to allow 100 per address) do
    // not stop the real user either.
    let mut auth = mesh.auth_client();
    for n in 0..120 {
        let refused = auth
            .login(auth::LoginRequest {
                email: format!("other-{n}@example.com"),
                password: "wrong password".into(),
            })
            .await;
        assert_code(refused, Code::Unauthenticated);
    }
    auth.login(auth::LoginRequest {
        email: "real@example.com".into(),
        password: PASSWORD.into(),
    })
    .await
    .expect("still");
    mesh.stop().await;
}

/// 40 concurrent wrong passwords for one account get at most 5 password checks: each attempt
/// is reserved before its Argon2id check, so they cannot race past the limit.
#[tokio::test]
async fn concurrent_wrong_passwords_cannot_race_the_throttle() {
    let mesh = TestMesh::builder().start().await;
    let client = mesh.auth_client();
    client
        .clone()
        .register(auth::RegisterRequest {
            email: "target@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("register");
    let codes: Vec<Code> = stream::iter(0..40)
        .map(|_| {
            let mut client = client.clone();
            async move {
                client
                    .login(auth::LoginRequest {
                        email: "Target@Example.com".into(),
                        password: "wrong password".into(),
                    })
                    .await
                    .err()
                    .map_or(Code::Ok, |s| s.code())
            }
        })
        .buffer_unordered(40)
        .collect()
        .await;
    let checked = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    assert!(checked <= 5, "{checked} checks of 40: {codes:?}");
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count(),
        40 - checked
    );
    mesh.stop().await;
}

/// DeleteAccount's password check is throttled like Login's: after 5 wrong passwords even the
/// right one is RESOURCE_EXHAUSTED (and the account stays).
#[tokio::test]
async fn delete_account_password_checks_are_throttled() {
    let mesh = TestMesh::builder().start().await;
    let mut client = mesh.auth_client();
    let tokens = client
        .register(auth::RegisterRequest {
            email: "victim@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("register")
        .into_inner()
        .tokens
        .expect("tokens");
    let delete = |password: &str| {
        bearer(
            &tokens.access_token,
            auth::DeleteAccountRequest {
                password: password.into(),
            },
        )
    };
    for _ in 0..5 {
        assert_code(
            client.delete_account(delete("guess guess")).await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        client.delete_account(delete(PASSWORD)).await,
        Code::ResourceExhausted,
    );
    client
        .validate_token(auth::ValidateTokenRequest {
            access_token: tokens.access_token.clone(),
        })
        .await
        .expect("the account is still there");
    mesh.stop().await;
}

/// An e-mail is bounded before it is used for anything: 300 characters are INVALID_ARGUMENT,
/// and a 4 MB one is refused by Login's request limit before it is read.
#[tokio::test]
async fn long_emails_are_refused_before_use() {
    let mesh = TestMesh::builder().start().await;
    let mut client = mesh.auth_client();
    let long = format!("{}@example.com", "a".repeat(300));
    let refused = assert_code(
        client
            .login(auth::LoginRequest {
                email: long,
                password: "whatever1".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(refused.message().contains("email"), "{refused:?}");
    let huge = format!("{}@example.com", "a".repeat(4_000_000));
    let refused = assert_code(
        client
            .login(auth::LoginRequest {
                email: huge,
                password: "whatever1".into(),
            })
            .await,
        Code::ResourceExhausted,
    );
    assert!(refused.message().len() < 200, "{refused:?}");
    mesh.stop().await;
}

/// Logins the client cancels are still counted: each password check runs to its end and its
/// failure counts for the address (cancelling used to escape the count while still costing
/// the account an attempt).
#[tokio::test]
async fn cancelled_logins_are_counted() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let client = mesh.aggregator_client();
    let cut_off = crate::support::within(std::time::Duration::from_secs(120), || {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(aggregator::LoginRequest {
                email: format!("gone-{}@example.com", uuid::Uuid::now_v7()),
                password: "wrong password".into(),
            });
            // The client gives up long before the Argon2id check is done (but leaves the
            // aggregator time to ask auth).
            request.set_timeout(std::time::Duration::from_millis(40));
            match client.login(request).await {
                Err(status) if status.code() == Code::ResourceExhausted => {
                    status.message().contains("failed logins")
                }
                _ => false,
            }
        }
    })
    .await;
    assert!(
        cut_off.is_some(),
        "cancelled failed logins never reached the address's limit"
    );
    mesh.stop().await;
}

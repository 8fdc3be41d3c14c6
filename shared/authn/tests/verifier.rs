//! The bearer-token layer in front of a real gRPC service, verifying against a real auth
//! server's JWKS: good tokens pass with their claims, hostile ones are UNAUTHENTICATED.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ed25519_dalek::Signer as _;
use mesh_authn::{AuthLayer, AuthnError, BearerToken, Claims, JwksCache};
use mesh_proto::{
    auth::v1::{IssueServiceTokenRequest, RegisterRequest, auth_service_client::AuthServiceClient},
    users::v1::{
        GetUserRequest, ListUsersRequest, ListUsersResponse, User,
        user_service_client::UserServiceClient, user_service_server::UserServiceServer,
    },
};
use mesh_testkit::{
    TestServer, UsersDouble, auth_config, bearer, claims, connect, serve_double_on, start_auth,
    unix_now,
};
use mesh_token::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, KeyRing, TokenError};
use tonic::{Code, Request, Status};
use tower::Layer as _;

/// A users double answering GetUser with the caller's claims and ListUsers (public) with
/// nothing, counting the ListUsers calls it answered on `lists`.
fn echo(lists: &Arc<AtomicUsize>) -> UsersDouble {
    let lists = lists.clone();
    UsersDouble::new()
        .get_user(|request| async move {
            let claims = request.extensions().get::<Claims>().cloned();
            let token = request.extensions().get::<BearerToken>().cloned();
            let claims = claims.ok_or_else(|| Status::internal("no claims"))?;
            assert!(
                token.is_some(),
                "the raw token is kept for downstream calls"
            );
            Ok(User {
                id: claims.sub,
                email: claims.email.unwrap_or_default(),
                ..User::default()
            })
        })
        .list_users(move |request| {
            assert!(request.extensions().get::<Claims>().is_none());
            lists.fetch_add(1, Ordering::SeqCst);
            async { Ok(ListUsersResponse::default()) }
        })
}

async fn start_auth_on(addr: SocketAddr, data: &Path, keys: Vec<std::path::PathBuf>) -> TestServer {
    let mut config = auth_config(data);
    config.listen = addr;
    config.signing_keys = keys;
    config.service_clients = vec!["svc=plain:svc-secret".parse().expect("client")];
    start_auth(config).await
}

/// A key cache for auth on `channel`, expecting the mesh's issuer and audience.
fn cache_on(channel: tonic::transport::Channel) -> JwksCache {
    JwksCache::new(
        mesh_runtime::client::traced(channel),
        DEFAULT_ISSUER,
        DEFAULT_AUDIENCE,
    )
}

async fn start_protected(cache: Arc<JwksCache>) -> TestServer {
    start_protected_on(([127, 0, 0, 1], 0).into(), cache, &Arc::default()).await
}

async fn start_protected_on(
    addr: SocketAddr,
    cache: Arc<JwksCache>,
    lists: &Arc<AtomicUsize>,
) -> TestServer {
    let service = AuthLayer::new(cache, &["ListUsers"]).layer(UserServiceServer::new(echo(lists)));
    serve_double_on(
        addr,
        service,
        mesh_proto::descriptor_sets::USERS,
        mesh_proto::service_names::USERS,
    )
    .await
}

fn with_token(token: &str) -> Request<GetUserRequest> {
    bearer(token, GetUserRequest::default())
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac as _};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn forge(header: &str, payload: &str, key: Option<&ed25519_dalek::SigningKey>) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let signature = key
        .map(|k| B64.encode(k.sign(input.as_bytes()).to_bytes()))
        .unwrap_or_default();
    format!("{input}.{signature}")
}

/// Two signing keys in `dir`, old and new: their files and rings.
fn two_keys(dir: &Path) -> (std::path::PathBuf, KeyRing, std::path::PathBuf, KeyRing) {
    let old = dir.join("old.pem");
    let new = dir.join("new.pem");
    KeyRing::load_or_create_dev_key(&old).expect("old key");
    KeyRing::load_or_create_dev_key(&new).expect("new key");
    let old_ring = KeyRing::load_pem_files(std::slice::from_ref(&old)).expect("old");
    let new_ring = KeyRing::load_pem_files(std::slice::from_ref(&new)).expect("new");
    (old, old_ring, new, new_ring)
}

/// Real tokens pass with their claims; a public method needs none; every hostile token is
/// UNAUTHENTICATED and none crashes anything.
#[tokio::test]
async fn verifies_real_tokens_and_refuses_hostile_ones() {
    let data = tempfile::tempdir().expect("tempdir");
    let auth = start_auth_on(([127, 0, 0, 1], 0).into(), data.path(), vec![]).await;
    let cache = Arc::new(cache_on(auth.channel.clone()));
    let server = start_protected(cache.clone()).await;
    let mut users = UserServiceClient::new(server.channel.clone());
    let mut auth_client = AuthServiceClient::new(auth.channel.clone());

    let registered = auth_client
        .register(RegisterRequest {
            email: "vera@example.com".into(),
            password: "long enough password".into(),
        })
        .await
        .expect("register")
        .into_inner();
    let user_token = registered.tokens.expect("tokens").access_token;
    let me = users
        .get_user(with_token(&user_token))
        .await
        .expect("user token")
        .into_inner();
    assert_eq!(
        (me.id.as_str(), me.email.as_str()),
        (registered.user_id.as_str(), "vera@example.com")
    );

    let service_token = auth_client
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "svc".into(),
            client_secret: "svc-secret".into(),
        })
        .await
        .expect("service token")
        .into_inner()
        .access_token;
    let svc = users
        .get_user(with_token(&service_token))
        .await
        .expect("service token")
        .into_inner();
    assert_eq!(svc.id, "service:svc");
    users
        .list_users(ListUsersRequest::default())
        .await
        .expect("a public method needs no token");

    // Hostile tokens, signed with auth's own key where a signature is needed.
    let ring = KeyRing::load_pem_files(&[data.path().join("auth/dev-signing-key.pem")])
        .expect("auth's development key");
    let kid = ring.signing_kid().to_owned();
    let sign = |c: &Claims| ring.sign(c);
    let mut expired = claims("u");
    expired.exp = unix_now() - 120;
    expired.iat = unix_now() - 1000;
    expired.nbf = unix_now() - 1000;
    let mut future = claims("u");
    future.nbf = unix_now() + 600;
    let mut wrong_aud = claims("u");
    wrong_aud.aud = vec!["elsewhere".into()];
    let mut wrong_iss = claims("u");
    wrong_iss.iss = "evil".into();
    let payload = serde_json::to_string(&claims("u")).expect("json");
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let public_x = &ring.jwks().keys[0].x;
    let hostile = vec![
        (
            "alg none",
            forge(
                &format!(r#"{{"alg":"none","kid":"{kid}"}}"#),
                &payload,
                None,
            ),
        ),
        ("HS256 keyed with the public key", {
            let input = format!(
                "{}.{}",
                B64.encode(format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#)),
                B64.encode(&payload)
            );
            let public = B64.decode(public_x).expect("x");
            format!(
                "{input}.{}",
                B64.encode(hmac_sha256(&public, input.as_bytes()))
            )
        }),
        (
            "another key under a known kid",
            forge(
                &format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#),
                &payload,
                Some(&other_key),
            ),
        ),
        (
            "unknown kid",
            forge(
                r#"{"alg":"EdDSA","kid":"no-such-key"}"#,
                &payload,
                Some(&other_key),
            ),
        ),
        ("expired", sign(&expired)),
        ("not yet valid", sign(&future)),
        ("wrong audience", sign(&wrong_aud)),
        ("wrong issuer", sign(&wrong_iss)),
        ("garbage", "not.a.token".into()),
        ("empty parts", "..".into()),
        ("too long", "a".repeat(9_000)),
        ("tampered", {
            let mut parts: Vec<String> = user_token.split('.').map(str::to_owned).collect();
            parts[1] = B64.encode(serde_json::to_string(&claims("someone-else")).expect("json"));
            parts.join(".")
        }),
    ];
    for (name, token) in &hostile {
        let status = users.get_user(with_token(token)).await.expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
    }
    for (name, request) in [
        ("no header", Request::new(GetUserRequest::default())),
        ("basic scheme", {
            let mut r = Request::new(GetUserRequest::default());
            r.metadata_mut().insert(
                "authorization",
                "Basic dXNlcjpwYXNz".parse().expect("ascii"),
            );
            r
        }),
        ("empty bearer", {
            let mut r = Request::new(GetUserRequest::default());
            r.metadata_mut()
                .insert("authorization", "Bearer ".parse().expect("ascii"));
            r
        }),
    ] {
        let status = users.get_user(request).await.expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}");
    }
    // Still serving after all that.
    users
        .get_user(with_token(&user_token))
        .await
        .expect("still serving");

    // A flood of unknown key ids fetches the keys at most once more, not once per token.
    let before = cache.fetches();
    for i in 0..50 {
        let token = forge(
            &format!(r#"{{"alg":"EdDSA","kid":"made-up-{i}"}}"#),
            &payload,
            Some(&other_key),
        );
        let status = users
            .get_user(with_token(&token))
            .await
            .expect_err("unknown kid");
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert!(
        cache.fetches() - before <= 1,
        "{} fetches",
        cache.fetches() - before
    );

    server.shutdown().await.expect("clean shutdown");
    auth.shutdown().await.expect("clean shutdown");
}

/// After auth rotates to a new key, a token with the new `kid` makes the cache fetch the keys
/// again, and tokens of the old key stay valid.
#[tokio::test]
async fn refetches_keys_after_rotation() {
    let data = tempfile::tempdir().expect("tempdir");
    let (old, old_ring, new, new_ring) = two_keys(data.path());

    let first = start_auth_on(([127, 0, 0, 1], 0).into(), data.path(), vec![old.clone()]).await;
    let addr = first.addr;
    let cache = Arc::new(cache_on(connect(addr).await).with_min_refetch(Duration::ZERO));
    let old_token = old_ring.sign(&claims("old-user"));
    cache.verify(&old_token).await.expect("old key known");
    first.shutdown().await.expect("stopped");

    // The same address, now with both keys; the new one signs.
    let second = start_auth_on(addr, data.path(), vec![old, new]).await;
    let new_token = new_ring.sign(&claims("new-user"));
    let claims = cache.verify(&new_token).await.expect("new key fetched");
    assert_eq!(claims.sub, "new-user");
    cache
        .verify(&old_token)
        .await
        .expect("old tokens stay valid");
    assert_eq!(cache.fetches(), 2);
    second.shutdown().await.expect("stopped");
}

/// A token verified once is answered from the cache after that, but its expiry is checked on
/// every use, and keys fetched anew (a key withdrawn) empty the cache.
#[tokio::test]
async fn verified_tokens_are_cached_and_still_checked() {
    let data = tempfile::tempdir().expect("tempdir");
    let (old, old_ring, new, new_ring) = two_keys(data.path());
    let first = start_auth_on(([127, 0, 0, 1], 0).into(), data.path(), vec![old.clone()]).await;
    let addr = first.addr;
    let cache = Arc::new(
        cache_on(connect(addr).await)
            .with_min_refetch(Duration::ZERO)
            .with_leeway(Duration::ZERO),
    );

    // Verified once, then from the cache.
    let token = old_ring.sign(&claims("cached-user"));
    for _ in 0..3 {
        assert_eq!(
            cache.verify(&token).await.expect("valid").sub,
            "cached-user"
        );
    }
    assert_eq!(cache.verified_hits(), 2);

    // A cached token still expires.
    let short = old_ring.sign(&Claims {
        exp: unix_now() + 1,
        ..claims("short-lived")
    });
    cache.verify(&short).await.expect("valid for a second");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        cache.verify(&short).await,
        Err(AuthnError::Invalid(TokenError::Expired))
    ));

    // auth now publishes only the new key: once the cache fetches keys again, the old key's
    // tokens are refused, cached or not.
    first.shutdown().await.expect("stopped");
    let second = start_auth_on(addr, data.path(), vec![new]).await;
    cache
        .verify(&new_ring.sign(&claims("new-user")))
        .await
        .expect("new key fetched");
    assert!(matches!(
        cache.verify(&token).await,
        Err(AuthnError::Invalid(TokenError::UnknownKey(_)))
    ));
    second.shutdown().await.expect("stopped");
}

/// When auth cannot be reached, calls are UNAVAILABLE (retryable), not UNAUTHENTICATED.
#[tokio::test]
async fn unreachable_auth_is_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let cache = Arc::new(cache_on(connect(addr).await));
    let server = start_protected(cache).await;
    let status = UserServiceClient::new(server.channel.clone())
        .get_user(with_token("a.b.c"))
        .await
        .expect_err("no keys");
    assert_eq!(status.code(), Code::Unavailable);
    server.shutdown().await.expect("clean shutdown");
}

/// A balanced channel spreads calls over every address its name resolves to, keeps working
/// when one endpoint stops, and drops it once the name no longer resolves to it.
#[tokio::test]
async fn balanced_channel_spreads_over_every_endpoint() {
    let data = tempfile::tempdir().expect("data");
    let auth = start_auth_on(([127, 0, 0, 1], 0).into(), data.path(), Vec::new()).await;
    let cache = Arc::new(cache_on(auth.channel.clone()));
    let mut servers = Vec::new();
    let mut echoes = Vec::new();
    // Three servers on three loopback addresses, as three pods behind a headless Service.
    for ip in [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]] {
        let lists = Arc::new(AtomicUsize::new(0));
        echoes.push(lists.clone());
        servers.push(start_protected_on((ip, 0).into(), cache.clone(), &lists).await);
    }
    let resolved = Arc::new(std::sync::Mutex::new(
        servers.iter().map(|s| s.addr).collect::<Vec<_>>(),
    ));
    let answers = resolved.clone();
    let resolve: mesh_runtime::client::Resolve = Box::new(move |host, _port| {
        assert_eq!(host, "users.mesh.svc.cluster.local");
        let addrs = answers.lock().expect("lock").clone();
        Box::pin(async move { Ok(addrs) })
    });
    let channel = mesh_runtime::client::balanced_channel_with(
        &"http://users.mesh.svc.cluster.local:50053"
            .parse()
            .expect("uri"),
        &mesh_runtime::tls::ClientTls::default(),
        Duration::from_millis(100),
        resolve,
    )
    .expect("a plaintext channel");
    let mut client = UserServiceClient::new(channel);
    let counts = |echoes: &[Arc<AtomicUsize>]| -> Vec<usize> {
        echoes.iter().map(|e| e.load(Ordering::SeqCst)).collect()
    };
    // The first endpoints appear after the first resolution.
    for _ in 0..300 {
        client
            .list_users(ListUsersRequest::default())
            .await
            .expect("list");
    }
    let spread = counts(&echoes);
    assert!(
        spread.iter().all(|&n| n > 0),
        "every endpoint takes calls: {spread:?}"
    );

    // One pod goes away: the name stops resolving to it and calls go on without a failure.
    let gone = servers.pop().expect("server");
    resolved.lock().expect("lock").pop();
    gone.shutdown().await.expect("stops");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = counts(&echoes);
    for _ in 0..200 {
        client
            .list_users(ListUsersRequest::default())
            .await
            .expect("calls continue");
    }
    let after = counts(&echoes);
    assert_eq!(after[2], before[2], "the stopped endpoint gets nothing");
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{before:?} -> {after:?}"
    );
    for server in servers {
        server.shutdown().await.expect("stops");
    }
    auth.shutdown().await.expect("stops");
}

//! TLS over real loopback connections with certificates made in the test: every service
//! behind TLS, auth and users requiring the mesh's client certificates, and certificates and
//! client CAs replaced on disk while the servers run.

use std::{net::SocketAddr, path::Path, time::Duration};

use mesh_proto::aggregator::v1::{
    GetMeRequest, SignUpRequest, aggregator_service_client::AggregatorServiceClient,
};
use mesh_runtime::tls::{ClientTls, dev::DevFiles};
use mesh_testkit::{
    TestPki, aggregator_config, auth_config, https, serve_tls, spawn_aggregator, start_auth,
    start_users, tls_channel as channel, users_config, wait_for_health_tls,
};
use rustls_pki_types::ServerName;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVING: i32 = ServingStatus::Serving as i32;

/// The overall health a fresh connection with `tls` gets, or why it got none.
async fn health(addr: SocketAddr, tls: &ClientTls) -> Result<i32, String> {
    health_on(&channel(addr, tls)).await
}

async fn health_on(channel: &Channel) -> Result<i32, String> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| e.to_string())
}

/// Waits (at most 20 s) until a fresh connection with `tls` finds the server SERVING.
async fn wait_serving(addr: SocketAddr, tls: &ClientTls) {
    wait_for_health_tls(addr, tls, "").await;
}

/// The certificate the server at `addr` presents to a new TLS connection.
async fn presented(addr: SocketAddr, ca: &Path, identity: &DevFiles) -> Vec<u8> {
    // The runtime's own client configuration: the CA, the identity, ALPN h2.
    let config = ClientTls::load(Some(ca), Some(&identity.cert), Some(&identity.key))
        .expect("client TLS")
        .rustls_config()
        .expect("a CA");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    session.peer_certificates().expect("certificates")[0].to_vec()
}

/// The three services with TLS everywhere: the facade takes clients without certificates;
/// auth and users take only clients with a certificate from the mesh's CA (the aggregator's,
/// users' own for auth), and refuse one without, an expired one, one from another CA and
/// plaintext, going on serving the mesh all the while.
#[tokio::test]
async fn the_services_speak_tls_and_auth_and_users_require_the_mesh_certificate() {
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "mesh-ca");
    let stranger = TestPki::new(&data.path().join("other"), "other-ca");
    let (auth_files, users_files, aggregator_files) =
        (pki.leaf("auth"), pki.leaf("users"), pki.leaf("aggregator"));

    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &auth_files, Some(&pki.ca_path));
    let probes = mesh_testkit::free_addr();
    config.server.health_listen = Some(probes);
    let auth = start_auth(config).await;

    let mut config = users_config(data.path(), auth.addr);
    serve_tls(&mut config.server, &users_files, Some(&pki.ca_path));
    config.authn.auth_url = https(auth.addr);
    config.authn.tls = pki.client_config_as(&users_files);
    let users = start_users(config).await;

    let mut config = aggregator_config(auth.addr, users.addr);
    serve_tls(&mut config.server, &aggregator_files, None);
    config.authn.auth_url = https(auth.addr);
    config.users_url = https(users.addr);
    config.authn.tls = pki.client_config_as(&aggregator_files);
    // Not the kit's `start_aggregator`, which waits for SERVING over plaintext.
    let aggregator = spawn_aggregator(config).await;

    // The public facade: a client with only the CA, no certificate of its own. SERVING means
    // both downstream health checks pass over mutual TLS.
    let public = pki.client(None);
    wait_serving(aggregator.addr, &public).await;
    let mut facade = AggregatorServiceClient::new(channel(aggregator.addr, &public));
    let signed_up = facade
        .sign_up(SignUpRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Ada".into(),
        })
        .await
        .expect("sign up over TLS: aggregator to auth and users over mutual TLS")
        .into_inner();
    let token = signed_up.tokens.expect("tokens").access_token;
    let mut request = tonic::Request::new(GetMeRequest::default());
    mesh_testkit::set_bearer(&mut request, &token);
    // Users verifies the token with keys it fetched from auth over mutual TLS.
    let me = facade.get_me(request).await.expect("GetMe").into_inner();
    assert_eq!(me.profile.expect("profile").display_name, "Ada");

    let mesh_cert = pki.client(Some(&aggregator_files));
    let expired = pki.expired("expired");
    let foreign = stranger.leaf("foreign");
    for (name, addr) in [("auth", auth.addr), ("users", users.addr)] {
        assert_eq!(health(addr, &mesh_cert).await, Ok(SERVING), "{name}");
        let refused = [
            ("no certificate", health(addr, &pki.client(None)).await),
            (
                "an expired one",
                health(addr, &pki.client(Some(&expired))).await,
            ),
            (
                "one from another CA",
                health(
                    addr,
                    &ClientTls::load(Some(&pki.ca_path), Some(&foreign.cert), Some(&foreign.key))
                        .expect("foreign client"),
                )
                .await,
            ),
            (
                "a client that trusts another CA",
                health(addr, &stranger.client(Some(&foreign))).await,
            ),
            (
                "plaintext",
                health_on(&mesh_runtime::testing::connect(addr).await).await,
            ),
        ];
        for (what, outcome) in refused {
            assert!(outcome.is_err(), "{name} accepted {what}: {outcome:?}");
        }
        // The refusals cost the server nothing.
        assert_eq!(health(addr, &mesh_cert).await, Ok(SERVING), "{name} after");
    }
    // The kubelet's probes cannot speak TLS: auth's plaintext probe port answers health, and
    // nothing else.
    let probe = mesh_runtime::testing::connect(probes).await;
    assert_eq!(health_on(&probe).await, Ok(SERVING), "probe port");
    let readiness = HealthClient::new(probe.clone())
        .check(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .expect("readiness on the probe port");
    assert_eq!(readiness.into_inner().status, SERVING);
    let jwks = mesh_proto::auth::v1::auth_service_client::AuthServiceClient::new(probe)
        .get_jwks(mesh_proto::auth::v1::GetJwksRequest::default())
        .await
        .expect_err("only health on the probe port");
    assert_eq!(jwks.code(), tonic::Code::Unimplemented, "{jwks:?}");

    // And the facade, which asks for no client certificate, refuses plaintext.
    assert!(
        health_on(&mesh_runtime::testing::connect(aggregator.addr).await)
            .await
            .is_err()
    );
    assert_eq!(health(aggregator.addr, &public).await, Ok(SERVING));

    for server in [aggregator, users, auth] {
        server.shutdown().await.expect("clean shutdown");
    }
}

/// Certificates, keys and the client CA replaced on disk while auth runs: new connections get
/// the new certificate (and are checked against the new CA), an established connection and
/// its open stream carry on, no call fails, and files that do not parse leave the last good
/// configuration in place.
#[tokio::test]
async fn certificates_and_the_client_ca_rotate_without_a_restart() {
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "ca-one");
    let next = TestPki::new(&data.path().join("next"), "ca-two");
    let served = pki.leaf("auth");
    let client_ca = data.path().join("client-ca.pem");
    std::fs::copy(&pki.ca_path, &client_ca).expect("client CA");
    let caller = pki.leaf("caller");

    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &served, Some(&client_ca));
    let auth = start_auth(config).await;
    let tls = pki.client(Some(&caller));
    wait_serving(auth.addr, &tls).await;
    let first = std::fs::read(&served.cert).expect("cert");
    let before = presented(auth.addr, &pki.ca_path, &caller).await;

    // One established connection with a health Watch stream open on it.
    let established = channel(auth.addr, &tls);
    let mut watch = HealthClient::new(established.clone())
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        watch.message().await.expect("first").map(|m| m.status),
        Some(SERVING)
    );

    // A renewed certificate from the same CA, written key first: for a moment the files do not
    // match, and the server keeps what worked.
    let renewed = pki.leaf_pem();
    std::fs::write(&served.key, &renewed.key).expect("key");
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&served.cert, &renewed.cert).expect("cert");
    assert_ne!(first, renewed.cert.as_bytes());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = presented(auth.addr, &pki.ca_path, &caller).await;
        if now == renewed.der {
            break;
        }
        assert_eq!(now, before, "only the old or the new certificate");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        // Calls go on meanwhile, on the old connection and on new ones.
        assert_eq!(health_on(&established).await, Ok(SERVING));
        assert_eq!(health(auth.addr, &tls).await, Ok(SERVING));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(health_on(&established).await, Ok(SERVING), "old connection");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.message())
            .await
            .is_err(),
        "the open stream neither ended nor failed"
    );

    // The client CA moves to another authority: its certificates get in on new connections,
    // the old authority's no longer do, and the established connection carries on.
    let newcomer = next.leaf("newcomer");
    let newcomer_tls = ClientTls::load(
        Some(&pki.ca_path),
        Some(&newcomer.cert),
        Some(&newcomer.key),
    )
    .expect("newcomer");
    assert!(health(auth.addr, &newcomer_tls).await.is_err(), "not yet");
    std::fs::copy(&next.ca_path, &client_ca).expect("new client CA");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while health(auth.addr, &newcomer_tls).await != Ok(SERVING) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new client CA was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        health(auth.addr, &tls).await.is_err(),
        "the old CA's client is refused on a new connection"
    );
    assert_eq!(health_on(&established).await, Ok(SERVING), "old connection");

    // A certificate file that no longer parses: the server keeps the last good one.
    std::fs::write(&served.cert, "not a certificate").expect("garbage");
    tokio::time::sleep(mesh_runtime::tls::TLS_RELOAD_INTERVAL * 2).await;
    assert_eq!(health(auth.addr, &newcomer_tls).await, Ok(SERVING));
    assert_eq!(
        presented(auth.addr, &pki.ca_path, &newcomer).await,
        renewed.der,
        "still the last good certificate"
    );
    drop(watch);
    auth.shutdown().await.expect("clean shutdown");
}

/// A balanced channel to `host` (resolved by the test to `addr`) over TLS.
fn balanced(host: &str, addr: SocketAddr, tls: &ClientTls) -> Channel {
    let resolve: mesh_runtime::client::Resolve =
        Box::new(move |_host, _port| Box::pin(async move { Ok(vec![addr]) }));
    mesh_runtime::client::balanced_channel_with(
        &format!("https://{host}:{}", addr.port())
            .parse()
            .expect("URL"),
        tls,
        Duration::from_millis(200),
        resolve,
    )
    .expect("balanced channel")
}

/// Waits (at most 20 s) until `channel` gets SERVING.
async fn wait_serving_on(channel: &Channel, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health_on(channel).await;
        if status == Ok(SERVING) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clients check the name they dial, also when balancing dials the addresses a name resolves
/// to: a server whose certificate lacks that name is refused.
#[tokio::test]
async fn clients_check_the_server_name_they_dial() {
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "ca");
    let served = pki.leaf_named("auth", &["auth.mesh.test"]);
    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &served, None);
    let auth = start_auth(config).await;
    let tls = pki.client(None);
    wait_serving_on(
        &balanced("auth.mesh.test", auth.addr, &tls),
        "the right name",
    )
    .await;
    // The same server, dialled as another name, and by its address (not in its certificate).
    assert!(
        health_on(&balanced("users.mesh.test", auth.addr, &tls))
            .await
            .is_err(),
        "a certificate for auth.mesh.test accepted for users.mesh.test"
    );
    assert!(
        health(auth.addr, &tls).await.is_err(),
        "a certificate without the address accepted for it"
    );
    auth.shutdown().await.expect("clean shutdown");
}

/// A client's certificate and CA renewed on disk while it runs: its next connections present
/// and verify with the new ones, through a balanced channel and a channel to an address alike.
#[tokio::test]
async fn clients_take_renewed_certificates_for_new_connections() {
    let data = tempfile::tempdir().expect("data");
    let old = TestPki::new(&data.path().join("old"), "old-ca");
    let new = TestPki::new(&data.path().join("new"), "new-ca");
    // The server trusts and presents the old CA's certificates, then the new one's.
    let served = old.leaf_named("auth", &["auth.mesh.test", "127.0.0.1"]);
    let trusted = data.path().join("clients-ca.pem");
    std::fs::copy(&old.ca_path, &trusted).expect("client CA");
    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &served, Some(&trusted));
    // Connections are sent away every second, so clients reconnect during the test.
    config.server.max_connection_age = Duration::from_secs(1);
    config.server.max_connection_age_grace = Duration::from_secs(1);
    let auth = start_auth(config).await;

    // The client's files: the old CA and a certificate from it.
    let client_dir = data.path().join("client");
    let identity = old.leaf_named("identity", &["client"]);
    std::fs::create_dir_all(&client_dir).expect("client dir");
    let (ca_file, cert_file, key_file) = (
        client_dir.join("ca.crt"),
        client_dir.join("tls.crt"),
        client_dir.join("tls.key"),
    );
    std::fs::copy(&old.ca_path, &ca_file).expect("ca");
    std::fs::copy(&identity.cert, &cert_file).expect("cert");
    std::fs::copy(&identity.key, &key_file).expect("key");
    let tls = ClientTls::load(Some(&ca_file), Some(&cert_file), Some(&key_file)).expect("tls");
    let channels = [
        ("balanced", balanced("auth.mesh.test", auth.addr, &tls)),
        (
            "address",
            mesh_runtime::client::balanced_channel(&https(auth.addr), &tls).expect("channel"),
        ),
    ];
    for (what, channel) in &channels {
        wait_serving_on(channel, what).await;
    }

    // Everything moves to the new CA: the server's certificate, the CA it checks clients
    // against, and the client's CA and certificate.
    let renewed_server = new.leaf_pem_named(&["auth.mesh.test", "127.0.0.1"]);
    std::fs::write(&served.key, &renewed_server.key).expect("server key");
    std::fs::write(&served.cert, &renewed_server.cert).expect("server cert");
    std::fs::copy(&new.ca_path, &trusted).expect("server's client CA");
    let renewed_client = new.leaf_pem_named(&["client"]);
    std::fs::write(&key_file, &renewed_client.key).expect("client key");
    std::fs::write(&cert_file, &renewed_client.cert).expect("client cert");
    std::fs::copy(&new.ca_path, &ca_file).expect("client CA");

    // A client still holding the old material is refused once the server has moved...
    let stale = ClientTls::load(
        Some(&old.ca_path),
        Some(&identity.cert),
        Some(&identity.key),
    )
    .expect("stale");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while health(auth.addr, &stale).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never moved"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...while the running client's channels reconnect with the renewed files.
    for (what, channel) in &channels {
        wait_serving_on(channel, what).await;
        for _ in 0..5 {
            assert_eq!(health_on(channel).await, Ok(SERVING), "{what}");
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    auth.shutdown().await.expect("clean shutdown");
}

/// A TLS port bounds the handshake: a client that starts one and stalls is closed after the
/// handshake timeout, and others are served meanwhile.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "ca");
    let served = pki.leaf("auth");
    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &served, None);
    config.server.handshake_timeout = Duration::from_secs(1);
    let auth = start_auth(config).await;
    let tls = pki.client(None);
    wait_serving(auth.addr, &tls).await;
    // The first bytes of a TLS ClientHello record, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(auth.addr)
        .await
        .expect("connect");
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(40, 0);
    stalled.write_all(&hello).await.expect("write");
    assert_eq!(health(auth.addr, &tls).await, Ok(SERVING), "others served");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
        .await
        .expect("closed within the handshake timeout and a margin");
    assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    auth.shutdown().await.expect("clean shutdown");
}

/// Whether a TLS handshake from `from` to `addr` completes, verifying with `ca`.
async fn handshake(addr: SocketAddr, ca: &Path, from: std::net::IpAddr) -> bool {
    let config = ClientTls::load(Some(ca), None, None)
        .expect("client TLS")
        .rustls_config()
        .expect("a CA");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let Ok(tcp) = socket.connect(addr).await else {
        return false;
    };
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// A flood of TLS handshakes from one address is cut to its rate (each costs the server a key
/// exchange and a signature, the client next to nothing); another address is served all the
/// while.
#[tokio::test]
async fn a_flood_of_tls_handshakes_from_one_address_is_cut_to_its_rate() {
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "ca");
    let served = pki.leaf("auth");
    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &served, None);
    config.server.max_connections_per_peer = 0;
    let rate = config.server.tls_handshakes_per_peer;
    let auth = start_auth(config).await;
    wait_serving(auth.addr, &pki.client(None)).await;
    let attempts = 600;
    let started = std::time::Instant::now();
    let mut done = 0usize;
    for _ in 0..attempts {
        if handshake(auth.addr, &pki.ca_path, [127, 0, 0, 1].into()).await {
            done += 1;
        }
    }
    let took = started.elapsed().as_secs_f64();
    // The burst, the refill over the time the flood took, and the handshake the readiness
    // wait made.
    let allowed = f64::from(2 * rate) + f64::from(rate) * took;
    assert!(
        (done as f64) <= allowed + 1.0,
        "{done} of {attempts} handshakes in {took:.2} s; at most {allowed:.0} allowed"
    );
    assert!(done < attempts, "nothing was cut: {done} in {took:.2} s");
    assert!(
        handshake(auth.addr, &pki.ca_path, mesh_runtime::testing::OTHER_PEER).await,
        "another address is served"
    );
    auth.shutdown().await.expect("clean shutdown");
}

/// The plaintext probe port holds little for anyone who reaches it: 8 connections per
/// address (the kubelet's probes come from the node, a connection at a time), closed when
/// nothing is asked for 5 s; one address's flood leaves another address's probes answered.
#[tokio::test]
async fn a_flood_of_the_probe_port_leaves_probes_answered() {
    use tokio::io::AsyncReadExt as _;
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "ca");
    let served = pki.leaf("auth");
    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &served, None);
    let probes = mesh_testkit::free_addr();
    config.server.health_listen = Some(probes);
    let auth = start_auth(config).await;
    wait_for_health_tls(auth.addr, &pki.client(None), "").await;
    // 40 silent connections from one address: past 8, each is closed at accept.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(
            tokio::net::TcpStream::connect(probes)
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = 0;
    for conn in &mut held {
        let mut byte = [0u8; 1];
        // Still open: nothing to read yet.
        if tokio::time::timeout(Duration::from_millis(100), conn.read(&mut byte))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert!(
        open <= 8,
        "{open} of 40 silent connections kept from one address"
    );
    // Another address still gets its probe answered.
    let other = mesh_runtime::testing::connect_from(probes, mesh_runtime::testing::OTHER_PEER);
    assert_eq!(
        health_on(&other).await,
        Ok(SERVING),
        "another address's probe"
    );
    // The silent ones are closed after the probe port's idle time.
    let mut closed = 0;
    for conn in &mut held {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, held.len(), "every silent connection closed");
    auth.shutdown().await.expect("clean shutdown");
}

/// Over TLS to `addr` with ALPN `http/1.1` only, as an HTTP/1.1-only client (or proxy) comes:
/// the negotiated protocol and the head of the answer to a gRPC-Web GetMe with a bad token, or
/// `None` if the handshake is refused.
async fn grpc_web_over_tls(addr: SocketAddr, ca: &Path) -> Option<(Vec<u8>, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let runtime = ClientTls::load(Some(ca), None, None)
        .expect("client TLS")
        .rustls_config()
        .expect("a CA");
    let mut config = (*runtime).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let alpn = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let request = "POST /mesh.aggregator.v1.AggregatorService/GetMe HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                   Content-Type: application/grpc-web+proto\r\nAuthorization: Bearer not-a-token\r\n\
                   Content-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0";
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    Some((alpn, String::from_utf8_lossy(&answer).to_lowercase()))
}

/// A browser (or a proxy that speaks only HTTP/1.1) reaches the TLS facade with gRPC-Web: the
/// aggregator offers ALPN `http/1.1` after `h2`; auth, which serves no browser, offers `h2`
/// only and refuses such a client at the handshake.
#[tokio::test]
async fn the_tls_facade_takes_grpc_web_over_http1() {
    let data = tempfile::tempdir().expect("data");
    let pki = TestPki::new(&data.path().join("tls"), "mesh-ca");
    let mut config = auth_config(data.path());
    serve_tls(&mut config.server, &pki.leaf("auth"), None);
    let auth = start_auth(config).await;
    let mut config = aggregator_config(auth.addr, mesh_testkit::free_addr());
    serve_tls(&mut config.server, &pki.leaf("aggregator"), None);
    config.authn.auth_url = https(auth.addr);
    config.authn.tls = pki.client_config();
    let aggregator = spawn_aggregator(config).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (alpn, answer) = loop {
        if let Some(answered) = grpc_web_over_tls(aggregator.addr, &pki.ca_path).await {
            break answered;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the facade takes TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alpn, b"http/1.1", "ALPN http/1.1 on the facade");
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("grpc-status: 16"),
        "UNAUTHENTICATED: {answer}"
    );
    // Clients that offer h2 still get it (the runtime's own client asserts it).
    let _ = presented(aggregator.addr, &pki.ca_path, &pki.leaf("client")).await;

    assert!(
        grpc_web_over_tls(auth.addr, &pki.ca_path).await.is_none(),
        "auth offers h2 only"
    );
    let _ = aggregator.shutdown().await;
    auth.shutdown().await.expect("clean shutdown");
}

//! Nothing secret reaches the logs: the full log output (every target, TRACE) of a
//! register/login/refresh/validate/logout/delete run holds no password, token or hash.
//!
//! A test binary of its own, not a module of `tests/auth`: it installs the process's global
//! tracing subscriber (once per process, at TRACE, for every thread, as auth's blocking pool and
//! SQLite's threads log too), which in a shared binary would also capture — and slow down — every
//! other test running beside it.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use mesh_proto::auth::v1::{
    DeleteAccountRequest, IssueServiceTokenRequest, LoginRequest, LogoutRequest, RefreshRequest,
    ValidateTokenRequest,
};
use mesh_testkit::{TestMesh, bearer};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The whole log of a session's life, at TRACE, never shows a secret.
#[tokio::test]
async fn logs_hold_no_secrets() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let password = "Secret-Password-123";
    let mesh = TestMesh::builder()
        .auth_config(|config| {
            config
                .service_clients
                .push("svc=plain:svc-secret".parse().expect("client"));
        })
        .start()
        .await;
    let mut c = mesh.auth_client();
    let (_, first) = mesh.register("sec@example.com", password).await;
    let login = c
        .login(LoginRequest {
            email: "sec@example.com".into(),
            password: password.into(),
        })
        .await
        .expect("login")
        .into_inner()
        .tokens
        .expect("tokens");
    let _ = c
        .login(LoginRequest {
            email: "sec@example.com".into(),
            password: "Wrong-Password-456".into(),
        })
        .await;
    let rotated = c
        .refresh(RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    let _ = c
        .refresh(RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await;
    c.validate_token(ValidateTokenRequest {
        access_token: login.access_token.clone(),
    })
    .await
    .expect("valid");
    let service = c
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "svc".into(),
            client_secret: "svc-secret".into(),
        })
        .await
        .expect("service token")
        .into_inner()
        .access_token;
    c.logout(LogoutRequest {
        refresh_token: login.refresh_token.clone(),
    })
    .await
    .expect("logout");
    let (_, other) = mesh.register("sec2@example.com", password).await;
    c.delete_account(bearer(
        &other.access_token,
        DeleteAccountRequest {
            password: password.into(),
        },
    ))
    .await
    .expect("delete");
    mesh.stop().await;

    let logs = String::from_utf8_lossy(&capture.0.lock().expect("lock")).into_owned();
    assert!(logs.contains("logged in"), "the capture works: {logs}");
    let secrets = [
        password,
        "Wrong-Password-456",
        "svc-secret",
        &first.access_token,
        &first.refresh_token,
        &login.access_token,
        &login.refresh_token,
        &rotated.access_token,
        &rotated.refresh_token,
        &other.access_token,
        &service,
        "$argon2id$",
    ];
    for secret in secrets {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
    // Token signatures and payloads never appear in part either.
    for token in [&login.access_token, &service] {
        for part in token.split('.').skip(1) {
            assert!(!logs.contains(part), "part of a token reached the logs");
        }
    }
}

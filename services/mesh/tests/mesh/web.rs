//! Browsers as clients of the real `mesh up`: a gRPC-Web client that is not the mesh's own
//! (`@connectrpc/connect-node`, `console/test/grpc-web.mjs`) and the console page in a real
//! headless Chromium (`console/test/browser.mjs`, puppeteer-core).
//!
//! They need Node.js, `console/node_modules` (`npm ci` in `console/`) and, for the page,
//! Chromium (`MESH_CHROMIUM`, else `/usr/bin/chromium`); scripts/test installs all three.
//! Outside CI a missing one skips these tests with a loud message; in CI (`CI=true`) it fails
//! them.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use mesh_proto::aggregator::v1::{
    Profile, UpdateProfileRequest, aggregator_service_client::AggregatorServiceClient,
};
use mesh_testkit::{bearer, connect, sign_up};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::Command,
};

use crate::common::MeshUp;

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../console")
}

fn chromium() -> PathBuf {
    std::env::var_os("MESH_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Whether what a test needs is here; outside CI, a loud skip when it is not.
fn tools_or_skip(test: &str, browser: bool) -> bool {
    let mut missing = Vec::new();
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        missing.push("node".to_owned());
    }
    if !console_dir()
        .join("node_modules/@connectrpc/connect-node")
        .is_dir()
    {
        missing.push("console/node_modules (npm ci in console/)".to_owned());
    }
    if browser && !chromium().is_file() {
        missing.push(format!("Chromium at {}", chromium().display()));
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test} needs {} in CI: run scripts/test, which installs them",
            missing.join(", ")
        );
    }
    eprintln!(
        "\n*** SKIPPED {test}: {} not found (scripts/test installs them). CI never skips \
         this. ***\n",
        missing.join(", ")
    );
    false
}

/// The console's origin: its URL without the trailing slash.
fn origin_of(url: &str) -> &str {
    url.trim_end_matches('/')
}

#[tokio::test]
async fn a_connect_client_calls_the_facade_over_grpc_web() {
    if !tools_or_skip("a_connect_client_calls_the_facade_over_grpc_web", false) {
        return;
    }
    let _machine = crate::common::process_test().await;
    let mesh = MeshUp::start("5s").await;
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("node")
            .arg("test/grpc-web.mjs")
            .current_dir(console_dir())
            .env(
                "MESH_AGGREGATOR_URL",
                format!("http://{}", mesh.addr("aggregator")),
            )
            .env("MESH_CORS_ALLOWED", origin_of(&mesh.console_url()))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Connect client finishes within 120 s")
    .expect("run node");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "the Connect client's checks failed:\n{stdout}\n{stderr}"
    );
    // Each kind of check ran (the script prints one line per check).
    for check in [
        "unary",
        "streaming",
        "error status",
        "deadline",
        "preflight",
    ] {
        assert!(
            stdout.to_lowercase().contains(check),
            "no {check} check reported:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn the_console_page_shows_another_clients_change_live() {
    if !tools_or_skip("the_console_page_shows_another_clients_change_live", true) {
        return;
    }
    let _machine = crate::common::process_test().await;
    let mesh = MeshUp::start("5s").await;
    let expected = format!("Grace, renamed over gRPC {}", std::process::id());
    // `MESH_CONSOLE_SCREENSHOT` keeps the picture (docs/console.png is made this way).
    let screenshot = std::env::var_os("MESH_CONSOLE_SCREENSHOT").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png"),
        PathBuf::from,
    );
    let _ = std::fs::remove_file(&screenshot);
    let mut browser = Command::new("node")
        .arg("test/browser.mjs")
        .current_dir(console_dir())
        .env("MESH_CONSOLE_URL", mesh.console_url())
        .env("MESH_EXPECT_NAME", &expected)
        .env("MESH_CHROMIUM", chromium())
        .env("MESH_SCREENSHOT", &screenshot)
        // A debug build's Argon2id on a loaded machine takes seconds: generous steps.
        .env("MESH_STEP_MS", "60000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = BufReader::new(browser.stdout.take().expect("stdout")).lines();
    let first = next_line(&mut lines).await;
    assert_eq!(first, "watching", "the page signed up and went live");

    // Another client, over native gRPC: a new account, then a change of its name.
    let mut native = AggregatorServiceClient::new(connect(mesh.addr("aggregator")).await);
    let (_, tokens) = sign_up(&mut native, "grace@example.com", "Grace").await;
    native
        .update_profile(bearer(
            &tokens.access_token,
            UpdateProfileRequest {
                profile: Some(Profile {
                    display_name: expected.clone(),
                    ..Profile::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
                expected_version: 0,
            },
        ))
        .await
        .expect("update over native gRPC");

    let last = next_line(&mut lines).await;
    assert_eq!(last, "ok", "the change reached the page's live list");
    let status = tokio::time::timeout(Duration::from_secs(30), browser.wait())
        .await
        .expect("the browser exits")
        .expect("wait");
    assert!(status.success(), "{status}");
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
}

/// The browser script's next line on stdout (empty once it has ended).
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(150), lines.next_line())
        .await
        .expect("the page reports within 150 s")
        .expect("read")
        .unwrap_or_default()
}

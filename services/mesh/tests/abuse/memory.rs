//! Memory stays bounded under hostile sizes, measured on the real binaries (each its own
//! process): requests beyond a method's limit are refused before they are read, and what a
//! flood makes a process hold is given back when it ends.

use std::time::Duration;

use futures_util::{StreamExt as _, stream};
use mesh_proto::{aggregator::v1 as aggregator, auth::v1 as auth};
use mesh_testkit::{ProcessMesh, ServiceProcess, bearer, free_addr, sign_up};

use crate::support::{mesh_exe, within};

const MIB: u64 = 1024;

/// 60 logins with 4 MB e-mails (under the server-wide 4 MiB) used to take auth from 14 MiB to
/// 400+ MiB (every e-mail kept as a throttle key): now each is RESOURCE_EXHAUSTED by Login's
/// 4 KiB limit before its body is read, and auth's peak memory stays small.
#[tokio::test]
async fn huge_logins_leave_auth_small() {
    let data = tempfile::tempdir().expect("data");
    let addr = free_addr();
    let auth = ServiceProcess::start(
        mesh_exe(),
        &[
            "auth".into(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            data.path().display().to_string(),
        ],
        addr,
        mesh_proto::service_names::AUTH,
    )
    .await;
    let idle = auth.rss_kib();
    let client = auth::auth_service_client::AuthServiceClient::new(auth.channel.clone())
        .max_encoding_message_size(8 * 1024 * 1024);
    let huge = format!("{}@example.com", "a".repeat(4_000_000));
    let codes: Vec<tonic::Code> = stream::iter(0..60)
        .map(|_| {
            let (mut client, email) = (client.clone(), huge.clone());
            async move {
                client
                    .login(auth::LoginRequest {
                        email,
                        password: "wrong password".into(),
                    })
                    .await
                    .err()
                    .map_or(tonic::Code::Ok, |s| s.code())
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    assert!(
        codes.iter().all(|c| *c == tonic::Code::ResourceExhausted),
        "{codes:?}"
    );
    let peak = auth.peak_rss_kib();
    eprintln!("auth: idle {idle} KiB, peak {peak} KiB during 60 logins of 4 MB");
    assert!(
        peak < 96 * MIB,
        "auth peaked at {peak} KiB (idle {idle} KiB)"
    );
}

/// 40 GetProfiles of 4 MB of malformed ids, never read, used to take the aggregator from 11 to
/// 278 MiB, and it stayed there: now they are refused by GetProfiles' 512 KiB limit. Of 40
/// that fit (10,000 malformed ids each), never read, one address gets only its share of the
/// request-byte budget (the rest are RESOURCE_EXHAUSTED); those accepted hold little — results
/// are made as they are read — and what they held is given back once they are cancelled.
#[tokio::test]
async fn unread_get_profiles_leave_the_aggregator_small() {
    let mesh = ProcessMesh::start(mesh_exe(), &[]).await;
    let mut client = aggregator::aggregator_service_client::AggregatorServiceClient::new(
        mesh.aggregator.channel.clone(),
    )
    .max_encoding_message_size(8 * 1024 * 1024);
    let (_, tokens) = sign_up(&mut client, "reader@example.com", "Someone").await;
    let token = tokens.access_token;
    let before = mesh.aggregator.rss_kib();

    let huge: Vec<String> = (0..10_000).map(|n| format!("{n:0>400}")).collect();
    for _ in 0..40 {
        let refused = client
            .get_profiles(bearer(
                &token,
                aggregator::GetProfilesRequest {
                    user_ids: huge.clone(),
                },
            ))
            .await;
        assert_eq!(
            refused.expect_err("4 MB").code(),
            tonic::Code::ResourceExhausted
        );
    }
    let peak_refused = mesh.aggregator.peak_rss_kib();

    let fitting: Vec<String> = (0..10_000).map(|n| format!("bad-{n:0>40}")).collect();
    let mut unread = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match client
            .get_profiles(bearer(
                &token,
                aggregator::GetProfilesRequest {
                    user_ids: fitting.clone(),
                },
            ))
            .await
        {
            Ok(stream) => unread.push(stream.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert!(!unread.is_empty(), "calls within the budget are served");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = mesh.aggregator.rss_kib();
    let unread_count = unread.len();
    drop(unread);
    // jemalloc's background thread gives unused pages back after its decay time (10 s).
    let returned = within(Duration::from_secs(40), || async {
        mesh.aggregator.rss_kib() < before + 16 * MIB
    })
    .await;
    let after = mesh.aggregator.rss_kib();
    eprintln!(
        "aggregator: {before} KiB before, peak {peak_refused} KiB after 40 refused 4 MB calls, \
         {during} KiB with {} unread calls ({refused} refused by the budget), {after} KiB after \
         they ended",
        unread_count
    );
    assert!(
        peak_refused < before + 64 * MIB,
        "{peak_refused} KiB peak (before: {before} KiB)"
    );
    assert!(
        during < before + 160 * MIB,
        "{during} KiB with 40 unread calls (before: {before} KiB)"
    );
    assert!(
        returned.is_some(),
        "{after} KiB 40 s after the calls ended (before: {before} KiB): memory not given back"
    );
}

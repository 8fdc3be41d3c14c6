//! Faults against the real binaries: `mesh auth`, `mesh users` and `mesh aggregator` as three
//! processes on loopback (not `mesh up`, which stops the mesh when one of them dies): users
//! killed with SIGKILL while GetProfiles and WatchProfiles run, and each service sent SIGTERM
//! under steady load.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_proto::aggregator::v1::{
    GetProfilesRequest, Profile, ProfileEvent, SignUpRequest, UpdateProfileRequest,
    WatchProfilesRequest, aggregator_service_client::AggregatorServiceClient,
    profile_result::Result as Item,
};
use mesh_runtime::testing::{connect, health_status};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, transport::Channel};

const SECRET: &str = "faults-test-aggregator-secret";
const SERVING: i32 = 1;

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// One service of the mesh as its own process, killed when dropped.
fn spawn(args: &[String]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesh"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if std::env::var_os("TEST_LOG").is_none() {
        command.stderr(Stdio::null());
    }
    command.spawn().expect("spawn mesh")
}

fn auth_args(auth: SocketAddr, data: &std::path::Path) -> Vec<String> {
    vec![
        "auth".into(),
        "--listen".into(),
        auth.to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--service-client".into(),
        format!("aggregator=plain:{SECRET}"),
    ]
}

fn aggregator_args(aggregator: SocketAddr, auth: SocketAddr, users: SocketAddr) -> Vec<String> {
    vec![
        "aggregator".into(),
        "--listen".into(),
        aggregator.to_string(),
        "--auth-url".into(),
        format!("http://{auth}"),
        "--users-url".into(),
        format!("http://{users}"),
        "--client-secret".into(),
        SECRET.into(),
        "--dependency-check-interval".into(),
        "200ms".into(),
    ]
}

fn users_args(users: SocketAddr, auth: SocketAddr, data: &std::path::Path) -> Vec<String> {
    vec![
        "users".into(),
        "--listen".into(),
        users.to_string(),
        "--auth-url".into(),
        format!("http://{auth}"),
        "--data-dir".into(),
        data.display().to_string(),
    ]
}

/// Waits until `name` at `channel` reports `want` (30 s at most); how long that took.
async fn wait_health(channel: &Channel, name: &str, want: i32) -> Duration {
    let start = Instant::now();
    loop {
        if health_status(channel, name).await.ok() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} never reported {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    mesh_authn::set_bearer(&mut request, token);
    request.set_timeout(Duration::from_secs(5));
    request
}

/// The results of GetProfiles of `ids`: (profiles found, item error codes).
async fn get_profiles(
    client: &mut AggregatorServiceClient<Channel>,
    token: &str,
    ids: &[String],
) -> Result<(usize, Vec<i32>), tonic::Status> {
    let mut stream = client
        .get_profiles(bearer(
            token,
            GetProfilesRequest {
                user_ids: ids.to_vec(),
            },
        ))
        .await?
        .into_inner();
    let (mut found, mut errors) = (0, Vec::new());
    while let Some(item) = stream.next().await {
        match item?.result {
            Some(Item::Profile(_)) => found += 1,
            Some(Item::Error(e)) => errors.push(e.code),
            None => errors.push(-1),
        }
    }
    Ok((found, errors))
}

/// users killed with SIGKILL while GetProfiles and a WatchProfiles subscriber run: the items
/// come back UNAVAILABLE, the aggregator turns NOT_SERVING; once users is started again (same
/// port, same database) everything recovers without restarting the aggregator, and the
/// subscriber, kept open throughout, has every event exactly once and in order.
#[tokio::test]
async fn users_killed_and_restarted_loses_nothing() {
    let data = tempfile::tempdir().expect("data dir");
    let (auth, users, aggregator) = (free_addr(), free_addr(), free_addr());
    let _auth = spawn(&auth_args(auth, data.path()));
    let mut users_proc = spawn(&users_args(users, auth, data.path()));
    let _aggregator = spawn(&aggregator_args(aggregator, auth, users));
    let agg_channel = connect(aggregator).await;
    let agg_name = "mesh.aggregator.v1.AggregatorService";
    wait_health(&agg_channel, agg_name, SERVING).await;
    let mut client = AggregatorServiceClient::new(agg_channel.clone());

    // Three accounts; the first one writes and watches.
    let mut accounts = Vec::new();
    for i in 0..3 {
        let reply = client
            .sign_up(SignUpRequest {
                email: format!("user{i}@example.com"),
                password: "correct horse battery".into(),
                display_name: format!("User {i}"),
            })
            .await
            .expect("sign up")
            .into_inner();
        accounts.push((
            reply.profile.expect("profile").user_id,
            reply.tokens.expect("tokens").access_token,
        ));
    }
    let ids: Vec<String> = accounts.iter().map(|(id, _)| id.clone()).collect();
    let (me, token) = accounts[0].clone();
    assert_eq!(
        get_profiles(&mut client, &token, &ids).await.expect("ok"),
        (3, vec![])
    );

    // The subscriber, from the start of the log, open for the whole test.
    let mut watch = client
        .watch_profiles(bearer(
            &token,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<ProfileEvent>();
    let watcher = tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            match event {
                Ok(event) => {
                    let _ = seen_tx.send(event);
                }
                Err(status) => return Some(status),
            }
        }
        None
    });
    let update = |n: usize| UpdateProfileRequest {
        profile: Some(Profile {
            bio: format!("change {n}"),
            ..Profile::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["bio".into()],
        }),
        expected_version: 0,
    };
    for n in 0..5 {
        client
            .update_profile(bearer(&token, update(n)))
            .await
            .expect("update");
    }

    // Kill users.
    users_proc.start_kill().expect("SIGKILL users");
    let _ = users_proc.wait().await;
    let killed = Instant::now();
    let not_serving = wait_health(&agg_channel, agg_name, 2).await;
    // Reads answer with UNAVAILABLE items (or the whole call UNAVAILABLE), never another code.
    match get_profiles(&mut client, &token, &ids).await {
        Ok((found, errors)) => {
            assert_eq!(found, 0);
            assert_eq!(errors, vec![14; 3], "each item UNAVAILABLE");
        }
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    let refused = client
        .update_profile(bearer(&token, update(99)))
        .await
        .expect_err("no users, no update");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        health_status(&agg_channel, "liveness").await.ok(),
        Some(SERVING),
        "not ready is not dead"
    );

    // Start users again on the same port and database.
    let _users_again = spawn(&users_args(users, auth, data.path()));
    let restarted = Instant::now();
    let serving_again = wait_health(&agg_channel, agg_name, SERVING).await;
    let reads_again = loop {
        if let Ok((3, errors)) = get_profiles(&mut client, &token, &ids).await {
            assert!(errors.is_empty());
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "reads never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for n in 5..10 {
        client
            .update_profile(bearer(&token, update(n)))
            .await
            .expect("update after recovery");
    }
    eprintln!(
        "users killed: aggregator NOT_SERVING after {not_serving:?}; users restarted {:?} after \
         the kill; aggregator SERVING {serving_again:?} and reads working {reads_again:?} \
         after the restart",
        restarted.duration_since(killed)
    );

    // The whole log, replayed afresh, is what the subscriber saw: 3 creations and 10 updates.
    let mut replay = client
        .watch_profiles(bearer(
            &token,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("replay")
        .into_inner();
    let mut log = Vec::new();
    while log.len() < 13 {
        let event = tokio::time::timeout(Duration::from_secs(10), replay.next())
            .await
            .expect("replay in time")
            .expect("replay open")
            .expect("event");
        log.push(event.sequence);
    }
    let mut seen = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(15), async {
        while seen.len() < log.len() {
            match seen_rx.recv().await {
                Some(event) => seen.push(event),
                None => break,
            }
        }
    })
    .await;
    let sequences: Vec<i64> = seen.iter().map(|e| e.sequence).collect();
    assert!(
        collected.is_ok(),
        "the subscriber stopped at {sequences:?} (stream ended: {:?})",
        watcher.is_finished()
    );
    assert_eq!(sequences, log, "no gap, no duplicate, in order");
    let last = seen
        .last()
        .and_then(|e| e.profile.as_ref())
        .expect("profile");
    assert_eq!(
        (last.user_id.as_str(), last.bio.as_str()),
        (me.as_str(), "change 9")
    );
    assert!(
        !watcher.is_finished(),
        "the subscriber's stream stayed open"
    );
}

/// What a steady load saw around a SIGTERM.
#[derive(Debug, Default)]
struct Outcome {
    ok: usize,
    /// Answered after the signal was sent (the drain keeps serving).
    ok_after_signal: usize,
    /// Failures the server answered (it echoes `x-request-id`): calls it had accepted.
    accepted_failed: Vec<tonic::Status>,
    /// Failures no server answered (refused connection or stream, or a request the closing
    /// connection never sent): not accepted.
    refused: Vec<Code>,
}

/// Runs `call` from 8 callers until `duration` has passed; SIGTERMs `target` after `signal_at`.
async fn steady_load<F, Fut>(target: &Child, signal_at: Duration, call: F) -> Outcome
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let start = Instant::now();
    let stop_at = signal_at + Duration::from_secs(2);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut outcome = Outcome::default();
                while start.elapsed() < stop_at {
                    let began = start.elapsed();
                    match call().await {
                        Ok(()) => {
                            outcome.ok += 1;
                            if began > signal_at {
                                outcome.ok_after_signal += 1;
                            }
                        }
                        Err(status) if status.metadata().get("x-request-id").is_some() => {
                            outcome.accepted_failed.push(status);
                        }
                        Err(status) => {
                            outcome.refused.push(status.code());
                            // The server is gone: do not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                outcome
            })
        })
        .collect();
    tokio::time::sleep(signal_at).await;
    let pid = i32::try_from(target.id().expect("running")).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let mut total = Outcome::default();
    for worker in workers {
        let o = worker.await.expect("worker");
        total.ok += o.ok;
        total.ok_after_signal += o.ok_after_signal;
        total.accepted_failed.extend(o.accepted_failed);
        total.refused.extend(o.refused);
    }
    total
}

/// The three services up, one account, its token.
struct Three {
    _data: tempfile::TempDir,
    auth: (SocketAddr, Child),
    users: (SocketAddr, Child),
    aggregator: (SocketAddr, Child),
    user_id: String,
    token: String,
}

async fn three() -> Three {
    let data = tempfile::tempdir().expect("data dir");
    let (auth, users, aggregator) = (free_addr(), free_addr(), free_addr());
    let auth_proc = spawn(&auth_args(auth, data.path()));
    let users_proc = spawn(&users_args(users, auth, data.path()));
    let agg_proc = spawn(&aggregator_args(aggregator, auth, users));
    let channel = connect(aggregator).await;
    wait_health(&channel, "mesh.aggregator.v1.AggregatorService", SERVING).await;
    let reply = AggregatorServiceClient::new(channel)
        .sign_up(SignUpRequest {
            email: "steady@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Steady".into(),
        })
        .await
        .expect("sign up")
        .into_inner();
    Three {
        _data: data,
        auth: (auth, auth_proc),
        users: (users, users_proc),
        aggregator: (aggregator, agg_proc),
        user_id: reply.profile.expect("profile").user_id,
        token: reply.tokens.expect("tokens").access_token,
    }
}

fn report(service: &str, outcome: &Outcome, exit: std::process::ExitStatus) {
    eprintln!(
        "SIGTERM to {service} under load: {} calls answered ({} after the signal), {} accepted \
         and failed, {} refused before reaching it ({:?}); exit {exit}",
        outcome.ok,
        outcome.ok_after_signal,
        outcome.accepted_failed.len(),
        outcome.refused.len(),
        outcome
            .refused
            .iter()
            .map(|c| *c as i32)
            .collect::<std::collections::BTreeSet<_>>()
    );
    // The drain keeps serving for at least half a second: many calls, not just the few that
    // were in flight when the signal came (8 callers).
    assert!(
        outcome.ok_after_signal >= 20,
        "{service} kept serving while draining: {} calls",
        outcome.ok_after_signal
    );
    assert!(
        outcome.accepted_failed.is_empty(),
        "{service}: accepted calls failed: {:?}",
        outcome.accepted_failed
    );
    // Refused calls never ran: UNAVAILABLE, or CANCELLED where the client's connection closed
    // (the server's GOAWAY) before the request was written — tonic's name for "not sent".
    assert!(
        outcome
            .refused
            .iter()
            .all(|c| matches!(c, Code::Unavailable | Code::Cancelled)),
        "{service}: refused calls are retryable: {:?}",
        outcome.refused
    );
    assert!(exit.success(), "{service} exits 0 after SIGTERM: {exit}");
}

/// SIGTERM to users under steady GetUser load: every call it accepted is answered, the rest
/// are refused as UNAVAILABLE, and an open WatchUsers stream ends with UNAVAILABLE.
#[tokio::test]
async fn sigterm_to_users_under_load_fails_no_accepted_call() {
    let mut mesh = three().await;
    let channel = connect(mesh.users.0).await;
    let mut watch =
        mesh_proto::users::v1::user_service_client::UserServiceClient::new(channel.clone())
            .watch_users(bearer(
                &mesh.token,
                mesh_proto::users::v1::WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch")
            .into_inner();
    let (token, id) = (mesh.token.clone(), mesh.user_id.clone());
    let outcome = steady_load(&mesh.users.1, Duration::from_millis(700), move || {
        let mut client =
            mesh_proto::users::v1::user_service_client::UserServiceClient::new(channel.clone());
        let request = {
            let mut r = Request::new(mesh_proto::users::v1::GetUserRequest { id: id.clone() });
            mesh_authn::set_bearer(&mut r, &token);
            r
        };
        async move { client.get_user(request).await.map(|_| ()) }
    })
    .await;
    let exit = mesh.users.1.wait().await.expect("users exits");
    report("users", &outcome, exit);
    let ended = loop {
        match watch.next().await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status.code(),
            None => panic!("WatchUsers ended without a status"),
        }
    };
    assert_eq!(ended, Code::Unavailable, "the stream ends retryably");
}

/// SIGTERM to auth under steady ValidateToken load: no accepted call fails.
#[tokio::test]
async fn sigterm_to_auth_under_load_fails_no_accepted_call() {
    let mut mesh = three().await;
    let channel = connect(mesh.auth.0).await;
    let token = mesh.token.clone();
    let outcome = steady_load(&mesh.auth.1, Duration::from_millis(700), move || {
        let mut client =
            mesh_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel.clone());
        let request = mesh_proto::auth::v1::ValidateTokenRequest {
            access_token: token.clone(),
        };
        async move { client.validate_token(request).await.map(|_| ()) }
    })
    .await;
    let exit = mesh.auth.1.wait().await.expect("auth exits");
    report("auth", &outcome, exit);
}

/// SIGTERM to the aggregator under steady GetMe load: no accepted call fails; a WatchProfiles
/// stream ends with UNAVAILABLE, and resuming from its last sequence on a new aggregator
/// misses nothing of what was written meanwhile.
#[tokio::test]
async fn sigterm_to_the_aggregator_under_load_fails_no_accepted_call() {
    let mut mesh = three().await;
    let channel = connect(mesh.aggregator.0).await;
    let mut client = AggregatorServiceClient::new(channel.clone());
    let mut watch = client
        .watch_profiles(bearer(
            &mesh.token,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let token = mesh.token.clone();
    let outcome = steady_load(&mesh.aggregator.1, Duration::from_millis(700), move || {
        let mut client = AggregatorServiceClient::new(channel.clone());
        let request = {
            let mut r = Request::new(mesh_proto::aggregator::v1::GetMeRequest {});
            mesh_authn::set_bearer(&mut r, &token);
            r
        };
        async move { client.get_me(request).await.map(|_| ()) }
    })
    .await;
    let exit = mesh.aggregator.1.wait().await.expect("aggregator exits");
    report("aggregator", &outcome, exit);
    let mut last = 0;
    let ended = loop {
        match watch.next().await {
            Some(Ok(event)) => last = event.sequence,
            Some(Err(status)) => break status.code(),
            None => panic!("WatchProfiles ended without a status"),
        }
    };
    assert_eq!(ended, Code::Unavailable, "the stream ends retryably");
    assert!(last > 0, "the sign-up's event was seen");

    // Changes while no aggregator runs, then a new one; resume from the last sequence.
    let mut users = mesh_proto::users::v1::user_service_client::UserServiceClient::new(
        connect(mesh.users.0).await,
    );
    for n in 0..3 {
        users
            .update_user(bearer(
                &mesh.token,
                mesh_proto::users::v1::UpdateUserRequest {
                    user: Some(mesh_proto::users::v1::User {
                        id: mesh.user_id.clone(),
                        bio: format!("while away {n}"),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
    }
    let _again = spawn(&aggregator_args(
        mesh.aggregator.0,
        mesh.auth.0,
        mesh.users.0,
    ));
    let channel = connect(mesh.aggregator.0).await;
    wait_health(&channel, "mesh.aggregator.v1.AggregatorService", SERVING).await;
    let mut resumed = AggregatorServiceClient::new(channel)
        .watch_profiles(bearer(
            &mesh.token,
            WatchProfilesRequest {
                after_sequence: Some(last),
            },
        ))
        .await
        .expect("resume")
        .into_inner();
    let mut bios = Vec::new();
    while bios.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), resumed.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("event");
        assert!(event.sequence > last, "nothing seen twice");
        last = event.sequence;
        bios.push(event.profile.expect("profile").bio);
    }
    assert_eq!(bios, ["while away 0", "while away 1", "while away 2"]);
}

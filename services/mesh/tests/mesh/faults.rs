//! Faults against the real binaries: `mesh auth`, `mesh users` and `mesh aggregator` as three
//! processes on loopback (not `mesh up`, which stops the mesh when one of them dies): users
//! killed with SIGKILL while GetProfiles and WatchProfiles run, and each service sent SIGTERM
//! under steady load.

use std::time::{Duration, Instant};

use mesh_proto::{
    aggregator::v1::{
        GetProfilesRequest, Profile, ProfileEvent, UpdateProfileRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient, profile_result::Result as Item,
    },
    headers,
};
use mesh_testkit::{ProcessMesh, ServiceProcess, bearer, health_status, sign_up};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// The real `mesh` binary.
fn mesh_exe() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_mesh"))
}

/// [`bearer`] with a 5 s deadline.
fn with_deadline<T>(token: &str, message: T) -> Request<T> {
    let mut request = bearer(token, message);
    request.set_timeout(Duration::from_secs(5));
    request
}

/// A stream request that only the server's shutdown is to end: its deadline leaves a slow,
/// shared machine all the time it needs before the signal.
fn until_shutdown<T>(token: &str, message: T) -> Request<T> {
    let mut request = bearer(token, message);
    request.set_timeout(Duration::from_secs(60));
    request
}

/// The results of GetProfiles of `ids`: (profiles found, item error codes).
async fn get_profiles(
    client: &mut AggregatorServiceClient<Channel>,
    token: &str,
    ids: &[String],
) -> Result<(usize, Vec<i32>), tonic::Status> {
    let mut stream = client
        .get_profiles(with_deadline(
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
    let _machine = crate::common::process_test().await;
    let mut mesh = ProcessMesh::start(mesh_exe(), &[]).await;
    let agg_name = mesh_aggregator::SERVICE_NAME;
    let mut client = AggregatorServiceClient::new(mesh.aggregator.channel.clone());

    // Three accounts; the first one writes and watches.
    let mut accounts = Vec::new();
    for i in 0..3 {
        let (id, tokens) = sign_up(
            &mut client,
            &format!("user{i}@example.com"),
            &format!("User {i}"),
        )
        .await;
        accounts.push((id, tokens.access_token));
    }
    let ids: Vec<String> = accounts.iter().map(|(id, _)| id.clone()).collect();
    let (me, token) = accounts[0].clone();
    assert_eq!(
        get_profiles(&mut client, &token, &ids).await.expect("ok"),
        (3, vec![])
    );

    // The subscriber, from the start of the log, open for the whole test.
    let mut watch = client
        .watch_profiles(with_deadline(
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
            .update_profile(with_deadline(&token, update(n)))
            .await
            .expect("update");
    }

    // Kill users.
    mesh.users.child.start_kill().expect("SIGKILL users");
    let _ = mesh.users.child.wait().await;
    let killed = Instant::now();
    mesh.aggregator
        .wait_for(agg_name, ServingStatus::NotServing)
        .await;
    let not_serving = killed.elapsed();
    // Reads answer with UNAVAILABLE items (or the whole call UNAVAILABLE), never another code.
    match get_profiles(&mut client, &token, &ids).await {
        Ok((found, errors)) => {
            assert_eq!(found, 0);
            assert_eq!(errors, vec![14; 3], "each item UNAVAILABLE");
        }
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    let refused = client
        .update_profile(with_deadline(&token, update(99)))
        .await
        .expect_err("no users, no update");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        health_status(&mesh.aggregator.channel, "liveness")
            .await
            .ok(),
        Some(ServingStatus::Serving as i32),
        "not ready is not dead"
    );

    // Start users again on the same port and database.
    let restarted = Instant::now();
    mesh.restart_users().await;
    mesh.aggregator
        .wait_for(agg_name, ServingStatus::Serving)
        .await;
    let serving_again = restarted.elapsed();
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
            .update_profile(with_deadline(&token, update(n)))
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
        .watch_profiles(with_deadline(
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
async fn steady_load<F, Fut>(target: &ServiceProcess, signal_at: Duration, call: F) -> Outcome
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
                        Err(status) if status.metadata().get(headers::REQUEST_ID).is_some() => {
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
    let pid = i32::try_from(target.pid()).expect("pid");
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

/// The three services up, one account: its id and access token.
async fn three() -> (ProcessMesh, String, String) {
    let mesh = ProcessMesh::start(mesh_exe(), &[]).await;
    let (user_id, tokens) = sign_up(
        &mut AggregatorServiceClient::new(mesh.aggregator.channel.clone()),
        "steady@example.com",
        "Steady",
    )
    .await;
    (mesh, user_id, tokens.access_token)
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
    let _machine = crate::common::process_test().await;
    let (mut mesh, id, token) = three().await;
    let channel = mesh.users.channel.clone();
    let mut watch =
        mesh_proto::users::v1::user_service_client::UserServiceClient::new(channel.clone())
            .watch_users(until_shutdown(
                &token,
                mesh_proto::users::v1::WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch")
            .into_inner();
    let outcome = steady_load(&mesh.users, Duration::from_millis(700), move || {
        let mut client =
            mesh_proto::users::v1::user_service_client::UserServiceClient::new(channel.clone());
        let request = bearer(
            &token,
            mesh_proto::users::v1::GetUserRequest { id: id.clone() },
        );
        async move { client.get_user(request).await.map(|_| ()) }
    })
    .await;
    let exit = mesh.users.child.wait().await.expect("users exits");
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
    let _machine = crate::common::process_test().await;
    let (mut mesh, _, token) = three().await;
    let channel = mesh.auth.channel.clone();
    let outcome = steady_load(&mesh.auth, Duration::from_millis(700), move || {
        let mut client =
            mesh_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel.clone());
        let request = mesh_proto::auth::v1::ValidateTokenRequest {
            access_token: token.clone(),
        };
        async move { client.validate_token(request).await.map(|_| ()) }
    })
    .await;
    let exit = mesh.auth.child.wait().await.expect("auth exits");
    report("auth", &outcome, exit);
}

/// SIGTERM to the aggregator under steady GetMe load: no accepted call fails; a WatchProfiles
/// stream ends with UNAVAILABLE, and resuming from its last sequence on a new aggregator
/// misses nothing of what was written meanwhile.
#[tokio::test]
async fn sigterm_to_the_aggregator_under_load_fails_no_accepted_call() {
    let _machine = crate::common::process_test().await;
    let (mut mesh, user_id, token) = three().await;
    let channel = mesh.aggregator.channel.clone();
    let mut client = AggregatorServiceClient::new(channel.clone());
    let mut watch = client
        .watch_profiles(until_shutdown(
            &token,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let outcome = steady_load(&mesh.aggregator, Duration::from_millis(700), {
        let token = token.clone();
        move || {
            let mut client = AggregatorServiceClient::new(channel.clone());
            let request = bearer(&token, mesh_proto::aggregator::v1::GetMeRequest {});
            async move { client.get_me(request).await.map(|_| ()) }
        }
    })
    .await;
    let exit = mesh
        .aggregator
        .child
        .wait()
        .await
        .expect("aggregator exits");
    report("aggregator", &outcome, exit);
    let mut last = 0;
    let ended = loop {
        match watch.next().await {
            Some(Ok(event)) => last = event.sequence,
            Some(Err(status)) => break status,
            None => panic!("WatchProfiles ended without a status"),
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "the stream ends retryably");
    // Ended by the relay when the drain began (naming where to resume), not cut off when the
    // grace period ran out.
    assert_eq!(
        ended.message(),
        format!("the server is shutting down; resume with after_sequence = {last}"),
        "{ended:?}"
    );
    assert!(last > 0, "the sign-up's event was seen");

    // Changes while no aggregator runs, then a new one; resume from the last sequence.
    let mut users = mesh_proto::users::v1::user_service_client::UserServiceClient::new(
        mesh.users.channel.clone(),
    );
    for n in 0..3 {
        users
            .update_user(with_deadline(
                &token,
                mesh_proto::users::v1::UpdateUserRequest {
                    user: Some(mesh_proto::users::v1::User {
                        id: user_id.clone(),
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
    mesh.restart_aggregator().await;
    let mut resumed = AggregatorServiceClient::new(mesh.aggregator.channel.clone())
        .watch_profiles(with_deadline(
            &token,
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

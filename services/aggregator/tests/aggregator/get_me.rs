//! GetMe: the profile and the sessions at once, and what every downstream call carries (the
//! caller's deadline, token, request id, trace context) and how reads are retried.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::{
    aggregator::v1::{GetMeRequest, aggregator_service_client::AggregatorServiceClient},
    auth::v1 as auth,
};
use mesh_testkit::{AuthDouble, Minter, UsersDouble, bearer};
use tokio::sync::Barrier;
use tonic::{Code, Status};

use crate::{Probe, aggregator_for, double_user, grpc_timeout, stop};

/// An auth double that publishes the keys of `keys` and answers ListSessions (one current
/// session) after `barrier`.
fn sessions_after(keys: &Minter, barrier: Arc<Barrier>) -> AuthDouble {
    AuthDouble::publishing(keys.jwks_json()).list_sessions(move |_| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            Ok(auth::ListSessionsResponse {
                sessions: vec![auth::Session {
                    session_id: "s1".into(),
                    current: true,
                    ..auth::Session::default()
                }],
            })
        }
    })
}

/// A users double answering GetUser with a [`crate::double_user`], each call counted and its
/// metadata kept on `probe`; the next `failures` calls (`usize::MAX`: all of them) fail with
/// UNAVAILABLE instead.
fn get_user_double(probe: &Probe, failures: Arc<AtomicUsize>) -> UsersDouble {
    let probe = probe.clone();
    UsersDouble::new().get_user(move |request| {
        let (probe, failures) = (probe.clone(), failures.clone());
        async move {
            probe.call();
            probe.record(request.metadata());
            let failing = failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                    0 => None,
                    usize::MAX => Some(usize::MAX),
                    n => Some(n - 1),
                })
                .is_ok();
            if failing {
                return Err(Status::unavailable("users double: unavailable"));
            }
            Ok(double_user(&request.get_ref().id))
        }
    })
}

/// GetMe fetches the profile and the sessions concurrently: both doubles wait on one
/// two-party barrier before answering, which a sequential implementation can never pass.
#[tokio::test]
async fn get_me_asks_both_services_at_once() {
    let data = tempfile::tempdir().expect("data");
    let keys = Minter::for_data_dir(data.path());
    let barrier = Arc::new(Barrier::new(2));
    let auth = sessions_after(&keys, barrier.clone()).serve().await;
    let users = UsersDouble::new()
        .get_user(move |request| {
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                Ok(double_user(&request.get_ref().id))
            }
        })
        .serve()
        .await;
    let aggregator = aggregator_for(auth.addr, users.addr).await;
    let id = uuid::Uuid::now_v7().to_string();
    let token = keys.user(&id, "me@example.com");
    let mut request = bearer(&token, GetMeRequest {});
    request.set_timeout(Duration::from_secs(20));
    let me = AggregatorServiceClient::new(aggregator.channel.clone())
        .get_me(request)
        .await
        .expect("both answered: the calls were concurrent")
        .into_inner();
    assert_eq!(me.profile.expect("profile").user_id, id);
    assert_eq!(me.sessions.len(), 1);
    stop(aggregator, users, auth).await;
}

/// Every downstream call carries the caller's remaining deadline (less a margin, or the
/// default when the caller set none), bearer token, request id and trace context; a call whose
/// deadline has already passed does no downstream work.
#[tokio::test]
async fn downstream_calls_carry_the_callers_context() {
    let data = tempfile::tempdir().expect("data");
    let keys = Minter::for_data_dir(data.path());
    let auth = sessions_after(&keys, Arc::new(Barrier::new(1)))
        .serve()
        .await;
    let probe = Probe::default();
    let users = get_user_double(&probe, Arc::default()).serve().await;
    let aggregator = aggregator_for(auth.addr, users.addr).await;
    let id = uuid::Uuid::now_v7().to_string();
    let token = keys.user(&id, "me@example.com");
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let mut request = bearer(&token, GetMeRequest {});
    request.set_timeout(Duration::from_secs(5));
    request
        .metadata_mut()
        .insert("x-request-id", "req-42".parse().expect("id"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("tp"));
    client.get_me(request).await.expect("get me");
    client
        .get_me(bearer(&token, GetMeRequest {}))
        .await
        .expect("no deadline");
    let seen = probe.seen();
    assert_eq!(seen.len(), 2);
    let first = grpc_timeout(&seen[0]);
    assert!(
        first < Duration::from_secs(5) && first > Duration::from_secs(4),
        "{first:?}"
    );
    assert_eq!(
        seen[0].get("authorization").and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(
        seen[0].get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("req-42")
    );
    assert_eq!(
        seen[0].get("traceparent").and_then(|v| v.to_str().ok()),
        Some(traceparent)
    );
    let second = grpc_timeout(&seen[1]);
    assert!(
        second <= Duration::from_secs(10) && second > Duration::from_secs(9),
        "{second:?}"
    );
    assert!(
        seen[1].get("x-request-id").is_some(),
        "a generated request id is passed on too"
    );

    let calls = probe.calls();
    let mut expired = bearer(&token, GetMeRequest {});
    expired.set_timeout(Duration::from_millis(5));
    let status = client.get_me(expired).await.expect_err("no time left");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert_eq!(probe.calls(), calls, "no downstream work");
    stop(aggregator, users, auth).await;
}

/// Reads are retried on UNAVAILABLE within the caller's deadline (each retry gets what is
/// left), and the shared budget keeps a failing users from seeing much more than one call per
/// request.
#[tokio::test]
async fn reads_are_retried_within_the_deadline_and_the_budget() {
    let data = tempfile::tempdir().expect("data");
    let keys = Minter::for_data_dir(data.path());
    let auth = sessions_after(&keys, Arc::new(Barrier::new(1)))
        .serve()
        .await;
    let probe = Probe::default();
    let failures = Arc::new(AtomicUsize::new(0));
    let users = get_user_double(&probe, failures.clone()).serve().await;
    let aggregator = aggregator_for(auth.addr, users.addr).await;
    let token = keys.user(&uuid::Uuid::now_v7().to_string(), "r@example.com");
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());

    // Two failures, then an answer: three attempts, each with less of the caller's 5 s.
    failures.store(2, Ordering::SeqCst);
    let mut request = bearer(&token, GetMeRequest {});
    request.set_timeout(Duration::from_secs(5));
    client.get_me(request).await.expect("recovered by retrying");
    let timeouts: Vec<Duration> = probe.seen().iter().map(grpc_timeout).collect();
    assert_eq!(timeouts.len(), mesh_aggregator::MAX_ATTEMPTS as usize);
    assert!(timeouts[0] <= Duration::from_secs(5));
    assert!(
        timeouts.windows(2).all(|w| w[1] < w[0]),
        "retries share the caller's deadline: {timeouts:?}"
    );

    // Users always failing: 50 requests cost at most 50 calls plus what the budget allows.
    failures.store(usize::MAX, Ordering::SeqCst);
    let before = probe.calls();
    const REQUESTS: usize = 50;
    for _ in 0..REQUESTS {
        let status = client
            .get_me(bearer(&token, GetMeRequest {}))
            .await
            .expect_err("users is down");
        assert_eq!(status.code(), Code::Unavailable);
    }
    let calls = probe.calls() - before;
    // Each GetMe makes two reads, each earning a fifth of a retry.
    let allowed = REQUESTS
        + mesh_aggregator::RETRY_RESERVE as usize
        + (2.0 * REQUESTS as f64 * mesh_aggregator::RETRY_RATIO) as usize;
    assert!(calls > REQUESTS, "some retries were made: {calls}");
    assert!(
        calls <= allowed,
        "{calls} calls for {REQUESTS} requests (budget allows {allowed}, unbounded would be {})",
        REQUESTS * mesh_aggregator::MAX_ATTEMPTS as usize
    );
    stop(aggregator, users, auth).await;
}

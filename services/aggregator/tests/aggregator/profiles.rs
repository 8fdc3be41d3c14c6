//! GetProfiles: many ids in one request, answered in batches as a stream.

use std::{
    collections::{BTreeSet, HashMap},
    sync::atomic::Ordering,
    time::Duration,
};

use mesh_proto::aggregator::v1::{
    GetProfilesRequest, aggregator_service_client::AggregatorServiceClient, profile_result,
};
use mesh_testkit::{Minter, assert_code, auth_config, bearer, start_auth};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::{Probe, aggregator_for, batch_double, collect, profile, start, stop};

/// GetProfiles with 10,000 mixed ids: every distinct id answered exactly once — profiles,
/// NOT_FOUND, INVALID_ARGUMENT — and more than 10,000 is refused.
#[tokio::test]
async fn get_profiles_answers_every_id_once() {
    let mesh = start().await;
    let mut existing = Vec::new();
    for n in 0..20 {
        existing.push(profile(&mesh, &format!("P{n}")).await.0);
    }
    let (_, reader) = profile(&mesh, "Reader").await;
    let mut ids: Vec<String> = Vec::new();
    let mut expected: HashMap<String, Option<Code>> = HashMap::new();
    for id in &existing {
        ids.push(id.to_uppercase());
        ids.push(id.clone());
        expected.insert(id.clone(), None);
    }
    for n in 0..100 {
        let bad = format!("not-a-uuid-{n}");
        ids.push(bad.clone());
        expected.insert(bad, Some(Code::InvalidArgument));
    }
    while ids.len() < 10_000 {
        let unknown = uuid::Uuid::now_v7().to_string();
        ids.push(unknown.clone());
        expected.insert(unknown, Some(Code::NotFound));
    }
    let stream = mesh
        .aggregator_client()
        .get_profiles(bearer(
            &reader,
            GetProfilesRequest {
                user_ids: ids.clone(),
            },
        ))
        .await
        .expect("get profiles")
        .into_inner();
    let results = collect(stream).await;
    assert_eq!(results.len(), expected.len(), "one result per distinct id");
    let mut seen = BTreeSet::new();
    for result in results {
        assert!(
            seen.insert(result.user_id.clone()),
            "{} twice",
            result.user_id
        );
        let want = expected.get(&result.user_id).expect("asked for");
        match (result.result.expect("result"), want) {
            (profile_result::Result::Profile(p), None) => {
                assert!(p.email.is_empty(), "another's e-mail is never shown");
            }
            (profile_result::Result::Error(e), Some(code)) => assert_eq!(e.code, *code as i32),
            (got, want) => panic!("{}: got {got:?}, wanted {want:?}", result.user_id),
        }
    }

    let empty = mesh
        .aggregator_client()
        .get_profiles(bearer(&reader, GetProfilesRequest { user_ids: vec![] }))
        .await
        .expect("empty")
        .into_inner();
    assert!(collect(empty).await.is_empty());
    ids.push(uuid::Uuid::now_v7().to_string());
    let status = mesh
        .aggregator_client()
        .get_profiles(bearer(&reader, GetProfilesRequest { user_ids: ids }))
        .await;
    assert_code(status, Code::InvalidArgument);
    let anonymous = mesh
        .aggregator_client()
        .get_profiles(GetProfilesRequest { user_ids: vec![] })
        .await;
    assert_code(anonymous, Code::Unauthenticated);
    mesh.stop().await;
}

/// A batch users fails is UNAVAILABLE on each of its items and the stream goes on; a client
/// that drops the stream early leaves no downstream call running; in-flight batches are
/// bounded.
#[tokio::test]
async fn get_profiles_failures_and_cancellation() {
    let data = tempfile::tempdir().expect("data");
    let keys = Minter::for_data_dir(data.path());
    let auth = start_auth(auth_config(data.path())).await;
    let probe = Probe::default();
    let users = batch_double(&probe, Some(Duration::from_millis(200)), Some("00000000"))
        .serve()
        .await;
    let aggregator = aggregator_for(auth.addr, users.addr).await;
    let token = keys.service("test");
    let mut client = AggregatorServiceClient::new(aggregator.channel.clone());

    // The first batch (ids sorted first) fails, the other goes through.
    let mut ids: Vec<String> = (0..100)
        .map(|n| format!("00000000-0000-7000-8000-{n:012}"))
        .collect();
    ids.extend((0..100).map(|n| format!("11111111-0000-7000-8000-{n:012}")));
    let results = collect(
        client
            .get_profiles(bearer(&token, GetProfilesRequest { user_ids: ids }))
            .await
            .expect("get profiles")
            .into_inner(),
    )
    .await;
    assert_eq!(results.len(), 200);
    for result in &results {
        match result.result.as_ref().expect("result") {
            profile_result::Result::Error(e) => {
                assert!(result.user_id.starts_with("00000000"));
                assert_eq!(e.code, Code::Unavailable as i32);
            }
            profile_result::Result::Profile(_) => assert!(result.user_id.starts_with("11111111")),
        }
    }

    // 10,000 ids: 100 batches of which at most 8 are in flight; the client reads one result
    // and goes away.
    let ids: Vec<String> = (0..10_000)
        .map(|n| format!("22222222-0000-7000-8000-{n:012}"))
        .collect();
    probe.max_in_flight.store(0, Ordering::SeqCst);
    let calls_before = probe.calls();
    let mut stream = client
        .get_profiles(bearer(&token, GetProfilesRequest { user_ids: ids }))
        .await
        .expect("get profiles")
        .into_inner();
    stream.next().await.expect("one result").expect("ok");
    assert!(probe.in_flight() > 0, "calls are in flight");
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while probe.in_flight() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "downstream calls still running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let max = probe.max_in_flight();
    assert!(
        max <= mesh_aggregator::PROFILE_BATCHES_IN_FLIGHT,
        "{max} batches in flight"
    );
    let calls = probe.calls() - calls_before;
    assert!(calls < 100, "only {calls} of 100 batches were ever started");
    stop(aggregator, users, auth).await;
}

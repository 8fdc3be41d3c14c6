//! LookupProfiles: ids streamed in, results streamed out, a fast writer held back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::aggregator::v1::{
    LookupProfilesRequest, aggregator_service_client::AggregatorServiceClient, profile_result,
};
use mesh_testkit::{Minter, auth_config, bearer, connect, start_auth};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::Code;

use crate::{Probe, aggregator_for, batch_double, stop};

/// LookupProfiles answers each id as it arrives while the stream stays open; a client that
/// writes fast and never reads is held back: the server takes only a bounded number of its
/// ids, and runs at most LOOKUPS_IN_FLIGHT lookups at once.
#[tokio::test]
async fn lookup_profiles_streams_and_holds_back_a_fast_writer() {
    let data = tempfile::tempdir().expect("data");
    let keys = Minter::for_data_dir(data.path());
    let auth = start_auth(auth_config(data.path())).await;
    let probe = Probe::default();
    let users = batch_double(&probe, None, None).serve().await;
    let aggregator = aggregator_for(auth.addr, users.addr).await;
    let token = keys.service("test");

    // Interactive: send, read, send again on the same open stream.
    let (tx, rx) = mpsc::channel(4);
    let mut results = AggregatorServiceClient::new(aggregator.channel.clone())
        .lookup_profiles(bearer(&token, ReceiverStream::new(rx)))
        .await
        .expect("lookup")
        .into_inner();
    let first = uuid::Uuid::now_v7().to_string();
    tx.send(LookupProfilesRequest {
        user_id: first.clone(),
    })
    .await
    .expect("send");
    let got = results.next().await.expect("result").expect("ok");
    assert_eq!(got.user_id, first);
    tx.send(LookupProfilesRequest {
        user_id: "bad".into(),
    })
    .await
    .expect("send");
    let got = results.next().await.expect("result").expect("ok");
    assert!(
        matches!(got.result, Some(profile_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
    drop(tx);
    assert!(results.next().await.is_none(), "ends when the client ends");

    // A writer that never reads, on its own connection.
    const SENT: usize = 200_000;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let ids = tokio_stream::iter(0..SENT).map(move |n| {
        counter.fetch_add(1, Ordering::SeqCst);
        LookupProfilesRequest {
            user_id: format!("33333333-0000-7000-8000-{n:012}"),
        }
    });
    let channel = connect(aggregator.addr).await;
    let _unread = AggregatorServiceClient::new(channel)
        .lookup_profiles(bearer(&token, ids))
        .await
        .expect("lookup")
        .into_inner();
    // Let it run until the windows are full and nothing moves any more.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = pulled.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < SENT / 4,
        "the server took {last} of {SENT} ids from a client that reads nothing"
    );
    let max = probe.max_in_flight();
    assert!(
        max <= mesh_aggregator::LOOKUPS_IN_FLIGHT,
        "{max} lookups at once"
    );
    stop(aggregator, users, auth).await;
}

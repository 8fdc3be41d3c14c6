//! Client-side load balancing over every address a service's DNS name resolves to.
//!
//! gRPC keeps one HTTP/2 connection open, so behind a ClusterIP Service all of one client's
//! calls go to one pod. Pointed at a headless Service instead, [`balanced_channel`] resolves the
//! name, keeps a connection per endpoint, spreads calls over the ready ones (tower's
//! power-of-two-choices, through tonic's balance channel), resolves again every
//! [`RESOLVE_INTERVAL`], and drops endpoints that disappear. An IP address needs no resolving:
//! it gets a plain channel.

use std::{collections::BTreeSet, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use http::Uri;
use tonic::transport::{Channel, Endpoint, channel::Change};

/// How often a name is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(15);

/// The endpoint settings every mesh client uses: connect timeout, `TCP_NODELAY`, HTTP/2
/// keepalive.
pub fn endpoint(uri: Uri) -> Endpoint {
    Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}

/// Resolves a host and port to addresses.
pub type Resolve = Box<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (DNS, `/etc/hosts`).
pub fn system_resolver() -> Resolve {
    Box::new(|host, port| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

/// A channel to `uri`: balanced over what its host name resolves to (again every
/// [`RESOLVE_INTERVAL`]), or a plain lazily connected one for an IP address.
pub fn balanced_channel(uri: &Uri) -> Channel {
    balanced_channel_with(uri, RESOLVE_INTERVAL, system_resolver())
}

/// [`balanced_channel`] with another resolver and interval (for tests).
pub fn balanced_channel_with(uri: &Uri, every: Duration, resolve: Resolve) -> Channel {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    if host.parse::<std::net::IpAddr>().is_ok() {
        return endpoint(uri.clone()).connect_lazy();
    }
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
    tokio::spawn(async move {
        let mut current = BTreeSet::new();
        loop {
            match resolve(host.clone(), port).await {
                Ok(addrs) => {
                    let fresh: BTreeSet<SocketAddr> = addrs.into_iter().collect();
                    if fresh.is_empty() {
                        // Keep what we have rather than balancing over nothing.
                        tracing::warn!(%host, "name resolved to no address; keeping the last set");
                    } else {
                        for gone in current.difference(&fresh) {
                            if changes.send(Change::Remove(*gone)).await.is_err() {
                                return;
                            }
                        }
                        for new in fresh.difference(&current) {
                            let Ok(uri) = format!("http://{new}").parse::<Uri>() else {
                                continue;
                            };
                            if changes
                                .send(Change::Insert(*new, endpoint(uri)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        if fresh != current {
                            tracing::info!(%host, endpoints = fresh.len(), "endpoints changed");
                        }
                        current = fresh;
                    }
                }
                Err(err) => tracing::warn!(%host, error = %err, "cannot resolve; retrying"),
            }
            // The channel's users are gone: stop resolving.
            if changes.is_closed() {
                return;
            }
            // Until there is an endpoint (e.g. the service's pods are not ready yet), look
            // again soon.
            let wait = if current.is_empty() {
                every.min(Duration::from_secs(1))
            } else {
                every
            };
            tokio::time::sleep(wait).await;
        }
    });
    channel
}

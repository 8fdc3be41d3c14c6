//! Every outgoing call of a mesh service goes through a channel made here: the endpoint
//! settings all clients share, client-side balancing, and the client trace layer.
//!
//! gRPC keeps one HTTP/2 connection open, so behind a ClusterIP Service all of one client's
//! calls go to one pod. Pointed at a headless Service instead, [`balanced_channel`] resolves the
//! name, keeps a connection per endpoint, spreads calls over the ready ones (tower's
//! power-of-two-choices, through tonic's balance channel), resolves again every
//! [`RESOLVE_INTERVAL`], and drops endpoints that disappear. An IP address needs no resolving:
//! it gets a plain channel.
//!
//! An `https://` URL is reached over TLS with the [`ClientTls`] given (the CA the server's
//! certificate must chain to, and the client's own certificate for mutual TLS), the name in
//! the URL being the one the certificate must carry, also when balancing dials the addresses
//! it resolves to. When the certificate, key or CA files change, new connections use the new
//! ones and established connections carry on: a balanced channel makes its endpoints again
//! (tonic's TLS settings are fixed per endpoint), and a channel to an IP address connects
//! through the mesh's own connector, which takes the current rustls configuration for each
//! new connection (tonic's balance channel only takes endpoints, so it cannot use that
//! connector).
//!
//! [`traced_channel`] puts [`mesh_telemetry::ClientTraceLayer`] on such a channel, so each call
//! gets a client span sent as the callee's `traceparent`; [`Pool`] keeps a few of them to one
//! service and uses them in turn.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use http::Uri;
use tonic::transport::{Channel, Endpoint, channel::Change};

use crate::tls::ClientTls;

/// Why a channel cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// An `https://` URL without a CA to verify its server with.
    #[error("{0} is an https:// URL but no --tls-ca is configured")]
    NoCa(Uri),
    /// tonic refused the TLS settings.
    #[error("TLS settings for {uri} refused: {source}")]
    Tls {
        /// The URL.
        uri: Uri,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A channel whose calls are traced (see [`mesh_telemetry::rpc`]).
pub type Traced = mesh_telemetry::ClientTrace<Channel>;

/// A traced, balanced channel to `uri`: what every mesh service calls another with.
pub fn traced_channel(uri: &Uri, tls: &ClientTls) -> Result<Traced, ChannelError> {
    Ok(tower::Layer::layer(
        &mesh_telemetry::ClientTraceLayer::new(uri),
        balanced_channel(uri, tls)?,
    ))
}

/// `channel` (made elsewhere, e.g. to a test server) with the client trace layer.
pub fn traced(channel: Channel) -> Traced {
    tower::Layer::layer(&mesh_telemetry::ClientTraceLayer::default(), channel)
}

/// A few long-lived HTTP/2 connections to one service, used in turn: one connection's lock and
/// flow-control window are then not the ceiling.
#[derive(Debug)]
pub struct Pool {
    channels: Vec<Traced>,
    next: AtomicUsize,
}

impl Pool {
    /// `connections` (at least one) [`traced_channel`]s to `uri`.
    pub fn new(uri: &Uri, connections: usize, tls: &ClientTls) -> Result<Self, ChannelError> {
        Ok(Self {
            channels: (0..connections.max(1))
                .map(|_| traced_channel(uri, tls))
                .collect::<Result<_, _>>()?,
            next: AtomicUsize::new(0),
        })
    }

    /// The next channel in turn.
    pub fn channel(&self) -> Traced {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
}

/// How often a name is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

/// The endpoint settings every mesh client uses: connect timeout, `TCP_NODELAY`, HTTP/2
/// keepalive; TLS for an `https://` URL.
pub fn endpoint(uri: Uri, tls: &ClientTls) -> Result<Endpoint, ChannelError> {
    let host = host_of(&uri);
    endpoint_for(uri, &host, tls)
}

/// [`endpoint`] for `uri` whose server's certificate names `host` (when `uri` is an address
/// the name resolved to).
fn endpoint_for(uri: Uri, host: &str, tls: &ClientTls) -> Result<Endpoint, ChannelError> {
    let https = uri.scheme_str() == Some("https");
    let endpoint = Endpoint::from(uri.clone())
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if !https {
        return Ok(endpoint);
    }
    if !tls.has_ca() {
        return Err(ChannelError::NoCa(uri));
    }
    endpoint
        .tls_config(tls.tonic_config(host))
        .map_err(|source| ChannelError::Tls { uri, source })
}

/// The endpoint for one resolved address of `host`.
fn endpoint_at(scheme: &str, addr: SocketAddr, host: &str, tls: &ClientTls) -> Option<Endpoint> {
    let uri = format!("{scheme}://{addr}").parse::<Uri>().ok()?;
    endpoint_for(uri, host, tls).ok()
}

/// A lazily connected channel to the IP address in `uri` over TLS, each new connection made
/// with the TLS configuration current at that moment.
fn tls_to_address(
    uri: Uri,
    host: String,
    port: u16,
    tls: &ClientTls,
) -> Result<Channel, ChannelError> {
    let Ok(ip) = host.parse::<std::net::IpAddr>() else {
        return Err(ChannelError::NoCa(uri));
    };
    let addr = SocketAddr::new(ip, port);
    let server_name = rustls_pki_types::ServerName::IpAddress(ip.into());
    // tonic's own connector wraps a custom one and refuses `https://` without its TLS
    // settings: the connector speaks TLS, tonic sees a plain byte stream.
    let plain = format!("http://{addr}")
        .parse::<Uri>()
        .map_err(|_| ChannelError::NoCa(uri.clone()))?;
    let endpoint = endpoint_for(plain, &host, tls)?;
    let tls = tls.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, server_name) = (tls.clone(), server_name.clone());
        async move {
            let config = tls
                .rustls_config()
                .ok_or_else(|| std::io::Error::other("no CA to verify the server with"))?;
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
            )
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

fn host_of(uri: &Uri) -> String {
    uri.host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned()
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
pub fn balanced_channel(uri: &Uri, tls: &ClientTls) -> Result<Channel, ChannelError> {
    balanced_channel_with(uri, tls, RESOLVE_INTERVAL, system_resolver())
}

/// [`balanced_channel`] with another resolver and interval (for tests).
pub fn balanced_channel_with(
    uri: &Uri,
    tls: &ClientTls,
    every: Duration,
    resolve: Resolve,
) -> Result<Channel, ChannelError> {
    let host = host_of(uri);
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // Checked here, so a bad setting fails at start-up rather than on each resolve.
    let first = endpoint_for(uri.clone(), &host, tls)?;
    if host.parse::<std::net::IpAddr>().is_ok() {
        if !https {
            return Ok(first.connect_lazy());
        }
        return tls_to_address(uri.clone(), host, port, tls);
    }
    let scheme = if https { "https" } else { "http" };
    let tls = tls.clone();
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
    tokio::spawn(async move {
        let mut current = BTreeSet::new();
        let mut generation = tls.generation();
        let mut resolve_at = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= resolve_at {
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
                                let Some(endpoint) = endpoint_at(scheme, *new, &host, &tls) else {
                                    continue;
                                };
                                if changes.send(Change::Insert(*new, endpoint)).await.is_err() {
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
                // Until there is an endpoint (e.g. the service's pods are not ready yet), look
                // again soon.
                resolve_at = tokio::time::Instant::now()
                    + if current.is_empty() {
                        every.min(Duration::from_secs(1))
                    } else {
                        every
                    };
            }
            // Renewed certificates or CA: every endpoint made again, so new connections use
            // them; the old endpoints' connections finish what they carry.
            if https && tls.refresh() != generation {
                generation = tls.generation();
                for addr in &current {
                    let Some(endpoint) = endpoint_at(scheme, *addr, &host, &tls) else {
                        continue;
                    };
                    if changes.send(Change::Insert(*addr, endpoint)).await.is_err() {
                        return;
                    }
                }
            }
            // The channel's users are gone: stop.
            if changes.is_closed() {
                return;
            }
            let wake = if https {
                resolve_at.min(tokio::time::Instant::now() + crate::tls::TLS_RELOAD_INTERVAL)
            } else {
                resolve_at
            };
            tokio::time::sleep_until(wake).await;
        }
    });
    Ok(channel)
}

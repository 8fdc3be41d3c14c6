//! Accepted connections, and what each may hold: the accept loop every mesh server runs.
//!
//! tonic's own `TcpIncoming` accepts every connection and keeps it for as long as the peer
//! likes: a TCP connection that never sends the HTTP/2 preface was kept about 11 minutes, and
//! nothing bounded how many one peer may open. Neither tonic nor hyper has a handshake timeout,
//! a per-peer connection limit or an idle timeout for HTTP/2 server connections (grpc-go's
//! `MaxConnectionIdle`), so the mesh accepts connections itself:
//!
//! - at most [`ConnLimits::max_connections`] at once, and at most
//!   [`ConnLimits::max_per_peer`] from one client address (an IPv4 address or an IPv6 /64:
//!   [`PeerKey`]); one more is closed at once;
//! - a connection must send its first 24 bytes (the length of the HTTP/2 preface, and less
//!   than any TLS ClientHello) and, on a TLS port, finish the TLS handshake, within
//!   [`ConnLimits::handshake_timeout`], or it is closed before tonic sees it (its slot is held
//!   meanwhile, so the connection bounds also bound handshakes in progress); on a server that
//!   also takes HTTP/1.1 (gRPC-Web) those bytes are the start of the request line, and the
//!   rest of the headers must follow within hyper's 30 s header timer;
//! - a connection with no call open for [`ConnLimits::idle_timeout`] is closed;
//! - on a TLS port, one address may start [`ConnLimits::tls_handshakes_per_second`] handshakes
//!   a second (twice that at once): a handshake costs the server far more CPU than the client.
//!
//! Each accepted connection is a [`MeshConn`]; its [`ConnInfo`] (peer address and the count of
//! its open calls) reaches every request's extensions, where [`peer_addr`] finds it.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

use crate::tls::ServerTls;

/// Bytes a new connection must send within the handshake timeout: the HTTP/2 client preface
/// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) is exactly this long.
pub const HANDSHAKE_BYTES: usize = 24;

/// Client addresses whose TLS handshake rate is followed at once (a fixed-size table).
const TLS_HANDSHAKE_PEERS: usize = 65_536;

/// The bounds on accepted connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once; one more is closed at accept.
    pub max_connections: usize,
    /// Connections open at once from one IP address (0: no per-peer bound).
    pub max_per_peer: usize,
    /// How long a new connection may take to send its first [`HANDSHAKE_BYTES`] bytes.
    pub handshake_timeout: Duration,
    /// How long a connection may stay open with no call on it.
    pub idle_timeout: Duration,
    /// TLS handshakes one address may start per second on a TLS port, twice that at once
    /// (0: unbounded); one more connection is closed at accept.
    pub tls_handshakes_per_second: u32,
}

/// What the server knows of one connection; in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The local address the peer connected to.
    pub local: SocketAddr,
    state: Arc<ConnState>,
}

impl ConnInfo {
    /// Marks one more call open on this connection until the returned guard is dropped.
    pub fn open_call(&self) -> CallOnConn {
        self.state.active.fetch_add(1, Ordering::SeqCst);
        CallOnConn {
            state: self.state.clone(),
        }
    }
}

/// A client machine, as per-address bounds count it: an IPv4 address, or an IPv6 /64 (one
/// machine usually has a whole /64 to pick source addresses from). Fixed-size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// An IPv4 address (also an IPv4-mapped IPv6 one).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl PeerKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Self::V6(prefix)
                }
            },
        }
    }
}

/// The peer address of a request, as recorded at accept (plaintext or TLS).
pub fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    conn_info(extensions).map(|info| info.remote)
}

/// The [`ConnInfo`] of a request's connection.
pub fn conn_info(extensions: &http::Extensions) -> Option<&ConnInfo> {
    extensions.get::<ConnInfo>()
}

/// Open calls and idleness of one connection, shared by its IO and its requests.
#[derive(Debug)]
struct ConnState {
    active: AtomicUsize,
    /// When the last call ended (ms since `epoch`).
    idle_since_ms: AtomicU64,
    epoch: Instant,
    /// The connection's pending read, woken when its last call ends so that the idle timer
    /// starts.
    reader: AtomicWaker,
}

impl ConnState {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One call open on a connection; dropping it ends the call for the idle timer.
#[derive(Debug)]
pub struct CallOnConn {
    state: Arc<ConnState>,
}

impl Drop for CallOnConn {
    fn drop(&mut self) {
        if self.state.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.state
                .idle_since_ms
                .store(self.state.now_ms(), Ordering::SeqCst);
            self.state.reader.wake();
        }
    }
}

/// The count of connections, in all and per peer address.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

/// A place held in [`Counts`] for as long as its connection lives.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    peer: PeerKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

fn take_slot(counts: &Arc<Mutex<Counts>>, peer: IpAddr, limits: &ConnLimits) -> Option<Slot> {
    let peer = PeerKey::of(peer);
    let mut guard = counts.lock().unwrap_or_else(|e| e.into_inner());
    if guard.total >= limits.max_connections {
        return None;
    }
    let of_peer = guard.per_peer.get(&peer).copied().unwrap_or(0);
    if limits.max_per_peer > 0 && of_peer >= limits.max_per_peer {
        return None;
    }
    guard.total += 1;
    *guard.per_peer.entry(peer).or_insert(0) += 1;
    drop(guard);
    Some(Slot {
        counts: counts.clone(),
        peer,
    })
}

/// The TCP stream with the bytes read during the handshake check given to the reader first.
#[derive(Debug)]
pub struct Prefixed {
    io: TcpStream,
    prefix: BytesMut,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection's byte stream: plaintext, or TLS terminated here.
enum Io {
    Plain(Prefixed),
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed>>),
}

/// An accepted connection: its byte stream (plaintext or TLS), what the server knows of it,
/// and the idle timer.
pub struct MeshConn {
    io: Io,
    info: ConnInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl std::fmt::Debug for MeshConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConn")
            .field("remote", &self.info.remote)
            .field("tls", &matches!(self.io, Io::Tls(_)))
            .field("calls", &self.info.state.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Connected for MeshConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl MeshConn {
    /// Whether the connection has had no call for the idle timeout; arms the timer otherwise.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let state = &self.info.state;
        state.reader.register(cx.waker());
        if state.active.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let since = state.idle_since_ms.load(Ordering::SeqCst);
        let deadline = state.epoch + Duration::from_millis(since) + self.idle_timeout;
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        self.idle.as_mut().poll(cx).is_ready()
    }
}

macro_rules! on_io {
    ($self:expr, $io:ident => $body:expr) => {
        match &mut $self.io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $body
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $body
            }
        }
    };
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.idle_expired(cx) {
            // End of stream: hyper closes the connection, as after a peer's close.
            tracing::debug!(peer = %this.info.remote, "closing an idle connection");
            return Poll::Ready(Ok(()));
        }
        on_io!(this, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, io => io.poll_shutdown(cx))
    }
}

/// Reads until `HANDSHAKE_BYTES` bytes have arrived; `None` if the peer closed first.
async fn read_handshake(io: &mut TcpStream) -> io::Result<Option<BytesMut>> {
    let mut prefix = BytesMut::with_capacity(256);
    while prefix.len() < HANDSHAKE_BYTES {
        if io.read_buf(&mut prefix).await? == 0 {
            return Ok(None);
        }
    }
    Ok(Some(prefix))
}

/// Accepts connections on `listener` within `limits`, as a stream for tonic's
/// `serve_with_incoming_shutdown`. Accepting stops (and the listening socket closes) when the
/// stream is dropped.
///
/// With `tls`, every connection is a TLS one: the handshake must finish within the handshake
/// timeout, and a connection that fails it (plaintext, no or a refused client certificate) is
/// closed without reaching tonic.
pub fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    tls: Option<ServerTls>,
) -> impl futures_util::Stream<Item = io::Result<MeshConn>> + Send + 'static {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(accept_loop(listener, limits, tls, tx));
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok)
}

use futures_util::StreamExt as _;

async fn accept_loop(
    listener: TcpListener,
    limits: ConnLimits,
    tls: Option<ServerTls>,
    tx: mpsc::UnboundedSender<MeshConn>,
) {
    let counts = Arc::new(Mutex::new(Counts::default()));
    let handshakes = crate::bounded::RateLimit::new(
        limits.tls_handshakes_per_second.saturating_mul(2),
        f64::from(limits.tls_handshakes_per_second),
        TLS_HANDSHAKE_PEERS,
    );
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (io, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Each TLS handshake costs the server a key exchange and a signature, and the client
        // next to nothing: one address gets a bounded rate of them.
        if tls.is_some()
            && limits.tls_handshakes_per_second > 0
            && handshakes.try_take(PeerKey::of(remote.ip())).is_err()
        {
            tracing::debug!(peer = %remote, "connection refused: too many TLS handshakes");
            drop(io);
            continue;
        }
        let Some(slot) = take_slot(&counts, remote.ip(), &limits) else {
            tracing::debug!(peer = %remote, "connection refused: too many connections");
            drop(io);
            continue;
        };
        // Small stream messages must not wait on Nagle's algorithm and delayed ACKs (tens of
        // milliseconds per message on loopback).
        let _ = io.set_nodelay(true);
        let tx = tx.clone();
        let local = io.local_addr().ok().or(local).unwrap_or(remote);
        let acceptor = tls.as_ref().map(ServerTls::acceptor);
        tokio::spawn(async move {
            let handshake = async move {
                let mut io = io;
                let Some(prefix) = read_handshake(&mut io).await? else {
                    return Ok(None);
                };
                let io = Prefixed { io, prefix };
                Ok::<_, io::Error>(Some(match acceptor {
                    None => Io::Plain(io),
                    Some(acceptor) => Io::Tls(Box::new(acceptor.accept(io).await?)),
                }))
            };
            let io = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                Ok(Ok(Some(io))) => io,
                Ok(Ok(None)) => return,
                Ok(Err(err)) => {
                    // Plaintext to a TLS port, a missing, expired or foreign client certificate.
                    tracing::debug!(peer = %remote, error = %err, "connection closed: handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %remote, "connection closed: no handshake in time");
                    return;
                }
            };
            let state = Arc::new(ConnState {
                active: AtomicUsize::new(0),
                idle_since_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                reader: AtomicWaker::new(),
            });
            let conn = MeshConn {
                io,
                info: ConnInfo {
                    remote,
                    local,
                    state,
                },
                idle_timeout: limits.idle_timeout,
                idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                _slot: slot,
            };
            let _ = tx.send(conn);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_peer: usize) -> ConnLimits {
        ConnLimits {
            max_connections: total,
            max_per_peer: per_peer,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            tls_handshakes_per_second: 0,
        }
    }

    /// Slots are bounded per peer and in all, and come back when dropped.
    #[test]
    fn slots_are_bounded() {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let l = limits(3, 2);
        let a1 = take_slot(&counts, a, &l).expect("first");
        let _a2 = take_slot(&counts, a, &l).expect("second");
        assert!(take_slot(&counts, a, &l).is_none(), "per peer");
        let _b1 = take_slot(&counts, b, &l).expect("other peer");
        assert!(take_slot(&counts, b, &l).is_none(), "in all");
        drop(a1);
        assert!(take_slot(&counts, b, &l).is_some(), "freed");
        drop(_b1);
        assert!(counts.lock().expect("lock").per_peer.len() <= 2);
        // Addresses of one IPv6 /64 are one peer.
        let counts = Arc::new(Mutex::new(Counts::default()));
        let l = limits(10, 1);
        let _x = take_slot(&counts, "2001:db8::1".parse().expect("ip"), &l).expect("first");
        assert!(take_slot(&counts, "2001:db8::2".parse().expect("ip"), &l).is_none());
    }
}

//! Settings every mesh server shares, as flags with environment-variable fallbacks.
//!
//! Each default is written once, in its flag's attribute (a named constant where other code
//! needs the value too): [`Default`] is what an empty command line parses to
//! ([`crate::cli::defaults`]). [`ServerConfig::to_args`] turns a configuration back into the
//! flags that make it, so `mesh up` passes every setting on to the services it starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::tls::{ClientTls, ServerTlsFiles, TlsError};

/// The default limit on one request message: 4 MiB (methods may have smaller ones).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The default budget of request bytes held by calls in flight: 32 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT: usize = 32 * 1024 * 1024;
/// The default concurrency limit.
pub const DEFAULT_CONCURRENCY_LIMIT: u32 = 512;
/// The default HTTP/2 streams per connection (as nginx and most gRPC deployments use).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// The default number of connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// The default number of connections open at once from one IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 64;
/// The default rate of TLS handshakes per second one client address may start.
pub const DEFAULT_TLS_HANDSHAKES_PER_PEER: u32 = 50;
/// The default share (percent) of the concurrency limit and of the request-byte budget one
/// client address may hold.
pub const DEFAULT_PEER_SHARE_PERCENT: u8 = 25;

/// Settings of the server runtime, shared by all three services.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ServerConfig {
    /// Largest request message accepted, in bytes, for methods that do not need less (each
    /// method's own limit is listed in its `.proto`); a larger one is answered with
    /// RESOURCE_EXHAUSTED and the server goes on serving.
    #[arg(long, env = "MESH_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES,
          value_parser = parse_bytes)]
    pub max_request_bytes: usize,

    /// Request bytes the calls in flight may hold in all (a quarter of it per client address);
    /// a call beyond it is RESOURCE_EXHAUSTED. With the concurrency limit, it bounds the memory
    /// requests can take.
    #[arg(long, env = "MESH_MAX_REQUEST_BYTES_IN_FLIGHT",
          default_value_t = DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT, value_parser = parse_bytes)]
    pub max_request_bytes_in_flight: usize,

    /// How long a call's request message may take to arrive in full after its headers; then
    /// the call is answered DEADLINE_EXCEEDED and holds nothing more.
    #[arg(long, env = "MESH_REQUEST_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// How long in-flight calls may take to finish after SIGTERM/SIGINT before they are cut
    /// off (e.g. `10s`, `500ms`, `2m`; a bare number is seconds).
    #[arg(long, env = "MESH_GRACE_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub grace_period: Duration,

    /// A client connection older than this is asked to go away (HTTP/2 GOAWAY) and reconnect,
    /// so clients that do not balance per endpoint still spread over new pods after a
    /// scale-up.
    #[arg(long, env = "MESH_MAX_CONNECTION_AGE", default_value = "10m",
          value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// How long calls on a connection past its age may still finish before it is closed.
    #[arg(long, env = "MESH_MAX_CONNECTION_AGE_GRACE", default_value = "1m",
          value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// A connection with no call open for this long is closed.
    #[arg(long, env = "MESH_MAX_CONNECTION_IDLE", default_value = "30s",
          value_parser = parse_duration)]
    pub max_connection_idle: Duration,

    /// How long a new connection may take to send its first bytes (the HTTP/2 preface or a TLS
    /// ClientHello) and, on a TLS port, to finish the TLS handshake, before it is closed.
    #[arg(long, env = "MESH_HANDSHAKE_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Connections open at once; one more is closed at accept.
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: u32,

    /// Connections open at once from one IP address (0: unbounded, e.g. behind a proxy that
    /// hides client addresses); one more is closed at accept.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_PEER",
          default_value_t = DEFAULT_MAX_CONNECTIONS_PER_PEER,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub max_connections_per_peer: u32,

    /// The share, in percent, of the concurrency limit and of the request-byte budget that one
    /// client address (an IPv4 address or an IPv6 /64) may hold, so that one client cannot take
    /// them all (100 for a server whose only clients are a few trusted services).
    #[arg(long = "peer-share", env = "MESH_PEER_SHARE", default_value_t = DEFAULT_PEER_SHARE_PERCENT,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub peer_share_percent: u8,

    /// Calls of the service handled at once (long-lived streams not counted); one more is
    /// answered RESOURCE_EXHAUSTED at once rather than queued. A call is counted from the
    /// moment its request has arrived until its handler has answered (a server stream: until
    /// it ends). Health and reflection are never refused.
    #[arg(long, env = "MESH_CONCURRENCY_LIMIT", default_value_t = DEFAULT_CONCURRENCY_LIMIT,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub concurrency_limit: u32,

    /// HTTP/2 streams one client connection may have open at once.
    #[arg(long, env = "MESH_MAX_CONCURRENT_STREAMS",
          default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_streams: u32,

    /// Largest response message sent, in bytes.
    #[arg(long, env = "MESH_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES,
          value_parser = parse_bytes)]
    pub max_response_bytes: usize,

    /// TLS handshakes one client address may start per second on a TLS port (twice that at
    /// once); a connection beyond is closed at accept. A handshake costs the server a key
    /// exchange and a signature and the client almost nothing. 0: unbounded.
    #[arg(long, env = "MESH_TLS_HANDSHAKES_PER_PEER", default_value_t = DEFAULT_TLS_HANDSHAKES_PER_PEER)]
    pub tls_handshakes_per_peer: u32,

    /// PEM certificate chain (leaf first) the server presents: with `--tls-key`, it speaks
    /// only TLS (1.2 or 1.3, ALPN h2). Re-read when the file changes. Unset: plaintext, said
    /// at start-up at WARN.
    #[arg(long, env = "MESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`. Re-read when the file changes.
    #[arg(long, env = "MESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates every client's certificate must chain to (mutual TLS): a client
    /// without one, or with an expired or foreign one, is refused at the handshake. Re-read
    /// when the file changes. Unset: no client certificate asked for (the public facade).
    #[arg(long, env = "MESH_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Also serve `grpc.health.v1.Health`, and nothing else, in plaintext on this address: for
    /// probes that cannot speak TLS (the kubelet's gRPC probe). Unset: health only on the main
    /// port.
    #[arg(long, env = "MESH_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

impl ServerConfig {
    /// The TLS files, when the server is to speak TLS.
    pub fn tls_files(&self) -> Option<ServerTlsFiles> {
        Some(ServerTlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            accept_http1: false,
        })
    }
}

/// How a mesh service reaches other mesh services over TLS: the CA their certificates must
/// chain to, and its own certificate for servers that require one (mutual TLS). Used for
/// `https://` URLs; `http://` URLs stay plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ClientTlsConfig {
    /// PEM CA certificates the services this one calls must present a chain to (needed for
    /// `https://` URLs).
    #[arg(long, env = "MESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate chain this service presents to servers that require one.
    #[arg(long, env = "MESH_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of `--tls-client-cert`.
    #[arg(long, env = "MESH_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTlsConfig {
    /// Reads and checks the files.
    pub fn load(&self) -> Result<ClientTls, TlsError> {
        ClientTls::load(
            self.tls_ca.as_deref(),
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
        )
    }

    /// The flags that make this configuration.
    pub fn to_args(&self) -> Vec<String> {
        let Self {
            tls_ca,
            tls_client_cert,
            tls_client_key,
        } = self;
        path_args(&[
            ("--tls-ca", tls_ca),
            ("--tls-client-cert", tls_client_cert),
            ("--tls-client-key", tls_client_key),
        ])
    }
}

fn path_args(pairs: &[(&str, &Option<PathBuf>)]) -> Vec<String> {
    pairs
        .iter()
        .filter_map(|(flag, path)| {
            path.as_ref()
                .map(|p| [(*flag).to_owned(), p.display().to_string()])
        })
        .flatten()
        .collect()
}

impl Default for ServerConfig {
    fn default() -> Self {
        crate::cli::defaults()
    }
}

/// A duration as a flag value that parses back to exactly it.
pub fn duration_arg(duration: Duration) -> String {
    if duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}ns", duration.as_nanos())
    }
}

impl ServerConfig {
    /// The flags that make this configuration (every one, defaults included), for a process
    /// that starts servers with the same settings.
    pub fn to_args(&self) -> Vec<String> {
        let Self {
            max_request_bytes,
            max_request_bytes_in_flight,
            request_timeout,
            grace_period,
            max_connection_age,
            max_connection_age_grace,
            max_connection_idle,
            handshake_timeout,
            max_connections,
            max_connections_per_peer,
            peer_share_percent,
            concurrency_limit,
            max_concurrent_streams,
            max_response_bytes,
            tls_handshakes_per_peer,
            tls_cert,
            tls_key,
            tls_client_ca,
            health_listen,
        } = self;
        let pairs = [
            ("--max-request-bytes", max_request_bytes.to_string()),
            (
                "--max-request-bytes-in-flight",
                max_request_bytes_in_flight.to_string(),
            ),
            ("--request-timeout", duration_arg(*request_timeout)),
            ("--grace-period", duration_arg(*grace_period)),
            ("--max-connection-age", duration_arg(*max_connection_age)),
            (
                "--max-connection-age-grace",
                duration_arg(*max_connection_age_grace),
            ),
            ("--max-connection-idle", duration_arg(*max_connection_idle)),
            ("--handshake-timeout", duration_arg(*handshake_timeout)),
            ("--max-connections", max_connections.to_string()),
            (
                "--max-connections-per-peer",
                max_connections_per_peer.to_string(),
            ),
            ("--peer-share", peer_share_percent.to_string()),
            ("--concurrency-limit", concurrency_limit.to_string()),
            (
                "--max-concurrent-streams",
                max_concurrent_streams.to_string(),
            ),
            ("--max-response-bytes", max_response_bytes.to_string()),
            (
                "--tls-handshakes-per-peer",
                tls_handshakes_per_peer.to_string(),
            ),
        ];
        let mut args: Vec<String> = pairs
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_owned(), value])
            .collect();
        args.extend(path_args(&[
            ("--tls-cert", tls_cert),
            ("--tls-key", tls_key),
            ("--tls-client-ca", tls_client_ca),
        ]));
        if let Some(addr) = health_listen {
            args.extend(["--health-listen".to_owned(), addr.to_string()]);
        }
        args
    }
}

/// A flag value that is a secret (a client secret, a database URL with its password): kept as
/// a [`secrecy::SecretString`], which `Debug` never prints.
pub fn parse_secret(s: &str) -> Result<secrecy::SecretString, std::convert::Infallible> {
    Ok(secrecy::SecretString::from(s))
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of bytes"))?;
    // gRPC frames carry a 32-bit length; 0 would refuse every message.
    if n == 0 || n > u32::MAX as usize {
        return Err(format!("{n} is out of range (1 to {})", u32::MAX));
    }
    Ok(n)
}

/// Parses a duration such as `250ms`, `10s`, `2m`, `1h` or `30d` (also `us` and `ns`); a bare
/// number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if let ("ns" | "us", Ok(whole)) = (unit.trim(), number.parse::<u64>()) {
        return Ok(if unit.trim() == "ns" {
            Duration::from_nanos(whole)
        } else {
            Duration::from_micros(whole)
        });
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try `10s` or `500ms`)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{s}` is out of range"))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerConfig,
        #[command(flatten)]
        client: ClientTlsConfig,
    }

    /// The client TLS settings survive `to_args` and parsing back, and none is the default.
    #[test]
    fn client_tls_round_trips_through_flags() {
        let parsed = Cli::try_parse_from(["mesh"])
            .expect("defaults parse")
            .client;
        assert_eq!(parsed, ClientTlsConfig::default());
        let changed = ClientTlsConfig {
            tls_ca: Some("/run/tls/ca.crt".into()),
            tls_client_cert: Some("/run/tls/tls.crt".into()),
            tls_client_key: Some("/run/tls/tls.key".into()),
        };
        let args = std::iter::once("mesh".to_owned()).chain(changed.to_args());
        assert_eq!(
            Cli::try_parse_from(args).expect("flags parse").client,
            changed
        );
    }

    /// Durations parse in every unit; nonsense is refused with a message naming it.
    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").unwrap_err().contains("ten"));
        assert!(parse_duration("5w").unwrap_err().contains("`w`"));
        assert!(parse_duration("").is_err());
    }

    /// The request limit must be a positive 32-bit size.
    #[test]
    fn max_request_bytes_is_bounded() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999").is_err());
    }

    /// The flag defaults and `Default` agree, and every setting survives `to_args` and parsing
    /// back: a new field left out of `to_args` fails to compile (the destructuring) or here.
    #[test]
    fn round_trip_through_flags() {
        let parsed = Cli::try_parse_from(["mesh"])
            .expect("defaults parse")
            .server;
        assert_eq!(parsed, ServerConfig::default());
        let changed = ServerConfig {
            max_request_bytes: 1234,
            max_request_bytes_in_flight: 99_999,
            request_timeout: Duration::from_millis(1500),
            grace_period: Duration::from_millis(250),
            max_connection_age: Duration::from_secs(7),
            max_connection_age_grace: Duration::from_secs(3),
            max_connection_idle: Duration::from_millis(900),
            handshake_timeout: Duration::from_micros(2500),
            max_connections: 77,
            max_connections_per_peer: 0,
            peer_share_percent: 60,
            concurrency_limit: 9,
            max_concurrent_streams: 11,
            max_response_bytes: 4321,
            tls_handshakes_per_peer: 7,
            tls_cert: Some("/run/tls/tls.crt".into()),
            tls_key: Some("/run/tls/tls.key".into()),
            tls_client_ca: Some("/run/tls/ca.crt".into()),
            health_listen: Some(([127, 0, 0, 1], 8081).into()),
        };
        let args = std::iter::once("mesh".to_owned()).chain(changed.to_args());
        let back = Cli::try_parse_from(args).expect("flags parse").server;
        assert_eq!(back, changed);
    }
}

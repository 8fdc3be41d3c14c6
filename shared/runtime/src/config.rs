//! Settings every mesh server shares, as flags with environment-variable fallbacks.

use std::time::Duration;

/// The default limit on one request message: 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Settings of the server runtime, shared by all three services.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Largest request message accepted, in bytes; a larger one is answered with
    /// RESOURCE_EXHAUSTED and the server goes on serving.
    #[arg(long, env = "MESH_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES,
          value_parser = parse_max_request_bytes)]
    pub max_request_bytes: usize,

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

    /// Calls of the service handled at once (long-lived streams not counted); one more is
    /// answered RESOURCE_EXHAUSTED at once rather than queued. Health and reflection are never
    /// refused.
    #[arg(long, env = "MESH_CONCURRENCY_LIMIT", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub concurrency_limit: u32,

    /// HTTP/2 streams one client connection may have open at once.
    #[arg(long, env = "MESH_MAX_CONCURRENT_STREAMS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_streams: u32,

    /// Largest response message sent, in bytes.
    #[arg(long, env = "MESH_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES,
          value_parser = parse_max_request_bytes)]
    pub max_response_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            grace_period: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(600),
            max_connection_age_grace: Duration::from_secs(60),
            concurrency_limit: 512,
            max_concurrent_streams: 1000,
            max_response_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

fn parse_max_request_bytes(s: &str) -> Result<usize, String> {
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

/// Parses a duration such as `250ms`, `10s`, `2m` or `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try `10s` or `500ms`)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{s}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations parse in every unit; nonsense is refused with a message naming it.
    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").unwrap_err().contains("ten"));
        assert!(parse_duration("5d").unwrap_err().contains("`d`"));
        assert!(parse_duration("").is_err());
    }

    /// The request limit must be a positive 32-bit size.
    #[test]
    fn max_request_bytes_is_bounded() {
        assert_eq!(parse_max_request_bytes("1024"), Ok(1024));
        assert!(parse_max_request_bytes("0").is_err());
        assert!(parse_max_request_bytes("-1").is_err());
        assert!(parse_max_request_bytes("99999999999").is_err());
    }
}

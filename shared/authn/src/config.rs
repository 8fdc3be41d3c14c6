//! Where a server finds auth and what its tokens must say: flags with environment-variable
//! fallbacks, shared by every server that verifies bearer tokens.

use std::time::Duration;

use http::Uri;
use tonic::transport::Channel;

use crate::JwksCache;

/// Auth's default address, as `mesh up` runs it.
pub const DEFAULT_AUTH_URL: &str = "http://127.0.0.1:50052";

/// How a server reaches auth and which tokens it accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthnConfig {
    /// The auth service's URL (`http://host:port`), for its signing keys (`GetJwks`).
    #[arg(long = "auth-url", env = "MESH_AUTH_URL", default_value = DEFAULT_AUTH_URL,
          value_parser = parse_url)]
    pub auth_url: Uri,

    /// The `iss` claim accepted tokens must carry.
    #[arg(
        long = "token-issuer",
        env = "MESH_TOKEN_ISSUER",
        default_value = "mesh-auth"
    )]
    pub issuer: String,

    /// The `aud` claim accepted tokens must carry.
    #[arg(
        long = "token-audience",
        env = "MESH_TOKEN_AUDIENCE",
        default_value = "mesh"
    )]
    pub audience: String,

    /// Clock skew allowed on the `exp` and `nbf` of accepted tokens.
    #[arg(long = "token-leeway", env = "MESH_TOKEN_LEEWAY", default_value = "30s",
          value_parser = mesh_runtime::parse_duration)]
    pub leeway: Duration,
}

/// Accepts `http://host:port` URLs (plaintext HTTP/2 inside the cluster; the mesh is built
/// without TLS).
pub fn parse_url(raw: &str) -> Result<Uri, String> {
    let uri: Uri = raw
        .parse()
        .map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(uri),
        _ => Err(format!("`{raw}` is not an http:// URL with a host")),
    }
}

impl AuthnConfig {
    /// Auth at `auth_url`, with the default issuer and audience.
    pub fn new(auth_url: Uri) -> Self {
        Self {
            auth_url,
            issuer: "mesh-auth".to_owned(),
            audience: "mesh".to_owned(),
            leeway: Duration::from_secs(30),
        }
    }

    /// A long-lived channel to auth: balanced over every address its host name resolves to
    /// (see [`crate::balance`]), connected on first use, reconnecting on its own.
    pub fn channel(&self) -> Channel {
        crate::balance::balanced_channel(&self.auth_url)
    }

    /// A key cache for this configuration, on a fresh [`AuthnConfig::channel`].
    pub fn jwks_cache(&self) -> JwksCache {
        JwksCache::new(self.channel(), self.issuer.clone(), self.audience.clone())
            .with_leeway(self.leeway)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only http(s) URLs with a host are accepted, with a message naming the value.
    #[test]
    fn urls() {
        assert!(parse_url("http://127.0.0.1:50052").is_ok());
        assert!(parse_url("http://auth.mesh.svc.cluster.local:50052").is_ok());
        for bad in [
            "127.0.0.1:50052",
            "https://auth:50052",
            "ftp://x",
            "http://",
            "not a url",
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }
}

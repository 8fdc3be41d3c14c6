//! Where a server finds auth and what its tokens must say: flags with environment-variable
//! fallbacks, shared by every server that verifies bearer tokens.

use std::time::Duration;

use http::Uri;
use mesh_runtime::{
    ClientTlsConfig,
    client::{ChannelError, Traced},
    tls::ClientTls,
};

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
    #[arg(long = "token-issuer", env = "MESH_TOKEN_ISSUER",
          default_value = mesh_token::DEFAULT_ISSUER)]
    pub issuer: String,

    /// The `aud` claim accepted tokens must carry.
    #[arg(long = "token-audience", env = "MESH_TOKEN_AUDIENCE",
          default_value = mesh_token::DEFAULT_AUDIENCE)]
    pub audience: String,

    /// Clock skew allowed on the `exp`, `nbf` and `iat` of accepted tokens (the default is
    /// [`mesh_token::DEFAULT_LEEWAY_SECS`]; a test checks they agree).
    #[arg(long = "token-leeway", env = "MESH_TOKEN_LEEWAY", default_value = "30s",
          value_parser = mesh_runtime::parse_duration)]
    pub leeway: Duration,

    /// The longest lifetime (`exp` − `iat`) an accepted token may have: at least auth's
    /// `--access-token-ttl`. Tokens claiming more are refused, however well signed.
    #[arg(long = "token-max-lifetime", env = "MESH_TOKEN_MAX_LIFETIME", default_value = "1h",
          value_parser = mesh_runtime::parse_duration)]
    pub max_lifetime: Duration,

    /// How this service reaches the services it calls over TLS (`https://` URLs).
    #[command(flatten)]
    pub tls: ClientTlsConfig,
}

/// Accepts `http://host:port` (plaintext HTTP/2) and `https://host:port` (TLS, verified with
/// `--tls-ca`) URLs.
pub fn parse_url(raw: &str) -> Result<Uri, String> {
    let uri: Uri = raw
        .parse()
        .map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!(
            "`{raw}` is not an http:// or https:// URL with a host"
        )),
    }
}

impl Default for AuthnConfig {
    fn default() -> Self {
        mesh_runtime::cli::defaults()
    }
}

impl AuthnConfig {
    /// Auth at `auth_url`, every other setting its default.
    pub fn new(auth_url: Uri) -> Self {
        Self {
            auth_url,
            ..Self::default()
        }
    }

    /// A long-lived traced channel to auth: balanced over every address its host name
    /// resolves to (see [`mesh_runtime::client`]), connected on first use, reconnecting on
    /// its own.
    pub fn channel(&self, tls: &ClientTls) -> Result<Traced, ChannelError> {
        mesh_runtime::client::traced_channel(&self.auth_url, tls)
    }

    /// A key cache for this configuration, on a fresh [`AuthnConfig::channel`] (`tls` is
    /// [`AuthnConfig::tls`], loaded).
    pub fn jwks_cache(&self, tls: &ClientTls) -> Result<JwksCache, ChannelError> {
        Ok(JwksCache::new(
            self.channel(tls)?,
            self.issuer.clone(),
            self.audience.clone(),
        )
        .with_leeway(self.leeway)
        .with_max_lifetime(self.max_lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag defaults are the token crate's.
    #[test]
    fn defaults_match_the_token_crate() {
        let config = AuthnConfig::default();
        assert_eq!(config.auth_url.to_string(), format!("{DEFAULT_AUTH_URL}/"));
        assert_eq!(config.issuer, mesh_token::DEFAULT_ISSUER);
        assert_eq!(config.audience, mesh_token::DEFAULT_AUDIENCE);
        assert_eq!(
            config.leeway.as_secs(),
            u64::try_from(mesh_token::DEFAULT_LEEWAY_SECS).expect("positive")
        );
        assert_eq!(
            config.max_lifetime.as_secs(),
            u64::try_from(mesh_token::DEFAULT_MAX_LIFETIME_SECS).expect("positive")
        );
    }

    /// Only http(s) URLs with a host are accepted, with a message naming the value.
    #[test]
    fn urls() {
        assert!(parse_url("http://127.0.0.1:50052").is_ok());
        assert!(parse_url("http://auth.mesh.svc.cluster.local:50052").is_ok());
        assert!(parse_url("https://auth:50052").is_ok());
        for bad in [
            "127.0.0.1:50052",
            "grpc://auth:50052",
            "ftp://x",
            "http://",
            "not a url",
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }
}

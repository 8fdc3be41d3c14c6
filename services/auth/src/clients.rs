//! Service clients (OAuth2-style client credentials) from configuration.
//!
//! Secrets are configured as SHA-256 digests (`sha256:<hex>`), so the configuration holds
//! nothing that would let its reader call as the client; `plain:<secret>` is accepted for
//! development and logged as a warning. Secrets are compared in constant time.

use std::{fmt, str::FromStr};

use sha2::{Digest as _, Sha256};

/// One configured client: `client_id=sha256:<hex>` or `client_id=plain:<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceClientSpec {
    client_id: String,
    secret_sha256: [u8; 32],
    plain: bool,
}

impl fmt::Debug for ServiceClientSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The digest is not secret, but there is no reason to print it.
        f.debug_struct("ServiceClientSpec")
            .field("client_id", &self.client_id)
            .field("plain", &self.plain)
            .finish_non_exhaustive()
    }
}

impl FromStr for ServiceClientSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (client_id, secret) = s
            .split_once('=')
            .ok_or("a service client is `client_id=sha256:<hex>` or `client_id=plain:<secret>`")?;
        let client_id = client_id.trim();
        if client_id.is_empty() || client_id.contains(char::is_whitespace) {
            return Err(format!("invalid service client id `{client_id}`"));
        }
        let (secret_sha256, plain) = if let Some(hex) = secret.strip_prefix("sha256:") {
            (
                parse_hex32(hex).ok_or_else(|| {
                    format!("the secret digest of `{client_id}` is not 64 hex digits")
                })?,
                false,
            )
        } else if let Some(plain) = secret.strip_prefix("plain:") {
            if plain.is_empty() {
                return Err(format!("the secret of `{client_id}` is empty"));
            }
            (Sha256::digest(plain.as_bytes()).into(), true)
        } else {
            return Err(format!(
                "the secret of `{client_id}` must start with `sha256:` or `plain:`"
            ));
        };
        Ok(Self {
            client_id: client_id.to_owned(),
            secret_sha256,
            plain,
        })
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The configured service clients.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceClients {
    clients: Vec<ServiceClientSpec>,
}

impl ServiceClients {
    pub(crate) fn new(clients: Vec<ServiceClientSpec>) -> Self {
        for client in clients.iter().filter(|c| c.plain) {
            tracing::warn!(
                client_id = %client.client_id,
                "service client secret configured in plain text; use sha256:<hex> outside development"
            );
        }
        Self { clients }
    }

    /// Whether `secret` is the secret of `client_id`. Takes the same time whether the client
    /// exists or not.
    pub(crate) fn verify(&self, client_id: &str, secret: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = false;
        for client in &self.clients {
            let same_id = client.client_id == client_id;
            let same_secret = constant_time_eq(&client.secret_sha256, &presented);
            found |= same_id & same_secret;
        }
        found
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms parse; a client verifies only with its own secret.
    #[test]
    fn specs_parse_and_verify() {
        let hex: String = Sha256::digest(b"s3cret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let digest = format!("sha256:{hex}");
        let hashed: ServiceClientSpec = format!("aggregator={digest}").parse().expect("hashed");
        let plain: ServiceClientSpec = "dev=plain:letmein".parse().expect("plain");
        assert!(plain.plain && !hashed.plain);
        let clients = ServiceClients::new(vec![hashed, plain]);
        assert!(clients.verify("aggregator", "s3cret"));
        assert!(clients.verify("dev", "letmein"));
        assert!(!clients.verify("aggregator", "letmein"));
        assert!(!clients.verify("dev", "s3cret"));
        assert!(!clients.verify("nobody", "s3cret"));
        assert!(!clients.verify("aggregator", ""));
    }

    /// Malformed specs are refused with a message that names the problem.
    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "no-equals",
            "=plain:x",
            "a=plain:",
            "a=sha256:abc",
            "a=secret",
            "a b=plain:x",
        ] {
            assert!(bad.parse::<ServiceClientSpec>().is_err(), "{bad}");
        }
    }

    /// Debug output never shows the secret digest.
    #[test]
    fn debug_hides_digest() {
        let spec: ServiceClientSpec = "dev=plain:letmein".parse().expect("plain");
        let shown = format!("{spec:?}");
        assert!(
            shown.contains("dev") && !shown.contains("letmein"),
            "{shown}"
        );
    }
}

//! The mesh's access tokens: JSON Web Tokens signed with Ed25519 (`alg: EdDSA`).
//!
//! auth signs with a [`KeyRing`] (one or more PKCS#8 keys; the newest signs, all are published)
//! and publishes the public keys as a [`Jwks`]. users and the aggregator verify locally with a
//! [`Verifier`] built from that JWKS: no auth round trip per request.
//!
//! Verification is deliberately narrow: `EdDSA` is the only algorithm (so `alg: none` and the
//! HS256-with-the-public-key confusion cannot work), the header must name a known `kid`, the
//! signature is checked with `verify_strict`, and `iss`, `aud`, `exp` and `nbf` are checked with
//! a small leeway. Every failure is a [`TokenError`], never a panic, whatever the input.

mod jwks;
mod keys;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use serde::{Deserialize, Serialize};

pub use jwks::{Jwk, Jwks};
pub use keys::{KeyError, KeyRing};

/// The only signature algorithm the mesh signs with or accepts.
pub const ALGORITHM: &str = "EdDSA";

/// The longest token [`Verifier::verify`] looks at; real ones are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The `iss` auth signs with and verifiers expect unless configured otherwise.
pub const DEFAULT_ISSUER: &str = "mesh-auth";

/// The `aud` auth signs with and verifiers expect unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "mesh";

/// Clock skew allowed on `exp`, `nbf` and `iat` unless configured otherwise, in seconds.
pub const DEFAULT_LEEWAY_SECS: i64 = 30;

/// The prefix of a service token's subject: `service:<client_id>`.
pub const SERVICE_SUBJECT_PREFIX: &str = "service:";

/// The claims of a mesh access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer, `mesh-auth` by default.
    pub iss: String,
    /// Audience, `mesh`.
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// Subject: a user id, or `service:<client_id>`.
    pub sub: String,
    /// The user's e-mail; absent on service tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The session id; absent on service tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not valid before (Unix seconds).
    pub nbf: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
}

impl Claims {
    /// Whether this is a service's token (`sub` = `service:<client_id>`).
    pub fn is_service(&self) -> bool {
        self.sub.starts_with(SERVICE_SUBJECT_PREFIX)
    }
}

/// `aud` may be one string or an array of strings (RFC 7519 §4.1.3).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Why a token was refused. Callers answer all of them with `UNAUTHENTICATED`; the variants
/// exist for logs and for [`TokenError::UnknownKey`], which tells a JWKS cache to refetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON, or too long.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than `EdDSA`.
    #[error("algorithm `{0}` is not accepted")]
    Algorithm(String),
    /// The header has no `kid`.
    #[error("token has no key id")]
    MissingKeyId,
    /// The `kid` is not among the known keys.
    #[error("unknown signing key `{0}`")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future: no honest issuer signs tokens it has not issued yet.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `exp` is further from `iat` than any token this verifier accepts may live (or before
    /// it).
    #[error("token lifetime out of bounds")]
    Lifetime,
    /// `iss` is not the expected issuer.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` does not contain the expected audience.
    #[error("wrong audience")]
    Audience,
}

/// Signs `claims` with `key`, naming `kid` in the header.
pub(crate) fn sign(key: &ed25519_dalek::SigningKey, kid: &str, claims: &Claims) -> String {
    let header = Header {
        alg: ALGORITHM.to_owned(),
        kid: Some(kid.to_owned()),
        typ: Some("JWT".to_owned()),
    };
    // Serializing plain structs of strings and integers cannot fail.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let payload = serde_json::to_vec(claims).unwrap_or_default();
    let signing_input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(signature.to_bytes()))
}

/// The longest lifetime (`exp` − `iat`) a [`Verifier`] accepts unless told otherwise: an
/// hour, four times auth's default access-token lifetime.
pub const DEFAULT_MAX_LIFETIME_SECS: i64 = 3600;

/// Verifies tokens against a fixed set of public keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<(String, VerifyingKey)>,
    issuer: String,
    audience: String,
    leeway_secs: i64,
    max_lifetime_secs: i64,
}

impl Verifier {
    /// A verifier for the keys of `jwks`, accepting tokens from `issuer` for `audience`, with
    /// `leeway_secs` of clock skew allowed on `exp` and `nbf`.
    pub fn new(
        jwks: &Jwks,
        issuer: impl Into<String>,
        audience: impl Into<String>,
        leeway_secs: i64,
    ) -> Result<Self, KeyError> {
        Ok(Self {
            keys: jwks.verifying_keys()?,
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_secs,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        })
    }

    /// The same verifier accepting lifetimes (`exp` − `iat`) of at most `seconds`.
    pub fn with_max_lifetime(mut self, seconds: i64) -> Self {
        self.max_lifetime_secs = seconds;
        self
    }

    /// Whether a key with this id is known.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|(k, _)| k == kid)
    }

    /// Verifies `token` at `now` (Unix seconds) and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = decode_json(header_b64)?;
        if header.alg != ALGORITHM {
            return Err(TokenError::Algorithm(header.alg));
        }
        let kid = header.kid.ok_or(TokenError::MissingKeyId)?;
        let key = self
            .keys
            .iter()
            .find(|(k, _)| *k == kid)
            .map(|(_, key)| key)
            .ok_or(TokenError::UnknownKey(kid))?;
        let signature = B64
            .decode(signature_b64)
            .map_err(|_| TokenError::Malformed)?;
        let signature = Signature::from_slice(&signature).map_err(|_| TokenError::Signature)?;
        let signing_input_len = header_b64.len() + 1 + payload_b64.len();
        key.verify_strict(&token.as_bytes()[..signing_input_len], &signature)
            .map_err(|_| TokenError::Signature)?;

        let claims: Claims = decode_json(payload_b64)?;
        if claims.iss != self.issuer {
            return Err(TokenError::Issuer);
        }
        if !claims.aud.contains(&self.audience) {
            return Err(TokenError::Audience);
        }
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if !(0..=self.max_lifetime_secs).contains(&lifetime) {
            return Err(TokenError::Lifetime);
        }
        self.check_time(&claims, now)?;
        Ok(claims)
    }

    /// Whether `claims` (already verified) are in force at `now`: `exp` not passed, `nbf`
    /// reached and `iat` not in the future, with the leeway. Callers that keep verified claims
    /// re-check this.
    pub fn check_time(&self, claims: &Claims, now: i64) -> Result<(), TokenError> {
        if now >= claims.exp.saturating_add(self.leeway_secs) {
            return Err(TokenError::Expired);
        }
        if now.saturating_add(self.leeway_secs) < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        if now.saturating_add(self.leeway_secs) < claims.iat {
            return Err(TokenError::IssuedInFuture);
        }
        Ok(())
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// The token of an `authorization` header value `Bearer <token>` (the scheme in any case,
/// surrounding spaces trimmed); `None` for any other scheme or an empty token. The one parser
/// of the mesh's bearer headers.
pub fn parse_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `kid` named in a token's header, without verifying anything (for logs and for deciding
/// whether to refetch keys).
pub fn peek_kid(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let header: Header = decode_json(token.split('.').next()?).ok()?;
    header.kid
}

#[cfg(test)]
mod tests;

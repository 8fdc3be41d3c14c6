//! JSON Web Key Sets (RFC 7517) of Ed25519 public keys (RFC 8037).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{ALGORITHM, KeyError};

/// One public verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key id: the key's RFC 7638 thumbprint, so the same key always has the same id.
    pub kid: String,
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    /// Always `EdDSA`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

impl Jwk {
    /// The JWK of `key`.
    pub fn from_verifying_key(key: &VerifyingKey) -> Self {
        let x = B64.encode(key.to_bytes());
        // RFC 7638: the required members in lexicographic order, no white space.
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = B64.encode(Sha256::digest(canonical.as_bytes()));
        Self {
            kid,
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x,
            alg: ALGORITHM.to_owned(),
            use_: "sig".to_owned(),
        }
    }

    /// The public key, if this JWK is a valid Ed25519 signing key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        let bad = || KeyError::BadJwk {
            kid: self.kid.clone(),
        };
        if self.kty != "OKP" || self.crv != "Ed25519" || self.alg != ALGORITHM {
            return Err(bad());
        }
        let bytes: [u8; 32] = B64
            .decode(&self.x)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| bad())
    }
}

/// A set of public keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The RFC 7517 JWK Set document.
    pub fn to_json(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a JWK Set document.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Every key with its id; fails on the first key that is not a valid Ed25519 key.
    pub fn verifying_keys(&self) -> Result<Vec<(String, VerifyingKey)>, KeyError> {
        self.keys
            .iter()
            .map(|jwk| Ok((jwk.kid.clone(), jwk.verifying_key()?)))
            .collect()
    }
}

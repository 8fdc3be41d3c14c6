//! Signing keys: loaded from PKCS#8 PEM, or a development key generated once and kept.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use ed25519_dalek::{
    SigningKey,
    pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, spki::der::pem::LineEnding},
};

use crate::{Claims, Jwk, Jwks};

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("cannot access key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not an Ed25519 PKCS#8 PEM private key.
    #[error("{path} is not an Ed25519 PKCS#8 PEM private key")]
    NotEd25519 {
        /// The file.
        path: PathBuf,
    },
    /// No key was given.
    #[error("no signing key")]
    Empty,
    /// A JWK is not an Ed25519 public key.
    #[error("JWK `{kid}` is not a valid Ed25519 public key")]
    BadJwk {
        /// Its key id.
        kid: String,
    },
    /// The operating system's random source failed.
    #[error("cannot generate a key: no randomness")]
    Random,
}

/// The keys auth signs with. The newest (the last one loaded) signs; all are published, so
/// tokens signed by an older key stay valid after a rotation until they expire.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<(String, SigningKey)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: private keys never print.
        let kids: Vec<_> = self.keys.iter().map(|(kid, _)| kid.as_str()).collect();
        f.debug_struct("KeyRing").field("kids", &kids).finish()
    }
}

impl KeyRing {
    /// A ring of the given keys, oldest first; the last one signs.
    pub fn new(keys: Vec<SigningKey>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self {
            keys: keys
                .into_iter()
                .map(|key| (Jwk::from_verifying_key(&key.verifying_key()).kid, key))
                .collect(),
        })
    }

    /// Loads PKCS#8 PEM private keys from `paths`, oldest first; the last one signs.
    pub fn load_pem_files(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let keys = paths
            .iter()
            .map(|path| {
                let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
                    path: path.clone(),
                    source,
                })?;
                SigningKey::from_pkcs8_pem(&pem)
                    .map_err(|_| KeyError::NotEd25519 { path: path.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keys)
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|_| KeyError::Random)?;
        Self::new(vec![SigningKey::from_bytes(&secret)])
    }

    /// The development key kept at `path`: loaded if the file exists, otherwise generated and
    /// written there (readable by the owner only). Returns whether it was created.
    pub fn load_or_create_dev_key(path: &Path) -> Result<(Self, bool), KeyError> {
        if path.exists() {
            return Ok((Self::load_pem_files(&[path.to_owned()])?, false));
        }
        let ring = Self::generate()?;
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let pem =
            ring.signing()
                .1
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|_| KeyError::NotEd25519 {
                    path: path.to_owned(),
                })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?
        };
        file.write_all(pem.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok((ring, true))
    }

    /// The key id and key that sign new tokens.
    fn signing(&self) -> &(String, SigningKey) {
        // `new` refuses an empty ring.
        &self.keys[self.keys.len() - 1]
    }

    /// The id of the key that signs new tokens.
    pub fn signing_kid(&self) -> &str {
        &self.signing().0
    }

    /// Signs `claims` with the newest key.
    pub fn sign(&self, claims: &Claims) -> String {
        let (kid, key) = self.signing();
        crate::sign(key, kid, claims)
    }

    /// Every public key, for publication.
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self
                .keys
                .iter()
                .map(|(_, key)| Jwk::from_verifying_key(&key.verifying_key()))
                .collect(),
        }
    }
}

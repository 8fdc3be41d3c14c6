//! TLS for mesh servers and clients: rustls with the ring provider, the stack tonic's
//! `tls-ring` feature already builds (one TLS stack in the tree).
//!
//! **Servers.** tonic's `ServerTlsConfig` builds its acceptor once, from certificate bytes
//! given at start-up: a certificate renewed on disk (Kubernetes updates a mounted Secret in
//! place, cert-manager renews before expiry) would need a restart, and the client CA bundle
//! could not change either. So the mesh terminates TLS itself, in its accept loop
//! ([`crate::conn`]), with tokio-rustls: [`ServerTls`] holds the current rustls configuration
//! and [`ServerTls::watch`] rebuilds it when the certificate, key or client CA files change.
//! New connections get the new certificate; established ones carry on with theirs. A file that
//! no longer parses leaves the last good configuration in place (and says so at WARN).
//!
//! TLS 1.2 and 1.3 with rustls' default cipher suites, ALPN `h2` only (and `http/1.1` on a
//! server that serves browsers). With a client CA
//! ([`ServerTlsFiles::client_ca`]) every client must present a certificate that chains to it
//! (mutual TLS); a client whose certificate is missing, expired or from another CA fails the
//! handshake, and the server goes on serving the others.
//!
//! **Clients.** [`ClientTls`] is the CA a client verifies servers with and the identity it
//! presents, applied to tonic's endpoints (`https://` URLs) by [`crate::client`]. Client files
//! are read when a service starts.

#[cfg(feature = "dev-certs")]
pub mod dev;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use secrecy::{ExposeSecret as _, SecretSlice};
use sha2::{Digest as _, Sha256};
use tokio_rustls::TlsAcceptor;

/// How often [`ServerTls::watch`] looks at the files.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// How often unusable TLS files are reported while they stay unusable.
const TLS_WARN_EVERY: Duration = Duration::from_secs(300);

/// The ALPN protocol every mesh server and client speaks.
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol a server that serves browsers also offers, after `h2`.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// Where a server's certificate, key and (for mutual TLS) client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates client certificates must chain to; `None`: no client certificate
    /// is asked for.
    pub client_ca: Option<PathBuf>,
    /// Offer ALPN `http/1.1` after `h2`, for a server that serves browsers over gRPC-Web
    /// (a client that can only speak HTTP/1.1 would otherwise be refused at the handshake).
    pub accept_http1: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no CERTIFICATE in it".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("no private key in it: {e}"),
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files' bytes, read once per look.
struct Material {
    cert: Vec<u8>,
    key: SecretSlice<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read(&files.cert)?,
            key: read(&files.key)?.into(),
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
        })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [
            self.cert.as_slice(),
            self.key.expose_secret(),
            self.client_ca.as_deref().unwrap_or_default(),
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    fn config(&self, files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match (&self.client_ca, &files.client_ca) {
            (Some(pem), Some(path)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(path, pem)?),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                certificates(&files.cert, &self.cert)?,
                private_key(&files.key, self.key.expose_secret())?,
            )
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        if files.accept_http1 {
            config.alpn_protocols.push(ALPN_HTTP1.to_vec());
        }
        Ok(Arc::new(config))
    }
}

struct Current {
    config: Arc<ServerConfig>,
    fingerprint: [u8; 32],
}

/// A server's TLS configuration, swapped when its files change.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<ServerTlsFiles>,
    current: Arc<RwLock<Current>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let material = Material::read(&files)?;
        let config = material.config(&files)?;
        Ok(Self {
            current: Arc::new(RwLock::new(Current {
                config,
                fingerprint: material.fingerprint(),
            })),
            files: Arc::new(files),
        })
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TlsAcceptor::from(current.config.clone())
    }

    /// Reads the files again; when they changed and still make a configuration, new
    /// connections use it. Returns whether the configuration changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let material = Material::read(&self.files)?;
        let fingerprint = material.fingerprint();
        {
            let current = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.fingerprint == fingerprint {
                return Ok(false);
            }
        }
        let config = material.config(&self.files)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Current {
            config,
            fingerprint,
        };
        Ok(true)
    }

    /// Looks at the files every `every` for as long as it runs (the server aborts it when it
    /// stops).
    pub async fn watch(self, every: Duration) {
        // When the files were last found unusable and said so.
        let mut warned: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(every).await;
            let this = self.clone();
            let reloaded = tokio::task::spawn_blocking(move || this.reload())
                .await
                .unwrap_or(Ok(false));
            match reloaded {
                Ok(true) => {
                    warned = None;
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Ok(false) => warned = None,
                // A file half-written, or a renewal gone wrong: keep serving with what worked,
                // and say so again every few minutes while it lasts.
                Err(err) => {
                    if warned.is_none_or(|at| at.elapsed() >= TLS_WARN_EVERY) {
                        tracing::warn!(error = %err, "TLS files cannot be used; keeping the previous certificate");
                        warned = Some(std::time::Instant::now());
                    }
                }
            }
        }
    }
}

/// What a mesh client verifies servers with and presents as itself, re-read from its files
/// when they change (at most every [`TLS_RELOAD_INTERVAL`], when a channel asks): channels
/// made with it give new connections the new certificate and CA (see [`crate::client`]);
/// established connections carry on.
#[derive(Clone, Default)]
pub struct ClientTls {
    files: Option<Arc<ClientTlsFiles>>,
    current: Arc<RwLock<ClientCurrent>>,
}

#[derive(Debug, Clone, Default)]
struct ClientTlsFiles {
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Default)]
struct ClientCurrent {
    material: ClientMaterial,
    rustls: Option<Arc<rustls::ClientConfig>>,
    fingerprint: [u8; 32],
    generation: u64,
    checked: Option<std::time::Instant>,
    failing: bool,
}

#[derive(Clone, Default)]
struct ClientMaterial {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, SecretSlice<u8>)>,
}

impl ClientMaterial {
    /// rustls' client configuration for this material (`None` without a CA).
    fn rustls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(Path::new("the CA bundle"), ca)?);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    certificates(Path::new("the client certificate"), cert)?,
                    private_key(Path::new("the client key"), key.expose_secret())?,
                )
                .map_err(|e| TlsError::Config(e.to_string()))?,
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Some(Arc::new(config)))
    }

    fn read(files: &ClientTlsFiles) -> Result<Self, TlsError> {
        let ca = files
            .ca
            .as_deref()
            .map(|path| {
                let pem = read(path)?;
                roots(path, &pem)?;
                Ok::<_, TlsError>(pem)
            })
            .transpose()?;
        let identity = files
            .identity
            .as_ref()
            .map(|(cert, key)| {
                let cert_pem = read(cert)?;
                let certs = certificates(cert, &cert_pem)?;
                let key_pem = read(key)?;
                let key_der = private_key(key, &key_pem)?;
                // A certificate and key from two different renewals: refuse, keep the last.
                rustls::crypto::ring::sign::any_supported_type(&key_der)
                    .map_err(|e| TlsError::Config(e.to_string()))
                    .and_then(|signer| {
                        rustls::sign::CertifiedKey::new(certs, signer)
                            .keys_match()
                            .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))
                    })?;
                Ok::<_, TlsError>((cert_pem, key_pem.into()))
            })
            .transpose()?;
        Ok(Self { ca, identity })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        let (cert, key) = self.identity.as_ref().map_or((&[][..], &[][..]), |(c, k)| {
            (c.as_slice(), k.expose_secret())
        });
        for part in [self.ca.as_deref().unwrap_or_default(), cert, key] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads and checks the CA bundle servers must chain to and, for mutual TLS, the client
    /// certificate chain and key.
    pub fn load(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert.to_owned(), key.to_owned())),
            (None, None) => None,
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ));
            }
        };
        let files = ClientTlsFiles {
            ca: ca.map(Path::to_owned),
            identity,
        };
        let material = ClientMaterial::read(&files)?;
        Ok(Self {
            current: Arc::new(RwLock::new(ClientCurrent {
                fingerprint: material.fingerprint(),
                rustls: material.rustls()?,
                material,
                generation: 0,
                checked: Some(std::time::Instant::now()),
                failing: false,
            })),
            files: Some(Arc::new(files)),
        })
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, ClientCurrent> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a CA is configured (`https://` URLs need one).
    pub fn has_ca(&self) -> bool {
        self.current().material.ca.is_some()
    }

    /// Counts the changes taken from the files: a channel whose endpoints were made at an
    /// older generation makes them again.
    pub fn generation(&self) -> u64 {
        self.current().generation
    }

    /// Reads the files again if the last look is [`TLS_RELOAD_INTERVAL`] old; takes what they
    /// hold when it changed and is usable (a half-renewed pair is not). Returns the generation.
    pub fn refresh(&self) -> u64 {
        let Some(files) = &self.files else {
            return 0;
        };
        {
            let current = self.current();
            if current
                .checked
                .is_some_and(|at| at.elapsed() < TLS_RELOAD_INTERVAL)
            {
                return current.generation;
            }
        }
        let read =
            ClientMaterial::read(files).and_then(|material| Ok((material.rustls()?, material)));
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.checked = Some(std::time::Instant::now());
        match read {
            Ok((rustls, material)) => {
                current.failing = false;
                let fingerprint = material.fingerprint();
                if fingerprint != current.fingerprint {
                    current.rustls = rustls;
                    current.material = material;
                    current.fingerprint = fingerprint;
                    current.generation += 1;
                    tracing::info!("client TLS certificate or CA reloaded");
                }
            }
            Err(err) => {
                if !current.failing {
                    tracing::warn!(error = %err, "client TLS files changed but cannot be used; keeping the previous ones");
                }
                current.failing = true;
            }
        }
        current.generation
    }

    /// rustls' client configuration as the files stand now (after [`ClientTls::refresh`]);
    /// `None` without a CA.
    pub fn rustls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.refresh();
        self.current().rustls.clone()
    }

    /// tonic's client TLS settings for a server named `domain`, from the current material.
    pub fn tonic_config(&self, domain: &str) -> tonic::transport::ClientTlsConfig {
        let current = self.current();
        let mut config = tonic::transport::ClientTlsConfig::new()
            .domain_name(domain)
            // The whole handshake, not only the TCP connect.
            .timeout(Duration::from_secs(5));
        if let Some(ca) = &current.material.ca {
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &current.material.identity {
            config = config.identity(tonic::transport::Identity::from_pem(
                cert,
                key.expose_secret(),
            ));
        }
        config
    }
}

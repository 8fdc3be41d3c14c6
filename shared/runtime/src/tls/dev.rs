//! Development certificates (feature `dev-certs`): a throw-away CA and its leaf certificates,
//! made with rcgen, for `mesh up --tls` and for tests. Nothing here is for production, where
//! certificates come from the cluster's issuer (see `deploy/`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};

use super::TlsError;

fn rcgen_error(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("cannot make a certificate: {e}"))
}

fn at(time: SystemTime) -> time::OffsetDateTime {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| TlsError::Config(format!("no randomness for a serial number: {e}")))?;
    // Positive as a DER integer.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "mesh development");
    name.push(DnType::CommonName, common_name);
    name
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
    /// The certificate, DER-encoded.
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

/// A development certificate authority.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA (ECDSA P-256), valid from an hour ago for 30 days.
    pub fn new(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = at(now - Duration::from_secs(3600));
        params.not_after = at(now + Duration::from_secs(30 * 86_400));
        params.serial_number = Some(serial()?);
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf certificate for `names` (DNS names or IP addresses; the first is its common
    /// name), for both server and client use, valid from an hour ago for 30 days.
    pub fn issue(&self, names: &[&str]) -> Result<Pem, TlsError> {
        let now = SystemTime::now();
        self.issue_valid(
            names,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(30 * 86_400),
        )
    }

    /// [`DevCa::issue`] valid from `not_before` to `not_after` (an expired one for tests).
    pub fn issue_valid(
        &self,
        names: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Pem, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .map_err(rcgen_error)?;
        params.distinguished_name = named(names.first().copied().unwrap_or("mesh"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        params.serial_number = Some(serial()?);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rcgen_error)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}

/// The files of one service's development certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevFiles {
    /// Its certificate.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
}

/// Writes `pem` as `<dir>/<name>.pem` and `<dir>/<name>-key.pem` (the key readable by its
/// owner only).
pub fn write(dir: &Path, name: &str, pem: &Pem) -> Result<DevFiles, TlsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Read { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = DevFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    write_private(&files.key, pem.key.as_bytes()).map_err(io(&files.key))?;
    std::fs::write(&files.cert, &pem.cert).map_err(io(&files.cert))?;
    Ok(files)
}

/// Writes `bytes` to `path` readable by its owner only, replacing it whole (a reader never
/// sees half a file).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    // A leftover from an earlier run may have other permissions: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

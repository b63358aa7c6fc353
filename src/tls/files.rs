//! Reading PEM certificate, private key and CA files, and checking them:
//! readable, PEM, the key matches the certificate, the certificate is valid
//! now. Config validation and the certificate reload both go through here,
//! so a file is judged the same way at start, on `sluice check` and when it
//! changes on disk.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// Which file of a certificate/key pair a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

/// A problem with a certificate, key or CA file; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct FileError {
    /// The file as it was opened.
    pub path: String,
    /// Which file of a pair it is (a CA file counts as `Cert`).
    pub part: Part,
    pub problem: String,
}

impl FileError {
    fn new(path: &Path, part: Part, problem: impl Into<String>) -> Self {
        FileError {
            path: path.display().to_string(),
            part,
            problem: problem.into(),
        }
    }
}

/// Reads a whole file; the error names it.
pub fn read(path: &Path, part: Part) -> Result<Arc<[u8]>, FileError> {
    std::fs::read(path)
        .map(Arc::from)
        .map_err(|e| FileError::new(path, part, format!("cannot read it: {e}")))
}

/// A certificate chain with its private key, checked, and the bytes of the
/// two files it came from.
#[derive(Clone)]
pub struct CertKey {
    pub certified: Arc<CertifiedKey>,
    /// The DNS names of the certificate's subjectAltName extension, lower
    /// case: exact names and `*.` wildcards (one label).
    pub names: Vec<String>,
    /// The leaf certificate's subject, for logs.
    pub subject: String,
    pub not_after: SystemTime,
    cert_pem: Arc<[u8]>,
    key_pem: Arc<[u8]>,
}

impl CertKey {
    /// Whether these are the bytes this was loaded from.
    pub fn is_from(&self, cert_pem: &[u8], key_pem: &[u8]) -> bool {
        *self.cert_pem == *cert_pem && *self.key_pem == *key_pem
    }
}

/// Equal when loaded from the same bytes.
impl PartialEq for CertKey {
    fn eq(&self, other: &Self) -> bool {
        self.is_from(&other.cert_pem, &other.key_pem)
    }
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("subject", &self.subject)
            .field("names", &self.names)
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

/// Reads and checks a certificate chain file and its private key file.
pub fn load_cert_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<CertKey, FileError> {
    let cert_pem = read(cert_path, Part::Cert)?;
    let key_pem = read(key_path, Part::Key)?;
    cert_key(cert_path, cert_pem, key_path, key_pem, provider, now)
}

/// Checks a certificate chain and its private key, given the files' bytes:
/// both PEM, the key usable by `provider` and matching the leaf
/// certificate, and the leaf valid at `now`.
pub fn cert_key(
    cert_path: &Path,
    cert_pem: Arc<[u8]>,
    key_path: &Path,
    key_pem: Arc<[u8]>,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<CertKey, FileError> {
    let chain = certificates(cert_path, &cert_pem, Part::Cert)?;
    let leaf = Leaf::parse(cert_path, &chain[0])?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(FileError::new(
                key_path,
                Part::Key,
                "no PEM private key in it (expected BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            ))
        }
        Err(e) => {
            return Err(FileError::new(
                key_path,
                Part::Key,
                format!("not a valid PEM private key ({e})"),
            ))
        }
    };
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| FileError::new(key_path, Part::Key, format!("unusable private key ({e})")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(FileError::new(
                key_path,
                Part::Key,
                format!(
                    "this private key does not match the certificate in {}",
                    cert_path.display()
                ),
            ))
        }
    }
    leaf.check_valid_at(cert_path, now)?;
    Ok(CertKey {
        certified: Arc::new(certified),
        names: leaf.names,
        subject: leaf.subject,
        not_after: leaf.not_after,
        cert_pem,
        key_pem,
    })
}

/// CA certificates read from one PEM file, as trust roots.
#[derive(Clone)]
pub struct CaCerts {
    pub roots: Arc<RootCertStore>,
    pem: Arc<[u8]>,
}

impl CaCerts {
    /// Whether these are the bytes this was loaded from.
    pub fn is_from(&self, pem: &[u8]) -> bool {
        *self.pem == *pem
    }
}

/// Equal when loaded from the same bytes.
impl PartialEq for CaCerts {
    fn eq(&self, other: &Self) -> bool {
        self.is_from(&other.pem)
    }
}

impl fmt::Debug for CaCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCerts")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// Reads a PEM file of CA certificates.
pub fn load_ca(path: &Path) -> Result<CaCerts, FileError> {
    let pem = read(path, Part::Cert)?;
    ca_certs(path, pem)
}

/// Checks a PEM file of CA certificates, given its bytes: every certificate
/// in it must be usable as a trust anchor.
pub fn ca_certs(path: &Path, pem: Arc<[u8]>) -> Result<CaCerts, FileError> {
    let certs = certificates(path, &pem, Part::Cert)?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            FileError::new(
                path,
                Part::Cert,
                format!("certificate {} is not a usable CA certificate ({e})", i + 1),
            )
        })?;
    }
    Ok(CaCerts {
        roots: Arc::new(roots),
        pem,
    })
}

/// The operating system's trust roots (`/etc/ssl/certs` on Debian, from
/// the `ca-certificates` package; `SSL_CERT_FILE` and `SSL_CERT_DIR`
/// override where they are read from). An error when none is found.
pub fn system_roots() -> Result<Arc<RootCertStore>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "no system CA certificates found{why}; install the ca-certificates package or set ca"
        ));
    }
    Ok(Arc::new(roots))
}

/// Every certificate in a PEM file; at least one.
fn certificates(
    path: &Path,
    pem: &[u8],
    part: Part,
) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileError::new(path, part, format!("not a valid PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(FileError::new(
            path,
            part,
            "no PEM certificate in it (expected BEGIN CERTIFICATE)",
        ));
    }
    Ok(certs)
}

/// What Sluice needs to know about a leaf certificate.
struct Leaf {
    names: Vec<String>,
    subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Leaf {
    fn parse(path: &Path, der: &CertificateDer<'_>) -> Result<Leaf, FileError> {
        let bad = |e: &dyn fmt::Display| {
            FileError::new(
                path,
                Part::Cert,
                format!("the first certificate cannot be parsed ({e})"),
            )
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(&e))?;
        let san = cert.subject_alternative_name().map_err(|e| bad(&e))?;
        let names = san
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    Some(dns.to_ascii_lowercase())
                }
                _ => None,
            })
            .filter(|name| is_certificate_name(name))
            .collect();
        let validity = cert.validity();
        Ok(Leaf {
            names,
            subject: cert.subject().to_string(),
            not_before: unix_time(validity.not_before.timestamp()),
            not_after: unix_time(validity.not_after.timestamp()),
        })
    }

    fn check_valid_at(&self, path: &Path, now: SystemTime) -> Result<(), FileError> {
        if now > self.not_after {
            return Err(FileError::new(
                path,
                Part::Cert,
                format!("the certificate expired on {}", rfc3339(self.not_after)),
            ));
        }
        if now < self.not_before {
            return Err(FileError::new(
                path,
                Part::Cert,
                format!(
                    "the certificate is not valid yet (not before {})",
                    rfc3339(self.not_before)
                ),
            ));
        }
        Ok(())
    }
}

/// A DNS name a certificate can be selected by: `a.example.com` or
/// `*.example.com` (a wildcard only as the whole first label).
fn is_certificate_name(name: &str) -> bool {
    let exact = name.strip_prefix("*.").unwrap_or(name);
    !exact.is_empty()
        && exact.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn unix_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
    }
}

/// `2026-01-01T00:00:00Z`, or the Unix seconds for a time before 1970.
pub fn rfc3339(t: SystemTime) -> String {
    if t < UNIX_EPOCH {
        return "before 1970".to_owned();
    }
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The file at `path`, relative to `base` (the config file's directory)
/// unless absolute.
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    base.join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_are_exact_or_a_whole_first_label_wildcard() {
        assert!(is_certificate_name("a.example.com"));
        assert!(is_certificate_name("*.example.com"));
        assert!(is_certificate_name("localhost"));
        assert!(!is_certificate_name("a*.example.com"));
        assert!(!is_certificate_name("*"));
        assert!(!is_certificate_name("a..b"));
        assert!(!is_certificate_name(""));
    }

    #[test]
    fn resolve_keeps_absolute_paths_and_joins_relative_ones() {
        assert_eq!(
            resolve(Path::new("/etc/sluice"), "certs/a.pem"),
            PathBuf::from("/etc/sluice/certs/a.pem")
        );
        assert_eq!(
            resolve(Path::new("/etc/sluice"), "/srv/a.pem"),
            PathBuf::from("/srv/a.pem")
        );
        assert_eq!(resolve(Path::new(""), "a.pem"), PathBuf::from("a.pem"));
    }
}

//! TLS termination for a listener: the certificate chosen by SNI, ALPN,
//! optional client certificates, and the reload of changed files.
//!
//! A listener's [`TlsAcceptor`] holds its rustls `ServerConfig` in an
//! `ArcSwap`: each handshake takes the config in use at that moment, so a
//! swap affects only handshakes that start after it and never an
//! established connection. [`TlsAcceptor::watch`] polls the certificate,
//! key and CA files and swaps in a config built from them when they change;
//! a change that does not load keeps the config in use.
//!
//! Certificate selection (HAProxy-style): every certificate answers to the
//! DNS names of its subjectAltName extension, exact (`api.example.com`) or
//! wildcard (`*.example.com`: exactly one more label, as in RFC 6125). An
//! exact name wins over a wildcard; among certificates with the same name
//! the first whose key the client can use (RSA or ECDSA, from the
//! ClientHello's signature schemes) wins. No SNI, or a name no certificate
//! has, gets the first certificate of the list.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::files::{self, CaCerts, CertKey, FileError, Part};
use crate::config::{Alpn, ListenerTlsConfig};
use crate::proxy::h1;

/// How often the certificate files are read to notice a change. A change
/// is loaded once it has stayed the same for one more interval, so a pair
/// written one file after the other is not caught half way.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Why a TLS server config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("no certificate")]
    NoCertificate,
    #[error("tls 1.2 and 1.3 are not available")]
    Versions(#[source] rustls::Error),
    #[error("client_ca cannot verify client certificates")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

/// Builds the rustls server config of a listener from checked certificates
/// (the first is the default), the ALPN protocols and the client CAs
/// (`(ca, required)`). TLS 1.2 and 1.3 with rustls's default cipher suites
/// and key exchanges. `sessions` keeps the session cache of a config being
/// replaced, so clients can still resume after a reload.
pub fn build_config(
    certificates: &[CertKey],
    alpn: &[Alpn],
    client_auth: Option<(&CaCerts, bool)>,
    sessions: Option<Arc<dyn StoresServerSessions>>,
) -> Result<ServerConfig, TlsSetupError> {
    let provider = super::provider();
    let resolver = SniResolver::new(certificates).ok_or(TlsSetupError::NoCertificate)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Versions)?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some((ca, required)) => {
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::clone(&ca.roots), provider);
            if !required {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(TlsSetupError::ClientVerifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn
        .iter()
        .map(|a| a.as_str().as_bytes().to_vec())
        .collect();
    if let Some(sessions) = sessions {
        config.session_storage = sessions;
    }
    Ok(config)
}

/// The certificate table: SNI name -> certificates, in file order.
#[derive(Debug)]
struct SniResolver {
    certificates: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, Vec<usize>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Vec<usize>>,
}

impl SniResolver {
    /// `None` without any certificate.
    fn new(certificates: &[CertKey]) -> Option<Self> {
        if certificates.is_empty() {
            return None;
        }
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, c) in certificates.iter().enumerate() {
            for name in &c.names {
                let (table, key) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut wildcard, rest),
                    None => (&mut exact, name.as_str()),
                };
                let entry = table.entry(key.to_owned()).or_default();
                if !entry.contains(&i) {
                    entry.push(i);
                }
            }
        }
        Some(SniResolver {
            certificates: certificates
                .iter()
                .map(|c| Arc::clone(&c.certified))
                .collect(),
            exact,
            wildcard,
        })
    }

    /// The certificates answering to `name` (lower case), best first.
    fn candidates(&self, name: &str) -> Option<&[usize]> {
        if let Some(found) = self.exact.get(name) {
            return Some(found);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(Vec::as_slice)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let candidates = hello.server_name().and_then(|name| {
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                self.candidates(&name.to_ascii_lowercase())
            } else {
                self.candidates(name)
            }
        });
        let Some(candidates) = candidates else {
            return self.certificates.first().cloned();
        };
        let schemes = hello.signature_schemes();
        let usable = candidates
            .iter()
            .find(|&&i| self.certificates[i].key.choose_scheme(schemes).is_some());
        usable
            .or(candidates.first())
            .and_then(|&i| self.certificates.get(i))
            .cloned()
    }
}

/// The TLS side of one listener.
pub struct TlsAcceptor {
    current: ArcSwap<ServerConfig>,
}

impl TlsAcceptor {
    /// Builds the acceptor from a validated listener config.
    pub fn from_config(tls: &ListenerTlsConfig) -> Result<Self, TlsSetupError> {
        let certificates: Vec<CertKey> =
            tls.certificates.iter().map(|c| c.loaded.clone()).collect();
        let client_auth = tls.client_auth.as_ref().map(|c| (&c.loaded, c.required));
        let config = build_config(&certificates, &tls.alpn, client_auth, None)?;
        Ok(TlsAcceptor {
            current: ArcSwap::from_pointee(config),
        })
    }

    /// Runs the TLS handshake on an accepted connection with the config in
    /// use now.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
            .accept(stream)
            .await
    }

    /// Polls the listener's certificate, key and CA files every
    /// [`CHECK_INTERVAL`] until `stop`, and swaps in a new config when they
    /// change. A change that does not load (unreadable, not PEM, key and
    /// certificate not matching, expired) is logged and counted in
    /// `failed`; the config in use stays, and the same broken files are not
    /// tried again until they change once more.
    pub async fn watch(
        self: Arc<Self>,
        tls: ListenerTlsConfig,
        listener: Arc<str>,
        reloaded: IntCounter,
        failed: IntCounter,
        stop: CancellationToken,
    ) {
        let files = Arc::new(WatchedFiles::of(&tls));
        let (reader, loaded) = (Arc::clone(&files), tls.clone());
        // A failed read task leaves nothing to compare with: the files then
        // count as changed and are loaded again.
        let mut in_use = tokio::task::spawn_blocking(move || reader.initial(&loaded))
            .await
            .unwrap_or_default();
        let mut pending: Option<Readings> = None;
        let mut broken: Option<Readings> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
            let reader = Arc::clone(&files);
            let Ok(seen) = tokio::task::spawn_blocking(move || reader.read()).await else {
                continue;
            };
            if seen == in_use || broken.as_ref() == Some(&seen) {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&seen) {
                // Changed since the last look: wait for it to settle.
                pending = Some(seen);
                continue;
            }
            pending = None;
            let sessions = Arc::clone(&self.current.load().session_storage);
            match files.load(&tls, &seen, sessions) {
                Ok((config, subjects)) => {
                    self.current.store(Arc::new(config));
                    reloaded.inc();
                    tracing::info!(
                        listener = &*listener,
                        certificates = %subjects.join("; "),
                        "tls certificates reloaded; new handshakes use them"
                    );
                    in_use = seen;
                    broken = None;
                }
                Err(err) => {
                    failed.inc();
                    tracing::error!(
                        listener = &*listener,
                        error = %super::with_causes(&err),
                        "tls certificate reload failed; keeping the certificates in use"
                    );
                    broken = Some(seen);
                }
            }
        }
    }
}

/// The bytes of every watched file (or why it could not be read), in the
/// order of [`WatchedFiles::paths`].
type Readings = Vec<Result<Arc<[u8]>, FileError>>;

/// The files behind one listener's TLS config: each certificate's cert and
/// key, then the client CA file if any.
struct WatchedFiles {
    paths: Vec<(PathBuf, Part)>,
}

impl WatchedFiles {
    fn of(tls: &ListenerTlsConfig) -> Self {
        let mut paths = Vec::new();
        for c in &tls.certificates {
            paths.push((c.cert.clone(), Part::Cert));
            paths.push((c.key.clone(), Part::Key));
        }
        if let Some(auth) = &tls.client_auth {
            paths.push((auth.ca.clone(), Part::Cert));
        }
        WatchedFiles { paths }
    }

    fn read(&self) -> Readings {
        self.paths
            .iter()
            .map(|(path, part)| files::read(path, *part))
            .collect()
    }

    /// What the files held when `tls` was loaded, as readings: read again
    /// now, and kept only where they still match the loaded material (a
    /// file that changed in between then counts as changed).
    fn initial(&self, tls: &ListenerTlsConfig) -> Readings {
        let now = self.read();
        let mut readings = Vec::with_capacity(now.len());
        for (i, c) in tls.certificates.iter().enumerate() {
            let (cert, key) = (&now[2 * i], &now[2 * i + 1]);
            let same = matches!((cert, key), (Ok(cp), Ok(kp)) if c.loaded.is_from(cp, kp));
            readings.push(if same { cert.clone() } else { stale() });
            readings.push(if same { key.clone() } else { stale() });
        }
        if let Some(auth) = &tls.client_auth {
            let ca = &now[now.len() - 1];
            let same = matches!(ca, Ok(pem) if auth.loaded.is_from(pem));
            readings.push(if same { ca.clone() } else { stale() });
        }
        readings
    }

    /// Checks the files' new contents and builds a config from them; also
    /// returns the certificates' subjects, for the log.
    fn load(
        &self,
        tls: &ListenerTlsConfig,
        seen: &Readings,
        sessions: Arc<dyn StoresServerSessions>,
    ) -> Result<(ServerConfig, Vec<String>), TlsSetupError> {
        let provider = super::provider();
        let now = SystemTime::now();
        let mut certificates = Vec::with_capacity(tls.certificates.len());
        for (i, c) in tls.certificates.iter().enumerate() {
            let cert_pem = seen[2 * i].clone()?;
            let key_pem = seen[2 * i + 1].clone()?;
            certificates.push(files::cert_key(
                &c.cert, cert_pem, &c.key, key_pem, &provider, now,
            )?);
        }
        let ca = match &tls.client_auth {
            Some(auth) => {
                let pem = seen[seen.len() - 1].clone()?;
                Some((files::ca_certs(&auth.ca, pem)?, auth.required))
            }
            None => None,
        };
        let client_auth = ca.as_ref().map(|(ca, required)| (ca, *required));
        let config = build_config(&certificates, &tls.alpn, client_auth, Some(sessions))?;
        let subjects = certificates.iter().map(|c| c.subject.clone()).collect();
        Ok((config, subjects))
    }
}

/// A reading that matches no file contents: the file changed between the
/// config load and the start of the watch.
fn stale() -> Result<Arc<[u8]>, FileError> {
    Err(FileError {
        path: String::new(),
        part: Part::Cert,
        problem: "changed since the config was loaded".to_owned(),
    })
}

/// The subject of the client certificate the handshake verified, as an
/// RFC 4514-style string (`CN=alice, O=Example`).
pub fn client_subject(conn: &ServerConnection) -> Option<Arc<str>> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(Arc::from(cert.subject().to_string()))
}

/// The HTTP/1 codec waits on a TLS connection like on a socket: a read can
/// make progress when rustls holds decrypted bytes (or the peer's
/// close_notify), else when the socket is readable.
impl h1::Transport for TlsStream<TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_ref();
        if conn.wants_read() {
            tcp.poll_read_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

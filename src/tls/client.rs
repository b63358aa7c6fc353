//! TLS to backends (`upstream.tls`), as a layer of its own: a rustls
//! `ClientConfig` built per backend, with its pooled client, and an
//! [`UpstreamTls::connect`] that turns a connected `TcpStream` into a TLS
//! stream. The pooled HTTP client (`upstream/client.rs`) and the active
//! health checks use it; they know nothing else of TLS.
//!
//! The name sent as SNI and verified against the backend's certificate is
//! `tls.sni` when set, else the backend's own host (its DNS name, or its IP
//! address, which is then matched against the certificate's IP SANs and
//! not sent as SNI). ALPN follows the upstream's protocol: `http/1.1`,
//! `h2`, or both for `auto`.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::config::{UpstreamProtocol, UpstreamRoots, UpstreamTlsConfig};

/// A backend whose handshakes keep failing is warned about at most this
/// often (the other failures are logged at debug level).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// TLS to one backend.
#[derive(Debug)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    /// `tls.sni` when set, else the backend's own host.
    name: ServerName<'static>,
    /// When a handshake failure was last warned about.
    warned: Mutex<Option<Instant>>,
}

impl UpstreamTls {
    /// Builds the client side of TLS to the backend `address` (as written
    /// in the config, normalised) at `addr`, from its upstream's validated
    /// `tls` and `protocol`.
    pub fn new(
        tls: &UpstreamTlsConfig,
        protocol: UpstreamProtocol,
        address: &str,
        addr: SocketAddr,
    ) -> Self {
        let provider = super::provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3");
        let builder = match &tls.roots {
            UpstreamRoots::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
            UpstreamRoots::System(roots) => builder.with_root_certificates(Arc::clone(&roots.0)),
            UpstreamRoots::File(ca) => builder.with_root_certificates(Arc::clone(&ca.roots)),
        };
        let mut config = match &tls.client_cert {
            Some(c) => builder
                .with_client_cert_resolver(Arc::new(ClientCert(Arc::clone(&c.loaded.certified)))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match protocol {
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let name = tls
            .sni
            .clone()
            .or_else(|| server_name(backend_host(address)?).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        UpstreamTls {
            config: Arc::new(config),
            name,
            warned: Mutex::new(None),
        }
    }

    /// The name presented to, and verified against, the backend.
    pub fn server_name(&self) -> ServerName<'static> {
        self.name.clone()
    }

    /// Runs the TLS handshake on a connected socket. The error of a failed
    /// verification carries rustls's reason; [`describe`] words it.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(self.server_name(), tcp)
            .await
    }

    /// Logs a failed handshake with the backend at `addr`: a warning, at
    /// most once per [`WARN_EVERY`], else at debug level.
    pub fn report_failure(&self, upstream: &str, addr: SocketAddr, err: &io::Error) {
        let now = Instant::now();
        let warn = {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            match *warned {
                Some(last) if now.duration_since(last) < WARN_EVERY => false,
                _ => {
                    *warned = Some(now);
                    true
                }
            }
        };
        let name = self.name.to_str();
        let reason = describe(err);
        if warn {
            tracing::warn!(upstream, backend = %addr, server_name = %name, reason = %reason, "tls handshake with backend failed");
        } else {
            tracing::debug!(upstream, backend = %addr, server_name = %name, reason = %reason, "tls handshake with backend failed");
        }
    }
}

/// A handshake error in words: what was wrong with the backend's
/// certificate when it was refused, else the error itself.
pub fn describe(err: &io::Error) -> String {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls::Error::InvalidCertificate(cert)) = rustls_error else {
        return err.to_string();
    };
    match cert {
        CertificateError::UnknownIssuer => {
            "the backend's certificate is signed by an unknown CA (not in tls.ca or the system roots)".to_owned()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("the backend's certificate does not match the expected name: {cert}")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("the backend's certificate has expired: {cert}")
        }
        other => format!("the backend's certificate was refused: {other}"),
    }
}

/// `api.internal` or an IP address, as a rustls server name.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| format!("{name:?} is not a DNS name or an IP address"))
}

/// The host part of a normalised backend address (`host:port`,
/// `[v6]:port`).
fn backend_host(address: &str) -> Option<&str> {
    let (host, _port) = address.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// The client certificate presented to every backend that asks.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify = false`: any certificate for any name is accepted. The
/// handshake signatures are still checked, so the peer must hold the key
/// of the certificate it sent; only who issued it and for what name are not.
#[derive(Debug)]
pub struct NoVerification(Arc<CryptoProvider>);

impl NoVerification {
    /// Checks handshake signatures with `provider`'s algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        NoVerification(provider)
    }
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_host_is_the_address_without_its_port() {
        assert_eq!(backend_host("app.internal:8443"), Some("app.internal"));
        assert_eq!(backend_host("10.0.0.1:443"), Some("10.0.0.1"));
        assert_eq!(backend_host("[::1]:443"), Some("::1"));
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            server_name("app.internal"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("10.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(server_name("not a name").is_err());
    }
}

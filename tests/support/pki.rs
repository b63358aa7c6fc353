//! Test certificates made with rcgen: a CA, server and client certificates
//! it signs, written as PEM files to a temporary directory; and rustls
//! client configs and TLS backends that use them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sluice::tls::client::NoVerification;
use tokio::net::{TcpListener, TcpStream};

/// A certificate authority and the files it issued, in a temporary
/// directory that lives as long as it.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// `ca.pem` in `dir`.
    pub ca_path: PathBuf,
}

/// A certificate and key written as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key"))
            .expect("ca certificate");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("write ca");
        Pki { dir, ca, ca_path }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A server certificate for `names` (DNS names or IP addresses) with
    /// common name `cn`, as `<stem>.pem` and `<stem>.key`.
    pub fn server(&self, stem: &str, names: &[&str], cn: &str) -> Issued {
        self.issue(stem, names, cn, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, stem: &str, cn: &str) -> Issued {
        self.issue(stem, &[], cn, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        stem: &str,
        names: &[&str],
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Sluice Tests");
        params.extended_key_usages.push(usage);
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca)
            .expect("signed certificate");
        let issued = Issued {
            cert: self.path(&format!("{stem}.pem")),
            key: self.path(&format!("{stem}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write cert");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("ca root");
        roots
    }

    /// A client trusting this CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&str]) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        config
    }

    /// A client trusting this CA that presents `client`.
    pub fn client_config_with_cert(&self, alpn: &[&str], client: &Issued) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(vec![client.der.clone()], read_key(&client.key))
            .expect("client cert");
        config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        config
    }
}

pub use sluice::tls::provider;

pub fn read_key(path: &std::path::Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("key file")
}

pub fn read_certs(path: &std::path::Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("certs")
}

/// A client that accepts any server certificate (to look at which one was
/// sent), offering `alpn`, limited to `versions`.
pub fn any_cert_client(
    alpn: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerification::new(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    config
}

/// A TLS connection to `addr` presenting `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// What a request over TLS got back.
pub struct TlsAnswer {
    pub status: u16,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// A request sender over one TLS connection: HTTP/2 when ALPN picked
/// `h2`, else HTTP/1.1.
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    pub async fn over(stream: tokio_rustls::client::TlsStream<TcpStream>) -> hyper::Result<Sender> {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Sender::H1(sender))
        }
    }

    /// `GET path` with `host`.
    pub async fn get(&mut self, host: &str, path: &str) -> hyper::Result<TlsAnswer> {
        let response = match self {
            Sender::H1(s) => {
                let req = Request::get(path)
                    .header("host", host)
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                let req = Request::get(format!("https://{host}{path}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                s.send_request(req).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(TlsAnswer {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// A backend serving HTTP/1.1 and HTTP/2 over TLS with `cert`, offering
/// `alpn`, and (with `client_ca`) requiring a client certificate. Every
/// answer's body is `<name> <HTTP version>`; its `x-client` header names
/// the client certificate's subject, if any.
pub async fn tls_backend(
    name: &str,
    cert: &Issued,
    alpn: &[&str],
    client_ca: Option<&Pki>,
) -> SocketAddr {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider(),
            )
            .build()
            .expect("verifier"),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certs(&cert.cert), read_key(&cert.key))
        .expect("server config");
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let name: Arc<str> = Arc::from(name);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = socket.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let name = Arc::clone(&name);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| format!("{} bytes", c.len()));
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = format!("{name} {:?}", req.version());
                    let mut resp: Response<BoxBody<Bytes, Infallible>> =
                        Response::new(Full::new(Bytes::from(body)).boxed());
                    if let Some(c) = &client {
                        resp.headers_mut()
                            .insert("x-client", c.parse().expect("header"));
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

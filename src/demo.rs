//! `sluice demo`: three small backends on loopback and the proxy in front.
//!
//! The backends are plain hyper servers on ephemeral ports that say which
//! one answered; the proxy gets a config rendered from their addresses and
//! parsed by the real config loader.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config;
use crate::runtime;

/// Proxy address of the demo.
pub const LISTEN: &str = "127.0.0.1:8080";
/// Admin address of the demo.
pub const ADMIN: &str = "127.0.0.1:9901";

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut backends = Vec::new();
    for n in 1..=3 {
        backends.push(spawn_backend(n).await?);
    }
    let text = render_config(LISTEN, ADMIN, &backends);
    let config = config::from_str(&text, "<demo>")?;
    let running = runtime::run(config).await?;
    let signals = runtime::signals::Signals::install()?;
    let signals =
        tokio::spawn(signals.run(Arc::clone(running.control()), running.shutdown_token()));
    let proxy = running
        .listener_addr("demo")
        .unwrap_or_else(|| LISTEN.parse().expect("literal"));
    println!(
        "\nSluice demo: three backends ({}) behind http://{proxy}\n\n\
         Try:\n  \
         for i in 1 2 3 4 5 6; do curl -s http://{proxy}/; done     # round robin over the three\n  \
         curl -s --http2-prior-knowledge http://{proxy}/hello        # HTTP/2 (h2c) on the same port\n  \
         curl -s http://{admin}/metrics | grep sluice_upstream_requests_total\n  \
         curl -s http://{admin}/status\n\n\
         Ctrl-C stops it.\n",
        backends.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        admin = running.admin,
    );
    running.wait().await;
    signals.abort();
    Ok(())
}

/// The demo's config text for these backends.
pub fn render_config(listen: &str, admin: &str, backends: &[SocketAddr]) -> String {
    let list = backends
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[admin]\nlisten = \"{admin}\"\n\n\
         [shutdown]\ngrace = \"2s\"\n\n\
         [[listener]]\nname = \"demo\"\nlisten = \"{listen}\"\nupstream = \"demo\"\n\n\
         [[upstream]]\nname = \"demo\"\nbalancer = \"round_robin\"\nbackends = [{list}]\n"
    )
}

/// Starts demo backend `n` on an ephemeral loopback port.
pub async fn spawn_backend(n: usize) -> std::io::Result<SocketAddr> {
    let socket = TcpListener::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    let name: Arc<str> = Arc::from(format!("backend-{n}"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            let name = Arc::clone(&name);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let body = format!(
                        "hello from {name} ({addr}): {} {}\n",
                        req.method(),
                        req.uri().path()
                    );
                    async move {
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        resp.headers_mut()
                            .insert("x-demo-backend", http::HeaderValue::from_static("yes"));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

//! What each admin path answers.

use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::state::Shared;

/// Answers one admin request.
pub fn answer<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if shared.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
            }
        }
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.encode())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/status" => {
            let snapshot = shared.snapshot.load();
            if let Some(token) = &snapshot.config.admin.token {
                let expected = format!("Bearer {token}");
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                if !given.is_some_and(|g| constant_time_eq(g, expected.as_bytes())) {
                    let mut resp = text(StatusCode::UNAUTHORIZED, "bearer token required\n");
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer"),
                    );
                    return resp;
                }
            }
            let body = serde_json::to_vec_pretty(&status(shared)).unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics /healthz /readyz /status\n",
        ),
    }
}

/// The /status document (schema in docs/status.md).
pub fn status(shared: &Shared) -> serde_json::Value {
    let snapshot = shared.snapshot.load();
    let loaded = snapshot
        .loaded_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let upstreams: Vec<_> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let backends: Vec<_> = u
                .backends
                .iter()
                .zip(&u.config.backends)
                .map(|(b, cfg)| {
                    json!({
                        "address": &*b.key.address,
                        "weight": cfg.weight,
                        "health": match (&u.config.health_check, b.is_healthy()) {
                            (None, _) => "unchecked",
                            (Some(_), true) => "up",
                            (Some(_), false) => "down",
                        },
                        "circuit": b.circuit_state().map(|s| s.as_str()),
                        "eligible": b.is_healthy() && b.circuit_allows(),
                        "in_flight": b.in_flight(),
                        "requests_total": b.requests_total(),
                        "failures_total": b.failures_total(),
                    })
                })
                .collect();
            let eligible = u
                .backends
                .iter()
                .filter(|b| b.is_healthy() && b.circuit_allows())
                .count();
            let discovery = u.config.discovery.as_ref().map(|d| {
                json!({
                    "dns": d.to_string(),
                    "refresh_seconds": d.refresh.as_secs_f64(),
                })
            });
            json!({
                "name": &*u.name,
                "balancer": u.config.balancer.as_str(),
                "discovery": discovery,
                "in_flight": u.limit.current(),
                "max_in_flight": u.config.max_in_flight,
                "eligible_backends": eligible,
                "backends": backends,
            })
        })
        .collect();
    let listeners: Vec<_> = snapshot
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": &*l.name,
                "listen": l.config.listen.to_string(),
                "protocol": l.config.protocol.as_str(),
                "default_upstream": l.config.upstream.as_deref(),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": {
            "path": snapshot.config.source.path.display().to_string(),
            "hash": snapshot.config.source.hash,
            "loaded_at_unix": loaded,
            "loaded_at": humantime::format_rfc3339_millis(snapshot.loaded_at).to_string(),
        },
        "ready": shared.is_ready(),
        "draining": shared.is_draining(),
        "listeners": listeners,
        "upstreams": upstreams,
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

//! The HTTP/1.1 client's per-request head work, in ns: writing the request
//! head for the backend and reading the backend's response head, both as
//! wire-form fields (what an HTTP/1.1 client gets) and as a `HeaderMap`
//! (HTTP/2 clients), on the head NGINX sends for a small static file.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Method, Request};
use sluice::proxy::forwarded::Forwarded;
use sluice::upstream::h1::head::{encode_request, parse_response};

const NGINX_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
    Date: Sun, 22 Nov 2026 20:00:00 GMT\r\nContent-Type: application/octet-stream\r\n\
    Content-Length: 128\r\nLast-Modified: Sun, 22 Nov 2026 19:00:00 GMT\r\n\
    Connection: keep-alive\r\nETag: \"6740d2b0-80\"\r\nAccept-Ranges: bytes\r\n\r\n";

fn heads(c: &mut Criterion) {
    let mut group = c.benchmark_group("upstream_h1");
    let (parts, ()) = Request::get("/128")
        .header("host", "127.0.0.1:18080")
        .header("user-agent", "wrk")
        .body(())
        .expect("request")
        .into_parts();
    let forwarded = Forwarded {
        for_: HeaderValue::from_static("127.0.0.1"),
        proto: Some("http"),
        replace_host: true,
    };
    let mut buf = BytesMut::with_capacity(8192);
    group.bench_function("encode_request", |b| {
        b.iter(|| {
            buf.clear();
            black_box(encode_request(
                &mut buf,
                black_box(&parts),
                Some(&forwarded),
                "127.0.0.1:18101",
                true,
                Some(0),
            ))
        })
    });
    group.bench_function("parse_response_encoded", |b| {
        b.iter(|| black_box(parse_response(black_box(NGINX_HEAD), &Method::GET, true)))
    });
    group.bench_function("parse_response_header_map", |b| {
        b.iter(|| black_box(parse_response(black_box(NGINX_HEAD), &Method::GET, false)))
    });
    group.finish();
}

criterion_group!(benches, heads);
criterion_main!(benches);

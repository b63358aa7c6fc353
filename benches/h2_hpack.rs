//! Encoding an HTTP/1.1 backend's response head for an HTTP/2 client, in ns:
//! NGINX's seven fields for a static file, as the connection's encoder sees
//! them on every response after the first (the repeated fields are in its
//! dynamic table), and on a connection's first response (every field a
//! literal, the repeated ones entering the table).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use sluice::proxy::h2::hpack::{encode_status, Encoder};

const FIELDS: [(&[u8], &[u8]); 7] = [
    (b"Server", b"nginx/1.22.1"),
    (b"Date", b"Mon, 23 Nov 2026 16:28:12 GMT"),
    (b"Content-Type", b"application/octet-stream"),
    (b"Content-Length", b"128"),
    (b"Last-Modified", b"Mon, 23 Nov 2026 16:00:00 GMT"),
    (b"ETag", b"\"6931a0e0-80\""),
    (b"Accept-Ranges", b"bytes"),
];

fn encode(encoder: &mut Encoder, buf: &mut BytesMut) {
    encoder.begin_block(buf);
    encode_status(buf, 200);
    for (name, value) in FIELDS {
        encoder.field(buf, black_box(name), black_box(value));
    }
}

fn response_head(c: &mut Criterion) {
    let mut group = c.benchmark_group("h2_response_head");
    group.bench_function("repeat", |b| {
        let mut encoder = Encoder::new();
        let mut buf = BytesMut::with_capacity(1024);
        encode(&mut encoder, &mut buf);
        b.iter(|| {
            buf.clear();
            encode(&mut encoder, &mut buf);
            black_box(&buf);
        })
    });
    group.bench_function("first", |b| {
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            let mut encoder = Encoder::new();
            buf.clear();
            encode(&mut encoder, &mut buf);
            black_box(&buf);
        })
    });
    group.finish();
}

criterion_group!(benches, response_head);
criterion_main!(benches);

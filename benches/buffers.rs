//! The per-thread buffer pool on a backend response read, in ns: taking a
//! buffer with room for a head and a 16 KiB body chunk, reading a small
//! response into it, passing its head and body on as shared bytes and giving
//! it back; against growing a fresh 8 KiB buffer to that size, which is what
//! the first read of each response cost before the pool kept large buffers.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use sluice::proxy::buffers::{self, BUF_INIT, BUF_LARGE};

/// A 128-byte response behind NGINX's 250-byte head.
const RESPONSE: [u8; 378] = [b'x'; 378];

fn response_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("buffers");
    group.bench_function("pooled_large_read_cycle", |b| {
        b.iter(|| {
            let mut buf = buffers::take_at_least(BUF_LARGE);
            buf.extend_from_slice(black_box(&RESPONSE));
            let head = buf.split_to(250).freeze();
            let body = buf.split_to(128).freeze();
            black_box((&head, &body));
            drop((head, body));
            buffers::give(buf);
        })
    });
    group.bench_function("grow_small_buffer_then_read", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(BUF_INIT);
            buf.reserve(BUF_LARGE);
            buf.extend_from_slice(black_box(&RESPONSE));
            black_box(&buf);
        })
    });
    group.finish();
}

criterion_group!(benches, response_read);
criterion_main!(benches);

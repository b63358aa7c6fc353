//! The HTTP/1.1 server's per-request head work, in ns: finding the end of a
//! client's request head and parsing and validating it into `http` types
//! (`sluice::proxy::h1::parse::parse_head`), for the head wrk sends in the
//! harness and for a browser-sized one, whole and split over two reads.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use sluice::proxy::h1::parse::parse_head;
use sluice::proxy::h1::H1Settings;

const WRK_HEAD: &[u8] = b"GET /128 HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n";

const BROWSER_HEAD: &[u8] = b"GET /app/items?page=2&sort=name HTTP/1.1\r\n\
    Host: shop.example.com\r\n\
    User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0\r\n\
    Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
    Accept-Language: en-GB,en;q=0.5\r\n\
    Accept-Encoding: gzip, deflate, br, zstd\r\n\
    Referer: https://shop.example.com/app/items?page=1&sort=name\r\n\
    Connection: keep-alive\r\n\
    Cookie: session=7f3a9c2e4b1d8f6a0c5e9b2d7a4f1c8e; theme=dark; consent=analytics%2Cads; \
    cart=3a7f9c2e-4b1d-8f6a-0c5e-9b2d7a4f1c8e; last_seen=2026-11-23T09%3A00%3A00Z\r\n\
    Upgrade-Insecure-Requests: 1\r\n\
    Sec-Fetch-Dest: document\r\n\
    Sec-Fetch-Mode: navigate\r\n\
    Sec-Fetch-Site: same-origin\r\n\
    Priority: u=0, i\r\n\r\n";

fn heads(c: &mut Criterion) {
    let mut group = c.benchmark_group("downstream_h1");
    let settings = H1Settings::default();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    for (name, head) in [("wrk", WRK_HEAD), ("browser", BROWSER_HEAD)] {
        group.bench_function(format!("parse_head/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(black_box(head));
                let mut scanned = 0;
                black_box(parse_head(&mut buf, &mut scanned, &settings)).expect("valid head")
            })
        });
        // The head arriving in two reads: the first call finds no end and
        // the second searches only what is new.
        let (first, second) = head.split_at(head.len() / 2);
        group.bench_function(format!("parse_head_two_reads/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(black_box(first));
                let mut scanned = 0;
                let none = parse_head(&mut buf, &mut scanned, &settings).expect("valid so far");
                assert!(none.is_none());
                buf.extend_from_slice(black_box(second));
                black_box(parse_head(&mut buf, &mut scanned, &settings)).expect("valid head")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, heads);
criterion_main!(benches);

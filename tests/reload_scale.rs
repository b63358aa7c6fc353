//! How long a reload takes with 1,000 upstreams of 10 backends each. The
//! times are printed (`cargo test --release --test reload_scale --
//! --nocapture`), not asserted: this checks that such a reload works and
//! keeps state, and measures it.

mod config_file;
mod support;

use std::time::{Duration, Instant};

use config_file::*;
use support::*;

const UPSTREAMS: usize = 1000;
const BACKENDS: usize = 10;

/// 1,000 upstreams x 10 backends on loopback addresses nothing listens on
/// (no traffic goes to them); `weight` and `port` vary the file.
fn big_config(weight: u32, port: u16, first: &Backend) -> String {
    let mut text = String::from(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"u0\"\n",
    );
    text.push_str(&format!(
        "\n[[upstream]]\nname = \"u0\"\nbackends = [\"{}\"]\n",
        first.addr
    ));
    for u in 1..UPSTREAMS {
        let backends = (0..BACKENDS)
            .map(|b| {
                format!(
                    "{{ address = \"127.{}.{}.{}:{port}\", weight = {weight} }}",
                    1 + u / 250,
                    u % 250,
                    1 + b
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "\n[[upstream]]\nname = \"u{u}\"\nbackends = [{backends}]\n"
        ));
    }
    text
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_time_with_a_thousand_upstreams_of_ten_backends() {
    let a = Backend::start("a").await;
    let text = big_config(1, 8080, &a);
    let started = Instant::now();
    sluice::config::from_str(&text, "big.toml").expect("valid");
    let parse = started.elapsed();

    let file = ConfigFile::new(&text);
    let started = Instant::now();
    let proxy = file.start().await;
    let start = started.elapsed();
    let addr = proxy.listener_addr("web").expect("bound");
    assert_eq!(get(addr, "/").await.body, "a");
    let backends = |proxy: &sluice::runtime::Running| {
        let snapshot = proxy.shared().snapshot.load();
        snapshot
            .upstreams
            .iter()
            .map(|u| u.backends.len())
            .sum::<usize>()
    };
    assert_eq!(backends(&proxy), 1 + (UPSTREAMS - 1) * BACKENDS);
    let state_of_u1 = || {
        let snapshot = proxy.shared().snapshot.load();
        std::sync::Arc::clone(&snapshot.upstream("u1").expect("u1").backends[0])
    };
    let kept = state_of_u1();

    let timed = |text: String| {
        let file = &file;
        let proxy = &proxy;
        async move {
            file.replace(&text);
            let started = Instant::now();
            proxy.reload().await.expect("reloaded");
            started.elapsed()
        }
    };
    // Five of each kind (one in an unoptimised build, where the figures
    // mean little); the machine may be shared, so the median is shown with
    // the fastest.
    let rounds: u16 = if cfg!(debug_assertions) { 1 } else { 5 };
    let mut same = Vec::new();
    let mut weights = Vec::new();
    let mut replaced = Vec::new();
    for round in 0..rounds {
        let (weight, port) = (1 + u32::from(round % 2), 8080 + round % 2);
        timed(big_config(weight, port, &a)).await;
        // The same text again (SIGHUP with nothing changed): all carried over.
        same.push(timed(big_config(weight, port, &a)).await);
        // Every weight changed: every upstream rebuilt, every backend kept.
        let before = state_of_u1();
        weights.push(timed(big_config(weight + 1, port, &a)).await);
        assert!(
            std::sync::Arc::ptr_eq(&before, &state_of_u1()),
            "state kept"
        );
        // Every address changed: 9,990 backends drained, 9,990 new.
        replaced.push(timed(big_config(weight + 1, port + 2, &a)).await);
        assert!(!std::sync::Arc::ptr_eq(&before, &state_of_u1()));
        assert_eq!(
            proxy.shared().registry.len(),
            1 + (UPSTREAMS - 1) * BACKENDS
        );
    }
    assert!(!std::sync::Arc::ptr_eq(&kept, &state_of_u1()));
    assert_eq!(get(addr, "/").await.body, "a");
    let summary = |times: &mut Vec<Duration>| {
        times.sort();
        format!(
            "median {} (fastest {})",
            ms(times[times.len() / 2]),
            ms(times[0])
        )
    };
    println!(
        "1,000 upstreams x 10 backends: parse+validate {}, start {}; reload (read, parse, validate, build, swap): unchanged {}, every weight changed {}, every address changed {}",
        ms(parse),
        ms(start),
        summary(&mut same),
        summary(&mut weights),
        summary(&mut replaced)
    );
}

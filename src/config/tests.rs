//! Tests for the config loader: defaults, every key, and the errors (their
//! text, their line:column and key path).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "app"

[[upstream]]
name = "app"
backends = ["127.0.0.1:9001"]
"#;

/// Every key with a value other than its default, where one works.
const FULL: &str = r#"
[runtime]
workers = 4
busy_poll = "200us"
busy_poll_interval = "20us"

[admin]
listen = "127.0.0.1:9902"
token = "s3cret"

[log]
format = "json"
access_log = true

[shutdown]
drain_delay = "5s"
grace = "1m"

[[listener]]
name = "edge.1"
listen = "[::1]:0"
protocol = "http"
upstream = "app"
max_connections = 5
proxy_protocol = false
tls_passthrough = false
trusted_proxies = ["10.0.0.0/8", "::1/128", "192.168.1.1"]
timeouts = { client_header = "250ms", idle = "2m" }

[[listener.route]]
host = "API.Example.com"
path_prefix = "/v1/"
headers = { "X-Canary" = "1" }
upstream = "api"

[[listener.route]]
host = "*.example.com"
split = [{ upstream = "api", weight = 95 }, { upstream = "app", weight = 5 }]

[[upstream]]
name = "app"
balancer = "round_robin"
backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }, "[::1]:9003"]
protocol = "h2"
max_in_flight = 0
max_in_flight_per_backend = 0
slow_start = "0s"
pool = { max_idle_per_backend = 8, idle_timeout = "30s" }
timeouts = { connect = "2s", request = "20s", per_try = "5s" }

[[upstream]]
name = "api"
backends = ["localhost:9004"]
"#;

fn parse(text: &str) -> Config {
    match from_str(text, "sluice.toml") {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn errors(text: &str) -> Vec<ConfigError> {
    match from_str(text, "sluice.toml") {
        Ok(_) => panic!("expected errors, the config was accepted:\n{text}"),
        Err(errors) => errors.0,
    }
}

/// Each error's key path and message.
fn paths_and_messages(errors: &[ConfigError]) -> Vec<(&str, &str)> {
    errors
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect()
}

/// The errors as `sluice check` prints them.
fn error_lines(text: &str) -> Vec<String> {
    errors(text).iter().map(ToString::to_string).collect()
}

/// Asserts exactly one error, and returns it.
fn one_error(text: &str) -> ConfigError {
    let mut errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.remove(0)
}

/// The minimal config with `extra` lines added to its listener.
fn listener_with(extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"app\"\n{extra}\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:9001\"]\n"
    )
}

/// The minimal config with `extra` lines added to its upstream.
fn upstream_with(extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:9001\"]\n{extra}\n"
    )
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address literal")
}

// ---------------------------------------------------------------------------
// Valid files

#[test]
fn minimal_config_gets_every_default() {
    let config = parse(MINIMAL);

    assert_eq!(config.source.path, Path::new("sluice.toml"));
    assert_eq!(config.runtime.workers, 0);
    assert_eq!(config.runtime.busy_poll, Duration::ZERO);
    assert_eq!(config.runtime.busy_poll_interval, Duration::ZERO);
    assert_eq!(config.admin.listen, addr("127.0.0.1:9901"));
    assert_eq!(config.admin.token, None);
    assert_eq!(config.log.format, LogFormat::Text);
    assert!(!config.log.access_log);
    assert_eq!(config.shutdown.drain_delay, Duration::ZERO);
    assert_eq!(config.shutdown.grace, Duration::from_secs(30));

    assert_eq!(config.listeners.len(), 1);
    let l = &config.listeners[0];
    assert_eq!(l.name, "web");
    assert_eq!(l.listen, addr("127.0.0.1:8080"));
    assert_eq!(l.protocol, ListenerProtocol::Http);
    assert_eq!(l.upstream.as_deref(), Some("app"));
    assert_eq!(l.max_connections, 100_000);
    assert!(l.trusted_proxies.is_empty());
    assert_eq!(l.timeouts.client_header, Duration::from_secs(10));
    assert_eq!(l.timeouts.idle, Duration::from_secs(60));
    assert!(l.routes.is_empty());

    assert_eq!(config.upstreams.len(), 1);
    let u = &config.upstreams[0];
    assert_eq!(u.name, "app");
    assert_eq!(u.balancer, BalancerKind::RoundRobin);
    assert_eq!(
        u.backends,
        vec![BackendConfig {
            address: "127.0.0.1:9001".to_owned(),
            socket_addr: addr("127.0.0.1:9001"),
            weight: 1,
        }]
    );
    assert_eq!(u.protocol, UpstreamProtocol::Http1);
    assert_eq!(u.max_in_flight, 1000);
    assert_eq!(u.pool.max_idle_per_backend, 64);
    assert_eq!(u.pool.idle_timeout, Duration::from_secs(90));
    assert_eq!(u.timeouts.connect, Duration::from_secs(1));
    assert_eq!(u.timeouts.request, Duration::from_secs(30));
    assert_eq!(u.timeouts.per_try, Duration::from_secs(10));
}

#[test]
fn every_key_of_the_full_example_is_read() {
    let config = parse(FULL);

    assert_eq!(config.runtime.workers, 4);
    assert_eq!(config.runtime.busy_poll, Duration::from_micros(200));
    assert_eq!(config.runtime.busy_poll_interval, Duration::from_micros(20));
    assert_eq!(config.admin.listen, addr("127.0.0.1:9902"));
    assert_eq!(config.admin.token.as_deref(), Some("s3cret"));
    assert_eq!(config.log.format, LogFormat::Json);
    assert!(config.log.access_log);
    assert_eq!(config.shutdown.drain_delay, Duration::from_secs(5));
    assert_eq!(config.shutdown.grace, Duration::from_secs(60));

    let l = &config.listeners[0];
    assert_eq!(l.name, "edge.1");
    assert_eq!(l.listen, addr("[::1]:0"));
    assert_eq!(l.protocol, ListenerProtocol::Http);
    assert_eq!(l.upstream.as_deref(), Some("app"));
    assert_eq!(l.max_connections, 5);
    let proxies: Vec<String> = l.trusted_proxies.iter().map(ToString::to_string).collect();
    assert_eq!(proxies, ["10.0.0.0/8", "::1/128", "192.168.1.1/32"]);
    assert_eq!(l.timeouts.client_header, Duration::from_millis(250));
    assert_eq!(l.timeouts.idle, Duration::from_secs(120));

    assert_eq!(l.routes.len(), 2);
    let exact = &l.routes[0];
    assert_eq!(
        exact.host,
        Some(HostMatch::Exact("api.example.com".to_owned()))
    );
    assert_eq!(exact.path_prefix.as_deref(), Some("/v1/"));
    assert_eq!(exact.headers.len(), 1);
    assert_eq!(exact.headers[0].0.as_str(), "x-canary");
    assert_eq!(exact.headers[0].1, "1");
    assert!(matches!(&exact.target, RouteTarget::Upstream(u) if u == "api"));
    let wildcard = &l.routes[1];
    assert_eq!(
        wildcard.host,
        Some(HostMatch::Suffix(".example.com".to_owned()))
    );
    assert_eq!(wildcard.path_prefix, None);
    assert!(wildcard.headers.is_empty());
    match &wildcard.target {
        RouteTarget::Split(parts) => {
            assert_eq!(parts, &[("api".to_owned(), 95), ("app".to_owned(), 5)])
        }
        other => panic!("expected a split, got {other:?}"),
    }

    let app = &config.upstreams[0];
    assert_eq!(app.name, "app");
    assert_eq!(app.balancer, BalancerKind::RoundRobin);
    let backends: Vec<(&str, SocketAddr, u32)> = app
        .backends
        .iter()
        .map(|b| (b.address.as_str(), b.socket_addr, b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            ("127.0.0.1:9001", addr("127.0.0.1:9001"), 1),
            ("127.0.0.1:9002", addr("127.0.0.1:9002"), 3),
            ("[::1]:9003", addr("[::1]:9003"), 1),
        ]
    );
    assert_eq!(app.protocol, UpstreamProtocol::H2);
    assert_eq!(app.max_in_flight, 0);
    assert_eq!(app.pool.max_idle_per_backend, 8);
    assert_eq!(app.pool.idle_timeout, Duration::from_secs(30));
    assert_eq!(app.timeouts.connect, Duration::from_secs(2));
    assert_eq!(app.timeouts.request, Duration::from_secs(20));
    assert_eq!(app.timeouts.per_try, Duration::from_secs(5));

    let api = &config.upstreams[1];
    assert_eq!(api.backends[0].address, "localhost:9004");
    assert_eq!(api.backends[0].socket_addr, addr("127.0.0.1:9004"));
}

#[test]
fn the_example_file_is_valid() {
    let config = parse(include_str!("../../config/sluice.toml"));
    assert_eq!(config.listeners.len(), 3);
    assert_eq!(config.listeners[0].routes.len(), 2);
    assert_eq!(config.listeners[2].routes.len(), 1);
    assert_eq!(config.upstreams.len(), 5);
    assert_eq!(
        config.upstreams[2].hash_key,
        HashKey::Header(http::HeaderName::from_static("x-user-id"))
    );
    let pods = &config.upstreams[3];
    assert!(pods.discovery.is_some() && pods.backends.is_empty());
}

// ---------------------------------------------------------------------------
// DNS discovery

/// The minimal config whose upstream finds its backends with `discovery`.
fn discovering(discovery: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\ndiscovery = {discovery}\n"
    )
}

#[test]
fn discovery_takes_a_dns_name_and_port_instead_of_backends() {
    let config = parse(&discovering(
        "{ dns = \"App.Default.svc.cluster.local:8080\", refresh = \"2s\" }",
    ));
    let app = &config.upstreams[0];
    assert!(app.backends.is_empty(), "filled in at run time");
    assert_eq!(
        app.discovery,
        Some(DiscoveryConfig {
            host: "app.default.svc.cluster.local".into(),
            port: 8080,
            refresh: Duration::from_secs(2),
        })
    );

    let fqdn = parse(&discovering("{ dns = \"app.test.:80\" }"));
    let d = fqdn.upstreams[0].discovery.clone().expect("discovery");
    assert_eq!((d.host.as_str(), d.port), ("app.test.", 80));
    assert_eq!(d.refresh, Duration::from_secs(5), "the default");
    assert_eq!(d.to_string(), "app.test.:80");
}

#[test]
fn bad_discovery_settings_are_errors_at_their_key() {
    let cases = [
        (
            "{ dns = \"app\" }",
            "upstream[0].discovery.dns",
            "missing port",
        ),
        (
            "{ dns = \"10.0.0.1:80\" }",
            "upstream[0].discovery.dns",
            "ip address",
        ),
        ("{ dns = \"app:0\" }", "upstream[0].discovery.dns", "port 0"),
        (
            "{ dns = \"a_b:80\" }",
            "upstream[0].discovery.dns",
            "bad host name",
        ),
        (
            "{ dns = \"app:80\", refresh = \"500ms\" }",
            "upstream[0].discovery.refresh",
            "at least 1s",
        ),
        (
            "{ dns = \"app:80\", every = \"5s\" }",
            "upstream[0].discovery",
            "unknown key \"every\"",
        ),
        (
            "{ refresh = \"5s\" }",
            "upstream[0].discovery",
            "missing required key \"dns\"",
        ),
    ];
    for (discovery, path, words) in cases {
        let error = one_error(&discovering(discovery));
        assert_eq!(error.path, path, "{discovery}");
        assert!(
            error.message.contains(words),
            "{discovery}: {}",
            error.message
        );
    }

    let both = one_error(&upstream_with("discovery = { dns = \"app:80\" }"));
    assert_eq!(both.path, "upstream[0].backends");
    assert_eq!(both.message, "set either backends or discovery, not both");
}

#[test]
fn dns_servers_take_ips_with_or_without_a_port() {
    let config = parse(&format!(
        "{MINIMAL}\n[runtime]\ndns_servers = [\"10.96.0.10\", \"127.0.0.1:5353\", \"[::1]:53\"]\n"
    ));
    assert_eq!(
        config.runtime.dns_servers,
        [
            addr("10.96.0.10:53"),
            addr("127.0.0.1:5353"),
            addr("[::1]:53")
        ]
    );
    assert!(parse(MINIMAL).runtime.dns_servers.is_empty());

    let error = one_error(&format!(
        "{MINIMAL}\n[runtime]\ndns_servers = [\"dns.example:53\"]\n"
    ));
    assert_eq!(error.path, "runtime.dns_servers[0]");
    assert!(
        error.message.contains("the host must be an ip address"),
        "{}",
        error.message
    );
}

#[test]
fn busy_poll_is_a_duration() {
    let error = one_error(&format!("{MINIMAL}\n[runtime]\nbusy_poll = 50\n"));
    assert_eq!(error.path, "runtime.busy_poll");
    assert!(
        error.message.contains("found integer 50"),
        "{}",
        error.message
    );
}

#[test]
fn busy_poll_interval_needs_a_longer_busy_poll() {
    for (runtime, message) in [
        (
            "busy_poll_interval = \"20us\"",
            "has no effect without busy_poll",
        ),
        (
            "busy_poll = \"1ms\"\nbusy_poll_interval = \"1ms\"",
            "must be shorter than busy_poll",
        ),
    ] {
        let text = format!("{MINIMAL}\n[runtime]\n{runtime}\n");
        let error = one_error(&text);
        assert_eq!(error.path, "runtime.busy_poll_interval", "{runtime}");
        assert!(
            error.message.contains(message),
            "{runtime}: {}",
            error.message
        );
        let line = text
            .lines()
            .position(|l| l.starts_with("busy_poll_interval"))
            .map(|i| i + 1);
        assert_eq!(Some(error.line), line, "{runtime}");
    }
    let text =
        format!("{MINIMAL}\n[runtime]\nbusy_poll = \"1ms\"\nbusy_poll_interval = \"999us\"\n");
    let config = parse(&text);
    assert_eq!(
        config.runtime.busy_poll_interval,
        Duration::from_micros(999)
    );
}

#[test]
fn the_example_file_shows_every_accepted_key() {
    let example = include_str!("../../config/sluice.toml");
    let written = |key: &str| {
        example.lines().any(|line| {
            // An optional key without a default (admin.token) is shown
            // commented out, so `# key = ...` counts too.
            let line = line.trim_start().trim_start_matches("# ");
            // `key = ...`, `{ key = ...` inside an inline table, or a header.
            line.starts_with(&format!("{key} ="))
                || line.contains(&format!("{{ {key} ="))
                || line.contains(&format!(", {key} ="))
                || line.contains(&format!("\"{key}\" ="))
                || line.contains(&format!("[{key}]"))
                || line.contains(&format!(".{key}]"))
        })
    };
    let missing: Vec<&str> = validate::ACCEPTED_KEYS
        .iter()
        .flat_map(|keys| keys.iter().copied())
        .filter(|key| !written(key))
        .collect();
    assert!(missing.is_empty(), "not in config/sluice.toml: {missing:?}");
}

#[test]
fn source_hash_is_fnv1a_64_of_the_text() {
    // Published FNV-1a 64 test vectors.
    assert_eq!(load::fnv1a_64_hex(b""), "cbf29ce484222325");
    assert_eq!(load::fnv1a_64_hex(b"a"), "af63dc4c8601ec8c");
    assert_eq!(load::fnv1a_64_hex(b"foobar"), "85944171f73967e8");

    let config = parse(MINIMAL);
    assert_eq!(config.source.hash, load::fnv1a_64_hex(MINIMAL.as_bytes()));
    assert_eq!(config.source.hash.len(), 16);
}

#[test]
fn load_file_reads_a_file_and_names_it_in_the_source() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, MINIMAL).expect("write config");
    let config = load_file(&path).expect("valid config");
    assert_eq!(config.source.path, path);
}

#[test]
fn an_unreadable_file_is_one_error_without_a_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing.toml");
    let errors = load_file(&path).expect_err("no such file").0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, 0);
    assert_eq!(errors[0].file, path.display().to_string());
    assert!(errors[0].message.starts_with("cannot read config file"));
    assert!(!errors[0].to_string().contains(":0:"));
}

// ---------------------------------------------------------------------------
// Reporting every problem, with its place

#[test]
fn one_file_with_five_mistakes_reports_exactly_those_five() {
    let text = r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstrem = "api"
max_connections = "many"
upstream = "apii"

[[upstream]]
name = "api"
backends = ["10.0.0.1:80", "10.0.0.7:80800"]
timeouts = { connect = "5" }
"#;
    let errors = errors(text);
    let got: Vec<(usize, usize, &str)> = errors
        .iter()
        .map(|e| (e.line, e.column, e.path.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (4, 1, "listener[0]"),
            (5, 19, "listener[0].max_connections"),
            (6, 12, "listener[0].upstream"),
            (10, 28, "upstream[0].backends[1]"),
            (11, 24, "upstream[0].timeouts.connect"),
        ]
    );
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "sluice.toml:4:1: listener[0]: unknown key \"upstrem\" (allowed: name, listen, \
             protocol, upstream, max_connections, proxy_protocol, trusted_proxies, timeouts, \
             tls_passthrough, tls, route); did you mean \"upstream\"?",
            "sluice.toml:5:19: listener[0].max_connections: expected an integer, found string",
            "sluice.toml:6:12: listener[0].upstream: unknown upstream \"apii\" (known: api); \
             did you mean \"api\"?",
            "sluice.toml:10:28: upstream[0].backends[1]: \"10.0.0.7:80800\" is not host:port \
             (port > 65535)",
            "sluice.toml:11:24: upstream[0].timeouts.connect: \"5\" has no unit; expected a \
             duration string with a unit, like \"5s\"",
        ]
    );
}

#[test]
fn errors_are_sorted_by_position_across_sections() {
    // The listener (later in the file) refers to a bad upstream name; the
    // upstream section comes first.
    let text = r#"[[upstream]]
name = "api"
backends = ["10.0.0.1:0"]

[[listener]]
name = "web"
listen = "127.0.0.1:99999"
upstream = "web"
"#;
    let places: Vec<(usize, usize)> = errors(text).iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(places, [(3, 13), (7, 10), (8, 12)]);
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = listener_with("# café\n[listener.timeouts]\nidle = \"0s\" # é\n")
        .replace("name = \"web\"", "name = \"wéb\"");
    let all = errors(&text);
    // "wéb" is not a valid name (ascii only); its column is after `name = `.
    assert_eq!((all[0].line, all[0].column), (2, 8));
    assert_eq!(all[0].path, "listener[0].name");
    let idle = all
        .iter()
        .find(|e| e.path == "listener[0].timeouts.idle")
        .expect("idle error");
    assert_eq!(idle.column, 8);
    assert_eq!(idle.message, "must be longer than 0s");
}

#[test]
fn a_syntax_error_is_reported_at_its_location() {
    let text = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\nupstream = \"app\"\n";
    let errors = errors(text);
    assert!(!errors.is_empty());
    assert_eq!((errors[0].line, errors[0].path.as_str()), (3, ""));
    assert!(
        errors[0].message.starts_with("invalid toml: "),
        "{}",
        errors[0].message
    );
}

#[test]
fn a_duplicate_key_is_a_syntax_error_at_the_second_key() {
    let text = listener_with("name = \"again\"");
    let error = &errors(&text)[0];
    assert_eq!((error.line, error.column), (5, 1));
    assert!(error.message.contains("duplicate key"), "{}", error.message);
}

// ---------------------------------------------------------------------------
// Types, names and required parts

#[test]
fn wrong_types_say_what_was_expected_and_found() {
    let error = one_error(&listener_with("max_connections = \"10\""));
    assert_eq!(error.message, "expected an integer, found string");

    let text = MINIMAL.replace("name = \"web\"", "name = 7");
    let error = one_error(&text);
    assert_eq!(error.path, "listener[0].name");
    assert_eq!(error.message, "expected a string, found integer");

    let error = one_error(&listener_with("proxy_protocol = \"no\""));
    assert_eq!(error.message, "expected a boolean, found string");

    let error = one_error(&format!("{MINIMAL}\n[admin]\nlisten = 9901\n"));
    assert_eq!(error.path, "admin.listen");
    assert_eq!(error.message, "expected a string, found integer");
}

#[test]
fn durations_must_be_strings_with_a_unit() {
    let error = one_error(&format!("{MINIMAL}\n[shutdown]\ngrace = 30\n"));
    assert_eq!(error.path, "shutdown.grace");
    assert_eq!(
        error.message,
        "expected a duration string with a unit, like \"5s\", found integer 30"
    );

    let error = one_error(&format!("{MINIMAL}\n[shutdown]\ngrace = \"30\"\n"));
    assert!(error.message.contains("has no unit"), "{}", error.message);

    let error = one_error(&format!("{MINIMAL}\n[shutdown]\ngrace = \"30 parsecs\"\n"));
    assert!(error
        .message
        .starts_with("\"30 parsecs\" is not a duration"));

    let config = parse(&format!("{MINIMAL}\n[shutdown]\ngrace = \"1h 30m\"\n"));
    assert_eq!(config.shutdown.grace, Duration::from_secs(90 * 60));
}

#[test]
fn timeouts_must_be_longer_than_zero() {
    let error = one_error(&upstream_with("timeouts = { request = \"0s\" }"));
    assert_eq!(error.path, "upstream[0].timeouts.request");
    assert_eq!(error.message, "must be longer than 0s");
}

#[test]
fn unknown_keys_are_rejected_everywhere_with_a_hint() {
    let error = one_error(&format!("{MINIMAL}\n[admin]\nlisen = \"127.0.0.1:1\"\n"));
    assert_eq!(error.path, "admin");
    assert_eq!(
        error.message,
        "unknown key \"lisen\" (allowed: listen, token); did you mean \"listen\"?"
    );

    let error = one_error(&format!("{MINIMAL}\n[metrics]\n"));
    assert_eq!(error.path, "");
    assert!(error.message.starts_with("unknown key \"metrics\""));

    let error = one_error(&upstream_with("pool = { max_idle = 3 }"));
    assert_eq!(error.path, "upstream[0].pool");
    assert!(!error.message.contains("did you mean"), "{}", error.message);

    let error = one_error(&MINIMAL.replace(
        "[\"127.0.0.1:9001\"]",
        "[{ address = \"127.0.0.1:1\", wieght = 2 }]",
    ));
    assert_eq!(error.path, "upstream[0].backends[0]");
    assert!(
        error.message.contains("did you mean \"weight\""),
        "{}",
        error.message
    );
}

#[test]
fn a_listener_and_an_upstream_are_required() {
    let lines = error_lines("[runtime]\nworkers = 2\n");
    assert_eq!(
        lines,
        [
            "sluice.toml:1:1: missing [[upstream]]: at least one upstream is required",
            "sluice.toml:1:1: missing [[listener]]: at least one listener is required",
        ]
    );

    let error = one_error(&MINIMAL.replace("[[listener]]", "[listener]"));
    assert_eq!(error.path, "listener");
    assert!(error.message.contains("expected an array of tables"));
}

#[test]
fn required_keys_are_reported_at_their_table() {
    let text = "[[listener]]\nupstream = \"app\"\n\n[[upstream]]\nname = \"app\"\n";
    let lines = error_lines(text);
    assert_eq!(
        lines,
        [
            "sluice.toml:1:1: listener[0]: missing required key \"name\"",
            "sluice.toml:1:1: listener[0]: missing required key \"listen\"",
            "sluice.toml:4:1: upstream[0]: missing required key \"backends\" (or discovery)",
        ]
    );
}

#[test]
fn duplicate_names_are_rejected() {
    let text = format!(
        "{MINIMAL}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8081\"\nupstream = \"app\"\n\
         \n[[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:9002\"]\n"
    );
    let errors = errors(&text);
    let got = paths_and_messages(&errors);
    assert_eq!(
        got,
        [
            (
                "listener[1].name",
                "duplicate listener name \"web\" (already used by listener[0])"
            ),
            (
                "upstream[1].name",
                "duplicate upstream name \"app\" (already used by upstream[0])"
            ),
        ]
    );
}

#[test]
fn listeners_may_not_share_a_port_with_each_other_or_the_admin() {
    let text = format!(
        "{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9901\"\n\
         [[listener]]\nname = \"any\"\nlisten = \"0.0.0.0:8080\"\nupstream = \"app\"\n\
         [[listener]]\nname = \"adm\"\nlisten = \"127.0.0.1:9901\"\nupstream = \"app\"\n\
         [[listener]]\nname = \"other\"\nlisten = \"127.0.0.2:8080\"\nupstream = \"app\"\n\
         [[listener]]\nname = \"ephemeral\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[listener]]\nname = \"ephemeral2\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n"
    );
    let errors = errors(&text);
    let got = paths_and_messages(&errors);
    assert_eq!(
        got,
        [
            (
                "listener[1].listen",
                "0.0.0.0:8080 overlaps listener[0].listen (127.0.0.1:8080): each listener needs its own port"
            ),
            (
                "listener[2].listen",
                "127.0.0.1:9901 overlaps admin.listen (127.0.0.1:9901): each listener needs its own port"
            ),
        ],
        "127.0.0.2:8080 overlaps neither; port 0 is always free"
    );
}

#[test]
fn names_use_a_restricted_charset() {
    // Renames the upstream and the listener's reference to it.
    let error = one_error(&MINIMAL.replace("\"app\"", "\"my app\""));
    assert_eq!(error.path, "upstream[0].name");
    assert_eq!(
        error.message,
        "\"my app\" is not a valid name (allowed: letters, digits, \"_\", \".\", \"-\")"
    );
}

#[test]
fn an_http_listener_needs_an_upstream_or_a_route() {
    let text = MINIMAL.replace("upstream = \"app\"\n", "");
    let error = one_error(&text);
    assert_eq!((error.line, error.column), (2, 1));
    assert_eq!(error.path, "listener[0]");
    assert_eq!(
        error.message,
        "an http listener needs an upstream or at least one route"
    );
}

#[test]
fn listen_addresses_must_be_ip_and_port() {
    let error = one_error(&MINIMAL.replace("127.0.0.1:8080", "localhost:8080"));
    assert_eq!(error.path, "listener[0].listen");
    assert!(error.message.contains("the host must be an ip address"));

    let error = one_error(&MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:65536"));
    assert!(
        error.message.ends_with("(port > 65535)"),
        "{}",
        error.message
    );

    let config = parse(&MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0"));
    assert_eq!(config.listeners[0].listen.port(), 0);
}

#[test]
fn trusted_proxies_are_cidrs() {
    let error = one_error(&listener_with(
        "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/40\"]",
    ));
    assert_eq!(error.path, "listener[0].trusted_proxies[1]");
    assert!(error.message.contains("prefix length > 32"));

    let config = parse(&listener_with("trusted_proxies = [\"10.0.0.0/8\"]"));
    let cidr = config.listeners[0].trusted_proxies[0];
    assert!(cidr.contains("10.9.8.7".parse().expect("ip literal")));
}

#[test]
fn integer_ranges_are_checked() {
    let error = one_error(&listener_with("max_connections = 0"));
    assert_eq!(error.message, "must be at least 1, found 0");

    let error = one_error(&format!("{MINIMAL}\n[runtime]\nworkers = -1\n"));
    assert_eq!(error.message, "must be at least 0, found -1");
}

#[test]
fn enumerated_values_list_what_is_allowed() {
    let error = one_error(&format!("{MINIMAL}\n[log]\nformat = \"jsno\"\n"));
    assert_eq!(
        error.message,
        "unknown format \"jsno\" (allowed: text, json); did you mean \"json\"?"
    );

    let error = one_error(&upstream_with("balancer = \"fastest\""));
    assert_eq!(
        error.message,
        "unknown balancer \"fastest\" (allowed: round_robin, least_conn, p2c, consistent_hash, random)"
    );
}

// ---------------------------------------------------------------------------
// Keys whose feature is not built yet

#[test]
fn unsupported_keys_at_their_default_are_accepted() {
    parse(&listener_with(
        "proxy_protocol = false\ntls_passthrough = false",
    ));
    parse(&upstream_with(
        "slow_start = \"0s\"\nmax_in_flight_per_backend = 0\nbalancer = \"round_robin\"",
    ));
}

// ---------------------------------------------------------------------------
// Routes

#[test]
fn route_hosts_are_exact_or_wildcard_and_lower_case() {
    let text = listener_with(
        "[[listener.route]]\nhost = \"Api.Example.COM\"\nupstream = \"app\"\n\
         [[listener.route]]\nhost = \"*.Example.com\"\nupstream = \"app\"",
    );
    let config = parse(&text);
    let hosts: Vec<Option<HostMatch>> = config.listeners[0]
        .routes
        .iter()
        .map(|r| r.host.clone())
        .collect();
    assert_eq!(
        hosts,
        [
            Some(HostMatch::Exact("api.example.com".to_owned())),
            Some(HostMatch::Suffix(".example.com".to_owned())),
        ]
    );
}

#[test]
fn bad_route_hosts_are_rejected() {
    for host in [
        "",
        "api.example.com:443",
        "a*.b",
        "*",
        "*.",
        "api.*.com",
        "bad host",
    ] {
        let text = listener_with(&format!(
            "[[listener.route]]\nhost = \"{host}\"\nupstream = \"app\""
        ));
        let error = one_error(&text);
        assert_eq!(error.path, "listener[0].route[0].host", "{host}");
        assert!(
            error.message.contains("is not a valid route host"),
            "{host}: {}",
            error.message
        );
    }
}

#[test]
fn route_path_prefix_must_start_with_a_slash() {
    let text = listener_with("[[listener.route]]\npath_prefix = \"v1\"\nupstream = \"app\"");
    let error = one_error(&text);
    assert_eq!(error.message, "\"v1\" must start with \"/\"");
}

#[test]
fn route_headers_must_be_valid() {
    let text = listener_with(
        "[[listener.route]]\nheaders = { \"bad name\" = \"1\", ok = \"line\\nbreak\" }\nupstream = \"app\"",
    );
    let errors = errors(&text);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "listener[0].route[0].headers.\"bad name\"",
            "listener[0].route[0].headers.ok"
        ]
    );
}

#[test]
fn split_routes_keep_their_upstreams_and_weights() {
    let text = format!(
        "{}\n[[upstream]]\nname = \"canary\"\nbackends = [\"127.0.0.1:9002\"]\n",
        listener_with(
            "[[listener.route]]\nsplit = [{ upstream = \"app\", weight = 99 }, \
             { upstream = \"canary\", weight = 1 }]"
        )
    );
    let config = parse(&text);
    match &config.listeners[0].routes[0].target {
        RouteTarget::Split(parts) => {
            assert_eq!(parts, &[("app".to_owned(), 99), ("canary".to_owned(), 1)])
        }
        other => panic!("expected a split, got {other:?}"),
    }
}

#[test]
fn split_entries_are_checked() {
    let text = listener_with(
        "[[listener.route]]\nsplit = [{ upstream = \"ap\", weight = 1 }, \
         { upstream = \"app\", weight = 0 }, { upstream = \"app\" }]",
    );
    let errors = errors(&text);
    let got = paths_and_messages(&errors);
    assert_eq!(
        got,
        [
            (
                "listener[0].route[0].split[0].upstream",
                "unknown upstream \"ap\" (known: app); did you mean \"app\"?"
            ),
            (
                "listener[0].route[0].split[1].weight",
                "must be between 1 and 1000000, found 0"
            ),
            (
                "listener[0].route[0].split[2]",
                "missing required key \"weight\""
            ),
        ]
    );

    let error = one_error(&listener_with("[[listener.route]]\nsplit = []"));
    assert_eq!(error.path, "listener[0].route[0].split");
}

#[test]
fn a_route_needs_exactly_one_of_upstream_or_split() {
    let error = one_error(&listener_with("[[listener.route]]\npath_prefix = \"/\""));
    assert_eq!(error.message, "a route needs an upstream or a split");

    let error = one_error(&listener_with(
        "[[listener.route]]\nupstream = \"app\"\nsplit = [{ upstream = \"app\", weight = 1 }]",
    ));
    assert_eq!(error.message, "set either upstream or split, not both");
}

#[test]
fn an_unknown_route_upstream_lists_the_known_ones() {
    let text = format!(
        "{}\n[[upstream]]\nname = \"web\"\nbackends = [\"127.0.0.1:9002\"]\n",
        listener_with("[[listener.route]]\nupstream = \"nope\"")
    );
    let error = one_error(&text);
    assert_eq!(error.path, "listener[0].route[0].upstream");
    assert_eq!(error.message, "unknown upstream \"nope\" (known: app, web)");
}

// ---------------------------------------------------------------------------
// Backends

#[test]
fn backends_are_strings_or_tables() {
    let text = MINIMAL.replace(
        "backends = [\"127.0.0.1:9001\"]",
        "backends = [\"127.0.0.1:9001\", { address = \"[::1]:9002\", weight = 10000 }, \
         { address = \"LocalHost:9003\" }]",
    );
    let config = parse(&text);
    let backends = &config.upstreams[0].backends;
    assert_eq!(backends[0].weight, 1);
    assert_eq!(backends[1].address, "[::1]:9002");
    assert_eq!(backends[1].socket_addr, addr("[::1]:9002"));
    assert_eq!(backends[1].weight, 10_000);
    assert_eq!(backends[2].address, "localhost:9003");
    assert_eq!(backends[2].socket_addr, addr("127.0.0.1:9003"));
    assert_eq!(backends[2].weight, 1);
}

#[test]
fn bad_backends_are_each_reported() {
    let text = MINIMAL.replace(
        "backends = [\"127.0.0.1:9001\"]",
        "backends = [\n  \"127.0.0.1\",\n  { address = \"127.0.0.1:1\", weight = 0 },\n  \
         \"no-such-host.invalid:80\",\n  8080,\n  \"127.0.0.1:0\",\n]",
    );
    let errors = errors(&text);
    let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(
        got,
        [
            (10, "upstream[0].backends[0]"),
            (11, "upstream[0].backends[1].weight"),
            (12, "upstream[0].backends[2]"),
            (13, "upstream[0].backends[3]"),
            (14, "upstream[0].backends[4]"),
        ]
    );
    assert_eq!(
        errors[0].message,
        "\"127.0.0.1\" is not host:port (missing port)"
    );
    assert!(errors[2]
        .message
        .starts_with("cannot resolve \"no-such-host.invalid\""));
    assert!(errors[3]
        .message
        .starts_with("expected a \"host:port\" string or a table"));
    assert_eq!(
        errors[4].message,
        "\"127.0.0.1:0\" is not host:port (port 0 is not allowed)"
    );
}

#[test]
fn duplicate_backends_in_one_upstream_are_rejected() {
    let text = MINIMAL.replace(
        "backends = [\"127.0.0.1:9001\"]",
        "backends = [\"127.0.0.1:9001\", { address = \"127.0.0.1:09001\", weight = 2 }]",
    );
    let error = one_error(&text);
    assert_eq!(error.path, "upstream[0].backends[1].address");
    assert_eq!(
        error.message,
        "duplicate backend \"127.0.0.1:9001\" (same as backends[0])"
    );
}

#[test]
fn an_upstream_needs_at_least_one_backend() {
    let error = one_error(&MINIMAL.replace("[\"127.0.0.1:9001\"]", "[]"));
    assert_eq!(error.path, "upstream[0].backends");
    assert_eq!(error.message, "must list at least one backend");
}

#[test]
fn unreferenced_upstreams_are_allowed() {
    let text = format!("{MINIMAL}\n[[upstream]]\nname = \"spare\"\nbackends = [\"127.0.0.1:9\"]\n");
    assert_eq!(parse(&text).upstreams.len(), 2);
}

#[test]
fn every_balancer_is_accepted_with_its_knobs() {
    for (text, kind) in [
        ("balancer = \"round_robin\"", BalancerKind::RoundRobin),
        ("balancer = \"least_conn\"", BalancerKind::LeastConn),
        ("balancer = \"p2c\"", BalancerKind::P2c),
        ("balancer = \"random\"", BalancerKind::Random),
        (
            "balancer = \"consistent_hash\"",
            BalancerKind::ConsistentHash {
                vnodes: crate::config::DEFAULT_VNODES,
                bounded_load: crate::config::DEFAULT_BOUNDED_LOAD,
            },
        ),
        (
            "balancer = \"consistent_hash\"\nhash = { vnodes = 160, bounded_load = 0 }",
            BalancerKind::ConsistentHash {
                vnodes: 160,
                bounded_load: 0.0,
            },
        ),
    ] {
        let config = parse(&upstream_with(text));
        assert_eq!(config.upstreams[0].balancer, kind, "{text}");
        assert_eq!(config.upstreams[0].hash_key, HashKey::ClientIp);
    }
}

#[test]
fn hash_keys_parse_and_bad_ones_are_errors() {
    for (text, key) in [
        ("client_ip", HashKey::ClientIp),
        ("path", HashKey::Path),
        (
            "header:X-User",
            HashKey::Header(http::HeaderName::from_static("x-user")),
        ),
        ("cookie:session", HashKey::Cookie("session".into())),
        ("query:user", HashKey::Query("user".into())),
    ] {
        let config = parse(&upstream_with(&format!(
            "balancer = \"consistent_hash\"\nhash_key = \"{text}\""
        )));
        assert_eq!(config.upstreams[0].hash_key, key, "{text}");
    }
    for bad in ["header:", "host", "cookie:", "header:bad name"] {
        let error = one_error(&upstream_with(&format!(
            "balancer = \"consistent_hash\"\nhash_key = \"{bad}\""
        )));
        assert_eq!(error.path, "upstream[0].hash_key", "{bad}");
        assert!(
            error.message.contains("allowed: client_ip"),
            "{}",
            error.message
        );
    }
}

#[test]
fn hash_settings_are_checked_and_only_apply_to_consistent_hash() {
    let error = one_error(&upstream_with(
        "balancer = \"consistent_hash\"\nhash = { bounded_load = 0.5 }",
    ));
    assert_eq!(error.path, "upstream[0].hash.bounded_load");
    assert!(
        error.message.contains("between 1.0 and 100.0"),
        "{}",
        error.message
    );

    let error = one_error(&upstream_with(
        "balancer = \"consistent_hash\"\nhash = { vnodes = 0 }",
    ));
    assert_eq!(error.path, "upstream[0].hash.vnodes");

    let error = one_error(&upstream_with(
        "balancer = \"consistent_hash\"\nhash = { vnode = 10 }",
    ));
    assert!(
        error.message.contains("unknown key \"vnode\""),
        "{}",
        error.message
    );

    let error = one_error(&upstream_with("balancer = \"p2c\"\nhash_key = \"path\""));
    assert_eq!(error.path, "upstream[0].hash_key");
    assert!(error
        .message
        .contains("only applies to balancer = \"consistent_hash\""));
}

fn tcp_config(listener_extra: &str, upstream_extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:5432\"\nprotocol = \"tcp\"\n{listener_extra}\n\n\
         [[upstream]]\nname = \"pg\"\nbackends = [\"127.0.0.1:9001\"]\n{upstream_extra}\n"
    )
}

#[test]
fn tcp_listeners_with_proxy_protocol_and_passthrough_are_accepted() {
    let config = parse(&tcp_config(
        "upstream = \"pg\"\nproxy_protocol = true",
        "send_proxy_protocol = \"v2\"",
    ));
    let l = &config.listeners[0];
    assert_eq!(l.protocol, ListenerProtocol::Tcp);
    assert!(l.proxy_protocol);
    assert_eq!(
        config.upstreams[0].send_proxy_protocol,
        Some(ProxyProtocolVersion::V2)
    );

    let config = parse(&tcp_config(
        "tls_passthrough = true\n[[listener.route]]\nsni = \"*.db.example.com\"\nupstream = \"pg\"",
        "",
    ));
    let l = &config.listeners[0];
    assert!(l.tls_passthrough);
    assert_eq!(l.upstream, None);
    assert_eq!(
        l.routes[0].sni,
        Some(HostMatch::Suffix(".db.example.com".into()))
    );
}

#[test]
fn misplaced_tcp_and_sni_settings_are_errors() {
    let error = one_error(&tcp_config("", ""));
    assert!(
        error.message.contains("a tcp listener needs an upstream"),
        "{}",
        error.message
    );

    let error = one_error(&tcp_config(
        "upstream = \"pg\"\n[[listener.route]]\nsni = \"a.example.com\"\nupstream = \"pg\"",
        "",
    ));
    assert_eq!(error.path, "listener[0].route[0].sni");
    assert!(
        error.message.contains("tls_passthrough"),
        "{}",
        error.message
    );

    let error = one_error(&tcp_config(
        "tls_passthrough = true\nupstream = \"pg\"\n[[listener.route]]\npath_prefix = \"/\"\nupstream = \"pg\"",
        "",
    ));
    assert_eq!(error.path, "listener[0].route[0].path_prefix");

    let error = one_error(&listener_with("tls_passthrough = true"));
    assert_eq!(error.path, "listener[0].tls_passthrough");

    let error = one_error(&listener_with(
        "[[listener.route]]\nsni = \"a.example.com\"\nupstream = \"app\"",
    ));
    assert_eq!(error.path, "listener[0].route[0].sni");

    let error = one_error(&upstream_with("send_proxy_protocol = \"v2\""));
    assert!(
        error.message.contains("only tcp listeners"),
        "{}",
        error.message
    );

    let error = one_error(&upstream_with("send_proxy_protocol = \"v3\""));
    assert_eq!(error.path, "upstream[0].send_proxy_protocol");
}

#[test]
fn health_checks_parse_with_defaults_and_bad_values_are_errors() {
    let config = parse(&upstream_with(
        "health_check = { path = \"/ping\", interval = \"500ms\" }",
    ));
    let check = config.upstreams[0]
        .health_check
        .clone()
        .expect("health check");
    assert_eq!(
        check.kind,
        HealthCheckKind::Http {
            path: "/ping".into(),
            host: None,
            expect_status: (200, 399)
        }
    );
    assert_eq!(check.interval, Duration::from_millis(500));
    assert_eq!(check.timeout, Duration::from_secs(1));
    assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (2, 3));

    let config = parse(&upstream_with(
        "health_check = { kind = \"tcp\", unhealthy_threshold = 1 }",
    ));
    let check = config.upstreams[0]
        .health_check
        .clone()
        .expect("health check");
    assert_eq!(check.kind, HealthCheckKind::Tcp);
    assert_eq!(check.unhealthy_threshold, 1);

    let error = one_error(&upstream_with(
        "health_check = { expect_status = \"200-99\" }",
    ));
    assert_eq!(error.path, "upstream[0].health_check.expect_status");
    let error = one_error(&upstream_with(
        "health_check = { kind = \"tcp\", path = \"/\" }",
    ));
    assert_eq!(error.path, "upstream[0].health_check.path");
    let error = one_error(&upstream_with("health_check = { kind = \"udp\" }"));
    assert_eq!(error.path, "upstream[0].health_check.kind");
    let error = one_error(&upstream_with("health_check = { path = \"ping\" }"));
    assert_eq!(error.path, "upstream[0].health_check.path");
}

#[test]
fn circuit_breakers_parse_with_defaults_and_bad_values_are_errors() {
    let config = parse(&upstream_with(
        "circuit_breaker = { consecutive_failures = 2 }",
    ));
    let c = config.upstreams[0]
        .circuit_breaker
        .clone()
        .expect("breaker");
    assert_eq!(c.consecutive_failures, 2);
    assert_eq!(c.failure_rate, 0.5);
    assert_eq!(c.min_requests, 20);
    assert_eq!(c.window, Duration::from_secs(10));
    assert_eq!(
        (c.open_for, c.open_for_max),
        (Duration::from_secs(5), Duration::from_secs(120))
    );
    assert_eq!(c.half_open_probes, 1);

    let error = one_error(&upstream_with("circuit_breaker = { failure_rate = 1.5 }"));
    assert_eq!(error.path, "upstream[0].circuit_breaker.failure_rate");
    let error = one_error(&upstream_with(
        "circuit_breaker = { open_for = \"10s\", open_for_max = \"1s\" }",
    ));
    assert_eq!(error.path, "upstream[0].circuit_breaker.open_for_max");
    let error = one_error(&upstream_with("circuit_breaker = { half_open_probes = 0 }"));
    assert_eq!(error.path, "upstream[0].circuit_breaker.half_open_probes");
}

#[test]
fn retries_default_to_connect_failures_and_parse_their_conditions() {
    use crate::resilience::retry::RetryOn;
    let config = parse(MINIMAL);
    let r = &config.upstreams[0].retry;
    assert_eq!(r.attempts, 3);
    assert!(r.on.contains(RetryOn::ConnectFailure));
    assert!(!r.on.contains(RetryOn::Status503));
    assert_eq!(r.budget, 0.2);

    let config = parse(&upstream_with(
        "retry = { attempts = 2, on = [\"503\", \"timeout\"], budget = 0.5 }",
    ));
    let r = &config.upstreams[0].retry;
    assert_eq!(r.attempts, 2);
    assert!(r.on.contains(RetryOn::Status503) && r.on.contains(RetryOn::Timeout));
    assert!(!r.on.contains(RetryOn::ConnectFailure));

    let error = one_error(&upstream_with("retry = { on = [\"5xx\"] }"));
    assert_eq!(error.path, "upstream[0].retry.on[0]");
    let error = one_error(&upstream_with("retry = { attempts = 0 }"));
    assert_eq!(error.path, "upstream[0].retry.attempts");
}

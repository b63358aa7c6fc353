//! Tests for the `tls` keys of listeners and upstreams, with certificate
//! files made here with rcgen: what is read, and every problem with a
//! file reported at its key, naming the file.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};

use super::*;

/// A directory of PEM files made for one test.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Files {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write file");
        path.display().to_string()
    }

    /// A self-signed certificate for `names` as `<stem>.pem` and its key
    /// as `<stem>.key`, with `params` adjusted by `tweak`; returns both
    /// paths.
    fn cert(
        &self,
        stem: &str,
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        tweak(&mut params);
        let cert = params.self_signed(&key).expect("self-signed");
        (
            self.write(&format!("{stem}.pem"), &cert.pem()),
            self.write(&format!("{stem}.key"), &key.serialize_pem()),
        )
    }
}

fn parse(text: &str) -> Config {
    match from_str(text, "sluice.toml") {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn one_error(text: &str) -> ConfigError {
    match from_str(text, "sluice.toml") {
        Ok(_) => panic!("expected an error, the config was accepted:\n{text}"),
        Err(errors) => {
            assert_eq!(errors.0.len(), 1, "expected one error, got {errors}");
            errors.0[0].clone()
        }
    }
}

fn listener_tls(tls: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8443\"\nupstream = \"app\"\ntls = {tls}\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:9001\"]\n"
    )
}

fn upstream_with(extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"127.0.0.1:9001\"]\n{extra}\n"
    )
}

fn certs(pairs: &[(&str, &str)]) -> String {
    let list: Vec<String> = pairs
        .iter()
        .map(|(c, k)| format!("{{ cert = {c:?}, key = {k:?} }}"))
        .collect();
    format!("[{}]", list.join(", "))
}

#[test]
fn a_listener_reads_its_certificates_with_their_names_and_defaults() {
    let files = Files::new();
    let (a_cert, a_key) = files.cert("a", &["api.example.com", "*.example.com"], |_| {});
    let (b_cert, b_key) = files.cert("b", &["Other.Example.org"], |_| {});
    let text = listener_tls(&format!(
        "{{ certificates = {} }}",
        certs(&[(&a_cert, &a_key), (&b_cert, &b_key)])
    ));
    let tls = parse(&text).listeners[0].tls.clone().expect("tls");
    assert_eq!(tls.certificates.len(), 2);
    assert_eq!(tls.certificates[0].cert, Path::new(&a_cert));
    assert_eq!(tls.certificates[0].key, Path::new(&a_key));
    assert_eq!(
        tls.certificates[0].loaded.names,
        ["api.example.com", "*.example.com"]
    );
    assert_eq!(tls.certificates[1].loaded.names, ["other.example.org"]);
    assert_eq!(tls.alpn, [Alpn::H2, Alpn::Http11]);
    assert!(tls.client_auth.is_none());
}

#[test]
fn relative_paths_are_relative_to_the_config_file() {
    let files = Files::new();
    std::fs::create_dir(files.path("certs")).expect("mkdir");
    files.cert("certs/site", &["site.test"], |_| {});
    let config_path = files.path("sluice.toml");
    let text = listener_tls(
        "{ certificates = [{ cert = \"certs/site.pem\", key = \"certs/site.key\" }] }",
    );
    std::fs::write(&config_path, text).expect("write config");
    let config = load_file(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let tls = config.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.certificates[0].cert, files.path("certs/site.pem"));
}

#[test]
fn alpn_client_ca_and_client_auth_are_read() {
    let files = Files::new();
    let (cert, key) = files.cert("a", &["a.test"], |_| {});
    let (ca, _) = files.cert("ca", &["ca.test"], |_| {});
    let text = listener_tls(&format!(
        "{{ certificates = {}, alpn = [\"http/1.1\"], client_ca = {ca:?}, client_auth = \"optional\" }}",
        certs(&[(&cert, &key)])
    ));
    let tls = parse(&text).listeners[0].tls.clone().expect("tls");
    assert_eq!(tls.alpn, [Alpn::Http11]);
    let auth = tls.client_auth.expect("client auth");
    assert_eq!(auth.ca, Path::new(&ca));
    assert!(!auth.required);

    let text = listener_tls(&format!(
        "{{ certificates = {}, client_ca = {ca:?} }}",
        certs(&[(&cert, &key)])
    ));
    let tls = parse(&text).listeners[0].tls.clone().expect("tls");
    assert!(tls.client_auth.expect("client auth").required);
}

#[test]
fn certificate_file_problems_name_the_file_and_point_at_its_key() {
    let files = Files::new();
    let (good_cert, good_key) = files.cert("good", &["a.test"], |_| {});
    let (_, other_key) = files.cert("other", &["b.test"], |_| {});
    let (old_cert, old_key) = files.cert("old", &["a.test"], |p| {
        p.not_before = rcgen::date_time_ymd(1999, 1, 1);
        p.not_after = rcgen::date_time_ymd(2000, 1, 1);
    });
    let (new_cert, new_key) = files.cert("new", &["a.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2999, 1, 1);
        p.not_after = rcgen::date_time_ymd(3000, 1, 1);
    });
    let text_file = files.write("notes.txt", "not a certificate\n");
    let missing = files.path("missing.pem").display().to_string();

    let cases = [
        (&missing, &good_key, "cert", "cannot read it", &missing),
        (
            &text_file,
            &good_key,
            "cert",
            "no PEM certificate",
            &text_file,
        ),
        (
            &good_cert,
            &text_file,
            "key",
            "no PEM private key",
            &text_file,
        ),
        (
            &good_cert,
            &other_key,
            "key",
            "does not match the certificate",
            &other_key,
        ),
        (
            &old_cert,
            &old_key,
            "cert",
            "expired on 2000-01-01T00:00:00Z",
            &old_cert,
        ),
        (&new_cert, &new_key, "cert", "not valid yet", &new_cert),
    ];
    for (cert, key, at, problem, file) in cases {
        let text = listener_tls(&format!("{{ certificates = {} }}", certs(&[(cert, key)])));
        let error = one_error(&text);
        assert_eq!(error.path, format!("listener[0].tls.certificates[0].{at}"));
        assert!(error.message.contains(problem), "{error}");
        assert!(error.message.starts_with(file.as_str()), "{error}");
        // The position is that of the offending path in the file.
        let line = text.lines().nth(error.line - 1).expect("line");
        let value = if at == "cert" { cert } else { key };
        let column = line.find(&format!("{value:?}")).expect("value on its line") + 1;
        assert_eq!(error.column, column, "{error}");
    }
}

#[test]
fn tls_settings_that_cannot_work_are_errors() {
    let files = Files::new();
    let (cert, key) = files.cert("a", &["a.test"], |_| {});
    let pair = certs(&[(&cert, &key)]);
    let notes = files.write("notes.txt", "no CA here\n");
    let cases = [
        (
            "{ certificates = [] }".to_owned(),
            "listener[0].tls.certificates",
            "at least one",
        ),
        (
            "{ alpn = [\"h2\"] }".to_owned(),
            "listener[0].tls",
            "missing required key \"certificates\"",
        ),
        (
            format!("{{ certificates = {pair}, alpn = [\"h3\"] }}"),
            "listener[0].tls.alpn[0]",
            "unknown ALPN protocol \"h3\" (allowed: h2, http/1.1)",
        ),
        (
            format!("{{ certificates = {pair}, alpn = [\"h2\", \"h2\"] }}"),
            "listener[0].tls.alpn[1]",
            "listed twice",
        ),
        (
            format!("{{ certificates = {pair}, client_auth = \"required\" }}"),
            "listener[0].tls.client_auth",
            "client_auth needs client_ca",
        ),
        (
            format!("{{ certificates = {pair}, client_ca = {notes:?} }}"),
            "listener[0].tls.client_ca",
            "no PEM certificate",
        ),
        (
            format!("{{ certificates = {pair}, client_ca = {cert:?}, client_auth = \"maybe\" }}"),
            "listener[0].tls.client_auth",
            "unknown client_auth \"maybe\" (allowed: required, optional)",
        ),
        (
            format!("{{ certificates = [{{ cert = {cert:?} }}] }}"),
            "listener[0].tls.certificates[0]",
            "missing required key \"key\"",
        ),
    ];
    for (tls, path, message) in cases {
        let error = one_error(&listener_tls(&tls));
        assert_eq!(error.path, path, "{error}");
        assert!(error.message.contains(message), "{error}");
    }
}

#[test]
fn tls_termination_is_for_http_listeners() {
    let files = Files::new();
    let (cert, key) = files.cert("a", &["a.test"], |_| {});
    let text = listener_tls(&format!("{{ certificates = {} }}", certs(&[(&cert, &key)]))).replace(
        "upstream = \"app\"\ntls",
        "upstream = \"app\"\nprotocol = \"tcp\"\ntls",
    );
    let error = one_error(&text);
    assert_eq!(error.path, "listener[0].tls");
    assert!(
        error.message.contains("needs protocol = \"http\""),
        "{error}"
    );
}

#[test]
fn upstream_tls_reads_sni_ca_and_client_certificate() {
    let files = Files::new();
    let (ca, _) = files.cert("ca", &["ca.test"], |_| {});
    let (cert, key) = files.cert("client", &["client.test"], |_| {});
    let text = upstream_with(&format!(
        "protocol = \"auto\"\ntls = {{ sni = \"App.Internal\", ca = {ca:?}, cert = {cert:?}, key = {key:?} }}"
    ));
    let upstream = &parse(&text).upstreams[0];
    assert_eq!(upstream.protocol, UpstreamProtocol::Auto);
    let tls = upstream.tls.as_ref().expect("tls");
    assert_eq!(
        tls.sni,
        Some(rustls::pki_types::ServerName::try_from("app.internal").expect("name"))
    );
    assert!(tls.verify);
    assert_eq!(tls.ca.as_deref(), Some(Path::new(&ca)));
    assert!(matches!(tls.roots, UpstreamRoots::File(_)));
    assert_eq!(
        tls.client_cert.as_ref().expect("client cert").cert,
        Path::new(&cert)
    );

    let text = upstream_with("tls = { verify = false }");
    let tls = parse(&text).upstreams[0].tls.clone().expect("tls");
    assert!(!tls.verify);
    assert_eq!(tls.roots, UpstreamRoots::None);
}

#[test]
fn upstream_tls_settings_that_cannot_work_are_errors() {
    let files = Files::new();
    let (ca, _) = files.cert("ca", &["ca.test"], |_| {});
    let (cert, _) = files.cert("client", &["client.test"], |_| {});
    let cases = [
        (
            "protocol = \"auto\"".to_owned(),
            "upstream[0].protocol",
            "picks h2 or http/1.1 by ALPN, which needs tls",
        ),
        (
            format!("tls = {{ verify = false, ca = {ca:?} }}"),
            "upstream[0].tls.ca",
            "ca does nothing with verify = false",
        ),
        (
            "tls = { verify = false, sni = \"not a name\" }".to_owned(),
            "upstream[0].tls.sni",
            "is not a DNS name or an IP address",
        ),
        (
            format!("tls = {{ verify = false, cert = {cert:?} }}"),
            "upstream[0].tls",
            "missing required key \"key\"",
        ),
        (
            "tls = { verify = false, ca = \"/nonexistent/ca.pem\" }".to_owned(),
            "upstream[0].tls.ca",
            "ca does nothing",
        ),
        (
            "tls = { ca = \"/nonexistent/ca.pem\" }".to_owned(),
            "upstream[0].tls.ca",
            "/nonexistent/ca.pem: cannot read it",
        ),
    ];
    for (extra, path, message) in cases {
        let error = one_error(&upstream_with(&extra));
        assert_eq!(error.path, path, "{error}");
        assert!(error.message.contains(message), "{error}");
    }

    let unreferenced = format!(
        "{}\n[[upstream]]\nname = \"both\"\nbackends = [\"127.0.0.1:9002\"]\n\
         send_proxy_protocol = \"v1\"\ntls = {{ verify = false }}\n",
        upstream_with("")
    );
    let error = one_error(&unreferenced);
    assert_eq!(error.path, "upstream[1].tls");
    assert!(error.message.contains("cannot have both"), "{error}");
}

#[test]
fn a_tcp_listener_cannot_use_an_upstream_with_tls() {
    let text = "[[listener]]\nname = \"l4\"\nlisten = \"127.0.0.1:5432\"\nprotocol = \"tcp\"\nupstream = \"db\"\n\n\
                [[upstream]]\nname = \"db\"\nbackends = [\"127.0.0.1:9001\"]\ntls = { verify = false }\n";
    let error = one_error(text);
    assert_eq!(error.path, "listener[0]");
    assert!(error.message.contains("only http listeners use"), "{error}");
}

#[test]
fn a_reload_sees_the_same_tls_setup_when_only_the_files_changed() {
    let files = Files::new();
    let (cert, key) = files.cert("a", &["a.test"], |_| {});
    let text = listener_tls(&format!("{{ certificates = {} }}", certs(&[(&cert, &key)])));
    let before = parse(&text).listeners[0].tls.clone().expect("tls");
    files.cert("a", &["a.test"], |_| {});
    let after = parse(&text).listeners[0].tls.clone().expect("tls");
    assert_ne!(before, after, "new file contents");
    assert_eq!(before.setup(), after.setup());
}

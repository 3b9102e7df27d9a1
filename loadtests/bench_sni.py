"""New TLS connections per second through an SNI-routing listener: l4lb against HAProxy.

    python loadtests/bench_sni.py [--duration 10] [--reps 2] [--connections 32]

Both proxies route on the ClientHello's server name without terminating TLS: l4lb with
`sni = { "localhost" = "tls" }`, HAProxy (mode tcp) with `tcp-request inspect-delay`,
`req.ssl_hello_type 1` and `use_backend tls if { req.ssl_sni -i localhost }`. Their
default route is a dead port, so a connection that was not routed by its name fails.
The backend is one nginx serving HTTPS (a self-signed certificate made with `openssl req`
in a scratch folder) with a 64-byte body; the load is `wrk -t1 -cN` over
https://localhost:PORT/ with `Connection: close`, so every request is a new TCP
connection and a full TLS handshake (wrk sends the URL's host as SNI).

Pinned as ../shared/bench does it: the proxy alone on CPU 0 with one worker, nginx and
wrk on CPU 1. Proxies alternate (l4lb, haproxy, l4lb, ...) --reps times. Printed per run:
connections/s, errors, the proxy's CPU-s per 100k connections; then the medians and the
ratio l4lb / haproxy of the medians. Everything listens on 127.0.0.1, every process is
started here and stopped by its pid at the end. A script, not a test.

Needs: haproxy, nginx, wrk, openssl, taskset (Debian: apt-get install haproxy nginx wrk).
Do not run it while another benchmark runs: both cores are part of the measurement.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BODY = b"x" * 63 + b"\n"
PROXY_CPU, LOAD_CPU = "0", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def start(cmd, cpu: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], stdin=subprocess.DEVNULL,
                            start_new_session=True, **kw)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "localhost.crt", folder / "localhost.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def nginx_conf(folder: Path, port: int, cert: Path, key: Path) -> Path:
    temp = folder / "nginx-temp"           # nginx hands its temp folders to its worker user
    temp.mkdir()
    conf = folder / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
error_log {folder}/nginx-error.log warn;
pid {folder}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp};
    proxy_temp_path {temp};
    fastcgi_temp_path {temp};
    uwsgi_temp_path {temp};
    scgi_temp_path {temp};
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {{ default_type text/plain; return 200 "{BODY.decode().strip()}\\n"; }}
    }}
}}
""")
    return conf


def haproxy_conf(folder: Path, listen: int, backend: int, dead: int) -> Path:
    conf = folder / f"haproxy-{listen}.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend tls
    bind 127.0.0.1:{listen}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend tls if {{ req.ssl_sni -i localhost }}
    default_backend dead
backend tls
    server b1 127.0.0.1:{backend}
backend dead
    server d1 127.0.0.1:{dead}
""")
    return conf


def l4lb_conf(folder: Path, listen: int, backend: int, dead: int) -> Path:
    conf = folder / f"l4lb-{listen}.toml"
    conf.write_text(f"""
[global]
max_connections = 8000
shutdown_timeout = 2.0
[control]
socket = "l4lb-{listen}.sock"
[log]
level = "warning"
access = false
[listeners.tls]
bind = ["127.0.0.1:{listen}"]
pool = "dead"
sni = {{ "localhost" = "tls" }}
[pools.tls]
backends = [{{ name = "b1", address = "127.0.0.1:{backend}" }}]
[pools.dead]
backends = [{{ name = "d1", address = "127.0.0.1:{dead}" }}]
""")
    return conf


def proxy_command(name: str, folder: Path, listen: int, backend: int, dead: int) -> list:
    if name == "haproxy":
        return ["haproxy", "-db", "-f", str(haproxy_conf(folder, listen, backend, dead))]
    return [sys.executable, "-m", "l4lb", "run", "-c", str(l4lb_conf(folder, listen, backend, dead))]


def run_wrk(port: int, duration: int, connections: int) -> tuple[float, int, int]:
    """(requests/s, requests, errors) of one wrk run."""
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
         "-H", "Connection: close", f"https://localhost:{port}/"],
        capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    return rps, total, errors


def cpu_seconds(pid: int) -> float:
    p = psutil.Process(pid)
    total = sum(p.cpu_times()[:2])
    for child in p.children(recursive=True):
        total += sum(child.cpu_times()[:2])
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    ap.add_argument("--reps", type=int, default=2, help="alternating runs per proxy (default 2)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    args = ap.parse_args(argv)
    for tool in ("haproxy", "nginx", "wrk", "openssl", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench_sni: {tool} is not installed", file=sys.stderr)
            return 2
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results: dict[str, list[tuple[float, float]]] = {"l4lb": [], "haproxy": []}
    with tempfile.TemporaryDirectory(prefix="l4lb-bench-sni-") as tmp:
        # nginx, started as root, hands its folder to its worker user; l4lb refuses a
        # control socket in a folder it does not own: each gets its own.
        folder = Path(tmp) / "proxies"
        folder.mkdir()
        web = Path(tmp) / "nginx"
        web.mkdir()
        cert, key = make_certificate(folder)
        backend, dead = free_port(), free_port()
        nginx = start(["nginx", "-c", str(nginx_conf(web, backend, cert, key)),
                       "-p", str(web)], LOAD_CPU)
        try:
            wait_listening(backend)
            for rep in range(args.reps):
                for name in results:
                    listen = free_port()
                    log = folder / f"{name}-{listen}.log"
                    with open(log, "wb") as out:
                        proc = start(proxy_command(name, folder, listen, backend, dead),
                                     PROXY_CPU, cwd=folder, env=env, stdout=out,
                                     stderr=subprocess.STDOUT)
                    try:
                        try:
                            wait_listening(listen)
                        except RuntimeError:
                            print(log.read_text()[-2000:], file=sys.stderr)
                            raise
                        run_wrk(listen, 1, 4)                  # warm up
                        before = cpu_seconds(proc.pid)
                        rps, total, errors = run_wrk(listen, args.duration, args.connections)
                        cpu = cpu_seconds(proc.pid) - before
                    finally:
                        stop(proc)
                    per_100k = cpu / max(total, 1) * 100_000
                    results[name].append((rps, per_100k))
                    print(f"rep {rep + 1} {name:8s} {rps:9.1f} conn/s  errors {errors:5d}  "
                          f"proxy CPU {per_100k:6.2f} s/100k conns", flush=True)
        finally:
            stop(nginx)
    med = {name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
           for name, runs in results.items()}
    for name, (rps, cpu) in med.items():
        print(f"median   {name:8s} {rps:9.1f} conn/s  proxy CPU {cpu:6.2f} s/100k conns")
    print(f"ratio l4lb/haproxy: conn/s {med['l4lb'][0] / med['haproxy'][0]:.2f}x, "
          f"CPU per conn {med['l4lb'][1] / med['haproxy'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

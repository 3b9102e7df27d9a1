#!/usr/bin/env bash
# Start l4lb in the foreground for ../shared/bench: listen on 127.0.0.1:LISTEN, forward to
# 127.0.0.1:BACKEND. Used as   cmd:l4lb 'loadtests/run-l4lb.sh {listen} {backend} [WORKERS]'.
#
# The config is what a production user would run for speed: leastconn (the algorithm the
# issue judges; round robin until leastconn is registered), access log off, level warning.
# The script `exec`s the balancer so the bench harness stops it by its own pid/group.
# It runs this checkout's code (PYTHONPATH = the repo root, build with
# `python setup.py build_ext --inplace` first); L4LB_PYTHON picks the interpreter.
# L4LB_BUFFERS=N sets the listener's rcvbuf and sndbuf to N bytes (unset: autotuning).
# L4LB_SUBSCRIBE=S keeps one `subscribe S` client reading (and parsing) the live view's
# frames for as long as the balancer runs: the cost of a watcher (`l4lb top`), issue 19.
# WORKERS is `[global] workers`: "auto" (the default: one per CPU this process may run on,
# so 1 when the harness pins the proxy to one core) or a count, e.g. the harness's
# {workers} (1 pinned, 2 unpinned). Every process of the balancer (master, fork server,
# workers) stays in the session the harness started, which is what it counts as the
# proxy's CPU.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 LISTEN_PORT BACKEND_PORT [WORKERS]" >&2
    exit 2
fi
listen=$1
backend=$2
workers=${3:-auto}
case "$workers" in
    auto) workers_value='"auto"' ;;
    *[!0-9]*|"") echo "$0: WORKERS must be auto or a count, not $workers" >&2; exit 2 ;;
    *) workers_value=$workers ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${L4LB_PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

buffers_lines=""
if [ -n "${L4LB_BUFFERS:-}" ]; then
    buffers_lines="rcvbuf = ${L4LB_BUFFERS}
sndbuf = ${L4LB_BUFFERS}"
fi

algorithm=rr
if [ "$("$py" -c "from l4lb.algorithms import ALGORITHMS; print('leastconn' in ALGORITHMS)")" = "True" ]; then
    algorithm=leastconn
fi

# Beside the bench's own scratch files, never in the repo.
dir="${L4LB_BENCH_DIR:-${TMPDIR:-/tmp}/l4lb-bench}/run"
mkdir -p "$dir"
conf="$dir/l4lb-$listen.toml"
cat >"$conf" <<TOML
# written by $0 for the benchmark
[global]
workers = $workers_value
max_connections = 20000
shutdown_timeout = 2.0

[control]
socket = "l4lb-$listen.sock"

[log]
level = "warning"
format = "json"
access = false

[listeners.bench]
bind = ["127.0.0.1:$listen"]
pool = "bench"
$buffers_lines

[pools.bench]
algorithm = "$algorithm"
backends = [
  { name = "b1", address = "127.0.0.1:$backend" },
]
TOML
if [ -n "${L4LB_SUBSCRIBE:-}" ]; then
    "$py" - "$dir/l4lb-$listen.sock" "$L4LB_SUBSCRIBE" <<'PY' &
import json, os, socket, sys, time
path, interval = sys.argv[1], sys.argv[2]
for _ in range(200):                      # until the balancer has made its socket
    if os.path.exists(path):
        break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try:
        s.connect(path)
        break
    except OSError:
        time.sleep(0.05)
s.sendall(f"subscribe {interval}\n".encode())
buf = b""
while data := s.recv(1 << 20):             # the balancer's end closes it
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        json.loads(line)
PY
fi
exec "$py" -m l4lb run -c "$conf"

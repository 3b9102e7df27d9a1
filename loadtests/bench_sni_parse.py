"""Parse time per TLS ClientHello: the compiled parser vs its reference twin.

    python loadtests/bench_sni_parse.py [--repeat 5]

Columns (microseconds of CPU per hello, median of --repeat runs, each run at least
0.2 CPU-s; CPU time because the machines are shared and noisy, see NOTES.md):
  C loop     l4lb._native.bench_sni_scan: sni_scan_hello + sni_scan_result in a C loop,
             what the relay pays per peek (the name and ALPN objects included).
  py call    l4lb._native.parse_client_hello from a Python loop (buffer + tuple).
  twin       l4lb.reference.sni.parse_client_hello from a Python loop.
  x twin/py  twin / py call.
The hellos are real ones from Python's ssl (memory BIOs, no network): TLS 1.3 with ALPN
(OpenSSL pads it to 517 bytes), TLS 1.2, the TLS 1.3 one grown to about 1.8 KB by a
padding extension (the size of a post-quantum key share) and re-framed into 4 records
(the gathering path), and the first half of a hello (a NEED_MORE answer). A script, not
a test: no assertion on speed.
"""
import argparse
import ssl
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l4lb import _native  # noqa: E402
from l4lb.reference import sni as twin  # noqa: E402
from bench_picks import rate  # noqa: E402  (this folder is sys.path[0] for a script)

CAP = twin.SNI_MAX_CLIENT_HELLO


def client_hello(server_name, alpn, max_version=None):
    """The ClientHello records an ssl client sends first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def padded_in_records(records, pad, count):
    """`records` (one record) with a padding extension of `pad` bytes, cut into `count`."""
    payload = records[5:]
    body = payload[4:]
    fixed = 2 + 32
    fixed += 1 + body[fixed]
    fixed += 2 + int.from_bytes(body[fixed:fixed + 2], "big")
    fixed += 1 + body[fixed]
    exts = body[fixed + 2:] + b"\x00\x15" + pad.to_bytes(2, "big") + bytes(pad)
    body = body[:fixed] + len(exts).to_bytes(2, "big") + exts
    payload = b"\x01" + len(body).to_bytes(3, "big") + body
    step = -(-len(payload) // count)
    return b"".join(b"\x16\x03\x01" + len(payload[i:i + step]).to_bytes(2, "big")
                    + payload[i:i + step] for i in range(0, len(payload), step))


def per_call_us(run):
    """CPU microseconds per call of run(count): bench_picks' rate, inverted."""
    return 1e6 / rate(run)


def python_loop(parse, data):
    def run(count):
        for _ in range(count):
            parse(data, CAP)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tls13 = client_hello("api.example.com", ["h2", "http/1.1"])
    cases = {
        "tls1.3+alpn": tls13,
        "tls1.2+alpn": client_hello("web.example.com", ["http/1.1"], ssl.TLSVersion.TLSv1_2),
        "1.8KB/4 recs": padded_in_records(tls13, 1300, 4),
        "half (more)": tls13[:len(tls13) // 2],
    }
    print(f"{'hello':<14}{'bytes':>7}{'C loop':>10}{'py call':>10}{'twin':>10}{'x twin/py':>11}"
          "   (us per hello, CPU)")
    for label, data in cases.items():
        answer = _native.parse_client_hello(data, CAP)
        assert answer == twin.parse_client_hello(data, CAP), label
        columns = []
        for run in (lambda n: _native.bench_sni_scan(data, CAP, n),
                    python_loop(_native.parse_client_hello, data),
                    python_loop(twin.parse_client_hello, data)):
            columns.append(statistics.median(per_call_us(run) for _ in range(args.repeat)))
        c_loop, py_call, ref = columns
        print(f"{label:<14}{len(data):>7}{c_loop:>10.3f}{py_call:>10.3f}{ref:>10.2f}"
              f"{ref / py_call:>10.0f}x   status {answer[0]}")


if __name__ == "__main__":
    main()

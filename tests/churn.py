"""The churn load client for the restart tests (issue 16): a separate process, so the load
is not slowed by the test process that restarts the balancer under it.

    python tests/churn.py echo [--port 0] [--lifetime 600]
    python tests/churn.py load --port P [--rate 500] [--streams 50] [--duration 30]
                               [--result FILE] [--host 127.0.0.1]

`echo` serves an echo backend on 127.0.0.1 (port 0: any free one), prints `listening PORT`
once it listens and serves until SIGTERM/SIGINT (or --lifetime s, so a test that crashed
cannot leave it behind). The test writes the balancer's config
pointing at it before the load starts.

`load` runs two kinds of traffic against the balancer at --host:--port:

- short connections, --rate a second, paced from the start time (a late tick launches
  what it owes, so a slow loop turn does not lower the rate): each connects, sends 64
  random bytes, reads back exactly those 64 and closes. Each ends as exactly one of ok,
  refused (ECONNREFUSED), reset (ECONNRESET / EPIPE / EOF before the 64 bytes), wrong
  (bytes differ), timeout (no answer within SHORT_TIMEOUT) or other (any other error).
  Besides, a connect is counted slow when it took over SLOW_CONNECT s, and syn_retransmit
  when its socket's TCP_INFO shows a retransmit right after connect: a SYN the listener
  dropped (accept queue full, or no listener for a moment under a SYN flood guard) is
  resent after the 1 s initial RTO. That count does not depend on how busy the machine
  is, unlike the slow figure, so a test asserts on it.
- --streams long-lived connections open for the whole run, each sending STREAM_CHUNK random
  bytes every 50-100 ms and reading the echo back; at the end it half-closes
  (shutdown(SHUT_WR)), reads to EOF and compares the sha256 of all it sent with all it
  received. A stream cut once open (reset, mismatch, short, timeout) is counted in
  stream_failures and replaced by a new one, so the load stays the same; a replacement
  that cannot connect is counted apart (streams.connect_failures) and tried again.

Once the first short connection succeeded and every stream is connected it prints
`running`; every PROGRESS_INTERVAL s it prints `progress {json counts}`. It ends after
--duration s or on SIGTERM/SIGINT (then it stops launching, lets the connections in flight
finish and ends the streams as above), prints `result {json}`, writes the JSON to --result
and exits 0: the test judges the figures. The first ERRORS_KEPT error messages are kept.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import os
import random
import resource
import signal
import socket
import struct
import sys
import time

try:
    import uvloop
except ImportError:         # the plain asyncio loop holds a few hundred a second too
    uvloop = None

SHORT_PAYLOAD = 64
# No answer within this many seconds is a timeout (a SYN dropped three times in a row
# would still connect within 1 + 2 + 4 s).
SHORT_TIMEOUT = 10.0
# A connect slower than this had a SYN resent (the initial RTO is 1 s) or waited in a
# full accept queue; on a busy machine the event loop's own lag can add to it.
SLOW_CONNECT = 1.0
STREAM_CHUNK = 4096
STREAM_INTERVAL = (0.05, 0.1)
# Seconds the end of a stream (half-close, read to EOF) and the connections still in
# flight at the end get before they count as timed out.
FINISH_TIMEOUT = 15.0
PROGRESS_INTERVAL = 0.5
ERRORS_KEPT = 10

# struct tcp_info (linux/tcp.h): eight one-byte fields, then u32s; tcpi_retransmits is
# byte 2 (the current RTO's retries), tcpi_total_retrans the 24th u32 (every segment
# resent over the socket's life, the SYN included).
TCP_INFO_LEN = 104
TCPI_RETRANSMITS_OFFSET = 2
TCPI_TOTAL_RETRANS_OFFSET = 8 + 23 * 4

# Errors that mean the peer cut the connection (as opposed to refusing it).
RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}


def syn_retransmits(sock: socket.socket) -> int:
    """Segments resent on `sock` so far (right after connect: the SYNs resent)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    if len(info) < TCP_INFO_LEN:
        return info[TCPI_RETRANSMITS_OFFSET]
    (total,) = struct.unpack_from("I", info, TCPI_TOTAL_RETRANS_OFFSET)
    return max(total, info[TCPI_RETRANSMITS_OFFSET])


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno in RESET_ERRNOS:
        return "reset"
    if isinstance(exc, EOFError):
        return "reset"
    return "other"


def raise_fd_limit() -> None:
    """Up to SHORT_TIMEOUT x rate connections can be in flight if the balancer stalls."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- echo ---------------------------------------------------------------------------------

class EchoProtocol(asyncio.Protocol):
    """Echo everything; on the client's EOF, close once the echo is flushed."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False        # the transport closes after writing what is buffered


async def serve_echo(host: str, port: int, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=4096,
                                      reuse_address=True)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.timeout(lifetime):
            await stop.wait()
    except TimeoutError:
        pass
    server.close()


# --- load ---------------------------------------------------------------------------------

class Load:
    """The counts of one run; every task reports here (one event loop: no locks)."""

    def __init__(self, host: str, port: int, rate: float, streams: int, duration: float):
        self.host, self.port = host, port
        self.rate, self.streams, self.duration = rate, streams, duration
        self.short = dict(attempts=0, ok=0, refused=0, reset=0, wrong=0, timeout=0, other=0,
                          slow_connects=0, syn_retransmits=0)
        # failed (and its kinds): streams cut once open; connect_failures: the new
        # streams that could not connect (a cut stream is replaced every 50 ms or so).
        self.stream = dict(opened=0, ok=0, failed=0, reset=0, mismatch=0, short=0,
                           timeout=0, other=0, connect_failures=0, bytes_sent=0,
                           bytes_received=0)
        self.connect_times: list[float] = []
        self.errors: list[str] = []
        self.stopping = asyncio.Event()
        self.streams_up: set[int] = set()
        self.announced = False
        self.started = time.monotonic()

    def error(self, where: str, exc: BaseException | str) -> None:
        if len(self.errors) < ERRORS_KEPT:
            text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{time.monotonic() - self.started:.3f}s {where}: {text}")

    def maybe_announce(self) -> None:
        if (not self.announced and self.short["ok"] > 0
                and len(self.streams_up) == self.streams):
            self.announced = True
            print("running", flush=True)

    async def open(self) -> socket.socket:
        """A connected non-blocking socket; counts the connect's time and SYN resends."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        began = time.monotonic()
        try:
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        took = time.monotonic() - began
        self.connect_times.append(took)
        if took > SLOW_CONNECT:
            self.short["slow_connects"] += 1
        if syn_retransmits(sock):
            self.short["syn_retransmits"] += 1
        return sock

    async def short_connection(self) -> None:
        loop = asyncio.get_running_loop()
        payload = random.randbytes(SHORT_PAYLOAD)
        sock = None
        try:
            async with asyncio.timeout(SHORT_TIMEOUT):
                sock = await self.open()
                await loop.sock_sendall(sock, payload)
                got = b""
                while len(got) < SHORT_PAYLOAD:
                    data = await loop.sock_recv(sock, SHORT_PAYLOAD - len(got))
                    if not data:
                        raise EOFError(f"EOF after {len(got)} of {SHORT_PAYLOAD} bytes")
                    got += data
            if got != payload:
                self.short["wrong"] += 1
                self.error("short", "wrong bytes")
            else:
                self.short["ok"] += 1
                self.maybe_announce()
        except Exception as exc:
            kind = classify(exc)
            self.short[kind] += 1
            self.error("short", exc)
        finally:
            if sock is not None:
                sock.close()

    async def run_stream(self, index: int) -> None:
        """Stream `index`, replaced by a new one each time it fails, until the end."""
        while not self.stopping.is_set():
            kind = await self.one_stream(index)
            self.streams_up.discard(index)
            if kind == "ok":
                return
            if kind == "connect":
                self.stream["connect_failures"] += 1
            else:
                self.stream["failed"] += 1
                self.stream[kind] += 1
            if not self.stopping.is_set():
                await asyncio.sleep(0.05)     # a refused reconnect must not spin

    async def one_stream(self, index: int) -> str:
        """One stream's life: 'ok', or the kind of its failure."""
        sock = None
        sent, received = hashlib.sha256(), hashlib.sha256()
        counts = {"sent": 0, "received": 0}
        try:
            try:
                async with asyncio.timeout(SHORT_TIMEOUT):
                    sock = await self.open()
            except Exception as exc:
                self.error(f"stream {index} connect", exc)
                return "connect"
            self.stream["opened"] += 1
            self.streams_up.add(index)
            self.maybe_announce()
            reader = asyncio.ensure_future(self.read_stream(sock, received, counts))
            try:
                await self.write_stream(sock, sent, counts, reader)
                sock.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(FINISH_TIMEOUT):
                    await asyncio.shield(reader)
            except BaseException:
                reader.cancel()
                raise
        except Exception as exc:
            self.error(f"stream {index}", exc)
            return classify(exc)
        finally:
            if sock is not None:
                sock.close()
            self.stream["bytes_sent"] += counts["sent"]
            self.stream["bytes_received"] += counts["received"]
        if counts["received"] < counts["sent"]:
            self.error(f"stream {index}", f"short: {counts['received']} of {counts['sent']}")
            return "short"
        if sent.digest() != received.digest():
            self.error(f"stream {index}", "sha256 mismatch")
            return "mismatch"
        self.stream["ok"] += 1
        return "ok"

    async def write_stream(self, sock, sent, counts, reader: asyncio.Future) -> None:
        """Send a chunk every STREAM_INTERVAL until the end; a reader that ended early
        (reset, EOF) ends the stream at once with its error."""
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            chunk = random.randbytes(STREAM_CHUNK)
            await loop.sock_sendall(sock, chunk)
            sent.update(chunk)
            counts["sent"] += len(chunk)
            await asyncio.wait([reader], timeout=random.uniform(*STREAM_INTERVAL))
            if reader.done():
                reader.result()         # raises the reader's error
                raise EOFError("EOF before the end")

    async def read_stream(self, sock, received, counts) -> None:
        """Read to EOF. EOF before the end (the writer still going) is a cut stream."""
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                if not self.stopping.is_set():
                    raise EOFError("EOF before the end")
                return
            received.update(data)
            counts["received"] += len(data)

    async def progress(self) -> None:
        while not self.stopping.is_set():
            try:
                async with asyncio.timeout(PROGRESS_INTERVAL):
                    await self.stopping.wait()
            except TimeoutError:
                pass
            print("progress", json.dumps(self.counts()), flush=True)

    def counts(self) -> dict:
        """The short connections' counts, their failures summed, and the cut streams."""
        failures = sum(self.short[k] for k in ("refused", "reset", "wrong", "timeout", "other"))
        return {**self.short, "failures": failures, "stream_failures": self.stream["failed"]}

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.started = time.monotonic()
        streams = [asyncio.ensure_future(self.run_stream(i)) for i in range(self.streams)]
        progress = asyncio.ensure_future(self.progress())
        shorts: set[asyncio.Future] = set()
        end = self.started + self.duration
        launched = 0
        stopped_by = "duration"
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if self.stopping.is_set():
                stopped_by = "signal"
                break
            due = int((now - self.started) * self.rate) + 1
            for _ in range(due - launched):
                task = asyncio.ensure_future(self.short_connection())
                shorts.add(task)
                task.add_done_callback(shorts.discard)
            self.short["attempts"] += max(0, due - launched)
            launched = max(launched, due)
            # Sleep until the next one is due (at least a millisecond: no busy loop).
            next_at = self.started + launched / self.rate
            await asyncio.sleep(max(0.001, next_at - time.monotonic()))
        elapsed = time.monotonic() - self.started
        self.stopping.set()
        if shorts:      # each has its own SHORT_TIMEOUT
            await asyncio.wait(shorts, timeout=SHORT_TIMEOUT + 1)
        _, pending = await asyncio.wait(streams, timeout=FINISH_TIMEOUT + 1)
        for task in pending:
            task.cancel()
        await progress
        return self.result(elapsed, stopped_by)

    def result(self, elapsed: float, stopped_by: str) -> dict:
        times = sorted(self.connect_times)

        def quantile(q: float) -> float | None:
            if not times:
                return None
            return round(times[min(len(times) - 1, int(q * len(times)))] * 1000, 3)

        short = self.short
        return {
            **self.counts(),
            "streams": self.stream,
            "rate_target": self.rate,
            "rate_achieved": round(short["attempts"] / elapsed, 1) if elapsed else 0.0,
            "ok_rate": round(short["ok"] / elapsed, 1) if elapsed else 0.0,
            "elapsed": round(elapsed, 3),
            "stopped_by": stopped_by,
            "connect_p50_ms": quantile(0.50),
            "connect_p99_ms": quantile(0.99),
            "connect_max_ms": round(times[-1] * 1000, 3) if times else None,
            "errors": self.errors,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="serve an echo backend until SIGTERM")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=0)
    echo.add_argument("--lifetime", type=float, default=600.0)
    load = sub.add_parser("load", help="short connections and streams against --port")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--rate", type=float, default=500.0)
    load.add_argument("--streams", type=int, default=50)
    load.add_argument("--duration", type=float, default=30.0)
    load.add_argument("--result", help="write the result JSON here too")
    args = parser.parse_args(argv)

    raise_fd_limit()
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.command == "echo":
        asyncio.run(serve_echo(args.host, args.port, args.lifetime))
        return 0
    result = asyncio.run(Load(args.host, args.port, args.rate, args.streams,
                              args.duration).run())
    text = json.dumps(result)
    if args.result:
        tmp = args.result + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.result)
    print("result", text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

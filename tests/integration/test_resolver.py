"""Hostname backends through a running balancer and a real DNS server on loopback
(dnsmasq answering from a hosts file the test rewrites): new connections follow the
answer, a dead DNS server leaves the last good answer in use, and no connection waits on
a lookup of its own."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading

import pytest

from ..support import ask, hello, simple_config, wait_until

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None,
                                reason="dnsmasq is not installed (apt-get install dnsmasq-base)")

NAME = "svc.test"


class Dnsmasq:
    """dnsmasq on 127.0.0.1:random UDP/TCP port, answering *.test from `hosts` only."""

    def __init__(self, tmp_path, lines, ttl: int = 1, extra=()):
        self.hosts = tmp_path / "dns-hosts"
        self.write(lines)
        self.log_path = tmp_path / "dnsmasq.log"
        for _ in range(5):     # dnsmasq binds UDP and TCP: a port taken meanwhile, try another
            self.start(ttl, extra)
            try:
                wait_until(lambda: self.proc.poll() is not None or (
                    self.log_path.exists() and "read " in self.log_path.read_text()),
                    timeout=10, what="dnsmasq to read its hosts file")
            except TimeoutError:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
        raise RuntimeError("dnsmasq did not start: " + self.proc.stderr.read().decode())

    def start(self, ttl, extra) -> None:
        self.port = _free_port()
        self.log_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["dnsmasq", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts}",
             f"--local-ttl={ttl}", f"--port={self.port}", "--listen-address=127.0.0.1",
             "--bind-interfaces", "-k", "--local=/test/", "--log-queries",
             f"--log-facility={self.log_path}", "--pid-file=", "--user=root", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def write(self, lines) -> None:
        self.hosts.write_text("".join(f"{ip} {NAME}\n" for ip in lines))

    def reload(self, lines) -> None:
        """A new hosts file, re-read at once (SIGHUP)."""
        self.write(lines)
        self.proc.send_signal(signal.SIGHUP)

    def queries(self) -> int:
        return self.log_path.read_text().count(f"query[A] {NAME}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _free_port() -> int:
    """A port free for UDP and, at this moment, for TCP too (dnsmasq binds both)."""
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()


class NameServer:
    """A TCP server on host:port answering every line with its name."""

    def __init__(self, name: str, host: str, port: int = 0):
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn:
            try:
                while conn.recv(100):
                    conn.sendall(self.name.encode() + b"\n")
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def dns_world(tmp_path):
    """(start_dns, servers): start_dns(lines, ttl) runs dnsmasq; servers a and b answer
    on 127.0.0.2 and 127.0.0.3 at one port; all stopped after the test."""
    started = []
    a = NameServer("a", "127.0.0.2")
    b = NameServer("b", "127.0.0.3", a.port)

    def start_dns(lines, ttl=1, extra=(), folder=None):
        d = Dnsmasq(folder or tmp_path, lines, ttl, extra)
        started.append(d)
        return d

    yield start_dns, (a, b)
    for d in started:
        d.stop()
    a.close()
    b.close()


def resolver_config(dns, port: int, host: str = NAME) -> str:
    return simple_config([("svc", f"{host}:{port}")]) + f"""
[resolvers]
nameservers = ["127.0.0.1:{dns.port}"]
min_ttl = 0.2
retry = 0.2
timeout = 1.0
"""


def backend_row(lb) -> dict:
    return ask(lb, "show backends")["backends"][0]


@pytest.mark.timeout(60)
def test_new_connections_follow_the_dns_answer_and_keep_it_when_dns_dies(dns_world, l4lb):
    start_dns, (a, b) = dns_world
    dns = start_dns(["127.0.0.2"])
    lb = l4lb(resolver_config(dns, a.port))
    port = lb.port()
    wait_until(lambda: backend_row(lb)["resolved"] == ["127.0.0.2"], what="the first answer")
    assert {hello(port) for _ in range(3)} == {"a"}

    dns.reload(["127.0.0.3"])
    wait_until(lambda: hello(port) == "b", what="connections to move to the new address")
    assert backend_row(lb)["resolved"] == ["127.0.0.3"]
    lb.wait_event("resolve_changed", name=NAME)

    dns.stop()
    failed = lb.wait_event("resolve_failed", name=NAME)
    assert failed["kept"] == ["127.0.0.3"]
    row = backend_row(lb)
    assert row["resolve_error"] and row["resolved"] == ["127.0.0.3"]
    assert {hello(port) for _ in range(5)} == {"b"}
    assert len(lb.events_named("resolve_failed")) == 1      # once per episode


@pytest.mark.timeout(60)
def test_connections_make_no_dns_query_of_their_own(dns_world, l4lb):
    start_dns, (a, _) = dns_world
    dns = start_dns(["127.0.0.2"], ttl=300)
    lb = l4lb(resolver_config(dns, a.port))
    port = lb.port()
    wait_until(lambda: backend_row(lb)["resolved"] == ["127.0.0.2"], what="the first answer")
    before = dns.queries()
    assert [hello(port) for _ in range(20)] == ["a"] * 20
    assert dns.queries() == before


@pytest.mark.timeout(60)
def test_every_address_of_the_name_is_tried_in_order(dns_world, l4lb):
    start_dns, (a, _) = dns_world
    # 127.0.0.4 has nothing listening on the port: whichever order DNS gives, every
    # connection reaches `a` through the other address.
    dns = start_dns(["127.0.0.4", "127.0.0.2"])
    lb = l4lb(resolver_config(dns, a.port))
    port = lb.port()
    wait_until(lambda: sorted(backend_row(lb)["resolved"] or []) == ["127.0.0.2", "127.0.0.4"],
               what="both addresses")
    assert {hello(port) for _ in range(6)} == {"a"}


@pytest.mark.timeout(60)
def test_an_srv_name_connects_to_the_port_its_records_give(dns_world, l4lb):
    start_dns, (a, _) = dns_world
    srv = "_echo._tcp.svc.test"
    dns = start_dns(["127.0.0.2"], extra=[f"--srv-host={srv},{NAME},{a.port},0,10"])
    # The address's own port (1) is wrong on purpose: the SRV record's port must win.
    lb = l4lb(resolver_config(dns, 1, host=srv))
    port = lb.port()
    wait_until(lambda: backend_row(lb)["resolved"] == [f"127.0.0.2:{a.port}"],
               what="the SRV answer")
    assert {hello(port) for _ in range(3)} == {"a"}


@pytest.mark.timeout(60)
def test_health_checks_probe_the_resolved_address(dns_world, l4lb):
    start_dns, (a, _) = dns_world
    dns = start_dns(["127.0.0.2"])
    # svc.test is known to this dnsmasq only: a probe resolving it through the system's
    # resolver would fail and mark the backend down.
    config = resolver_config(dns, a.port) + """
[pools.main.health]
interval = 0.2
timeout = 1.0
rise = 1
fall = 1
"""
    lb = l4lb(config)
    wait_until(lambda: backend_row(lb)["health"] == "passing", what="a passing check")
    assert backend_row(lb)["state"] == "up"


@pytest.mark.timeout(60)
def test_a_reload_to_other_nameservers_asks_them_at_once(dns_world, l4lb, tmp_path):
    start_dns, (a, b) = dns_world
    first = start_dns(["127.0.0.2"], ttl=300)
    lb = l4lb(resolver_config(first, a.port))
    port = lb.port()
    wait_until(lambda: backend_row(lb)["resolved"] == ["127.0.0.2"], what="the first answer")
    (tmp_path / "second").mkdir()
    second = start_dns(["127.0.0.3"], ttl=300, folder=tmp_path / "second")
    lb.path.write_text(resolver_config(second, a.port))
    reply = ask(lb, "reload")
    assert f"resolvers nameservers [127.0.0.1:{second.port}]" in reply["changes"]
    # The first answer's TTL (300 s) has not run out: only the reload makes it ask again.
    wait_until(lambda: hello(port) == "b", what="connections to follow the new nameserver")

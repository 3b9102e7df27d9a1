"""PROXY protocol through the balancer: send_proxy to backends, accept_proxy from an
upstream balancer, and the hostile inputs of the accept side (slowloris, garbage)."""
import socket
import time

import pytest

from l4lb.proxyproto import encode_v2, parse_proxy_header

from ..support import connect, simple_config, ask


def rejected(lb, reason, count=None, timeout=10.0):
    """rejected[reason] of listener web, waiting until it reaches `count` if given."""
    deadline = time.monotonic() + timeout
    while True:
        row = ask(lb, "show listeners")["listeners"][0]
        seen = row["rejected"].get(reason, 0)
        if count is None or seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def proxy_reporting_handler(conn, backend):
    """A backend that requires a PROXY header: answers the addresses it carries, then
    echoes the stream that follows it."""
    data = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
        result = parse_proxy_header(data)
        if result is not None:
            break
    header, consumed = result
    src, dst = header.src, header.dst
    conn.sendall(f"{header.version} {src[0]} {src[1]} {dst[0]} {dst[1]}\n".encode())
    rest = data[consumed:]
    while True:
        if rest:
            conn.sendall(rest)
        rest = conn.recv(4096)
        if not rest:
            return


def recv_line(s):
    """One line, read a byte at a time so nothing after it is taken from the socket."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def is_closed(s):
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.timeout(30)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_gives_the_backend_the_client_real_address(backends, l4lb, version):
    b = backends(proxy_reporting_handler, name="pp")
    lb = l4lb(simple_config([("pp", b.address)], listener_extra=f'send_proxy = "{version}"'))
    s = connect(lb.port(), source="127.0.0.5")
    s.sendall(b"hello\n")                    # sent before the backend is even connected
    client_port = s.getsockname()[1]
    report = recv_line(s).decode().split()
    assert report == [version[1], "127.0.0.5", str(client_port), "127.0.0.1", str(lb.port())]
    assert recv_line(s) == b"hello\n"        # the client's bytes follow the header only
    s.close()


@pytest.mark.timeout(30)
def test_accept_proxy_address_is_the_client_for_logs_conns_acl_and_send_proxy(backends, l4lb):
    b = backends(proxy_reporting_handler, name="pp")
    lb = l4lb(simple_config([("pp", b.address)], listener_extra="""
accept_proxy = true
send_proxy = "v2"
deny = ["203.0.113.66"]
"""))
    s = connect(lb.port(), source="127.0.0.5")
    s.sendall(b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\nhello\n")
    assert recv_line(s) == b"2 203.0.113.7 4242 198.51.100.1 443\n"
    assert recv_line(s) == b"hello\n"
    conns = ask(lb, "show conns")["conns"]
    assert [c["client"] for c in conns] == ["203.0.113.7:4242"]
    s.close()
    ev = lb.wait_event("connection_closed", client="203.0.113.7:4242")
    assert ev["reason"] == "closed" and ev["bytes_in"] == len(b"hello\n")
    # An IPv6 client behind the upstream balancer, in the binary header.
    s = connect(lb.port())
    s.sendall(encode_v2(("2001:db8::7", 5555), ("2001:db8::1", 443)) + b"six\n")
    assert recv_line(s) == b"2 2001:db8::7 5555 2001:db8::1 443\n"
    assert recv_line(s) == b"six\n"
    s.close()
    # deny applies to the address from the header, not to the upstream's.
    s = connect(lb.port(), source="127.0.0.5")
    s.sendall(b"PROXY TCP4 203.0.113.66 198.51.100.1 4242 443\r\nhello\n")
    assert is_closed(s)
    s.close()
    assert rejected(lb, "denied", 1) == 1
    assert b.accepted == 2


@pytest.mark.timeout(30)
def test_unknown_header_keeps_the_connection_address(backends, l4lb):
    b = backends(proxy_reporting_handler, name="pp")
    lb = l4lb(simple_config([("pp", b.address)], listener_extra="""
accept_proxy = true
send_proxy = "v1"
"""))
    s = connect(lb.port(), source="127.0.0.9")
    s.sendall(b"PROXY UNKNOWN\r\nhi\n")
    report = recv_line(s).decode().split()
    assert report[:3] == ["1", "127.0.0.9", str(s.getsockname()[1])]
    s.close()


@pytest.mark.timeout(40)
def test_slowloris_is_closed_by_the_header_timeout_while_others_are_served(backends, l4lb):
    b = backends(proxy_reporting_handler, name="pp")
    lb = l4lb(simple_config([("pp", b.address)], access=False, listener_extra="""
accept_proxy = true
send_proxy = "v1"
proxy_timeout = 1.0
"""))
    port = lb.port()
    start = time.monotonic()
    silent = [connect(port, source="127.0.0.5") for _ in range(500)]
    served = 0
    while time.monotonic() - start < 1.5:    # normal clients throughout the attack
        s = connect(port, source="127.0.0.6")
        s.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\nok\n")
        assert recv_line(s) == b"1 192.0.2.1 1000 192.0.2.2 2000\n"
        s.close()
        served += 1
    assert served >= 10
    assert rejected(lb, "proxy_timeout", 500) == 500
    for s in silent:
        s.settimeout(5)
        assert is_closed(s)
        s.close()
    assert time.monotonic() - start < 5
    row = ask(lb, "show listeners")["listeners"][0]
    assert row["active"] == 0 and set(row["rejected"]) == {"proxy_timeout"}


@pytest.mark.timeout(30)
def test_bad_header_closes_only_that_connection_at_once(backends, l4lb):
    b = backends(proxy_reporting_handler, name="pp")
    lb = l4lb(simple_config([("pp", b.address)], listener_extra="""
accept_proxy = true
send_proxy = "v1"
"""))
    port = lb.port()
    good = connect(port, source="127.0.0.5")
    good.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n")
    assert recv_line(good).startswith(b"1 192.0.2.1 ")
    hostile = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",               # not a PROXY header at all
        b"\r\n\r\n\x00\r\nQUIT\x0b\x21\x00\x0c",            # v2 signature mismatch
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",          # port out of range
        b"PROXY TCP4 " + b"1" * 200,                        # no CRLF within 107 bytes
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))[:14] + b"\xff\xff",   # v2 length too big
    ]
    started = time.monotonic()
    for data in hostile:
        s = connect(port)
        s.sendall(data)
        assert is_closed(s), data
        s.close()
    truncated = connect(port)                             # half a header, then EOF
    truncated.sendall(b"PROXY TCP4 1.2.3")
    truncated.shutdown(socket.SHUT_WR)
    assert is_closed(truncated)
    truncated.close()
    assert time.monotonic() - started < 3                 # at once, not at proxy_timeout
    assert rejected(lb, "bad_proxy_header", len(hostile) + 1) == len(hostile) + 1
    good.sendall(b"still here\n")
    assert recv_line(good) == b"still here\n"
    good.close()
    assert b.accepted == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_that_arrives_in_pieces_is_read_whole_and_the_bytes_after_it_follow(
        backends, l4lb, version):
    b = backends(proxy_reporting_handler, name="pp")
    lb = l4lb(simple_config([("pp", b.address)], listener_extra=f"""
accept_proxy = true
send_proxy = "{version}"
"""))
    header = (b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n" if version == "v1"
              else encode_v2(("192.0.2.1", 1000), ("192.0.2.2", 2000)))
    s = connect(lb.port())
    for i in range(len(header)):             # one segment per byte (TCP_NODELAY)
        s.sendall(header[i:i + 1])
        time.sleep(0.002)
    s.sendall(b"first\n")
    assert recv_line(s) == f"{version[1]} 192.0.2.1 1000 192.0.2.2 2000\n".encode()
    assert recv_line(s) == b"first\n"
    s.sendall(b"PROXY TCP4 again\n")         # after the header it is plain payload
    assert recv_line(s) == b"PROXY TCP4 again\n"
    s.close()

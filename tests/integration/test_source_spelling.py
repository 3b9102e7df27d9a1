"""Per-source limits through PROXY headers: one client address written two ways is one
source (issue 20 item 7)."""
import pytest

from ..support import ask, connect, name_handler, simple_config



def through_proxy(port, header: bytes):
    """A client behind an upstream balancer: its PROXY v1 header, one line, the reply
    (b"" when the balancer refused it). The socket stays open."""
    s = connect(port)
    s.sendall(header + b"x\n")
    try:
        reply = s.recv(100)
    except ConnectionResetError:
        reply = b""
    return s, reply


@pytest.mark.timeout(30)
def test_one_client_in_ipv4_and_mapped_ipv6_spelling_gets_the_limit_once(backends, l4lb):
    b = backends(name_handler, name="alpha")
    lb = l4lb(simple_config([("alpha", b.address)], listener_extra="""
accept_proxy = true
per_source_max_connections = 2
"""))
    port = lb.port()
    v4 = b"PROXY TCP4 10.0.0.1 192.0.2.2 1000 443\r\n"
    mapped = b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:192.0.2.2 1001 443\r\n"
    held = []
    for header in (v4, mapped):
        s, reply = through_proxy(port, header)
        held.append(s)
        assert reply == b"alpha\n"
    for header in (v4, mapped, b"PROXY TCP6 ::FFFF:a00:1 ::1 1002 443\r\n"):
        s, reply = through_proxy(port, header)
        held.append(s)
        assert reply == b""
    row = ask(lb, "show listeners")["listeners"][0]
    assert row["rejected"] == {"per_source_max_connections": 3}
    for s in held:
        s.close()

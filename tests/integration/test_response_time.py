"""The measured response time (issue 21): from the client's first bytes passed on to the
backend's first bytes back, per connection in the access log and per backend as an EWMA
in `show backends` and /metrics. Only lower bounds on time are asserted: the backends
wait a known minimum before they answer."""
from __future__ import annotations

import socket
import time

from ..support import ask, connect, iter_lines, recv_all, simple_config, wait_until
from .test_metrics import metrics_config, metrics_port, samples, scrape, value

DELAY = 0.05          # what the slow backend waits at least before each answer


def slow_answer_handler(conn, backend):
    """Answer each line after DELAY seconds."""
    for _ in iter_lines(conn):
        time.sleep(DELAY)
        conn.sendall(b"ok\n")


def banner_handler(conn, backend):
    """Greet first (as an SMTP or FTP server does), then echo lines at once."""
    conn.sendall(b"220 hello\n")
    for line in iter_lines(conn):
        conn.sendall(line + b"\n")


def ask_once(port: int, request: bytes = b"hi\n") -> bytes:
    s = connect(port)
    s.sendall(request)
    s.shutdown(socket.SHUT_WR)
    reply = recv_all(s)
    s.close()
    return reply


def test_a_backend_that_answers_after_50_ms_has_a_response_time_of_at_least_50_ms(
        backends, l4lb):
    slow = backends(slow_answer_handler)
    lb = l4lb(metrics_config([("slow", slow.address)]))
    for _ in range(3):
        assert ask_once(lb.port()) == b"ok\n"
    closed = lb.wait_events("connection_closed", 3)
    assert all(ev["response_ms"] >= DELAY * 1000.0 for ev in closed), closed
    row = ask(lb, "show backends")["backends"][0]
    assert row["responses"] == 3
    assert row["resp_ms"] >= DELAY * 1000.0
    parsed = samples(scrape(metrics_port(lb)))
    labels = {"pool": "main", "backend": "slow"}
    assert value(parsed, "l4lb_backend_response_time_average_seconds", **labels) >= DELAY
    assert value(parsed, "l4lb_backend_responses_total", **labels) == 3


def test_a_backend_that_speaks_first_gives_no_response_time(backends, l4lb):
    greeter = backends(banner_handler)
    lb = l4lb(simple_config([("greeter", greeter.address)]))
    for _ in range(3):
        s = connect(lb.port())
        assert s.recv(100) == b"220 hello\n"     # the banner came before any request
        s.sendall(b"EHLO x\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"EHLO x\n"
        s.close()
    closed = lb.wait_events("connection_closed", 3)
    assert [ev["response_ms"] for ev in closed] == [None, None, None]
    row = ask(lb, "show backends")["backends"][0]
    assert row["responses"] == 0
    assert row["resp_ms"] is None


def test_a_connection_closed_before_the_backend_answered_gives_no_response_time(
        backends, l4lb):
    def silent_handler(conn, backend):
        conn.recv(100)                           # reads the request, never answers
        conn.recv(100)

    silent = backends(silent_handler)
    lb = l4lb(simple_config([("silent", silent.address)]))
    s = connect(lb.port())
    s.sendall(b"hi\n")
    wait_until(lambda: ask(lb, "show backends")["backends"][0]["bytes_in"] == 3,
               what="the request to reach the backend")
    s.close()
    ev = lb.wait_event("connection_closed")
    assert ev["response_ms"] is None
    assert ask(lb, "show backends")["backends"][0]["responses"] == 0


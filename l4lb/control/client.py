"""Talking to a running balancer's control socket (`l4lb ctl`, `l4lb deploy`)."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path


class ControlClientError(Exception):
    """The control socket could not be reached or answered nonsense; the message is
    meant for a person."""


class ControlClient:
    """A connection to the control socket; `call` sends one command, returns the reply."""

    def __init__(self, path, timeout: float | None = 30.0):
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except PermissionError:
            self.sock.close()
            raise ControlClientError(
                f"permission denied: cannot connect to {self.path} "
                "(its mode is control.mode; run as its owner or a member of its group)") from None
        except FileNotFoundError:
            self.sock.close()
            raise ControlClientError(f"no control socket at {self.path}: is l4lb running?") from None
        except ConnectionRefusedError:
            self.sock.close()
            raise ControlClientError(f"nothing answers on {self.path}: l4lb is not running "
                                     "(stale socket file)") from None
        except OSError as exc:
            self.sock.close()
            raise ControlClientError(f"cannot connect to {self.path}: {exc.strerror}") from None
        self.buf = b""

    def call(self, line: str, timeout: float | None = None) -> dict:
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            self.sock.sendall(line.encode("utf-8") + b"\n")
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise ControlClientError("the balancer closed the control connection")
                self.buf += data
        except socket.timeout:
            raise ControlClientError(f"no reply to {line!r} in time") from None
        except OSError as exc:
            raise ControlClientError(f"control connection failed: {exc}") from None
        raw, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(raw)
        except ValueError:
            raise ControlClientError(f"unreadable reply: {raw[:200]!r}") from None

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def call(path, line: str, timeout: float | None = 30.0) -> dict:
    """Send one command on a fresh connection and return its reply."""
    with ControlClient(path, timeout) as client:
        return client.call(line)


def format_reply(reply: dict) -> str:
    """A person's view of a reply: tables for row lists, `key: value` lines otherwise."""
    if not reply.get("ok"):
        return f"error: {reply.get('error')}"
    lines = []
    for key, value in reply.items():
        if key == "ok":
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(format_table(value))
        elif isinstance(value, list):
            lines.extend(str(v) for v in value) if key == "commands" else lines.append(
                f"{key}: {', '.join(map(str, value)) if value else '(none)'}")
        else:
            lines.append(f"{key}: {_cell(value)}")
    return "\n".join(lines) if lines else "ok"


# Columns holding a wall-clock time (seconds since the epoch): a person reads an age.
TIME_COLUMNS = frozenset({"last_check", "started"})


def format_table(rows: list[dict], now: float | None = None) -> str:
    columns = list(rows[0])
    now = time.time() if now is None else now
    cells = [[_age(r.get(c), now) if c in TIME_COLUMNS else _cell(r.get(c)) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for row in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(out)


def _age(value, now: float) -> str:
    if not isinstance(value, (int, float)):
        return _cell(value)
    return f"{max(0.0, now - value):.1f}s ago"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)

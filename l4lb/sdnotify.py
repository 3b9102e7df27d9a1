"""systemd's readiness protocol (sd_notify(3)), spoken by the master.

With `Type=notify` systemd starts the unit and waits for `READY=1`; l4lb sends it once
every listener is bound and every worker accepts, so `systemctl start` returns (and units
ordered after l4lb start) only when it serves. A reload is bracketed: `RELOADING=1` with
`MONOTONIC_USEC` (CLOCK_MONOTONIC in µs, which systemd uses to order the messages) before
the file is read, `READY=1` once it was applied or refused. `STOPPING=1` starts a graceful
shutdown. `STATUS=` lines say what `systemctl status` should show.

The protocol: one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by
`$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Nothing here may stall
the balancer or stop it: the socket is non-blocking, a datagram the manager does not take
is dropped, and without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.
Only the master sends (`NotifyAccess=main` in conf/l4lb.service); workers never do.
"""
from __future__ import annotations

import os
import socket
import time


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd reads MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def message(**fields) -> bytes:
    """The datagram for `fields`: `KEY=VALUE` lines, keys upper-cased; a newline in a value
    (a STATUS text) is replaced by a space, since it would end the field."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key.upper()}={text}")
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


class Notifier:
    """The master's line to systemd; a no-op when $NOTIFY_SOCKET is not set."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET") or ""
        if path.startswith("@"):
            path = "\0" + path[1:]                  # the abstract namespace
        self.address = path or None
        self.sent = 0                               # datagrams the manager took

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields) -> bool:
        """Send one datagram; True when it went out. Never raises, never blocks."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(message(**fields), self.address)
        except OSError:
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status, mainpid=os.getpid())

    def reloading(self) -> bool:
        return self.send(reloading=1, monotonic_usec=monotonic_usec(),
                         status="reloading the config")

    def stopping(self, status: str) -> bool:
        return self.send(stopping=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

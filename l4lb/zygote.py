"""The fork server the master forks its workers from (DESIGN.md §9).

At the very start of `l4lb run`, before the master has any thread, the master forks this
small process: it holds every module a worker needs already imported and waits on a
Unix SOCK_SEQPACKET socket for spawn requests. For each it forks a worker, which runs
l4lb.worker on the channel socket the request carried (SCM_RIGHTS), and answers with
the worker's pid; when a worker ends it tells the master its pid and exit status. A
worker therefore starts in milliseconds (a fork, not an interpreter and its imports) and
inherits nothing of the master's event loop, threads or sockets opened later.

The zygote is plain blocking code (it never runs an event loop): one select over its
socket and a self-pipe that SIGCHLD writes to. It exits when the master's end of its
socket closes; workers already started live on (each notices the master is gone through
its own channel).
"""
from __future__ import annotations

import array
import json
import os
import select
import signal
import socket

# Bytes of one request or event record, and of the ancillary data for one descriptor.
RECORD_MAX = 4096


def start() -> "ZygoteHandle":
    """Fork the zygote (call before any thread exists); the master's handle on it."""
    from . import worker as _worker     # noqa: F401 — imported here so the fork has it

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:                        # the zygote
        status = 0
        try:
            ours.close()
            _close_listen_fds()
            _serve(theirs)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    theirs.close()
    return ZygoteHandle(pid, ours)


class ZygoteHandle:
    """The master's end: `spawn` requests and `exited` events (see workers.py)."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock


def _close_listen_fds() -> None:
    """Close the listening sockets systemd passed the master (LISTEN_FDS, from fd 3 on):
    they are the master's to keep or close, and a bind the master closes must not stay
    open here (it would go on queueing connections nobody accepts). No Python object of
    the zygote wraps them: the master takes them only after this fork (listen.Inherited)."""
    from .listen import SD_LISTEN_FDS_START
    count = os.environ.pop("LISTEN_FDS", "")
    pid = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid == str(os.getppid()) and count.isdigit():
        os.closerange(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))


def _send(sock: socket.socket, msg: dict) -> None:
    try:
        sock.send(json.dumps(msg).encode() + b"\n")
    except OSError:
        pass


def _serve(sock: socket.socket) -> None:
    """The zygote's body: fork workers on request, report their exits."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)     # the master's to handle; it stops us by EOF
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
            _reap(sock, children)
        if sock in ready:
            try:
                data, ancdata, _, _ = sock.recvmsg(RECORD_MAX, socket.CMSG_SPACE(16))
            except InterruptedError:
                continue
            if not data:
                return                          # the master is gone
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                _become_worker(sock, wake_r, wake_w, fds[0], request)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            _send(sock, {"reply": request["id"], "pid": pid})


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(sock, {"event": "exited", "pid": pid, "status": os.waitstatus_to_exitcode(status)})


def _become_worker(sock, wake_r, wake_w, channel_fd: int, request: dict) -> None:
    """In the forked child: drop the zygote's state, run the worker, never return."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        # SIGTERM, SIGINT and SIGHUP stay ignored: the worker ignores them too (worker.run).
        for sig in (signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        from . import worker
        status = worker.run(socket.socket(fileno=channel_fd), request["index"],
                            request["generation"]) or 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(status)

"""The listening sockets of every listener, and accepting on them.

The master owns the sockets (DESIGN.md §9): per bind it opens one SO_REUSEPORT socket per
worker (a BindGroup, listen()ed in worker order), hands socket i to worker i and keeps its
own reference, so a worker that dies leaves its socket open and the connections queued
on it wait for the worker that replaces it instead of being reset. The kernel spreads
new connections over the group by their 4-tuple hash. `Listening` is the master's room:
opening a listener's binds, and a reload's new binds before anything else changes
(`open_binds`), so a bind that fails leaves the running listeners as they were.

A worker runs `Accepting`: an Acceptor (accept4 in C, ext/l4lb/acceptor.pxi) on its
socket of each bind, retuned and swapped on reload, and paused for every listener when
the process runs out of descriptors.
"""
from __future__ import annotations

import ipaddress
import os
import socket

from . import _native
from .config import Address, Config, ListenerConfig
from .model import Listener

# Backlog of each listening socket: deep enough for connection bursts (HAProxy uses the
# listener's maxconn; the kernel caps it at net.core.somaxconn anyway).
LISTEN_BACKLOG = 4096
# Seconds between two `fd_exhausted` warnings: one line per episode, not one per client.
FD_EXHAUSTED_LOG_INTERVAL = 10.0
# Seconds accepting stays paused once the process ran out of descriptors (new clients wait
# in the kernel's backlog meanwhile instead of being accepted only to be refused): the
# relay's own, which an Acceptor also uses when accept4 finds no descriptor.
ACCEPT_PAUSE = _native.ACCEPT_PAUSE


def open_listening_socket(addr: Address, rcvbuf: int = 0, sndbuf: int = 0, *,
                          reuse_port: bool = False, port: int | None = None) -> socket.socket:
    """A bound, listening, non-blocking socket for `addr` (on `port` instead of addr's
    when given: the port a group's first socket got for port 0). OSError (e.g.
    EADDRINUSE) propagates with the address in its message."""
    family = addr.family
    host = addr.host
    if family == socket.AF_UNSPEC:               # a hostname: listen on its first address
        try:
            info = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
        family, host = info[0], info[4][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit the listener's buffer sizes; set before listen() so
        # the window scale a client is offered fits them.
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind((host, addr.port if port is None else port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return sock


class BindGroup:
    """The sockets of one bind: one SO_REUSEPORT socket per worker, in worker order (the
    master's; worker i accepts on sockets[i]); or one socket systemd passed, which every
    worker accepts on (the same object at every index)."""

    def __init__(self, addr: Address, sockets: list[socket.socket]):
        self.addr = addr
        self.sockets = sockets

    def close(self) -> None:
        for sock in {id(s): s for s in self.sockets}.values():
            sock.close()
        self.sockets = []


# Socket activation (sd_listen_fds(3)): systemd passes listening sockets from fd 3 on.
SD_LISTEN_FDS_START = 3


def _address_key(host: str, port: int) -> tuple:
    try:
        return (ipaddress.ip_address(host.split("%", 1)[0]), port)
    except ValueError:
        return (host, port)


class Inherited:
    """The listening sockets systemd passed (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES),
    by the address each is bound to; `take(addr)` hands one to the bind it matches. The
    variables are removed from the environment, so no child takes them for its own."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.sockets: dict[tuple, socket.socket] = {}
        self.names: dict[tuple, str] = {}
        count = environ.pop("LISTEN_FDS", None)
        pid = environ.pop("LISTEN_PID", None)
        names = (environ.pop("LISTEN_FDNAMES", None) or "").split(":")
        if count is None or pid != str(os.getpid()):
            return
        for i in range(int(count) if count.isdigit() else 0):
            fd = SD_LISTEN_FDS_START + i
            try:
                sock = socket.socket(fileno=fd)
                if sock.type != socket.SOCK_STREAM:
                    sock.detach()
                    continue
                sock.set_inheritable(False)
                sock.setblocking(False)
                key = _address_key(*sock.getsockname()[:2])
            except OSError:
                continue
            self.sockets[key] = sock
            self.names[key] = names[i] if i < len(names) else ""

    def take(self, addr: Address) -> socket.socket | None:
        """The passed socket bound to `addr`'s IP and port, or None."""
        return self.sockets.pop(_address_key(addr.host, addr.port), None)

    def close_rest(self) -> list[str]:
        """Close the passed sockets no bind took; their `ip:port` for the log."""
        left = [f"{host}:{port}" for host, port in self.sockets]
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        return left


def open_bind_group(addr: Address, count: int, rcvbuf: int = 0, sndbuf: int = 0) -> BindGroup:
    """`count` listening sockets on `addr` sharing it with SO_REUSEPORT (port 0: the port
    the first one got). OSError when one cannot be opened (none is left open then)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            port = sockets[0].getsockname()[1] if sockets else None
            sockets.append(open_listening_socket(addr, rcvbuf, sndbuf, reuse_port=True,
                                                 port=port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return BindGroup(addr, sockets)


def serve_socket(sock: socket.socket, runtime=None) -> _native.Acceptor:
    """Accept on `sock` for `runtime`: an Acceptor (accept4 in C, the relay on raw
    sockets). A listener that a reload is creating has no runtime yet: its Acceptor is
    attached once it exists (swap_binds), before the loop runs any accept."""
    return _native.Acceptor(sock, runtime)


def bound_port(server, addr=None):
    """The port `server` listens on (port 0 resolved), or `addr`'s when it has no socket."""
    if server.sockets:
        return server.sockets[0].getsockname()[1]
    return addr.port if addr is not None else None


class _Servers:
    """What both rooms do to every listener's servers (BindGroups in the master,
    Acceptors in a worker): `listeners` is the process's own name -> Listener table
    (read here, written by the balancer and by reload)."""

    def __init__(self, loop, hub, listeners: dict[str, Listener], log):
        self.loop = loop
        self.hub = hub
        self.listeners = listeners
        self.log = log

    def close_all(self) -> None:
        """Close every listener's servers (shutdown, or a failed start)."""
        for listener in self.listeners.values():
            self.close_listener(listener)

    @staticmethod
    def close_listener(listener: Listener) -> None:
        for server in listener.servers.values():
            server.close()
        listener.servers.clear()


class Listening(_Servers):
    """The master's binds of every listener: a BindGroup per bind (one socket per worker).

    Each Listener's `servers` (bind -> BindGroup) is written only here. `count` is the
    number of workers: the sockets per bind. The master closes its sockets only once the
    workers stopped accepting (Balancer.shutdown), or when a reload drops a bind."""

    def __init__(self, loop, hub, listeners: dict[str, Listener], log, count: int = 1,
                 inherited: Inherited | None = None):
        super().__init__(loop, hub, listeners, log)
        self.count = count
        self.inherited = inherited

    def open_group(self, addr: Address, lcfg: ListenerConfig) -> BindGroup:
        """The bind's sockets: the one systemd passed for its address, which every worker
        shares (systemd keeps it open across restarts), or one SO_REUSEPORT socket per
        worker."""
        sock = self.inherited.take(addr) if self.inherited is not None else None
        if sock is not None:
            self.log.info("listen_fd_taken", listener=lcfg.name, bind=str(addr))
            return BindGroup(addr, [sock] * self.count)
        return open_bind_group(addr, self.count, lcfg.rcvbuf, lcfg.sndbuf)

    def release_inherited(self) -> None:
        """After start: close the passed sockets no bind took (a config without them)."""
        if self.inherited is not None:
            left = self.inherited.close_rest()
            if left:
                self.log.warning("listen_fds_unused", binds=left,
                                 hint="add them to a listener's bind, or drop them from "
                                      "the systemd socket unit")

    async def open_listener(self, listener: Listener) -> None:
        """Bind every address of `listener` (start). OSError if one fails; the binds
        opened before it stay in `listener.servers` for close_all."""
        for addr in listener.config.bind:
            group = self.open_group(addr, listener.config)
            listener.servers[str(addr)] = group
            self.log.info("listener_started", listener=listener.name, bind=str(addr),
                          port=bound_port(group, addr), **listener.route())

    def sockets_of(self, index: int) -> list[tuple[str, str, socket.socket]]:
        """(listener, bind, socket) of worker `index`, for every bind of every listener."""
        return [(name, bind, group.sockets[index])
                for name, listener in self.listeners.items()
                for bind, group in listener.servers.items()]

    # --- reload -------------------------------------------------------------------------

    async def open_binds(self, new: Config) -> dict[str, dict]:
        """Per listener of `new`: {bind: BindGroup} after the reload, the groups of binds
        kept and new binds opened. Opens every new bind before anything changes; on
        failure closes what it opened and re-raises (OSError)."""
        result = {}
        opened = []
        try:
            for name, lcfg in new.listeners.items():
                listener = self.listeners.get(name)
                current = listener.servers if listener is not None else {}
                servers = {}
                for addr in lcfg.bind:
                    group = current.get(str(addr))
                    if group is None:
                        group = self.open_group(addr, lcfg)
                        opened.append(group)
                    servers[str(addr)] = group
                result[name] = servers
        except BaseException:
            for group in opened:
                group.close()
            raise
        return result

    @staticmethod
    def close_binds(servers) -> None:
        """Close the groups a reload opened but does not use (it was refused)."""
        for per_listener in servers.values():
            for server in per_listener.values():
                server.close()

    def swap_binds(self, listener: Listener, servers: dict) -> None:
        """After a reload: `listener` has the groups `servers` (bind -> BindGroup, from
        open_binds); the binds it no longer has are closed here (the workers close their
        copies when they apply the reload), the new ones logged."""
        for addr, server in listener.servers.items():
            if servers.get(addr) is not server:
                server.close()
        for addr, server in servers.items():
            if listener.servers.get(addr) is not server:
                self.log.info("listener_started", listener=listener.name, bind=addr,
                              port=bound_port(server), **listener.route())
        listener.servers = servers

    @staticmethod
    def retune_binds(listener: Listener, lcfg: ListenerConfig, servers: dict) -> None:
        """A reload that changes a listener's rcvbuf or sndbuf: client sockets inherit the
        listening socket's sizes, so the new size is set on each bind the reload keeps
        (new binds are opened with it; backend sockets follow the ListenerRuntime). A
        size set back to 0 cannot give an open socket its autotuning back: the binds kept
        keep the old size until they are reopened (the reload's change line says so).
        The workers' descriptors are the same sockets: setting it here sets it for all."""
        kept = [server for addr, server in listener.servers.items()
                if servers.get(addr) is server]
        for key, option in (("rcvbuf", socket.SO_RCVBUF), ("sndbuf", socket.SO_SNDBUF)):
            now = getattr(lcfg, key)
            if now and now != getattr(listener.config, key):
                for server in kept:
                    for sock in server.sockets:
                        sock.setsockopt(socket.SOL_SOCKET, option, now)


class Accepting(_Servers):
    """A worker's Acceptors: one per bind of every listener, on the socket the master
    gave it, and accept pausing when the process runs out of descriptors.

    Each Listener's `servers` (bind -> Acceptor) is written only here; closing them
    (close_all) stops this worker accepting, while the master's sockets stay open."""

    def __init__(self, loop, hub, listeners: dict[str, Listener], log):
        super().__init__(loop, hub, listeners, log)
        self._fd_exhausted_logged_at = -1e9
        hub.on_overload = self.pause_accepting

    def serve(self, listener: Listener, bind: str, sock: socket.socket) -> None:
        listener.servers[bind] = serve_socket(sock, listener.runtime)

    def pause_accepting(self) -> None:
        """Hub.on_overload: the process ran out of descriptors. Pause accepting on every
        listener for ACCEPT_PAUSE s, and log it
        once per episode (at most every FD_EXHAUSTED_LOG_INTERVAL s)."""
        paused = [listener.name for listener in self.listeners.values()
                  if any([server.pause() for server in listener.servers.values()])]
        for name in paused:
            self.listeners[name].runtime.count_rejected("accept_paused")
        now = self.loop.time()
        if now - self._fd_exhausted_logged_at >= FD_EXHAUSTED_LOG_INTERVAL:
            self._fd_exhausted_logged_at = now
            self.log.warning("fd_exhausted", active=self.hub.active, paused=paused,
                             pause_s=ACCEPT_PAUSE,
                             hint="raise LimitNOFILE / ulimit -n, or lower max_connections")

    def new_binds(self, sockets: list[tuple[str, str, socket.socket]]) -> dict[str, dict]:
        """Per listener: {bind: Acceptor} after a reload, from the Acceptors of binds
        kept and the new sockets the master sent ((listener, bind, socket))."""
        fresh = {(name, bind): sock for name, bind, sock in sockets}
        result: dict[str, dict] = {}
        for name, listener in self.listeners.items():
            result[name] = dict(listener.servers)
        for (name, bind), sock in fresh.items():
            listener = self.listeners.get(name)
            result.setdefault(name, {})[bind] = serve_socket(
                sock, listener.runtime if listener is not None else None)
        return result

    @staticmethod
    def swap_binds(listener: Listener, servers: dict, binds: list[str]) -> None:
        """After a reload: `listener` accepts on `servers` for its `binds`; the Acceptors
        of binds it no longer has are closed."""
        keep = {bind: servers[bind] for bind in binds if bind in servers}
        for server in keep.values():
            server.attach(listener.runtime)       # no-op once attached
        for addr, server in listener.servers.items():
            if keep.get(addr) is not server:
                server.close()
        listener.servers = keep

"""The listening sockets of every listener and accept pausing.

What it owns: opening a listener's binds (`open_listening_socket`, `serve_socket`), the
Acceptors that accept on them (accept4 in C, ext/l4lb/acceptor.pxi), retuning
and closing them, and pausing every listener's accepts when the process runs out of
descriptors. Reload asks it to open a new config's binds before anything else changes
(`open_binds`), so a bind that fails leaves the running listeners as they were.
"""
from __future__ import annotations

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


def open_listening_socket(addr: Address, rcvbuf: int = 0, sndbuf: int = 0) -> socket.socket:
    """A bound, listening, non-blocking socket for `addr`. OSError (e.g. EADDRINUSE)
    propagates with the address in its message."""
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
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit the listener's buffer sizes; set before listen() so
        # the window scale a client is offered fits them.
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind((host, addr.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return sock


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


class Listening:
    """The binds of every listener of one balancer, and accept pausing.

    `listeners` is the balancer's own name -> Listener table (read here, written by the
    balancer and by reload); each Listener's `servers` (bind -> server) is written only
    here."""

    def __init__(self, loop, hub, listeners: dict[str, Listener], log):
        self.loop = loop
        self.hub = hub
        self.listeners = listeners
        self.log = log
        self._fd_exhausted_logged_at = -1e9
        hub.on_overload = self.pause_accepting

    async def open_listener(self, listener: Listener) -> None:
        """Bind every address of `listener` (start). OSError if one fails; the binds
        opened before it stay in `listener.servers` for close_all."""
        for addr in listener.config.bind:
            sock = open_listening_socket(addr, listener.config.rcvbuf, listener.config.sndbuf)
            server = serve_socket(sock, listener.runtime)
            listener.servers[str(addr)] = server
            self.log.info("listener_started", listener=listener.name, bind=str(addr),
                          port=bound_port(server, addr), **listener.route())

    def close_all(self) -> None:
        """Stop accepting on every listener (shutdown, or a failed start)."""
        for listener in self.listeners.values():
            self.close_listener(listener)

    @staticmethod
    def close_listener(listener: Listener) -> None:
        for server in listener.servers.values():
            server.close()
        listener.servers.clear()

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

    # --- reload -------------------------------------------------------------------------

    async def open_binds(self, new: Config) -> dict[str, dict]:
        """Per listener of `new`: {bind: server} after the reload, the servers of binds
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
                    server = current.get(str(addr))
                    if server is None:
                        sock = open_listening_socket(addr, lcfg.rcvbuf, lcfg.sndbuf)
                        server = serve_socket(sock, listener.runtime if listener else None)
                        opened.append(server)
                    servers[str(addr)] = server
                result[name] = servers
        except BaseException:
            for server in opened:
                server.close()
            raise
        return result

    @staticmethod
    def close_binds(servers) -> None:
        """Close the servers a reload opened but does not use (it was refused)."""
        for per_listener in servers.values():
            for server in per_listener.values():
                server.close()

    def swap_binds(self, listener: Listener, servers: dict) -> None:
        """After a reload: `listener` accepts on `servers` (bind -> server, from
        open_binds); the binds it no longer has are closed, the new ones logged."""
        for server in servers.values():
            if isinstance(server, _native.Acceptor):
                server.attach(listener.runtime)       # no-op once attached
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
        keep the old size until they are reopened (the reload's change line says so)."""
        kept = [server for addr, server in listener.servers.items()
                if servers.get(addr) is server]
        for key, option in (("rcvbuf", socket.SO_RCVBUF), ("sndbuf", socket.SO_SNDBUF)):
            now = getattr(lcfg, key)
            if now and now != getattr(listener.config, key):
                for server in kept:
                    for sock in server.sockets:
                        sock.setsockopt(socket.SOL_SOCKET, option, now)

"""The listening sockets of every listener, and accepting on them.

The master owns the sockets (DESIGN.md §9): per bind it opens one SO_REUSEPORT socket per
worker (a BindGroup, listen()ed in worker order) and keeps its own reference, so a worker
that dies leaves its socket open and the connections queued on it wait for the worker
that replaces it instead of being reset. The kernel spreads new connections over the
group by their 4-tuple hash. `Listening` is the master's room: opening a listener's binds,
and a reload's new binds before anything else changes (`open_binds`), so a bind that fails
leaves the running listeners as they were.

A group's socket is never closed while its bind is configured, because closing a
SO_REUSEPORT socket resets the connections queued on it (net.ipv4.tcp_migrate_req is off
by default). So when the number of workers changes (a reload, an upgrade) a group only
grows: every socket always has a worker accepting on it (BindGroup.assigned: worker i of
N takes sockets i, i+N, ...), and when a group has more sockets than workers a cBPF
program (SO_ATTACH_REUSEPORT_CBPF, `steer`) sends new connections to the first N only, one
per worker, so the load stays even; the others just drain what they hold.

A worker runs `Accepting`: an Acceptor (accept4 in C, ext/l4lb/acceptor.pxi) on each of
its sockets of each bind, retuned and swapped on reload, and paused for every listener when
the process runs out of descriptors.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct

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
    """The sockets of one bind: SO_REUSEPORT sockets in listen() order (the master's;
    see `assigned` for who accepts on which), or one socket systemd passed (`shared`),
    which every worker accepts on."""

    def __init__(self, addr: Address, sockets: list[socket.socket], shared: bool = False):
        self.addr = addr
        self.sockets = sockets
        self.shared = shared
        self.steered_to = 0             # the first N the cBPF program picks from; 0: none

    def assigned(self, index: int, count: int) -> list[socket.socket]:
        """The sockets worker `index` of `count` accepts on: sockets index, index+count,
        ... (every socket has exactly one worker), or the shared one."""
        if self.shared:
            return self.sockets[:1]
        return self.sockets[index::count]

    def grow(self, count: int, rcvbuf: int = 0, sndbuf: int = 0) -> None:
        """At least `count` sockets (more workers than before). OSError when one cannot
        be opened; the ones opened before it stay (harmless: each gets a worker)."""
        if self.shared:
            return
        while len(self.sockets) < count:
            port = self.sockets[0].getsockname()[1]
            self.sockets.append(open_listening_socket(self.addr, rcvbuf, sndbuf,
                                                      reuse_port=True, port=port))

    def steer(self, count: int, force: bool = False) -> None:
        """New connections to the first `count` sockets only, when the group has more
        (their workers are the ones that take new load); over them all otherwise. With
        `force` the program is attached even then, so sockets added later get nothing
        until steered to. OSError if the kernel refuses the program."""
        if self.shared or not self.sockets:
            return
        want = count if count < len(self.sockets) else len(self.sockets)
        if not force and (want == self.steered_to
                          or (self.steered_to == 0 and want == len(self.sockets))):
            return
        attach_steering(self.sockets[0], want)
        self.steered_to = want

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


# SO_ATTACH_REUSEPORT_CBPF (asm-generic/socket.h) and the classic BPF words of the program
# `A = random() % N; return A`: the index, in listen() order, of the socket that gets the
# new connection (man 7 socket). Random rather than a hash: the program sees a SYN only,
# and which of the N sockets queues it does not matter, only that it is one of the N.
SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20      # BPF_LD | BPF_W | BPF_ABS
_BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00     # BPF_ALU | BPF_MOD | BPF_K
_BPF_RET_A = 0x06 | 0x10                # BPF_RET | BPF_A
_SKF_AD_RANDOM = -0x1000 + 56           # SKF_AD_OFF + SKF_AD_RANDOM


def steering_program(count: int) -> list[tuple[int, int, int, int]]:
    """The cBPF instructions (code, jt, jf, k) that pick one of `count` sockets."""
    return [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM & 0xFFFFFFFF),
            (_BPF_ALU_MOD_K, 0, 0, count),
            (_BPF_RET_A, 0, 0, 0)]


def attach_steering(sock: socket.socket, count: int) -> None:
    """Attach steering_program(count) to `sock`'s reuseport group (any socket of the
    group will do; a later program replaces it). OSError if refused."""
    program = steering_program(count)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn)
                                                   for insn in program))
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


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


class AcceptorSet:
    """A worker's Acceptors of one bind when it accepts on more than one of the group's
    sockets (fewer workers than sockets): it looks like one Acceptor."""

    def __init__(self, acceptors: list):
        self.acceptors = acceptors

    @property
    def sockets(self) -> list:
        return [sock for a in self.acceptors for sock in a.sockets]

    def add(self, acceptor) -> "AcceptorSet":
        self.acceptors.append(acceptor)
        return self

    def attach(self, runtime) -> None:
        for a in self.acceptors:
            a.attach(runtime)

    def pause(self, *args) -> bool:
        return any([a.pause(*args) for a in self.acceptors])

    def close(self) -> None:
        for a in self.acceptors:
            a.close()


def add_acceptor(servers: dict, bind: str, acceptor):
    """servers[bind] with `acceptor` added (an AcceptorSet once there are two)."""
    current = servers.get(bind)
    if current is None:
        servers[bind] = acceptor
    elif isinstance(current, AcceptorSet):
        current.add(acceptor)
    else:
        servers[bind] = AcceptorSet([current, acceptor])


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
        self.handed: dict[str, BindGroup] = {}     # an upgrade's: bind -> the old group

    def open_group(self, addr: Address, lcfg: ListenerConfig) -> BindGroup:
        """The bind's sockets: the one systemd passed for its address, which every worker
        shares (systemd keeps it open across restarts), or one SO_REUSEPORT socket per
        worker."""
        group = self.handed.pop(str(addr), None)
        if group is not None:
            self.log.info("listen_fds_taken_over", listener=lcfg.name, bind=str(addr),
                          sockets=len(group.sockets))
            return group
        sock = self.inherited.take(addr) if self.inherited is not None else None
        if sock is not None:
            self.log.info("listen_fd_taken", listener=lcfg.name, bind=str(addr))
            return BindGroup(addr, [sock], shared=True)
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

    def sockets_of(self, index: int, count: int) -> list[tuple[str, str, socket.socket]]:
        """(listener, bind, socket) for each socket worker `index` of `count` accepts on,
        for every bind of every listener (BindGroup.assigned)."""
        return [(name, bind, sock)
                for name, listener in self.listeners.items()
                for bind, group in listener.servers.items()
                for sock in group.assigned(index, count)]

    def groups(self):
        """(ListenerConfig, BindGroup) of every bind."""
        return [(listener.config, group) for listener in self.listeners.values()
                for group in listener.servers.values()]

    async def take_over(self, takeover) -> None:
        """An upgrade: the old master's sockets of every bind this config has, which
        open_group then uses instead of binding."""
        for listener in self.listeners.values():
            for addr in listener.config.bind:
                got = await takeover.bind_sockets(str(addr))
                if got is not None:
                    sockets, meta = got
                    group = BindGroup(addr, sockets, shared=meta.get("shared", False))
                    group.steered_to = meta.get("steered_to", 0)
                    self.handed[str(addr)] = group

    def resize(self, count: int, current: int | None = None) -> list[tuple[BindGroup, int]]:
        """Before `count` workers start while `current` accept: every group gets a socket
        for each. A group that grows is first steered to the `current` sockets its workers
        accept on, so that the new sockets queue nothing before their workers accept.
        Returns (group, its length before) of the groups grown, for `shrink`. OSError
        when a socket cannot be opened (after shrinking back)."""
        grown: list[tuple[BindGroup, int]] = []
        try:
            for lcfg, group in self.groups():
                if group.shared or len(group.sockets) >= count:
                    continue
                group.steer(group.steered_to or len(group.sockets) if current is None
                            else current, force=True)
                grown.append((group, len(group.sockets)))
                group.grow(count, lcfg.rcvbuf, lcfg.sndbuf)
        except OSError:
            self.shrink(grown, current)
            raise
        self.count = count
        return grown

    def shrink(self, grown: list[tuple[BindGroup, int]], current: int) -> None:
        """Undo `resize` (the new workers did not start): close the sockets it added,
        which no connection was steered to, last first (the kernel keeps the order of
        the others then)."""
        for group, length in grown:
            while len(group.sockets) > length:
                group.sockets.pop().close()
            group.steer(current)
        self.count = current

    def steer(self, count: int) -> None:
        """Once `count` workers accept: new connections go to one socket of each."""
        for _, group in self.groups():
            try:
                group.steer(count)
            except OSError as exc:
                self.log.warning("listen_steering_failed", bind=str(group.addr),
                                 error=str(exc), hint="new connections spread over all "
                                 "of the bind's sockets, some workers take more than others")

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
        """Accept on `sock` for `listener`'s `bind` (a bind may have several sockets)."""
        add_acceptor(listener.servers, bind, serve_socket(sock, listener.runtime))

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
        fresh = {(name, bind) for name, bind, _ in sockets}
        result: dict[str, dict] = {}
        for name, listener in self.listeners.items():
            result[name] = dict(listener.servers)
        for name, bind, sock in sockets:
            listener = self.listeners.get(name)
            servers = result.setdefault(name, {})
            if (name, bind) in fresh:               # a new bind: not the kept Acceptors'
                servers.pop(bind, None)
                fresh.discard((name, bind))
            add_acceptor(servers, bind, serve_socket(
                sock, listener.runtime if listener is not None else None))
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

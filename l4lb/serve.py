"""The composition root of `l4lb run` (and `l4lb demo`): builds the balancer, its control
socket and metrics, and routes the process's signals to them.

Start order, and why: the signal handlers go first (a SIGHUP at any moment neither kills
the process nor is lost: one that comes while starting is kept and carried out once the
balancer is ready); then the fd limit, the model, the control socket and the binds.
A SIGHUP during a graceful shutdown is refused (logged as config_rejected) and never
reopens a listener (Balancer.reload refuses it).
"""
from __future__ import annotations

import asyncio
import os
import resource
import signal

from . import __version__, upgrade, zygote
from .actions import OperationError
from .balancer import Balancer
from .config import Config
from .control.server import ControlServer
from .log import get_logger
from .process import fd_limit_warnings
from .signals import HANDLED, EarlySignals


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class SignalRouter:
    """SIGHUP -> reload, SIGTERM/SIGINT -> graceful shutdown, from the loop's start on.
    Until `ready` is called the last wish of each kind is kept, then carried out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, early: EarlySignals | None = None):
        self.loop = loop
        self.balancer: Balancer | None = None
        self.reload_wanted = False
        self.upgrade_wanted = False
        self.stop_wanted = False
        for sig in HANDLED:
            loop.add_signal_handler(sig, self.on_signal, sig)
        for sig in (early.received if early is not None else ()):
            self.on_signal(sig)

    def on_signal(self, sig: int) -> None:
        if self.balancer is None:
            if sig == signal.SIGHUP:
                self.reload_wanted = True
            elif sig == signal.SIGUSR2:
                self.upgrade_wanted = True
            else:
                self.stop_wanted = True
        elif sig == signal.SIGHUP:
            self.loop.create_task(self.reload())
        elif sig == signal.SIGUSR2:
            self.loop.create_task(self.upgrade())
        else:
            self.loop.create_task(self.balancer.shutdown())

    def ready(self, balancer: Balancer) -> None:
        self.balancer = balancer
        if self.stop_wanted:
            self.on_signal(signal.SIGTERM)
        elif self.reload_wanted:
            self.on_signal(signal.SIGHUP)
        if self.upgrade_wanted and not self.stop_wanted:
            self.on_signal(signal.SIGUSR2)

    async def reload(self) -> None:
        try:
            await self.balancer.reload("sighup")
        except OperationError:
            pass                        # logged as config_rejected by the reload itself

    async def upgrade(self) -> None:
        try:
            await self.balancer.upgrade.run("sigusr2")
        except OperationError:
            pass                        # logged as upgrade_failed by the upgrade itself


async def serve(config: Config, ready=None, early: EarlySignals | None = None) -> None:
    """Run a balancer for `config` until SIGTERM/SIGINT (graceful) — the body of `run`.
    `ready(balancer)` is called once it listens. OSError / ControlSocketError when it
    cannot start."""
    # First, while the process has no thread: the fork server the workers come from.
    fork_server = zygote.start()
    loop = asyncio.get_running_loop()
    signals = SignalRouter(loop, early)
    log = get_logger()
    # An upgrade's new master: the old one answers over $L4LB_UPGRADE_FD (upgrade.py).
    takeover = upgrade.Takeover.from_environ(loop)
    try:
        await _serve(config, loop, signals, log, fork_server, takeover, ready)
    except BaseException as exc:
        if takeover is not None and not takeover.channel.closed:
            takeover.failed(f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError)
                            else str(exc))
        raise


async def _serve(config, loop, signals, log, fork_server, takeover, ready) -> None:
    soft, hard = raise_fd_limit()
    log.info("fd_limit", soft=soft, hard=hard)
    for warning in fd_limit_warnings(config.global_.max_connections, soft):
        log.warning("fd_limit_low", soft=soft, hard=hard, warning=warning)
    for warning in config.warnings:             # deprecated keys (FILE:LINE key: message)
        log.warning("config_deprecated", warning=warning)
    if takeover is not None:
        info = await takeover.hello()
        log.info("upgrade_taking_over", old_pid=info.get("pid"),
                 generation=info.get("generation", 0) + 1)
    balancer = Balancer(config, loop, fork_server, takeover)
    control = ControlServer(balancer, config.control.socket, config.control.mode)
    balancer.upgrade = upgrade.Upgrade(balancer, control)
    if takeover is None:
        await control.start()
    else:
        control.keep_path = True        # the old master's until the hand-over
    try:
        await balancer.start()
        if takeover is not None:
            # Every worker accepts on the old master's sockets: it stops, this one
            # answers on its control socket (the same file) from now on.
            sock = await takeover.control_socket(config.control.socket)
            await takeover.ready(generation=balancer.generation, version=__version__,
                                 control_taken=sock is not None)
            control.keep_path = False
            await control.start(sock)
    except BaseException:
        control.close()
        raise
    log.info("started", pid=os.getpid(), version=__version__, config=str(config.path),
             control=str(config.control.socket), generation=balancer.generation)
    balancer.notifier.ready(balancer.status_line())
    signals.ready(balancer)
    if ready is not None:
        ready(balancer)
    try:
        await balancer.wait_stopped()
    finally:
        control.close()

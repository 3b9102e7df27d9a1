"""The signals `l4lb run` handles, caught from its first moment.

Python's default for SIGHUP is to die, and systemd's `Restart=on-failure` does not
restart a process that a SIGHUP killed; a `systemctl reload` right after a start must
not take the balancer down. So `catch_early` installs plain handlers before anything
slow; they only note what came. "Before anything slow" means before the package's own
import: `import l4lb` loads the compiled module and asyncio (about 0.2 s), which Python
runs before any code of `l4lb run`, so l4lb/__init__.py calls `catch_for_run(sys.argv)`
first, which installs them only when the command line is `l4lb run` (`python -m l4lb
run` or the `l4lb` script); `cmd_run` calls `catch_early` again, which returns the same
catcher.
Once the loop runs, serve.py takes the signals over (SIGTERM and SIGINT too) and replays
what was noted: a SIGHUP becomes a reload once the balancer is ready.

Deliberately tiny (imports nothing of l4lb): it runs before the rest is imported.
"""
from __future__ import annotations

import signal

# The signals `l4lb run` acts on: SIGHUP reloads; SIGTERM and SIGINT shut down gracefully;
# SIGUSR2 upgrades (the l4lb now installed takes over: upgrade.py).
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
# The ones caught before the loop runs. SIGTERM and SIGINT keep their defaults until then
# (a start stuck before the loop, reading a config on a hung mount say, can still be
# stopped); SIGHUP's and SIGUSR2's defaults would kill a process that was only asked to
# reload or upgrade.
EARLY = (signal.SIGHUP, signal.SIGUSR2)


class EarlySignals:
    """Notes the EARLY signals that arrive before the event loop takes them over."""

    def __init__(self):
        self.received: list[int] = []

    def install(self) -> "EarlySignals":
        for sig in EARLY:
            signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received.append(signum)


_early: EarlySignals | None = None


def catch_early() -> EarlySignals:
    """Install the early handlers (once per process); returns the catcher."""
    global _early
    if _early is None:
        _early = EarlySignals().install()
    return _early


def catch_for_run(argv: list[str]) -> None:
    """catch_early when `argv` is that of `l4lb run` (its first word after the program,
    or after `-m` while `python -m l4lb` imports the package, is `run`)."""
    if argv[1:2] == ["run"]:
        catch_early()

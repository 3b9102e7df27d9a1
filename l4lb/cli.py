"""The `l4lb` command line (DESIGN.md §3): parses arguments and calls the command.

`run` and `demo` need the event loop and the balancer (serve.py, the composition root,
with the control server, metrics and psutil); `ctl`, `check` and `deploy` need none of
it. So `run` and `demo` import those inside the function, which keeps `l4lb ctl` and
`l4lb check` quick to start; everything else is imported here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, default_config_path, load_config
from .control.client import ControlClientError, call, format_reply
from .deploy import fraction, parse_steps, run_deploy, seconds
from .log import configure_logging, get_logger
from .signals import catch_early


def load_or_exit(path=None) -> Config:
    """Load a config (the shipped default when `path` is None) or print every error
    (FILE:LINE key: message) and exit 1.

    The default config lives inside the installed package, which may not be writable, so
    its relative control socket is taken from the current directory instead."""
    try:
        config = load_config(path if path is not None else default_config_path())
    except ConfigError as exc:
        for issue in exc.issues:
            print(str(issue), file=sys.stderr)
        from .upgrade import report_failure    # an upgrade's new master: say why to the old
        report_failure("config rejected: " + "; ".join(str(i) for i in exc.issues))
        raise SystemExit(1)
    if path is None:
        config.control.socket = Path.cwd() / config.control.socket.name
    return config


def cmd_run(args) -> int:
    try:
        return _run(args)
    except Exception as exc:            # an upgrade's new master says why it could not
        from .upgrade import report_failure     # start (a no-op otherwise, or once it
        report_failure(f"{type(exc).__name__}: {exc}")  # took over)
        raise


def _run(args) -> int:
    early = catch_early()               # first: a SIGHUP from now on is kept, not fatal
    config = load_or_exit(Path(args.config) if args.config else None)
    configure_logging(config.log.level, config.log.format)
    import uvloop                       # local: see the module doc (start-up of ctl/check)

    from .control.server import ControlSocketError
    from .serve import serve

    try:
        uvloop.run(serve(config, early=early))
    except (OSError, ControlSocketError) as exc:
        get_logger().error("start_failed", error=str(exc))
        return 1
    return 0


def control_socket_path(args) -> Path:
    """-s SOCKET, else control.socket of -c FILE, else the default config's."""
    if args.socket:
        return Path(args.socket)
    return load_or_exit(Path(args.config) if args.config else None).control.socket


def cmd_ctl(args) -> int:
    line = " ".join(args.words + (["--fleet"] if args.fleet else []))
    try:
        reply = call(control_socket_path(args), line, timeout=args.timeout)
    except ControlClientError as exc:
        print(f"l4lb ctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply) if args.json else format_reply(reply))
    return 0 if reply.get("ok") else 1


def cmd_deploy(args) -> int:
    return run_deploy(args, control_socket_path(args))


def cmd_top(args) -> int:
    from . import top                   # local: rich is needed by `top` only

    from .control.protocol import SUBSCRIBE_MIN_INTERVAL

    if args.interval < SUBSCRIBE_MIN_INTERVAL:
        print(f"l4lb top: --interval must be at least {SUBSCRIBE_MIN_INTERVAL:g} s",
              file=sys.stderr)
        return 2
    path = control_socket_path(args)
    if args.once:
        return top.print_once(path)
    if not top.is_terminal():
        print("l4lb top: needs a terminal (use --once for one frame on a pipe)",
              file=sys.stderr)
        return 1
    return top.run_top(path, args.interval)


def cmd_check(args) -> int:
    config = load_or_exit(args.config)
    print(f"{args.config}: ok ({len(config.listeners)} listeners, {len(config.pools)} pools, "
          f"{sum(len(p.backends) for p in config.pools.values())} backends)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo          # local: the demo runs the balancer (serve.py)

    return run_demo(args.port, args.backend_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l4lb", description="An L4 (TCP) load balancer.")
    parser.add_argument("--version", action="version", version=f"l4lb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the balancer in the foreground")
    p.add_argument("-c", "--config", help="config file (default: the annotated default)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config file")
    p.add_argument("-c", "--config", required=True, help="config file")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("ctl", help="send one command to a running balancer")
    add_socket_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the reply (default: forever, for `wait`)")
    p.add_argument("--fleet", action="store_true",
                   help="in a fleet ([cluster]): reply once every live node applied the change")
    p.add_argument("words", nargs="+", metavar="COMMAND", help="e.g. show backends")
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser("top", help="live full-screen view of pools, backends, workers, drains",
                       description="Keys: up/down (k/j) select a backend; f filter (all, down, "
                                   "draining, each pool); s sort; d drain, e enable, m disable "
                                   "(maint), w weight the selected backend, each after y; q quit.")
    add_socket_options(p)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=seconds, default=1.0, metavar="S",
                   help="seconds between two frames (default 1)")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("demo", help="three demo backends with the balancer in front")
    p.add_argument("--port", type=int, default=8000, help="balancer port (default 8000)")
    p.add_argument("--backend-port", type=int, default=9001,
                   help="first demo backend port (default 9001, then +1, +2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("deploy", help="roll out a new version: rolling, blue-green or canary")
    p.set_defaults(func=cmd_deploy)
    dsub = p.add_subparsers(dest="strategy", required=True)
    d = dsub.add_parser("rolling", help="drain, run CMD and re-enable each backend in turn")
    d.add_argument("pool")
    d.add_argument("--exec", dest="command", required=True, metavar="CMD",
                   help="shell command replacing one backend (env L4LB_POOL, L4LB_BACKEND, "
                        "L4LB_ADDRESS); non-zero exit stops the deploy")
    d.add_argument("--ready-timeout", type=seconds, default=30.0, metavar="S",
                   help="seconds a replaced backend gets to become ready (default 30)")
    bg = dsub.add_parser("blue-green", help="switch a listener to POOL, wait for the old to drain")
    bg.add_argument("listener")
    bg.add_argument("--to", required=True, metavar="POOL")
    d = dsub.add_parser("canary", help="shift a listener to POOL step by step, roll back on breach")
    d.add_argument("listener")
    d.add_argument("--to", required=True, metavar="POOL")
    d.add_argument("--steps", type=parse_steps, default=[5, 25, 50, 100], metavar="5,25,50,100",
                   help="percentages of new connections for POOL (default 5,25,50,100)")
    d.add_argument("--interval", type=seconds, required=True, metavar="S",
                   help="seconds each step is watched")
    d.add_argument("--max-failure-rate", type=fraction, default=0.05, metavar="F",
                   help="connect failures / attempts on POOL above which it rolls back "
                        "(default 0.05)")
    for d in dsub.choices.values():
        d.add_argument("--drain-timeout", type=seconds, default=30.0, metavar="S",
                       help="seconds connections get to end; then they are killed (default "
                            "30; canary: after reaching 100)")
        add_socket_options(d)
    return parser


def add_socket_options(p) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-s", "--socket", help="control socket path")
    group.add_argument("-c", "--config", help="take control.socket from this config")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())

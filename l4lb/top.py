"""`l4lb top`: a full-screen live view of a running balancer, like top or hatop.

Theory of operation
-------------------
It reads the control socket's `subscribe` stream (one snapshot a second, l4lb.live) and
draws it with rich: a header with the process and each worker's active connections and
accept rate, one row per pool and backend (admin state and health apart, weight, active,
new connections/s, bytes/s each way, connect errors/s, the pool's queue), sparklines of
the last HISTORY rates, and a drain pane (remaining connections, close rate, ETA).

`TopView` is the whole screen as state: frames in, keys in, a renderable and the
commands to send out; it does no I/O, so it is tested without a terminal. `run_top`
wires it to the socket, the keyboard (cbreak mode, select(2) on both) and rich's Live.

Keys: up/down (or k/j) select a backend; f cycles the filter (all, down, draining, each
pool); s cycles the sort; d drain, e enable, m disable (maint), w weight act on the
selected backend, each after a y/n confirmation (weight first asks for the number); q
quits and puts the terminal back. The screen is redrawn at its new size on a resize;
at 80x24 the per-rate sparklines of the selected backend are on one line under the table.
A lost connection is retried every RECONNECT seconds.

`--once` prints one frame (the first, so rates are "-") and exits, for scripts and tests.
"""
from __future__ import annotations

import collections
import json
import os
import select
import sys
import termios
import time
import tty
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .control.client import ControlClient, ControlClientError
from .live import BACKEND_COLUMNS, field, format_bytes, format_count, format_eta

# Rates kept per backend and worker for the sparklines (one per frame: a minute at 1 s).
HISTORY = 60
SPARK = "▁▂▃▄▅▆▇█"
# Seconds between two attempts to subscribe again after the balancer went away.
RECONNECT = 1.0
# The selected backend's rates drawn as sparklines on the detail line.
SPARK_RATES = (("new/s", "new_s", format_count), ("in/s", "bytes_in_s", format_bytes),
               ("out/s", "bytes_out_s", format_bytes), ("err/s", "errors_s", format_count))
SORTS = ("name", "active", "new", "bytes", "errors")
# Key -> the control command it sends for the selected backend (after "y").
ACTIONS = {"d": "drain", "e": "enable", "m": "disable"}
# `--once` on a pipe without $COLUMNS: columns to lay the frame out in.
ONCE_WIDTH = 120
# Columns left out below FULL_WIDTH, so that 80 columns hold the rest (and the queue).
NARROW_DROPS = ("address", "total", "failed")
FULL_WIDTH = 110
# Width from which each rate column carries its own sparkline.
WIDE = 130
KEY_UP = ("\x1b[A", "k")
KEY_DOWN = ("\x1b[B", "j")


def sparkline(values, width: int) -> str:
    """The last `width` values as block characters, scaled to their maximum."""
    points = [v for v in list(values)[-width:] if v is not None]
    if not points:
        return ""
    top = max(points) or 1.0
    return "".join(SPARK[min(7, int(round(v / top * 7)))] for v in points)


def _sort_key(sort: str):
    if sort == "active":
        return lambda b: -b["active"]
    rate = {"new": ("new_s",), "bytes": ("bytes_in_s", "bytes_out_s"),
            "errors": ("errors_s",)}.get(sort)
    if rate is None:
        return lambda b: b["name"]
    return lambda b: -sum((b["rates"] or {}).get(r) or 0 for r in rate)


class TopView:
    """The screen's state: the last frame, rate history, filter, sort, selection and the
    prompt. `key()` returns a control command line to send, "quit", or None."""

    def __init__(self):
        self.frame: dict | None = None
        self.history: dict = collections.defaultdict(lambda: collections.deque(maxlen=HISTORY))
        self.drain_start: dict = {}             # (pool, backend) -> remaining when first seen
        self.filter = "all"
        self.sort = "name"
        self.selected: tuple[str, str] | None = None
        self.prompt: dict | None = None        # {"kind": "confirm"|"weight", ...}
        self.message = ""
        self.connected = False
        self.scroll = 0

    # --- frames ---------------------------------------------------------------------

    def add_frame(self, frame: dict) -> None:
        self.frame = frame
        self.connected = True
        for b in frame["backends"]:
            rates = b.get("rates")
            if rates:
                for _, rate, _ in SPARK_RATES:
                    self.history[b["pool"], b["name"], rate].append(rates[rate])
        for w in frame["workers"]:
            if w.get("rates"):
                self.history["worker", w["worker"]].append(w["rates"]["accepted_s"])
        seen = set()
        for d in frame["drains"]:
            key = (d["pool"], d["backend"])
            seen.add(key)
            self.drain_start[key] = max(self.drain_start.get(key, 0), d["remaining"])
        for key in set(self.drain_start) - seen:
            del self.drain_start[key]
        self._reselect()

    def _reselect(self) -> None:
        """Keep the selected backend if it is still shown, else select the first one."""
        rows = self.rows()
        if self.selected not in {(b["pool"], b["name"]) for b in rows}:
            self.selected = (rows[0]["pool"], rows[0]["name"]) if rows else None

    def filters(self) -> list[str]:
        pools = [p["name"] for p in self.frame["pools"]] if self.frame else []
        return ["all", "down", "draining", *(f"pool {p}" for p in pools)]

    def rows(self) -> list[dict]:
        """The backend rows shown: filtered, grouped by pool, sorted within each."""
        if self.frame is None:
            return []
        shown = []
        key = _sort_key(self.sort)
        for pool in self.frame["pools"]:
            if self.filter.startswith("pool ") and self.filter != f"pool {pool['name']}":
                continue
            rows = [b for b in self.frame["backends"]
                    if b["pool"] == pool["name"] and self._passes(b)]
            shown.extend(sorted(rows, key=key))
        return shown

    def _passes(self, b: dict) -> bool:
        if self.filter == "down":
            return b["state"] == "down" or b["health"] == "failing"
        if self.filter == "draining":
            return b["state"] == "draining"
        return True

    # --- keys -----------------------------------------------------------------------

    def key(self, k: str) -> str | None:
        if self.prompt is not None:
            return self._prompt_key(k)
        if k == "q":
            return "quit"
        if k in KEY_UP or k in KEY_DOWN:
            self._move(-1 if k in KEY_UP else 1)
        elif k == "f":
            options = self.filters()
            self.filter = options[(options.index(self.filter) + 1) % len(options)
                                  if self.filter in options else 0]
            self.message = f"filter: {self.filter}"
            self.scroll = 0
            self._reselect()
        elif k == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
            self.message = f"sort: {self.sort}"
        elif k in ACTIONS or k == "w":
            if self.selected is None:
                self.message = "no backend selected"
            elif k == "w":
                self.prompt = {"kind": "weight", "text": ""}
            else:
                self.prompt = {"kind": "confirm", "command": ACTIONS[k]}
        return None

    def _prompt_key(self, k: str) -> str | None:
        p = self.prompt
        ref = "/".join(self.selected)
        if p["kind"] == "weight":
            if k.isdigit() and len(p["text"]) < 5:
                p["text"] += k
            elif k in ("\x7f", "\b"):
                p["text"] = p["text"][:-1]
            elif k in ("\r", "\n") and p["text"]:
                self.prompt = {"kind": "confirm", "command": "weight", "arg": p["text"]}
            elif k == "\x1b":
                self.prompt, self.message = None, "cancelled"
            return None
        self.prompt = None
        if k in ("y", "Y"):
            return " ".join([p["command"], ref, *([p["arg"]] if "arg" in p else [])])
        self.message = "cancelled"
        return None

    def _move(self, step: int) -> None:
        keys = [(b["pool"], b["name"]) for b in self.rows()]
        if not keys:
            return
        i = keys.index(self.selected) if self.selected in keys else 0
        self.selected = keys[max(0, min(len(keys) - 1, i + step))]

    # --- drawing --------------------------------------------------------------------

    def render(self, width: int, height: int):
        if self.frame is None:
            return Text("l4lb top: waiting for the balancer..." if not self.message
                        else self.message)
        parts = [self._header()]
        workers = self._workers(max(1, min(4, height // 6)))
        parts.extend(workers)
        drains = self._drains(width)
        fixed = 1 + len(workers) + 1 + 1 + len(drains) + 1 + 1   # + table head, detail, footer
        table = self._table(width, max(1, height - fixed))
        parts.append(table)
        parts.append(self._detail(width))
        parts.extend(drains)
        parts.append(self._footer())
        return Group(*parts)

    def _header(self) -> Text:
        i = self.frame["info"]
        cpu = "-" if i["cpu_percent"] is None else f"{i['cpu_percent']:.0f}%"
        up = int(i["uptime_s"])
        t = _line("", "")
        t.append("l4lb top", style="bold")
        t.append(f"  {i['version']}  up {up // 3600}h{up // 60 % 60:02d}m{up % 60:02d}s  "
                 f"active {i['conns_active']}  total {i['conns_total']}  cpu {cpu}")
        if not self.connected:
            t.append("  (disconnected)", style="bold red")
        return t

    def _workers(self, limit: int) -> list[Text]:
        workers = self.frame["workers"]
        lines = []
        for w in workers[:limit]:
            rate = (w.get("rates") or {}).get("accepted_s")
            t = _line(f"worker {w['worker']}  pid {w['pid']}  active {w['active']}  "
                      f"accept {format_count(rate)}/s  restarts {w['restarts']}  ", "")
            t.append(sparkline(self.history["worker", w["worker"]], 20), style="cyan")
            lines.append(t)
        if len(workers) > limit:
            rest = workers[limit:]
            lines[-1:] = [Text(f"... and {len(rest) + 1} more workers, active "
                               f"{sum(w['active'] for w in workers[limit - 1:])}")]
        return lines

    def _table(self, width: int, rows_room: int) -> Table:
        wide = width >= WIDE
        table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), expand=False,
                      header_style="bold reverse")
        table.add_column(" ", width=1, no_wrap=True)
        columns = [c for c in BACKEND_COLUMNS
                   if c.key not in NARROW_DROPS or width >= FULL_WIDTH]
        for c in columns:
            table.add_column(c.heading.upper(), no_wrap=True, overflow="ellipsis",
                             justify="left" if c.kind == "text" else "right",
                             min_width=3)
        table.add_column("Q", justify="right", no_wrap=True)
        if wide:
            table.add_column("NEW/S TREND", no_wrap=True)
        lines = self._lines()
        # keep the selection in view: scroll by whole screens of rows
        sel = next((n for n, (kind, row) in enumerate(lines)
                    if kind == "b" and (row["pool"], row["name"]) == self.selected), 0)
        if sel < self.scroll or sel >= self.scroll + rows_room:
            self.scroll = max(0, sel - rows_room + 1) if sel >= rows_room else 0
        for kind, row in lines[self.scroll:self.scroll + rows_room]:
            if kind == "p":
                cells = [""] + [""] * len(columns) + [str(row["queue"])]
                cells[1] = f"{row['name']} ({row['algorithm']})"
                if wide:
                    cells.append("")
                table.add_row(*cells, style="bold blue")
                continue
            chosen = (row["pool"], row["name"]) == self.selected
            cells = [">" if chosen else " "]
            for c in columns:
                cells.append(self._cell(c, row))
            cells.append("")
            if wide:
                cells.append(Text(sparkline(self.history[row["pool"], row["name"], "new_s"],
                                            HISTORY // 3), style="cyan"))
            table.add_row(*cells, style=self._row_style(row, chosen))
        return table

    def _cell(self, column, row: dict):
        text = column.text(row)
        if column.key == "backend":
            return "  " + text
        if column.key == "health" and row["health"] == "failing":
            return Text(text, style="bold red")
        if column.key == "admin" and row["admin"] != "enabled":
            return Text(text, style="yellow" if row["admin"] == "draining" else "dim")
        return text

    @staticmethod
    def _row_style(row: dict, chosen: bool) -> str:
        style = "reverse" if chosen else ""
        if row["state"] == "down":
            style += " red"
        return style.strip()

    def _lines(self) -> list[tuple[str, dict]]:
        rows = self.rows()
        lines = []
        for pool in self.frame["pools"]:
            mine = [b for b in rows if b["pool"] == pool["name"]]
            if not mine and self.filter != "all":
                continue
            lines.append(("p", pool))
            lines.extend(("b", b) for b in mine)
        return lines

    def _detail(self, width: int) -> Text:
        if self.selected is None:
            return Text("no backend matches the filter" if self.frame["backends"] else
                        "no backends")
        pool, name = self.selected
        t = _line(f"{pool}/{name} ", "bold")
        room = max(4, (width - len(t) - 4 * 14) // 4)
        row = next((b for b in self.frame["backends"] if (b["pool"], b["name"]) == (pool, name)),
                   None)
        for label, rate, fmt in SPARK_RATES:
            value = field(row, f"rates.{rate}") if row else None
            t.append(f" {label} {fmt(value)} ")
            t.append(sparkline(self.history[pool, name, rate], min(room, 20)), style="cyan")
        return t

    def _drains(self, width: int) -> list[Text]:
        drains = self.frame["drains"]
        if not drains:
            return []
        lines = [Text("DRAINS", style="bold reverse")]
        for d in drains[:6]:
            start = self.drain_start.get((d["pool"], d["backend"]), d["remaining"]) or 1
            bar_width = max(5, min(30, width - 70))
            done = int(round((1 - d["remaining"] / start) * bar_width)) if start else bar_width
            t = _line(f"{d['pool']}/{d['backend']}  remaining {d['remaining']}  closing "
                      f"{format_count(d['closes_s'])}/s  ETA {format_eta(d)}  ", "")
            t.append("█" * done, style="green")
            t.append("░" * (bar_width - done), style="dim")
            t.append(f"  by {d['set_by'] or 'operator'}")
            lines.append(t)
        if len(drains) > 6:
            lines.append(Text(f"... {len(drains) - 6} more draining"))
        return lines

    def _footer(self) -> Text:
        p = self.prompt
        if p is not None and p["kind"] == "weight":
            return _line(f"weight for {'/'.join(self.selected)}: {p['text']}_  "
                         "(Enter; Esc cancels)", "bold yellow")
        if p is not None:
            arg = f" {'/'.join(self.selected)}" + (f" {p['arg']}" if "arg" in p else "")
            return _line(f"{p['command']}{arg}? [y/N]", "bold yellow")
        help_ = (f"q quit ↑↓ select f filter:{self.filter} s sort:{self.sort} "
                 "d drain e enable m maint w weight")
        return _line(f"{self.message} | {help_}" if self.message else help_, "dim")


def _line(text: str, style: str) -> Text:
    """One line that never wraps (the screen's height is counted in lines)."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


# --- the subscription ------------------------------------------------------------------

class Subscription:
    """A `subscribe` connection: frames as they come, without blocking (fileno + poll)."""

    def __init__(self, path: Path, interval: float):
        self.path = path
        self.client = ControlClient(path, timeout=10.0)
        self.client.sock.sendall(f"subscribe {interval:g}\n".encode())
        self.client.sock.setblocking(False)
        self.buf = b""

    def fileno(self) -> int:
        return self.client.sock.fileno()

    def frames(self) -> list[dict]:
        """The whole frames read so far; ControlClientError when the balancer closed the
        connection or refused the subscription."""
        try:
            data = self.client.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise ControlClientError(f"control connection failed: {exc}") from None
        if not data:
            raise ControlClientError("the balancer closed the connection")
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        frames = []
        for line in lines:
            reply = json.loads(line)
            if not reply.get("ok"):
                raise ControlClientError(reply.get("error", "subscribe refused"))
            frames.append(reply)
        return frames

    def close(self) -> None:
        self.client.close()


def first_frame(path: Path, timeout: float = 10.0) -> dict:
    """One `subscribe` frame (ControlClientError when there is none)."""
    with ControlClient(path, timeout=timeout) as client:
        reply = client.call("subscribe")
    if not reply.get("ok"):
        raise ControlClientError(reply.get("error", "subscribe refused"))
    return reply


def print_once(path: Path, console: Console | None = None) -> int:
    """`l4lb top --once`: one frame on stdout, every row (no screen height)."""
    try:
        frame = first_frame(path)
    except ControlClientError as exc:
        print(f"l4lb top: {exc}", file=sys.stderr)
        return 1
    wide_enough = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = console or Console(width=None if wide_enough else ONCE_WIDTH,
                                 highlight=False, soft_wrap=False)
    view = TopView()
    view.add_frame(frame)
    console.print(view.render(console.width, 10_000))
    return 0


def read_keys(fd: int) -> list[str]:
    """Keys from the terminal in cbreak mode; an escape sequence is one key."""
    data = os.read(fd, 64).decode("utf-8", "replace")
    keys = []
    i = 0
    while i < len(data):
        if data[i] == "\x1b" and data[i + 1:i + 2] == "[" and i + 2 < len(data):
            keys.append(data[i:i + 3])
            i += 3
        else:
            keys.append(data[i])
            i += 1
    return keys


def run_top(path: Path, interval: float = 1.0) -> int:
    """The full-screen view until `q` (or Ctrl-C); exit 0, or 1 when the first connection
    fails."""
    from rich.live import Live

    try:
        sub = Subscription(path, interval)
    except ControlClientError as exc:
        print(f"l4lb top: {exc}", file=sys.stderr)
        return 1
    view = TopView()
    console = Console(highlight=False)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    retry_at = 0.0
    try:
        tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            size = None
            while True:
                watched = [fd] + ([sub] if sub is not None else [])
                ready, _, _ = select.select(watched, [], [], 0.2)
                changed = False
                if sub is not None and sub in ready:
                    try:
                        for frame in sub.frames():
                            view.add_frame(frame)
                            changed = True
                    except (ControlClientError, ValueError) as exc:
                        sub.close()
                        sub = None
                        view.connected = False
                        view.message = f"{exc}; retrying"
                        retry_at = time.monotonic() + RECONNECT
                        changed = True
                if sub is None and time.monotonic() >= retry_at:
                    try:
                        sub = Subscription(path, interval)
                        view.message = "reconnected"
                    except ControlClientError as exc:
                        view.message = f"{exc}; retrying"
                        retry_at = time.monotonic() + RECONNECT
                if fd in ready:
                    for k in read_keys(fd):
                        command = view.key(k)
                        if command == "quit":
                            return 0
                        if command is not None:
                            view.message = send_command(path, command)
                        changed = True
                if console.size != size:
                    size = console.size
                    changed = True
                if changed:
                    live.update(view.render(size.width, size.height), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if sub is not None:
            sub.close()


def send_command(path: Path, line: str) -> str:
    """Carry out one action on a fresh control connection; a line for the footer."""
    try:
        with ControlClient(path, timeout=10.0) as client:
            reply = client.call(line)
    except ControlClientError as exc:
        return f"{line}: {exc}"
    if not reply.get("ok"):
        return f"{line}: {reply.get('error')}"
    if "state" in reply:
        return f"{line}: {reply.get('previous')} -> {reply['state']}"
    return f"{line}: ok"


def is_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()

"""docs/REFERENCE.md, generated from the tables the code runs on, so it cannot drift:

- config keys from l4lb.config.SCHEMA (rule, default and doc of every key),
- control commands from l4lb.control.protocol.COMMANDS (usage, summary, reply fields),
- log events from l4lb.log.LOG_EVENTS (checked against every logging call by a test),
- close and reject reasons from l4lb.reasons.REASONS (checked against the code's reason
  literals by a test),
- metrics from l4lb.metrics.METRICS (the collector builds its families from it).

    python -m l4lb.docs            # rewrite docs/REFERENCE.md
    python -m l4lb.docs --check    # exit 1 if docs/REFERENCE.md is not up to date

tests/unit/test_reference_docs.py regenerates the page and compares it with the committed
file, so a change to any of those tables without `python -m l4lb.docs` fails the suite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as cfg
from .control.protocol import COMMANDS
from .log import LOG_EVENTS
from .metrics import METRICS
from .reasons import REASONS

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "REFERENCE.md"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    return f"`{text}`"


def toml_value(value, rule: cfg.Rule) -> str:
    """A default as the TOML file would spell it."""
    if value is cfg.REQUIRED:
        return "required"
    if value is None:
        return "absent"
    if isinstance(value, bool):
        return code("true" if value else "false")
    if isinstance(rule, cfg.FileMode):
        return code(oct(value))
    if isinstance(value, str):
        return code(json.dumps(value))
    if isinstance(value, (list, dict)) and not value:
        return code("[]" if isinstance(value, list) else "{}")
    return code(json.dumps(value))


# --- config ------------------------------------------------------------------------------

def config_sections() -> list[tuple[str, cfg.Table]]:
    """(TOML header, table) for every table of SCHEMA, in file order."""
    out: list[tuple[str, cfg.Table]] = []

    def walk(header: str, table: cfg.Table) -> None:
        out.append((header, table))
        for key, spec in table.keys.items():
            sub = f"{header}.{key}" if header else key
            rule = spec.rule
            if isinstance(rule, cfg.Table):
                walk(sub, rule)
            elif isinstance(rule, cfg.TableOf):
                walk(f"{sub}.NAME", rule.table)
            elif isinstance(rule, cfg.ListOf) and isinstance(rule.item, cfg.Table):
                walk(f"{sub}[]", rule.item)

    for key, spec in cfg.SCHEMA.keys.items():
        rule = spec.rule
        if isinstance(rule, cfg.TableOf):
            walk(f"{key}.NAME", rule.table)
        else:
            walk(key, rule)
    return out


def is_table_key(spec: cfg.Key) -> bool:
    rule = spec.rule
    return isinstance(rule, (cfg.Table, cfg.TableOf)) or (
        isinstance(rule, cfg.ListOf) and isinstance(rule.item, cfg.Table))


def render_config() -> list[str]:
    lines = ["## Config file", "",
             "TOML. Every key below is optional unless its default says *required*; "
             "unknown keys are errors. `l4lb check -c FILE` reports every problem as "
             "`FILE:LINE key.path: message`. The annotated default is "
             "[`conf/l4lb.toml`](../conf/l4lb.toml).", ""]
    for header, table in config_sections():
        if header.endswith("[]"):
            title = f"`{header[:-2]} = [ {{ ... }}, ... ]`"
        else:
            title = f"`[{header}]`"
        lines += [f"### {title}", "", cell(table.doc), ""]
        rows = [(key, spec) for key, spec in table.keys.items()]
        sub_tables = [(key, spec) for key, spec in rows if is_table_key(spec)]
        plain = [(key, spec) for key, spec in rows if not is_table_key(spec)]
        if plain:
            lines += ["| key | value | default | meaning |", "|---|---|---|---|"]
            for key, spec in plain:
                lines.append(f"| `{key}` | {cell(spec.rule.expects)} | "
                             f"{toml_value(spec.default, spec.rule)} | {cell(spec.doc)} |")
            lines.append("")
        for key, spec in sub_tables:
            if not header:
                break                               # top-level sections have their own headings
            lines.append(f"- `{key}`: {spec.doc}")
        if sub_tables and header:
            lines.append("")
    return lines


# --- control commands ----------------------------------------------------------------------

def render_commands() -> list[str]:
    lines = ["## Control commands", "",
             "One UTF-8 command per line on the control socket (`l4lb ctl COMMAND...`); "
             "each gets one JSON line back, `{\"ok\": true, ...fields}` or "
             "`{\"ok\": false, \"error\": \"...\"}`.", "",
             "| command | does | reply fields |", "|---|---|---|"]
    for spec in COMMANDS:
        if spec.rows:
            reply = f"`{spec.reply[0]}`: a list of objects with " + ", ".join(
                code(f) for f in spec.rows)
        else:
            reply = ", ".join(code(f) for f in spec.reply) or "—"
        lines.append(f"| `{spec.usage}` | {cell(spec.summary)} | {cell(reply)} |")
    lines.append("")
    return lines


# --- log events and metrics -------------------------------------------------------------------

def render_log_events() -> list[str]:
    lines = ["## Log events", "",
             "One JSON object per line on stderr (`log.format = \"json\"`). Every line has "
             "`event`, `level` and `timestamp` besides the fields below.", "",
             "| event | level | fields | meaning |", "|---|---|---|---|"]
    for ev in LOG_EVENTS:
        fields = ", ".join(code(f) for f in ev.fields) or "—"
        lines.append(f"| `{ev.name}` | {ev.level} | {fields} | {cell(ev.doc)} |")
    lines.append("")
    return lines


def render_reasons() -> list[str]:
    lines = ["## Close and reject reasons", "",
             "The words in the access log's `reason` (kind *close*), in a listener's "
             "`rejected` counters of `show listeners` and `l4lb_listener_rejected_total` "
             "(kind *reject*), and in a backend's `last_error` after a failed connect "
             "(kind *connect*).", "",
             "| reason | kind | meaning |", "|---|---|---|"]
    for reason in REASONS:
        lines.append(f"| `{reason.word}` | {', '.join(reason.kinds)} | {cell(reason.doc)} |")
    lines.append("")
    return lines


def render_metrics() -> list[str]:
    lines = ["## Metrics", "",
             "Served at `GET /metrics` on `metrics.listen`, in the Prometheus text format. "
             "Read from the balancer's counters at scrape time.", "",
             "| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(code(label) for label in spec.labels) or "—"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {cell(spec.doc)} |")
    lines.append("")
    return lines


def render_reference() -> str:
    lines = ["# l4lb reference", "",
             "<!-- Generated by `python -m l4lb.docs` from l4lb/config.py (SCHEMA), "
             "l4lb/control/protocol.py (COMMANDS), l4lb/log.py (LOG_EVENTS), "
             "l4lb/reasons.py (REASONS) and l4lb/metrics.py (METRICS). Do not edit by "
             "hand. -->", "",
             "Contents: [Config file](#config-file) · [Control commands](#control-commands) · "
             "[Log events](#log-events) · [Close and reject reasons](#close-and-reject-reasons) "
             "· [Metrics](#metrics)", ""]
    lines += (render_config() + render_commands() + render_log_events() + render_reasons()
              + render_metrics())
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m l4lb.docs",
                                 description="Generate docs/REFERENCE.md.")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the file differs from what would be generated")
    ap.add_argument("path", nargs="?", type=Path, default=REFERENCE)
    args = ap.parse_args(argv)
    text = render_reference()
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is out of date: run python -m l4lb.docs", file=sys.stderr)
            return 1
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text, encoding="utf-8")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

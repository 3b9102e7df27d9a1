"""docs/REFERENCE.md is generated from the code's own tables and is up to date; the
tables it comes from cover what the code does."""
from __future__ import annotations

import ast

from l4lb import docs
from l4lb.config import SCHEMA
from l4lb.control.protocol import COMMANDS
from l4lb.log import LOG_EVENTS, LOG_EVENTS_BY_NAME
from l4lb.metrics import METRICS
from l4lb.reasons import REASONS

from ..support import REPO

LOG_METHODS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error",
               "exception": "error", "critical": "critical"}


def test_committed_reference_is_what_the_generator_writes():
    committed = (REPO / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    assert committed == docs.render_reference(), (
        "docs/REFERENCE.md is out of date: run `python -m l4lb.docs` and commit it")


def test_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "REFERENCE.md"
    stale.write_text("old\n")
    assert docs.main(["--check", str(stale)]) == 1
    assert docs.main([str(stale)]) == 0
    assert docs.main(["--check", str(stale)]) == 0


def test_reference_names_every_key_command_event_and_metric():
    text = docs.render_reference()

    def keys(table):
        for key, spec in table.keys.items():
            yield key
            rule = spec.rule
            inner = getattr(rule, "table", None) or getattr(rule, "item", None) or rule
            if hasattr(inner, "keys") and isinstance(inner.keys, dict):
                yield from keys(inner)

    for key in keys(SCHEMA):
        assert f"`{key}`" in text or f"`[{key}" in text or f".{key}" in text, key
    for spec in COMMANDS:
        assert f"`{spec.usage}`" in text
    for ev in LOG_EVENTS:
        assert f"`{ev.name}`" in text
    for spec in METRICS:
        assert f"`{spec.name}`" in text
    for reason in REASONS:
        assert f"| `{reason.word}` |" in text


def logging_calls():
    """(file, line, level, event, static keyword names, has **kwargs) of every logging
    call with a literal event name in the package."""
    for path in sorted((REPO / "l4lb").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                names = {k.arg for k in node.keywords if k.arg is not None}
                dynamic = any(k.arg is None for k in node.keywords)
                yield (path.relative_to(REPO), node.lineno, LOG_METHODS[node.func.attr],
                       node.args[0].value, names, dynamic)


def test_every_logged_event_is_in_log_events_with_its_level_and_fields():
    calls = list(logging_calls())
    assert len(calls) > 20                       # the scan finds the calls at all
    for path, line, level, event, fields, _ in calls:
        where = f"{path}:{line} {event}"
        assert event in LOG_EVENTS_BY_NAME, f"{where}: add it to l4lb.log.LOG_EVENTS"
        spec = LOG_EVENTS_BY_NAME[event]
        assert spec.level == level, where
        assert fields <= set(spec.fields), f"{where}: fields {fields - set(spec.fields)} undocumented"


def test_log_events_holds_no_event_the_code_no_longer_logs():
    logged = {event for _, _, _, event, _, _ in logging_calls()}
    assert {ev.name for ev in LOG_EVENTS} - logged == set()
    assert len({ev.name for ev in LOG_EVENTS}) == len(LOG_EVENTS)


def test_events_are_snake_case_facts():
    for ev in LOG_EVENTS:
        assert ev.name.islower() and " " not in ev.name and ev.doc.endswith((".", "...")), ev

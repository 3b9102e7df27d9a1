"""The `cause` values backend_state_changed documents (l4lb.log.STATE_CHANGE_CAUSES) are
exactly the ones the code passes to Pool.set_state, collected from the source."""
import ast
from pathlib import Path

import l4lb
from l4lb.log import LOG_EVENTS, STATE_CHANGE_CAUSES

SOURCE = Path(l4lb.__file__).parent


def logged_causes() -> set[str]:
    """Every cause literal reaching Pool.set_state: CAUSE_* constants and string literals
    given as its third argument. A call passing anything else must pass a parameter
    named `cause` (health's record), whose callers pass CAUSE_* constants."""
    constants, used = {}, set()
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id.startswith("CAUSE_")
                    and isinstance(node.value, ast.Constant)):
                constants[node.targets[0].id] = node.value.value
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "set_state" and len(node.args) == 3):
                arg = node.args[2]
                if isinstance(arg, ast.Constant):
                    used.add(arg.value)
                else:
                    assert isinstance(arg, ast.Name), ast.dump(arg)
                    assert arg.id.startswith("CAUSE_") or arg.id == "cause", (path, arg.id)
    return set(constants.values()) | used


def test_the_documented_causes_are_the_logged_ones():
    assert logged_causes() == set(STATE_CHANGE_CAUSES)


def test_the_event_doc_lists_every_cause():
    doc = next(e.doc for e in LOG_EVENTS if e.name == "backend_state_changed")
    assert all(cause in doc for cause in STATE_CHANGE_CAUSES)

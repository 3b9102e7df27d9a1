"""The close/reject reasons table (l4lb.reasons) holds every reason word the code passes,
and nothing it no longer passes. The sources are found by glob and the reasons by call
pattern, so a moved or renamed file is still scanned."""
import ast
import re

from l4lb.reasons import KINDS, REASONS, REASONS_BY_WORD

from ..support import REPO

# Functions and methods that take a reason word (relay, hub, listener runtime, gate users).
REASON_CALLS = {"close_both", "reject", "count_rejected", "connect_failed", "close_all",
                "close_target", "close", "finish", "refuse", "abort_with", "close_open"}
# Functions whose return value is a reason (the gate's admit/check: None or a reason word).
REASON_RETURNERS = {"admit", "check", "check_parsed"}
_WORD = re.compile(r'"([a-z][a-z0-9]*(?:_[a-z0-9]+)*)"')
_CALL = re.compile(r"\b(\w+)\(")


def cython_reasons() -> dict[str, str]:
    """word -> where, from ext/: literals in reason calls, `reason="..."` defaults, and the
    literals returned by functions whose name ends in `_reason`."""
    found: dict[str, str] = {}
    sources = [p for pattern in ("*.pxi", "*.pxd", "*.pyx")
               for p in (REPO / "ext").rglob(pattern)]
    assert sources
    for path in sources:
        in_reason_function = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            if re.match(r"\s*(cdef|cpdef|def)\b", line):
                in_reason_function = bool(re.search(r"\w*_reason\s*\(", line))
            for match in _CALL.finditer(line):
                if match.group(1) in REASON_CALLS:
                    args = line[match.end():]
                    for word in _WORD.findall(args.split(")")[0] + ")"):
                        found.setdefault(word, where)
            for word in re.findall(r'\breason\s*=\s*"(\w+)"', line):
                found.setdefault(word, where)
            if in_reason_function:
                for word in re.findall(r'\breturn\s+"(\w+)"', line):
                    found.setdefault(word, where)
    return found


def python_reasons() -> dict[str, str]:
    """word -> where, from l4lb/: string arguments (literal or module constant) of reason
    calls, and what reason-returning functions return."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8"))
             for path in sorted((REPO / "l4lb").rglob("*.py"))}
    constants = {}
    for tree in trees.values():
        for node in tree.body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = node.value.value

    def words_of(node, attributes=None) -> list[str]:
        """The reason words an expression can be: a literal, a module constant, either
        branch of `a if c else b`, or (in a returner) what `self.attr` is assigned."""
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        if isinstance(node, ast.IfExp):
            return words_of(node.body, attributes) + words_of(node.orelse, attributes)
        name = node.id if isinstance(node, ast.Name) else (
            node.attr if isinstance(node, ast.Attribute) else None)
        if name and name.isupper() and name in constants:
            return [constants[name]]
        if attributes is not None and isinstance(node, ast.Attribute):
            return [w for value in attributes.get(node.attr, ()) for w in words_of(value)]
        return []

    found: dict[str, str] = {}
    for path, tree in trees.items():
        if path.name == "reasons.py":
            continue
        attributes: dict[str, list] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute):
                        attributes.setdefault(target.attr, []).append(node.value)
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in REASON_CALLS:
                    for arg in node.args:
                        for word in words_of(arg):
                            found.setdefault(word, where)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name in REASON_RETURNERS:
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Return) and inner.value is not None:
                        for word in words_of(inner.value, attributes):
                            found.setdefault(word, where)
    return found


def test_the_scans_find_the_reasons_at_all():
    assert {"closed", "backend_reset", "no_backend", "accept_paused"} <= set(cython_reasons())
    assert {"killed", "shutdown", "backend_down", "denied"} <= set(python_reasons())


def test_every_reason_the_code_passes_is_in_the_table():
    for word, where in {**cython_reasons(), **python_reasons()}.items():
        assert word in REASONS_BY_WORD, f"{where}: reason {word!r} is not in l4lb.reasons.REASONS"


def test_every_reason_in_the_table_is_passed_somewhere():
    used = set(cython_reasons()) | set(python_reasons())
    assert [r.word for r in REASONS if r.word not in used] == []


def test_reasons_are_unique_snake_case_words_with_a_kind_and_a_sentence():
    assert len(REASONS_BY_WORD) == len(REASONS)
    for reason in REASONS:
        assert re.fullmatch(r"[a-z]+(_[a-z0-9]+)*", reason.word), reason
        assert reason.kinds and set(reason.kinds) <= set(KINDS), reason
        assert reason.doc.endswith((".", ")")), reason

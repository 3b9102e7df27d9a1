"""The import graph of l4lb/ is a tree: no module imports, directly or through others, a
module that imports it. Module-level and function-local imports both count (a local
import that closes a cycle is a cycle waiting for the next refactor); imports under
`if TYPE_CHECKING:` do not (they never run)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "l4lb"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The l4lb modules `path` imports (what `from X import name` reaches: X, or X.name
    when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    # A package's __init__ runs before any of its modules: importing l4lb.x imports l4lb.
    return {module_name(p): imported_modules(p, modules) - {"l4lb"} for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk, each as [a, b, ..., a]."""
    cycles, done, stack = [], set(), []

    def walk(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            walk(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        walk(node)
    return cycles


def test_the_scan_sees_module_level_and_function_local_imports():
    graph = import_graph()
    assert "l4lb.balancer" in graph["l4lb.serve"]            # module level
    assert "l4lb.serve" in graph["l4lb.cli"]                 # inside cmd_run
    assert "l4lb.demo" in graph["l4lb.cli"]                  # inside cmd_demo
    assert "l4lb.balancer" not in graph["l4lb.reload"]       # TYPE_CHECKING only


def test_find_cycles_reports_a_cycle_with_its_path():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_l4lb():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)

"""l4lb/_native.pyi declares exactly what the compiled module offers, with the same parameters."""
import ast
import inspect
import types
from pathlib import Path

import pytest

import l4lb._native as native

pytestmark = pytest.mark.timeout(30)
STUB = Path(__file__).resolve().parents[2] / "l4lb" / "_native.pyi"


def public(names):
    return {n for n in names if not n.startswith("_")}


def declared(body):
    """name -> node for what a module or class body of the stub declares (imports aside)."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            out.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return out


STUB_NAMES = declared(ast.parse(STUB.read_text()).body)
STUB_CLASSES = {n: node for n, node in STUB_NAMES.items() if isinstance(node, ast.ClassDef)}
# What `dir` shows that is no API: modules the .pyx imports for its own use.
RUNTIME_NAMES = public(n for n in dir(native)
                       if not isinstance(getattr(native, n), types.ModuleType))


def test_the_stub_is_shipped_beside_the_compiled_module():
    assert Path(native.__file__).parent == STUB.parent
    assert native.__file__.endswith(".so")


def test_every_public_name_of_the_module_is_in_the_stub_and_nothing_else():
    assert RUNTIME_NAMES - public(STUB_NAMES) == set(), "missing from l4lb/_native.pyi"
    assert public(STUB_NAMES) - RUNTIME_NAMES == set(), "in l4lb/_native.pyi but not in _native"


def test_the_stub_declares_classes_as_classes_and_functions_as_functions():
    for name in sorted(RUNTIME_NAMES & public(STUB_NAMES)):
        value, node = getattr(native, name), STUB_NAMES[name]
        if isinstance(value, type):
            assert isinstance(node, ast.ClassDef), name
        elif callable(value):
            assert isinstance(node, ast.FunctionDef), name
        else:
            assert isinstance(node, (ast.AnnAssign, ast.Assign)), name


@pytest.mark.parametrize("name", sorted(STUB_CLASSES))
def test_each_stub_class_has_the_bases_and_public_members_of_the_compiled_class(name):
    cls, node = getattr(native, name), STUB_CLASSES[name]
    assert [b.id for b in node.bases] == [b.__name__ for b in cls.__bases__ if b is not object]
    members = declared(node.body)
    own = public(vars(cls))
    assert own - public(members) == set(), f"{name}: missing from the stub"
    assert public(members) - own == set(), f"{name}: in the stub but not in the class"


def stub_functions():
    """(qualified name, the runtime object, the stub's def) for every function and method
    but the dunders (slot wrappers state no parameters)."""
    for name, node in STUB_NAMES.items():
        if isinstance(node, ast.FunctionDef):
            yield name, getattr(native, name), node
        elif isinstance(node, ast.ClassDef):
            cls = getattr(native, name)
            for member, sub in declared(node.body).items():
                if (isinstance(sub, ast.FunctionDef) and member in vars(cls)
                        and not member.startswith("__")):
                    if not any(isinstance(d, ast.Name) and d.id == "property"
                               for d in sub.decorator_list):
                        yield f"{name}.{member}", vars(cls)[member], sub


@pytest.mark.parametrize("qualname,obj,node", sorted(stub_functions(), key=lambda t: t[0]),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_stub_function_takes_the_parameters_of_the_compiled_one(qualname, obj, node):
    params = list(inspect.signature(obj).parameters)
    a = node.args
    stub = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    assert stub == params, qualname

"""No worker module reaches into another module's classes: an ``obj._name`` access (obj
not ``self``/``cls``/``super()``) must name something the same module defines, and no
module imports another's ``_private`` name. Parsed, not run: it holds for every path."""

from __future__ import annotations

import ast
from pathlib import Path

import wsgate.worker

WORKER = Path(wsgate.worker.__file__).resolve().parent

#: Known reaches, each to be replaced by a public method, and then removed from here
#: (those into state_client follow its typed clients). A new one fails the test.
KNOWN = {
    ("activation_storage.py", "storage._object"),
    ("turn_commits.py", "self._client._error"),
    ("activation_alarm.py", "import wsgate.worker.object_cache._Unknown"),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_names(tree: ast.Module) -> set[str]:
    """Every name the module itself defines or assigns (as an attribute or a variable)."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            own.add(node.value)  # __slots__ entries
    return own


def _reaches(source: str) -> list[str]:
    tree = ast.parse(source)
    own = _own_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                continue
            found.append(ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wsgate"):
            found += [f"import {node.module}.{a.name}" for a in node.names if _private(a.name)]
    return found


def test_the_check_finds_a_reach_into_another_class() -> None:
    source = "def f(conn):\n    conn._buffer.append(1)\n    return conn.send\n"
    assert _reaches(source) == ["conn._buffer"]
    assert _reaches("from wsgate.worker.connection import _Phase\n") == [
        "import wsgate.worker.connection._Phase"
    ]
    assert _reaches("class A:\n    def f(self, other):\n        return other._x\n") == ["other._x"]
    # Its own class's private members, on another instance of it, are the module's own.
    own = (
        "class A:\n    def __init__(self):\n        self._x = 1\n"
        "    def f(self, o):\n        return o._x\n"
    )
    assert _reaches(own) == []


def test_no_worker_module_reaches_into_another_modules_private_members() -> None:
    found = {
        (path.name, reach)
        for path in sorted(WORKER.glob("*.py"))
        for reach in _reaches(path.read_text(encoding="utf-8"))
    }
    assert found - KNOWN == set()

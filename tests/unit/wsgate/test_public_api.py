"""User code imports everything from ``wsgate``: the names resolve, and the README, the
tutorial and the examples import nothing else of ours."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wsgate

ROOT = Path(__file__).resolve().parents[3]
PUBLIC_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PUBLIC_CODE = sorted((ROOT / "examples").rglob("*.py"))


@pytest.mark.parametrize("name", wsgate.__all__)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(wsgate, name)
    assert getattr(value, "__name__", name) == name
    assert name in dir(wsgate)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = wsgate.Nope  # type: ignore[attr-defined]


def test_the_worker_package_exports_nothing_of_its_own() -> None:
    """wsgate is the one list of public names: the worker package is implementation."""
    sdk = importlib.import_module("wsgate.worker")
    assert not hasattr(sdk, "__all__")
    assert not hasattr(sdk, "App")


def test_importing_the_kernel_does_not_load_the_sdk() -> None:
    """A gateway imports wsgate.config; the handler SDK (and gRPC) stays unloaded."""
    probe = "import sys, wsgate.config; print('wsgate.worker' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def _imports_of(source: str, where: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _not_public(module: str) -> bool:
    top = module.split(".")[0]
    return top in {"wsgate", "worker", "gateway", "stateservice", "examples"} and module != "wsgate"


def test_docs_and_examples_import_only_from_wsgate() -> None:
    offenders = []
    for path in PUBLIC_CODE:
        for line, module in _imports_of(path.read_text(), str(path)):
            if _not_public(module):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    for path in PUBLIC_DOCS:
        for block in _python_blocks(path.read_text()):
            try:
                imports = _imports_of(block, str(path))
            except SyntaxError:
                continue  # a fragment, not a program
            offenders += [f"{path.relative_to(ROOT)}: {m}" for _, m in imports if _not_public(m)]
    assert not offenders, "import these from wsgate:\n" + "\n".join(offenders)

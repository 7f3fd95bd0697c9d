"""The package's layers (pyproject.toml, ``[tool.importlinter]``) hold, and name every module.

import-linter checks the imports; these tests also make sure no module escapes the
contract by not being named in it, and that nothing imports a role by its folder's bare
name (``gateway``, ``worker``, ...), which would load a second copy of its modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "wsgate"
ROLE_FOLDERS = ("gateway", "worker", "stateservice", "examples")


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = (c for c in config["contracts"] if c["id"] == "layers")
    return contract["layers"]


def _named_in_layers() -> list[str]:
    names = []
    for layer in _layers():
        names += [part.strip() for part in layer.replace("|", ":").split(":")]
    return names


def _top_modules() -> set[str]:
    """Every module and subpackage directly under ``wsgate`` (the role links included)."""
    found = set()
    for entry in PACKAGE.iterdir():
        if entry.name.startswith(("_", ".")) and entry.name != "__main__.py":
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            found.add(f"wsgate.{entry.name}")
        elif entry.suffix == ".py":
            found.add(f"wsgate.{entry.stem}")
    return found


def test_the_layer_contract_is_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_every_module_has_exactly_one_layer() -> None:
    named = _named_in_layers()
    duplicates = {name for name in named if named.count(name) > 1}
    assert not duplicates, f"named in more than one layer: {sorted(duplicates)}"
    missing = _top_modules() - set(named)
    assert not missing, f"not in any layer of pyproject.toml's [tool.importlinter]: {missing}"
    unknown = set(named) - _top_modules()
    assert not unknown, f"layers name modules that do not exist: {unknown}"


def test_the_roles_are_independent_siblings() -> None:
    roles = next(layer for layer in _layers() if "wsgate.gateway" in layer)
    assert ":" not in roles, "the roles' layer must use | only: roles never import each other"
    assert {"wsgate.gateway", "wsgate.worker", "wsgate.stateservice"} <= {
        part.strip() for part in roles.split("|")
    }


def _python_files() -> list[Path]:
    folders = [PACKAGE, *(ROOT / name for name in ROLE_FOLDERS), ROOT / "tests"]
    files: list[Path] = []
    for folder in folders:
        # rglob does not follow the role links inside wsgate/: each file is read once.
        files += [path for path in folder.rglob("*.py") if "_pb2" not in path.name]
    return files


def test_nothing_imports_a_role_by_its_folder_name() -> None:
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in ROLE_FOLDERS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}")
    assert not offenders, "import these as wsgate.<role>:\n" + "\n".join(offenders)


@pytest.mark.parametrize("role", ROLE_FOLDERS)
def test_each_role_folder_is_linked_into_the_package(role: str) -> None:
    link = PACKAGE / role
    assert link.is_symlink(), f"wsgate/{role} must be a symlink to the top-level {role}/"
    assert link.resolve() == (ROOT / role).resolve()

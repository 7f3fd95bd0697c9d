"""The unit tests mirror the source: each sits in ``tests/unit/<role>/``, where ``<role>`` is
one of the packages of the source tree (``gateway``, ``worker``, ``stateservice``, and
``wsgate`` for the shared kernel, the CLI, the client, bench and dev). A test of
``gateway/delivery.py`` is found in ``tests/unit/gateway/``, and nowhere else."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "tests" / "unit"
ROLES = ("gateway", "worker", "stateservice", "wsgate")
#: What may sit directly in tests/unit: package markers and shared fixtures, no tests.
AT_THE_TOP = {"__init__.py", "conftest.py"}


def test_every_role_folder_mirrors_a_source_package() -> None:
    for role in ROLES:
        assert (ROOT / role / "__init__.py").is_file(), f"{role}/ is no package of the source"
    folders = {p.name for p in UNIT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(ROLES), (
        f"tests/unit has folders that mirror no role: {sorted(folders - set(ROLES))}"
    )
    for folder in folders:
        # Without it, two roles' test_x.py would collide as one module name.
        assert (UNIT / folder / "__init__.py").is_file(), f"tests/unit/{folder} has no __init__.py"


def test_every_unit_test_sits_in_its_role_folder() -> None:
    tests = sorted(UNIT.rglob("test_*.py"))
    assert tests, "found no unit tests: is UNIT right?"
    misplaced = [
        str(path.relative_to(ROOT))
        for path in tests
        if path.relative_to(UNIT).parts[0] not in ROLES
    ]
    assert not misplaced, f"unit tests outside tests/unit/<role>/ ({', '.join(ROLES)}): {misplaced}"
    stray = sorted(p.name for p in UNIT.iterdir() if p.is_file() and p.suffix == ".py")
    assert set(stray) <= AT_THE_TOP, f"modules directly in tests/unit: {set(stray) - AT_THE_TOP}"

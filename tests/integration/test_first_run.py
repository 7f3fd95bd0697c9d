"""The first ``./scripts/dev`` prints no warning: neither its install step (scripts/bootstrap's
``pip install -e``) nor ``wsgate dev`` up to the line that says where it serves.

The install is built exactly as scripts/bootstrap builds it (its pip flags and environment
are read from the script, so the test follows the script), with ``--no-deps``, into a
throwaway virtualenv: only the build and its output are under test, not the dependencies.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.harness import start_dev, wait_for_dev_url

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap"
#: Any warning, in any case: pip's "WARNING:", a Python warning ("BuildBackendWarning:",
#: "DeprecationWarning:"), a log record at WARNING, nats-server's "[WRN]"; not a word that
#: merely contains one (this module's own name is in the paths it prints).
WARNING = re.compile(r"\bwarn|warn(?:ings?)?\b|\[WRN\]", re.IGNORECASE)
#: The import names a checkout has at its top level; of them only ``wsgate`` is installed.
NOT_INSTALLED = ("gateway", "worker", "stateservice", "examples")


def bootstrap_install() -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the pip flags of scripts/bootstrap's editable
    install (``NAME="value" ... "$venv/bin/python" -m pip install FLAGS -e "$spec"``)."""
    script = BOOTSTRAP.read_text().replace("\\\n", " ")
    found = re.search(
        r'^\s*((?:[A-Z_]+="[^"]*"\s+)*)"\$venv/bin/python" -m pip install (.+?) -e "\$spec"\s*$',
        script,
        re.MULTILINE,
    )
    assert found, 'scripts/bootstrap has no `pip install ... -e "$spec"` line'
    env = dict(re.findall(r'([A-Z_]+)="([^"]*)"', found.group(1)))
    return env, shlex.split(found.group(2))


def test_the_editable_install_prints_no_warning_and_installs_only_wsgate(
    tmp_path: Path,
) -> None:
    env_set, flags = bootstrap_install()
    assert "--quiet" in flags  # what a first run shows is pip's quiet output
    target = tmp_path / "venv"
    # No pip of its own (creating one takes seconds): the project's pip installs into it.
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | env_set
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", *flags]
    install = subprocess.run(
        [*pip, "-e", str(ROOT), "--no-deps"],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    output = install.stdout + install.stderr
    assert install.returncode == 0, output
    warnings = [line for line in output.splitlines() if WARNING.search(line)]
    assert not warnings, output

    # From a directory outside the checkout, so that only what was installed is found.
    probe = (
        "import importlib.util, wsgate\n"
        "print(wsgate.__file__)\n"
        f"print([n for n in {NOT_INSTALLED!r} if importlib.util.find_spec(n)])\n"
    )
    found = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert found == [str(ROOT / "wsgate" / "__init__.py"), "[]"], found


def test_dev_prints_no_warning_up_to_ready(tmp_path: Path) -> None:
    proc = start_dev(tmp_path / "data")
    try:
        _, _, output = wait_for_dev_url(proc)
    finally:
        # As Ctrl-C in a terminal: the whole foreground process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = output.decode(errors="replace")
    warnings = [line for line in text.splitlines() if WARNING.search(line)]
    assert not warnings, text

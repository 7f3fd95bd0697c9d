"""Fixtures of the container tests: skipped, with the reason, where no Docker engine
answers or the base image is missing (``scripts/docker-setup engine base`` provides both;
``scripts/test`` runs it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.load.images import BASE_IMAGE, ImageBuildFailed, Images, base_image_present, build_images


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command (scripts/docker-setup engine installs docker.io)"
    info = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if info.returncode != 0:
        return (
            "no Docker engine answers (`docker info` failed; `scripts/docker-setup engine` "
            f"starts one): {info.stderr.strip()[-200:]}"
        )
    if not base_image_present():
        return f"no base image {BASE_IMAGE}: `scripts/docker-setup base` makes it offline"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skips the test when no engine can run the cluster's images."""
    problem = _engine_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def images(docker_engine: None) -> Images:
    """The project, NATS and PostgreSQL images, built from this checkout (cached)."""
    try:
        return build_images()
    except ImageBuildFailed as exc:
        pytest.fail(f"building the load images failed: {exc}")

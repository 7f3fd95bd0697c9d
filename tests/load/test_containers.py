"""No container outlives a load session: not when the run fails, not when it is
interrupted (SIGINT, SIGTERM), and after a SIGKILL the next session removes them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.load.containers import OWNER_LABEL, SESSION_LABEL, ContainerSession
from tests.load.images import Images

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def client(images: Images) -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


def _containers(client: docker.DockerClient, session: str) -> list[str]:
    found = client.containers.list(all=True, filters={"label": f"{SESSION_LABEL}={session}"})
    return [c.id for c in found]


@contextlib.contextmanager
def started_probe(mode: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The probe process, once its containers run, and its session id."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests.load.cleanup_probe", mode],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as probe:  # fmt: skip
        try:
            assert probe.stdout is not None
            line = probe.stdout.readline()  # returns once the containers run (or it died)
            if not line.startswith("ready "):
                probe.kill()
                pytest.fail(f"the probe did not start: {line!r} {probe.communicate()[1]}")
            yield probe, line.split()[1]
        finally:
            if probe.poll() is None:
                probe.send_signal(signal.SIGTERM)
                probe.wait(timeout=60)


def test_a_failed_run_removes_its_containers(client: docker.DockerClient) -> None:
    with started_probe("raise") as (probe, session):
        _, errors = probe.communicate(timeout=60)
        assert probe.returncode == 1
        assert "the load run failed" in errors
    assert _containers(client, session) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_run_removes_its_containers(
    client: docker.DockerClient, signum: signal.Signals
) -> None:
    with started_probe("wait") as (probe, session):
        assert len(_containers(client, session)) == 2
        probe.send_signal(signum)
        assert probe.wait(timeout=60) != 0
    assert _containers(client, session) == []


def test_the_next_session_sweeps_the_containers_of_a_killed_run(
    client: docker.DockerClient,
) -> None:
    with started_probe("wait") as (probe, session):
        probe.kill()  # SIGKILL: the probe runs nothing more
        probe.wait(timeout=60)
    assert len(_containers(client, session)) == 2
    with ContainerSession() as next_session:
        assert set(_containers(client, session)) <= set(next_session.swept)
    assert _containers(client, session) == []


def test_a_live_sessions_containers_are_not_swept(client: docker.DockerClient) -> None:
    with started_probe("wait") as (_, session):
        with ContainerSession() as other:
            assert not set(_containers(client, session)) & set(other.swept)
        assert len(_containers(client, session)) == 2
    assert _containers(client, session) == []


def test_every_container_carries_the_owner_label(client: docker.DockerClient) -> None:
    with started_probe("wait") as (probe, session):
        for cid in _containers(client, session):
            owner = client.containers.get(cid).labels[OWNER_LABEL]
            assert owner.startswith(f"{probe.pid}:")

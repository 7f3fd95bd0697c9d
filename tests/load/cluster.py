"""The cluster a small production has, each process in a container of its own:

- 3 NATS servers clustered (routes between them), JetStream on;
- 1 PostgreSQL and 3 state replicas over it;
- 3 workers serving the example app (examples/app.py: echo, chat rooms, counters);
- 2 gateways.

The engine has no bridge network, so every container uses the host's network and listens
on 127.0.0.1, each on ports of its own picked free on the host. Faults are Docker's own
operations on a container (``kill -s KILL``, ``stop``, ``start``), so a killed process is
PID 1 of its container and a restart is the same container, as a Kubernetes restart is.
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import docker
import psutil
import psycopg
from testcontainers.core.container import DockerContainer

from tests.load.containers import ContainerSession
from tests.load.images import Images
from wsgate.procs import DEV_NATS_MAX_PAYLOAD_BYTES

_T = TypeVar("_T")

CLUSTER_NAME = "wsgate-load"
#: The workers' app (tests/load/app.py), mounted into their containers as /app/loadapp.py.
LOAD_APP = Path(__file__).with_name("app.py")
#: How long a role may take to turn ready after its container starts.
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A port free on 127.0.0.1 now (host networking: the container binds the same one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotReady(RuntimeError):
    """A container did not become ready in time; the message ends with its log."""


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def postgres_ok(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@dataclass(eq=False)
class Node:
    """One process of the cluster: its container and how to tell that it is ready."""

    name: str
    role: str
    container: DockerContainer
    ready: Callable[[], bool]
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def docker(self) -> docker.models.containers.Container:
        return self.container.get_wrapped_container()

    def host_pid(self) -> int | None:
        """The host's pid of the container's PID 1 (``None`` while it is not running)."""
        self.docker.reload()
        pid = int(self.docker.attrs["State"]["Pid"])
        return pid or None

    def _processes(self) -> list[psutil.Process]:
        """The role's process and its children (PostgreSQL's backends, for one)."""
        pid = self.host_pid()
        if pid is None:
            return []
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def usage(self) -> tuple[int, int] | None:
        """(RSS bytes, open fds) of the role's processes; ``None`` while it is not running.
        (Summed over a process tree, shared pages count once per process.)"""
        rss = fds = 0
        processes = self._processes()
        for process in processes:
            try:
                rss += process.memory_info().rss
                fds += process.num_fds()
            except psutil.Error:  # a child that ended meanwhile
                continue
        return (rss, fds) if processes else None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the role's processes have used; ``None`` while it is
        not running."""
        used = 0.0
        processes = self._processes()
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            used += times.user + times.system
        return used if processes else None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll the role's readiness (a probe endpoint or a query) until it answers; the
        probe is the event, there is nothing to subscribe to from outside."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            self.docker.reload()
            if self.docker.status not in ("running", "created", "restarting"):
                raise NotReady(f"{self.name} exited ({self.docker.status}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise NotReady(f"{self.name} not ready in {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.1)  # synchronous (docker SDK): the poll's interval, within the deadline

    def kill(self, signal: str = "SIGKILL") -> None:
        self.docker.kill(signal=signal)

    def wait_exited(self, timeout_s: float = 60.0) -> int:
        """Wait for the process to end (after a signal); its exit status."""
        result = self.docker.wait(timeout=timeout_s)
        return int(result["StatusCode"])

    def stop(self, timeout_s: int = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``: what Kubernetes does to a pod."""
        self.docker.stop(timeout=timeout_s)

    def start(self, *, wait: bool = True) -> None:
        """Start the same container again (same command, ports and name)."""
        self.docker.start()
        if wait:
            self.wait_ready()

    def log_tail(self, chars: int = 4000) -> str:
        return self.docker.logs().decode(errors="replace")[-chars:]


class Cluster:
    """Starts the topology in ``session``; ``work_dir`` holds the NATS configurations."""

    def __init__(
        self,
        session: ContainerSession,
        images: Images,
        work_dir: Path,
        *,
        nats_servers: int = 3,
        state_replicas: int = 3,
        workers: int = 3,
        gateways: int = 2,
        app: Path = LOAD_APP,
    ) -> None:
        self.session = session
        self.images = images
        self.work_dir = work_dir
        self.counts = {
            "nats": nats_servers,
            "state": state_replicas,
            "worker": workers,
            "gateway": gateways,
        }
        self.app = app
        self.nats: list[Node] = []
        self.postgres: Node | None = None
        self.state: list[Node] = []
        self.workers: list[Node] = []
        self.gateways: list[Node] = []

    # --- what clients and faults need ---

    @property
    def nodes(self) -> list[Node]:
        """Every process, in start order."""
        pg = [self.postgres] if self.postgres is not None else []
        return [*self.nats, *pg, *self.state, *self.workers, *self.gateways]

    @property
    def nats_urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{n.ports['client']}" for n in self.nats)

    @property
    def dsn(self) -> str:
        assert self.postgres is not None
        return f"postgresql://postgres@127.0.0.1:{self.postgres.ports['pg']}/postgres"

    def gateway_url(self, index: int, path: str) -> str:
        return f"ws://127.0.0.1:{self.gateways[index].ports['http']}{path}"

    # --- start ---

    def start(self) -> Cluster:
        """Every node, each role waiting for the one it needs; ready when this returns."""
        self._start_nats()
        self._start_postgres()
        self._start_roles("state", self.counts["state"], self._state_command, self.state)
        self._start_roles("worker", self.counts["worker"], self._worker_command, self.workers)
        self._start_roles("gateway", self.counts["gateway"], self._gateway_command, self.gateways)
        return self

    def _run(
        self, image: str, name: str, role: str, command: list[str], ready: Callable[[], bool],
        ports: dict[str, int], *, volumes: dict[Path, str] | None = None, mode: str = "rw",
    ) -> Node:  # fmt: skip
        container = (
            self.session.container(image)
            .with_command(command)
            .with_name(f"wsgate-load-{self.session.id[:8]}-{name}")
        )
        if image == self.images.project:
            # The image listens on 0.0.0.0 by default: here only loopback may be reached.
            container.with_env("WSGATE_HOST", "127.0.0.1")
        for host, inside in (volumes or {}).items():
            container.with_volume_mapping(str(host), inside, mode)
        container.start()
        return Node(name, role, container, ready, ports)

    def _start_nats(self) -> None:
        ports = [
            {"client": free_port(), "cluster": free_port(), "monitor": free_port()}
            for _ in range(self.counts["nats"])
        ]
        for index, own in enumerate(ports):
            name = f"nats-{index + 1}"
            data = self.work_dir / name
            (data / "jetstream").mkdir(parents=True, exist_ok=True)
            routes = ", ".join(
                f"nats://127.0.0.1:{p['cluster']}" for i, p in enumerate(ports) if i != index
            )
            (data / "nats.conf").write_text(
                f"server_name: {name}\n"
                f"listen: 127.0.0.1:{own['client']}\n"
                f"http: 127.0.0.1:{own['monitor']}\n"
                f"max_payload: {DEV_NATS_MAX_PAYLOAD_BYTES}\n"
                "jetstream {\n  store_dir: /data/jetstream\n"
                "  max_memory_store: 64MB\n  max_file_store: 256MB\n}\n"
                f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{own['cluster']}\n"
                f"  routes: [{routes}]\n}}\n"
            )
            health = f"http://127.0.0.1:{own['monitor']}/healthz"
            self.nats.append(
                self._run(
                    self.images.nats,
                    name,
                    "nats",
                    ["-c", "/data/nats.conf"],
                    lambda url=health: http_ok(url),
                    own,
                    volumes={data: "/data"},
                )
            )
        for node in self.nats:
            node.wait_ready()

    def _start_postgres(self) -> None:
        port = free_port()
        node = self._run(
            self.images.postgres, "postgres", "postgres", [str(port)],
            lambda: postgres_ok(f"postgresql://postgres@127.0.0.1:{port}/postgres"),
            {"pg": port},
        )  # fmt: skip
        self.postgres = node
        node.wait_ready()

    def _start_roles(
        self,
        role: str,
        count: int,
        command: Callable[[int, dict[str, int]], list[str]],
        into: list[Node],
    ) -> None:
        for index in range(count):
            ports = {"http": free_port()}
            if role == "state":
                ports["grpc"] = free_port()
            ready = f"http://127.0.0.1:{ports['http']}/readyz"
            volumes = {self.app: "/app/loadapp.py"} if role == "worker" else {}
            into.append(
                self._run(
                    self.images.project,
                    f"{role}-{index + 1}",
                    role,
                    command(index, ports),
                    lambda url=ready: http_ok(url),
                    ports,
                    volumes=volumes,
                    mode="ro",
                )
            )
        for node in into:
            node.wait_ready()

    def _state_command(self, index: int, ports: dict[str, int]) -> list[str]:
        return [
            "state", "--nats-url", self.nats_urls, "--dsn", self.dsn, "--migrate", "yes",
            "--replica-id", f"state-{index + 1}", "--port", str(ports["grpc"]),
            "--advertise", f"127.0.0.1:{ports['grpc']}", "--probe-port", str(ports["http"]),
        ]  # fmt: skip

    def _worker_command(self, index: int, ports: dict[str, int]) -> list[str]:
        return [
            "worker", "--nats-url", self.nats_urls, "--app", "loadapp:app", "--app-dir", "/app",
            "--state-address", f"127.0.0.1:{self.state[0].ports['grpc']}",
            "--port", str(ports["http"]), "--drain-timeout-s", "10",
        ]  # fmt: skip

    def _gateway_command(self, index: int, ports: dict[str, int]) -> list[str]:
        return [
            "gateway", "--nats-url", self.nats_urls, "--port", str(ports["http"]),
            "--node-name", f"gateway-{index + 1}", "--drain-timeout-s", "5",
            # Every load client connects from 127.0.0.1 (host networking): the per-address
            # limit would bound the test, not a client.
            "--max-connections-per-ip", "0",
        ]  # fmt: skip

    # --- after ---

    def _of_running(self, measure: Callable[[Node], _T | None]) -> dict[str, _T]:
        """``measure`` of every node whose process runs, by node name."""
        found = {}
        for node in self.nodes:
            value = measure(node)
            if value is not None:
                found[node.name] = value
        return found

    def usage(self) -> dict[str, tuple[int, int]]:
        """(RSS bytes, open fds) of every running process, by node name."""
        return self._of_running(Node.usage)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by every running process, by node name."""
        return self._of_running(Node.cpu_seconds)

    def save_logs(self, into: Path) -> None:
        """Every node's log as ``<name>.log`` (for a failed run)."""
        into.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            with contextlib.suppress(docker.errors.APIError):
                (into / f"{node.name}.log").write_bytes(node.docker.logs())


@contextlib.contextmanager
def running_cluster(
    session: ContainerSession, images: Images, work_dir: Path, **counts: int
) -> Iterator[Cluster]:
    """A started cluster; its logs land in ``work_dir/logs`` when the block is left."""
    cluster = Cluster(session, images, work_dir, **counts)
    try:
        yield cluster.start()
    finally:
        cluster.save_logs(work_dir / "logs")

"""Containers started through testcontainers, and removed again whatever happens.

testcontainers normally relies on Ryuk, a container that removes a session's containers
when the session's process goes away. Ryuk's image cannot be pulled here (no registry is
reachable), so it is disabled and :class:`ContainerSession` does its job:

- every container it starts carries two labels: ``wsgate.load.session`` (this session's
  id) and ``wsgate.load.owner`` (``<pid>:<start time>`` of the process that started it);
- :meth:`ContainerSession.close` removes every container with the session's label (found
  by label, so a container whose start failed half-way is found too); it runs when the
  ``with`` block ends, normally or by an exception, and on SIGTERM and SIGHUP, which are
  turned into :class:`Interrupted` so that the ``finally`` blocks run, as Ctrl-C's
  KeyboardInterrupt does;
- a process killed with SIGKILL runs nothing: the next session sweeps, at its start, every
  container whose owner process is gone (:func:`sweep_orphans`).
"""

from __future__ import annotations

import contextlib
import signal
import uuid
from types import FrameType, TracebackType

import docker
import psutil
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

SESSION_LABEL = "wsgate.load.session"
OWNER_LABEL = "wsgate.load.owner"


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived: unwind as KeyboardInterrupt does, cleaning up."""


def disable_ryuk() -> None:
    """Ryuk's image cannot be pulled: never start it (we remove our containers ourselves)."""
    testcontainers_config.ryuk_disabled = True


def owner_token(pid: int) -> str:
    """``<pid>:<start time>``: a pid alone could be reused by an unrelated process."""
    return f"{pid}:{psutil.Process(pid).create_time():.3f}"


def _owner_alive(token: str) -> bool:
    pid_text, _, started = token.partition(":")
    try:
        return owner_token(int(pid_text)) == f"{pid_text}:{started}"
    except (ValueError, psutil.Error):
        return False


def remove_labelled(client: docker.DockerClient, label: str) -> list[str]:
    """Remove (forcibly, with their anonymous volumes) every container with ``label``
    (``key`` or ``key=value``); return their ids."""
    removed = []
    for container in client.containers.list(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile: as wanted
            container.remove(force=True, v=True)
        removed.append(container.id)
    return removed


def sweep_orphans(client: docker.DockerClient) -> list[str]:
    """Remove the containers of load sessions whose process is gone; return their ids."""
    removed = []
    for container in client.containers.list(all=True, filters={"label": OWNER_LABEL}):
        if not _owner_alive(container.labels.get(OWNER_LABEL, "")):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)
            removed.append(container.id)
    return removed


class ContainerSession:
    """Starts containers with this session's labels; removes all of them on close."""

    def __init__(self) -> None:
        disable_ryuk()
        self.id = uuid.uuid4().hex
        self.client = docker.from_env()
        self._owner = owner_token(psutil.Process().pid)
        self._previous_handlers: dict[int, object] = {}
        self.swept = sweep_orphans(self.client)

    @property
    def label(self) -> str:
        """The docker filter that finds this session's containers."""
        return f"{SESSION_LABEL}={self.id}"

    def container(self, image: str, **docker_kwargs: object) -> DockerContainer:
        """A container of ``image`` on the host's network, labelled as this session's.
        ``docker_kwargs`` go to docker-py's ``create``; give them here, all at once:
        testcontainers' ``with_kwargs`` replaces earlier ones (the labels and the network
        among them) instead of adding to them."""
        labels = {SESSION_LABEL: self.id, OWNER_LABEL: self._owner}
        return DockerContainer(image).with_kwargs(
            network_mode="host", labels=labels, **docker_kwargs
        )

    def container_ids(self) -> list[str]:
        """Every container of this session, running or not."""
        return [c.id for c in self.client.containers.list(all=True, filters={"label": self.label})]

    def close(self) -> list[str]:
        """Remove every container of this session; return their ids."""
        return remove_labelled(self.client, self.label)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    def __enter__(self) -> ContainerSession:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, self._interrupt)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
            self.client.close()

"""Faults a test can inject into a worker, at points no outside action can reach exactly.

Off unless ``WSGATE_FAILPOINTS`` (``--failpoints``) names them; for tests only, as the
failpoints of FoundationDB or TiKV. Comma-separated ``name=argument`` pairs:

- ``kill-after-commit=<text>``: once the turn that handled a first delivery of the text
  message ``<text>`` has committed, and before anything of it is released (its frames, its
  ack), the worker kills itself with SIGKILL: the window in which a crash makes the
  gateway redeliver an event whose turn is durable.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from wsgate.errors import ConfigError
from wsgate.v1 import envelope_pb2 as envelope

log = logging.getLogger(__name__)

KILL_AFTER_COMMIT = "kill-after-commit"
_KNOWN = (KILL_AFTER_COMMIT,)


@dataclass(frozen=True)
class Failpoints:
    """The faults armed in this worker (none by default)."""

    kill_after_commit: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Failpoints:
        """Read ``name=argument,...``; raises ConfigError for an unknown name or a missing
        argument."""
        armed: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, argument = item.partition("=")
            if name not in _KNOWN:
                raise ConfigError(f"unknown failpoint {name!r} (known: {', '.join(_KNOWN)})")
            if not argument:
                raise ConfigError(f"failpoint {name!r} needs an argument: {name}=<message>")
            armed[name] = argument
        return cls(kill_after_commit=armed.get(KILL_AFTER_COMMIT))

    def after_commit(self, events: Iterable[envelope.ConnectionEvent | None]) -> None:
        """Kill the process if ``kill-after-commit`` matches one of the committed events."""
        text = self.kill_after_commit
        if text is None:
            return
        for event in events:
            if (
                event is not None
                and not event.redelivered
                and event.WhichOneof("kind") == "message"
                and event.message.text == text
            ):
                log.warning("failpoint %s: killing the worker", KILL_AFTER_COMMIT)
                os.kill(os.getpid(), signal.SIGKILL)

"""What a handler can reach besides its connection: the worker's environment."""

from __future__ import annotations

from worker.state_client import ObjectStorage, StateClient


class Env:
    """Shared by every handler call of one worker process.

    ``env.storage("counter", name)`` gives the storage of one durable object; any worker
    reaches the same object through the state service.
    """

    def __init__(self, state: StateClient) -> None:
        self._state = state

    def storage(self, namespace: str, name: str) -> ObjectStorage:
        """The key/value storage of the object ``name`` in ``namespace``."""
        return self._state.storage(namespace, name)

"""A durable object's storage inside its activation: served from memory, written by turns.

The same API as :class:`~worker.state_client.ObjectStorage` (what ``self.storage`` is), with
Cloudflare's semantics:

- **Reads** are served from the activation's cache (:mod:`worker.object_cache`) and see the
  activation's own writes at once; a key the cache does not know is read from the state
  service once, then kept.
- **Writes** apply to the cache at once and join the running turn's effects; their future
  is already resolved (awaiting it waits for nothing). They become durable when the turn
  commits, and what the turn sends leaves only then (the output gate), so a client never
  sees a value that is then lost. The next turn does not wait for that commit.
- **Limits** are checked at the call (the state service checks again at the commit).
- A handler that raises keeps the writes it made, as on Cloudflare; ``transaction(fn)`` is
  the way to make several writes all or none: it runs ``fn`` over an overlay, applied only
  if ``fn`` returns.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from worker.errors import TurnOver
from worker.object_cache import (
    UNKNOWN,
    KeyRange,
    Layer,
)
from worker.state_client import ObjectStorage, Transaction
from worker.turn import Turn, current_turn
from wsgate.limits import check_batch, check_key, check_value_size
from wsgate.v1 import state_pb2 as pb
from wsgate.values import decode_value, encode_value

if TYPE_CHECKING:
    from worker.activation import Activation

T = TypeVar("T")


def _done(value: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _encode_entry(key: str, value: Any) -> bytes:
    check_key(key)
    encoded = encode_value(value)
    check_value_size(encoded, key)
    return encoded


class ActivationStorage(ObjectStorage):
    """``self.storage`` of a durable object in its activation (see the module docstring).

    Writes made outside one of the object's own turns raise TurnOver.
    """

    def __init__(self, activation: Activation) -> None:
        super().__init__(activation.state, activation.namespace, activation.name)
        self._activation = activation

    def __repr__(self) -> str:
        return f"<ActivationStorage {self.namespace!r}/{self.name!r}>"

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it does not exist."""
        known = self._activation.cache.lookup(key)
        if known is UNKNOWN:
            return (await self.get_many([key])).get(key, default)
        self._activation.memory_reads.inc()  # the common case, kept short
        return decode_value(known) if isinstance(known, bytes) else default

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of the keys that exist (at most 128 keys)."""
        return await self._read(keys, self._layers())

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """As :meth:`ObjectStorage.list`, including this activation's writes."""
        return await self._list(KeyRange(prefix, start, end), limit, reverse, self._layers())

    async def _read(self, keys: Iterable[str], layers: builtins.list[Layer]) -> dict[str, Any]:
        """The values of the keys that exist, as the top of ``layers`` sees them."""
        keys = builtins.list(keys)
        check_batch(len(keys), keys[0] if keys else "")
        found = await self._activation.read_keys(keys, layers)
        return {key: decode_value(value) for key, value in found.items()}

    async def _list(
        self, bounds: KeyRange, limit: int | None, reverse: bool, layers: builtins.list[Layer]
    ) -> dict[str, Any]:
        """A listing as the top of ``layers`` sees it."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if limit == 0:
            return {}
        entries = await self._activation.list_keys(bounds, limit, reverse, layers)
        return {key: decode_value(value) for key, value in entries}

    def _layers(self) -> builtins.list[Layer]:
        """The layers reads look through, bottom first (a transaction adds its own)."""
        return [self._activation.cache]

    # -- writes --------------------------------------------------------------------------

    def put(self, key: str, value: Any) -> asyncio.Future[None]:
        """Set ``key`` to ``value`` (InvalidValue, KeyTooLarge or ValueTooLarge at once)."""
        return self.put_many({key: value})

    def put_many(self, entries: Mapping[str, Any]) -> asyncio.Future[None]:
        """Set every key of ``entries`` (at most 128)."""
        check_batch(len(entries), next(iter(entries), ""))
        encoded = {key: _encode_entry(key, value) for key, value in entries.items()}
        turn = self._turn()
        cache = self._activation.cache
        for key, value in encoded.items():
            cache.set(key, value)
        written = [pb.Entry(key=key, value=value) for key, value in encoded.items()]
        turn.write(pb.Write(put=pb.PutRequest(entries=written)))
        return self._activation.done

    def delete(self, key: str) -> asyncio.Future[bool]:
        """Delete ``key``; resolves to whether it existed."""
        counted = self.delete_many([key])
        return asyncio.ensure_future(_as_bool(counted))

    def delete_many(self, keys: Iterable[str]) -> asyncio.Future[int]:
        """Delete the keys (at most 128); resolves to how many existed."""
        keys = builtins.list(dict.fromkeys(keys))
        check_batch(len(keys), keys[0] if keys else "")
        for key in keys:
            check_key(key)
        turn = self._turn()
        cache = self._activation.cache
        before = {key: cache.lookup(key) for key in keys}
        for key in keys:
            cache.set(key, None)
        turn.write(pb.Write(delete=pb.DeleteRequest(keys=keys)))
        unknown = [key for key, value in before.items() if value is UNKNOWN]
        known = sum(1 for value in before.values() if isinstance(value, bytes))
        if not unknown:
            return _done(known)
        # The cache had not seen these keys, so no write of this activation touched them:
        # what the state service holds is what they held before this delete (read before
        # the turn's commit: the turn waits for it).
        counting = asyncio.ensure_future(self._count_existing(unknown, known))
        turn.hold(counting)
        return counting

    async def _count_existing(self, keys: builtins.list[str], known: int) -> int:
        found = await self._activation.read_remote(keys)
        return known + len(found)

    def delete_all(self) -> asyncio.Future[int]:
        """Delete every key of the object; resolves to how many there were."""
        turn = self._turn()
        cache = self._activation.cache
        before = Layer()  # what the cache knew until now: counted below, after the clear
        before.values, before.whole = dict(cache.values), cache.whole
        counting = asyncio.ensure_future(self._count_all(before))
        turn.hold(counting)  # its read must reach the service before the turn's commit
        cache.clear()
        turn.write(pb.Write(delete_all=pb.DeleteAllRequest()))
        return counting

    async def _count_all(self, before: Layer) -> int:
        entries = await self._activation.list_keys(KeyRange(), None, False, [before])
        return len(entries)

    def transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], *, timeout_s: float | None = None
    ) -> asyncio.Future[T]:
        """Run ``fn(txn)`` with all-or-none writes: they apply to the object only if ``fn``
        returns (if it raises, nothing it wrote is kept and the exception propagates).

        Turns of an object already run one at a time, so nothing else writes meanwhile:
        there is no hold to wait for, nor conflict to retry. ``timeout_s`` is accepted for
        the API's sake; the turn's own time limit bounds ``fn``. Not awaiting the returned
        future is allowed: the turn waits for it before it ends.
        """
        turn = self._turn()
        task = asyncio.ensure_future(self._run_transaction(fn, turn))
        turn.hold(task)
        return task

    async def _run_transaction(self, fn: Callable[[Transaction], Awaitable[T]], turn: Turn) -> T:
        txn = CachedTransaction(self)
        try:
            result = await fn(txn)
        finally:
            txn._finished = True
        txn.apply(turn)
        return result

    def _turn(self) -> Turn:
        turn = current_turn.get()
        if turn is None or turn.activation is not self._activation:
            raise TurnOver(
                f"{self!r} can be written only by its object's own handlers, while they run"
            )
        turn.check_open()
        return turn


async def _as_bool(count: Awaitable[int]) -> bool:
    return await count > 0


class CachedTransaction(Transaction):
    """The storage of an activation's object inside ``storage.transaction(fn)``: reads see
    the object with the transaction's own writes; the writes apply when ``fn`` returns."""

    def __init__(self, storage: ActivationStorage) -> None:
        super().__init__(storage._object, None)
        self._storage = storage
        self._layer = Layer()
        # key -> encoded value or None, in the order written (the order they commit in)
        self._order: dict[str, bytes | None] = {}

    def _layers(self) -> builtins.list[Layer]:
        return [*self._storage._layers(), self._layer]

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of the keys that exist, as this transaction sees them."""
        self._check_open()
        return await self._storage._read(keys, self._layers())

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """As :meth:`ObjectStorage.list`, as this transaction sees the object."""
        self._check_open()
        return await self._storage._list(
            KeyRange(prefix, start, end), limit, reverse, self._layers()
        )

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` when the transaction's function returns."""
        self._check_open()
        encoded = _encode_entry(key, value)
        self._layer.set(key, encoded)
        self._order.pop(key, None)
        self._order[key] = encoded

    def delete(self, key: str) -> None:
        """Delete ``key`` when the transaction's function returns."""
        self._check_open()
        check_key(key)
        self._layer.set(key, None)
        self._order.pop(key, None)
        self._order[key] = None

    def delete_all(self) -> None:
        """Delete every key (later puts still apply)."""
        self._check_open()
        self._layer.clear()
        self._order.clear()
        self._cleared = True

    def apply(self, turn: Turn) -> None:
        """The function returned: its writes join the turn, and the activation's cache."""
        cache = self._storage._activation.cache
        if self._cleared:
            cache.clear()
            turn.write(pb.Write(delete_all=pb.DeleteAllRequest()))
        for key, value in self._order.items():
            cache.set(key, value)
            if value is None:
                turn.write(pb.Write(delete=pb.DeleteRequest(keys=[key])))
            else:
                turn.write(pb.Write(put=pb.PutRequest(entries=[pb.Entry(key=key, value=value)])))

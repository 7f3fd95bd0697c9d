"""A durable object's storage inside its activation: served from memory, written by turns.

The same API as :class:`~wsgate.worker.object_storage.ObjectStorage` (what ``self.storage``
is), with Cloudflare's semantics:

- **Reads** are served from the activation's cache (:mod:`wsgate.worker.object_cache`) and see the
  activation's own writes at once; a key the cache does not know is read from the state
  service once, then kept.
- **Writes** apply to the cache at once and join the running turn's effects; their future
  is already resolved (awaiting it waits for nothing). They become durable when the turn
  commits, and what the turn sends leaves only then (the output gate), so a client never
  sees a value that is then lost. The next turn does not wait for that commit.
- **Limits** are checked at the call (the state service checks again at the commit).
- **Quotas** (keys and bytes per object) are checked at the call too, against the
  activation's count (:mod:`wsgate.worker.activation_quota`): a write over one raises
  TooManyObjectKeys or ObjectTooLarge and applies nothing. Near a quota, a write of keys
  this activation never read may need the state service to tell: its future then resolves
  (or raises) once it knows, and the storage calls made after it wait for it, in order.
- A handler that raises keeps the writes it made, as on Cloudflare; ``transaction(fn)`` is
  the way to make several writes all or none: it runs ``fn`` over an overlay, applied only
  if ``fn`` returns.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from wsgate.limits import check_batch, check_key, check_value_size
from wsgate.v1 import state_pb2 as pb
from wsgate.values import StorableValue, Value, decode_value, encode_value
from wsgate.worker.errors import TurnOver
from wsgate.worker.object_cache import (
    UNKNOWN,
    KeyRange,
    Layer,
)
from wsgate.worker.object_storage import ObjectStorage, Transaction
from wsgate.worker.turn import Turn, current_turn

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation

T = TypeVar("T")


def _done(value: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _encode_entry(key: str, value: StorableValue) -> bytes:
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
        #: The last write that waits for the state service to decide on a quota; the
        #: storage calls made after it wait for it, so they keep their order.
        self._waiting: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"<ActivationStorage {self.namespace!r}/{self.name!r}>"

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: str, default: Value = None) -> Value:
        """The value of ``key``, or ``default`` if it does not exist."""
        if self._waiting is not None:
            await self._settled()
        known = self._activation.cache.lookup(key)
        if known is UNKNOWN:
            return (await self.get_many([key])).get(key, default)
        self._activation.memory_reads.inc()  # the common case, kept short
        return decode_value(known) if isinstance(known, bytes) else default

    async def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
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
    ) -> dict[str, Value]:
        """As :meth:`ObjectStorage.list`, including this activation's writes."""
        return await self._list(KeyRange(prefix, start, end), limit, reverse, self._layers())

    async def _read(self, keys: Iterable[str], layers: builtins.list[Layer]) -> dict[str, Value]:
        """The values of the keys that exist, as the top of ``layers`` sees them."""
        keys = builtins.list(keys)
        check_batch(len(keys), keys[0] if keys else "")
        await self._settled()
        found = await self._activation.read_keys(keys, layers)
        return {key: decode_value(value) for key, value in found.items()}

    async def _list(
        self, bounds: KeyRange, limit: int | None, reverse: bool, layers: builtins.list[Layer]
    ) -> dict[str, Value]:
        """A listing as the top of ``layers`` sees it."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if limit == 0:
            return {}
        await self._settled()
        entries = await self._activation.list_keys(bounds, limit, reverse, layers)
        return {key: decode_value(value) for key, value in entries}

    def _layers(self) -> builtins.list[Layer]:
        """The layers reads look through, bottom first (a transaction adds its own)."""
        return [self._activation.cache]

    # -- writes --------------------------------------------------------------------------

    def put(self, key: str, value: StorableValue) -> asyncio.Future[None]:
        """Set ``key`` to ``value`` (InvalidValue, KeyTooLarge or ValueTooLarge at once)."""
        return self.put_many({key: value})

    def put_many(self, entries: Mapping[str, StorableValue]) -> asyncio.Future[None]:
        """Set every key of ``entries`` (at most 128). Raises TooManyObjectKeys or
        ObjectTooLarge (nothing applied) if the object would go over a quota; near one,
        the returned future may raise it instead (see the module docstring)."""
        check_batch(len(entries), next(iter(entries), ""))
        encoded = {key: _encode_entry(key, value) for key, value in entries.items()}
        turn = self._turn()
        quota = self._activation.quota
        cache = self._activation.cache
        if self._waiting is None:
            refused = quota.refusal(cache, encoded)
            if refused is None:
                self._put_now(turn, encoded)
                return self._activation.done
            if quota.decides(cache, encoded):
                raise self._activation.refused(refused)
        # The count may be above the truth: the state service decides (in order).
        return self._after_waiting(turn, self._put_settled(turn, encoded))

    def _put_now(self, turn: Turn, encoded: dict[str, bytes]) -> None:
        cache = self._activation.cache
        self._activation.quota.wrote(turn.number, cache, encoded)
        for key, value in encoded.items():
            cache.set(key, value)
        written = [pb.Entry(key=key, value=value) for key, value in encoded.items()]
        turn.write(pb.Write(put=pb.PutRequest(entries=written)))

    async def _put_settled(self, turn: Turn, encoded: dict[str, bytes]) -> None:
        activation = self._activation
        quota, cache = activation.quota, activation.cache
        refused = quota.refusal(cache, encoded)
        if refused is not None and not quota.decides(cache, encoded):
            await activation.settle_quota(turn, quota.unknown(cache, encoded))
            refused = quota.refusal(cache, encoded)
        turn.check_open()
        if refused is not None:
            raise activation.refused(refused)
        self._put_now(turn, encoded)

    def _after_waiting(self, turn: Turn, write: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``write`` once the writes waiting before it are done (whatever their
        outcome: each raises to its own caller); the turn ends only after it."""
        waiting = self._waiting

        async def in_order() -> T:
            try:
                if waiting is not None:
                    await asyncio.wait([waiting])
            except BaseException:
                write.close()  # cancelled before its turn came: it never runs
                raise
            return await write

        task = asyncio.ensure_future(in_order())
        self._waiting = task
        task.add_done_callback(self._done_waiting)
        # The turn waits for it, but its refusal is its caller's (who may catch it).
        turn.hold(asyncio.ensure_future(asyncio.wait([task])))
        return task

    def _done_waiting(self, task: asyncio.Future[Any]) -> None:
        if self._waiting is task:
            self._waiting = None

    async def _settled(self) -> None:
        """Until the writes waiting for the state service are done (reads see them)."""
        while self._waiting is not None:
            await asyncio.wait([self._waiting])

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
        if self._waiting is not None:
            return self._after_waiting(turn, _awaited(lambda: self._delete_now(turn, keys)))
        return self._delete_now(turn, keys)

    def _delete_now(self, turn: Turn, keys: builtins.list[str]) -> asyncio.Future[int]:
        cache = self._activation.cache
        before = {key: cache.lookup(key) for key in keys}
        self._activation.quota.wrote(turn.number, cache, dict.fromkeys(keys))
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
        if self._waiting is not None:
            return self._after_waiting(turn, _awaited(lambda: self._delete_all_now(turn)))
        return self._delete_all_now(turn)

    def _delete_all_now(self, turn: Turn) -> asyncio.Future[int]:
        cache = self._activation.cache
        before = Layer()  # what the cache knew until now: counted below, after the clear
        before.values, before.whole = dict(cache.values), cache.whole
        counting = asyncio.ensure_future(self._count_all(before))
        turn.hold(counting)  # its read must reach the service before the turn's commit
        self._activation.quota.wrote(turn.number, cache, {}, clear=True)
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
        await self._settled()
        # Its writes count together against the quotas, as the state service counts them.
        activation = self._activation
        quota, cache = activation.quota, activation.cache
        changes, clear = txn.changes()
        refused = quota.refusal(cache, changes, clear=clear)
        if refused is not None and not quota.decides(cache, changes, clear=clear):
            await activation.settle_quota(turn, quota.unknown(cache, changes))
            refused = quota.refusal(cache, changes, clear=clear)
        if refused is not None:
            raise activation.refused(refused)  # nothing of it applies
        turn.check_open()
        quota.wrote(turn.number, cache, changes, clear=clear)
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


async def _awaited(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``'s result, awaited (a write run later, in its turn)."""
    return await call()


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

    async def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
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
    ) -> dict[str, Value]:
        """As :meth:`ObjectStorage.list`, as this transaction sees the object."""
        self._check_open()
        return await self._storage._list(
            KeyRange(prefix, start, end), limit, reverse, self._layers()
        )

    def put(self, key: str, value: StorableValue) -> None:
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

    def changes(self) -> tuple[dict[str, bytes | None], bool]:
        """What the transaction writes: each key's new value (None: deleted), in order,
        and whether it deletes every key first."""
        return dict(self._order), self._cleared

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

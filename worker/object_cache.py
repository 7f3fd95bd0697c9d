"""What an activation knows of its object's keys, and how listings merge with it.

Pure bookkeeping, no I/O: values are kept encoded (``wsgate.v1.Value`` bytes, decoded
afresh on every read, so a caller that mutates what it read never changes the cache).

Why the cache can be trusted: while a worker holds an object's lease, its activation is
the object's one writer (writes from outside are refused, and a stale holder's commits are
fenced). So every key the activation wrote holds what it wrote, committed or not, and
every key it read and did not write since holds what it read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final


class _Unknown:
    """The cache does not know the key: ask the state service."""

    def __repr__(self) -> str:
        return "UNKNOWN"


#: A key the cache knows nothing about (distinct from None, a key known not to exist).
UNKNOWN: Final = _Unknown()


@dataclass(frozen=True)
class KeyRange:
    """The bounds of a listing: keys that start with ``prefix``, are ``>= start`` and
    ``< end``, compared as UTF-8 bytes (the order of Durable Objects' storage)."""

    prefix: str = ""
    start: str | None = None
    end: str | None = None

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or not key.startswith(self.prefix):
            return False
        encoded = key.encode()
        if self.start is not None and encoded < self.start.encode():
            return False
        return self.end is None or encoded < self.end.encode()

    @property
    def is_everything(self) -> bool:
        """Whether the range is every key."""
        return not self.prefix and self.start is None and self.end is None


class Layer:
    """Known keys (encoded value, or None for a key known not to exist) over what lies
    below; ``whole``: nothing below counts (the cache knows every key, or a transaction
    deleted them all)."""

    def __init__(self) -> None:
        self.values: dict[str, bytes | None] = {}
        self.whole = False

    def lookup(self, key: str) -> bytes | _Unknown | None:
        """The key's value as this layer knows it: bytes, None (does not exist) or
        UNKNOWN (look below)."""
        value = self.values.get(key, UNKNOWN)
        if value is UNKNOWN and self.whole:
            return None
        return value

    def set(self, key: str, value: bytes | None) -> None:
        """The key now holds ``value`` (None: it was deleted)."""
        self.values[key] = value

    def clear(self) -> None:
        """Every key was deleted: nothing below counts any more."""
        self.values = {}
        self.whole = True

    def known_in(self, bounds: KeyRange) -> int:
        """How many keys this layer knows inside ``bounds``."""
        return sum(1 for key in self.values if key in bounds)


class StorageCache(Layer):
    """One activation's view of its object: every key it read or wrote.

    ``whole`` (all keys known) is set by a listing of every key and by ``delete_all``.
    """

    def fill(self, key: str, value: bytes | None) -> None:
        """What the state service said ``key`` holds, unless the cache knows better: a
        write of this activation that the read did not see yet (or a ``delete_all``,
        after which the cache knows every key)."""
        if not self.whole and key not in self.values:
            self.values[key] = value


def merged_listing(
    remote: Mapping[str, bytes] | None,
    layers: Iterable[Layer],
    bounds: KeyRange,
    *,
    limit: int | None,
    reverse: bool,
) -> list[tuple[str, bytes]]:
    """The entries of ``bounds`` as the topmost layer sees them: ``remote`` (what the state
    service listed; None if a layer is whole, so it was not asked) overlaid by each layer
    in turn (bottom first), in UTF-8 order of keys (descending if ``reverse``), at most
    ``limit``."""
    merged: dict[str, bytes] = dict(remote or {})
    for layer in layers:
        if layer.whole:
            merged = {}
        for key, value in layer.values.items():
            if key not in bounds:
                continue
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
    ordered = sorted(merged, key=str.encode, reverse=reverse)
    if limit is not None:
        ordered = ordered[:limit]
    return [(key, merged[key]) for key in ordered]


def needs_remote(layers: Iterable[Layer]) -> bool:
    """Whether a listing must ask the state service: no layer knows every key."""
    return not any(layer.whole for layer in layers)


def remote_limit(layers: Iterable[Layer], bounds: KeyRange, limit: int | None) -> int | None:
    """How many entries to ask the state service for so that ``limit`` remain after the
    layers' deletions hide some: the limit plus every key the layers know in range."""
    if limit is None:
        return None
    return limit + sum(layer.known_in(bounds) for layer in layers)

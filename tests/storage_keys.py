"""What the stateful storage tests (against the storage and against the gRPC service,
each on SQLite and on PostgreSQL) draw keys from, so all of them hit the same ordering
edges: PostgreSQL must order these keys (BYTEA) exactly as SQLite does (BLOB)."""

from __future__ import annotations

from typing import TypeVar

from hypothesis import strategies as st

T = TypeVar("T")

#: The characters keys are made of. "\ue000" and "\uffff" are BMP characters above the
#: surrogates, so they sort after supplementary characters in UTF-16 but before them in
#: UTF-8; "\U00010000" and "\U0001f600" differ only beyond the BMP; "\x00" is the least.
KEY_CHARS = ("a", "b", "\x00", "\u00e9", "\ue000", "\uffff", "\U00010000", "\U0001f600")

#: Keys that are drawn often, so that steps meet the same keys (and their prefixes) again:
#: the least key, prefixes of other keys (also with a NUL after them), a 2-byte, a 3-byte
#: (the greatest BMP character) and 4-byte characters, one of them the greatest of all.
KEY_UNIVERSE = (
    "",
    "a",
    "a\x00",
    "ab",
    "b",
    "\u00e9",
    "\uffff",
    "\U00010000",
    "\U0001f600",
    "\U0001f600a",
    "\U0010ffff",
)


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each chosen with its weight (``one_of`` weighs all alike, and
    drops a strategy given twice)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


#: Mostly keys of the universe (3 to 1), so that reads and deletes find what was written.
KEYS = weighted(
    (3, st.sampled_from(KEY_UNIVERSE)), (1, st.text(st.sampled_from(KEY_CHARS), max_size=3))
)

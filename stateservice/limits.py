"""The documented limits of durable object storage, as Cloudflare Durable Objects' own.

Over a limit is a clear error carrying the numbers, never a truncation. The state service
enforces them; clients rely on it rather than keeping a second copy of the rules.
"""

from __future__ import annotations

from wsgate.errors import KeyTooLarge, ValueTooLarge

#: A key is at most 2 KiB of UTF-8.
MAX_KEY_BYTES = 2048

#: A value is at most 128 KiB, measured as its encoded ``wsgate.v1.Value``.
MAX_VALUE_BYTES = 131072


def check_key(key: str) -> bytes:
    """Return ``key`` as UTF-8, or raise KeyTooLarge if it is over :data:`MAX_KEY_BYTES`.

    Raises UnicodeEncodeError for a str with lone surrogates (which gRPC cannot carry).
    """
    encoded = key.encode("utf-8")
    if len(encoded) > MAX_KEY_BYTES:
        raise KeyTooLarge(len(encoded), MAX_KEY_BYTES, key)
    return encoded


def check_value_size(value: bytes, key: str = "") -> None:
    """Raise ValueTooLarge if the encoded ``value`` is over :data:`MAX_VALUE_BYTES`."""
    if len(value) > MAX_VALUE_BYTES:
        raise ValueTooLarge(len(value), MAX_VALUE_BYTES, key)

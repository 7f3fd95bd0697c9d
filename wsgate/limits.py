"""The documented limits of durable object storage, as Cloudflare Durable Objects' own.

Over a limit is a clear error carrying the numbers, never a truncation. Shared by the
state service (the authority: it checks every request) and a worker's activations, which
check a write where the handler makes it, since the write is applied to the activation's
memory at once and must fail there, not at the commit.
"""

from __future__ import annotations

from wsgate.errors import (
    AttachmentTooLarge,
    KeyTooLarge,
    TagTooLarge,
    TooManyKeys,
    TooManyTags,
    ValueTooLarge,
)

#: A key is at most 2 KiB of UTF-8.
MAX_KEY_BYTES = 2048

#: A value is at most 128 KiB, measured as its encoded ``wsgate.v1.Value``.
MAX_VALUE_BYTES = 131072

#: One call (get, put, delete, a transaction's commit) names at most 128 keys.
MAX_BATCH_KEYS = 128

#: A connection has at most 10 tags in an object ...
MAX_TAGS = 10

#: ... each at most 256 characters (and not empty).
MAX_TAG_CHARS = 256

#: A connection's attachment is at most 16 KiB, measured as its encoded Value.
MAX_ATTACHMENT_BYTES = 16384


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


def check_batch(count: int, first_key: str = "") -> None:
    """Raise TooManyKeys if one call names more than :data:`MAX_BATCH_KEYS` keys."""
    if count > MAX_BATCH_KEYS:
        raise TooManyKeys(count, MAX_BATCH_KEYS, first_key)


def check_tags(tags: list[str] | tuple[str, ...]) -> None:
    """Raise TooManyTags for over :data:`MAX_TAGS` tags, TagTooLarge for a tag that is
    empty or over :data:`MAX_TAG_CHARS` characters."""
    if len(tags) > MAX_TAGS:
        raise TooManyTags(len(tags), MAX_TAGS, tags[0] if tags else "")
    for tag in tags:
        if not tag or len(tag) > MAX_TAG_CHARS:
            raise TagTooLarge(len(tag), MAX_TAG_CHARS, tag)


def check_attachment_size(attachment: bytes) -> None:
    """Raise AttachmentTooLarge if the encoded attachment is over :data:`MAX_ATTACHMENT_BYTES`."""
    if len(attachment) > MAX_ATTACHMENT_BYTES:
        raise AttachmentTooLarge(len(attachment), MAX_ATTACHMENT_BYTES)

"""NATS subjects, and the encoding of user strings into subject tokens.

Subjects (``<prefix>`` defaults to ``wsgate`` and may itself hold several tokens)::

    <prefix>.connect.<app>      connect requests, request/reply, workers in one queue group
    <prefix>.events.<app>       connection events, request/reply, workers in one queue group
    <prefix>.gw.<gateway_id>    commands for one gateway
    <prefix>.presence           gateways' membership leases, heard by state services
    <prefix>.alarm.<namespace>  alarm events, request/reply, worker queue group

User strings (app names, room names, tags, paths) never become tokens unencoded:
:func:`encode_token` maps every string to a non-empty token of ``[A-Za-z0-9_~-]`` with no
``.``, ``*``, ``>`` or whitespace, and it is injective, so no string can change routing or
collide with another. Everything here is pure.
"""

from __future__ import annotations

import hashlib
import re

from wsgate.errors import ConfigError, InvalidToken

#: Characters kept as they are; everything else is escaped as ``_XX`` per UTF-8 byte.
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
#: The token of the empty string. ``_`` never appears alone otherwise (it always starts an
#: escape of two hex digits), so this cannot collide.
EMPTY_TOKEN = "_"
#: Longer encodings are shortened to a readable head and a digest of the whole string, to
#: stay far below NATS' control-line limit (4 KiB by default) whatever the input.
MAX_TOKEN_CHARS = 200
_HEAD_CHARS = 64
_DIGEST_BYTES = 20  # 160 bits: collisions are out of reach

_ESCAPE = re.compile(r"_([0-9A-F]{2})")
#: Applied with fullmatch: "$" would also accept a trailing newline.
_PREFIX_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def encode_token(value: str) -> str:
    """Encode any string as one NATS subject token.

    The result is non-empty, contains only ``A-Z a-z 0-9 - _ ~``, is at most
    :data:`MAX_TOKEN_CHARS` long, and differs for different inputs. Strings made only of
    letters, digits and ``-`` encode to themselves, so common names stay readable.
    Never raises for any ``str`` (lone surrogates are escaped by their code point bytes).
    """
    if value == "":
        return EMPTY_TOKEN
    raw = value.encode("utf-8", "surrogatepass")
    encoded = "".join(chr(b) if b in _SAFE else f"_{b:02X}" for b in raw)
    if len(encoded) <= MAX_TOKEN_CHARS:
        return encoded
    # '~' is escaped in every ordinary encoding, so it marks a shortened token unambiguously.
    digest = hashlib.blake2b(raw, digest_size=_DIGEST_BYTES).hexdigest()
    return f"{encoded[:_HEAD_CHARS]}~{digest}"


def decode_token(token: str) -> str:
    """Invert :func:`encode_token`.

    Raises InvalidToken for a string that encode_token does not produce, including a
    shortened token (its tail is a digest, which cannot be inverted).
    """
    if token == EMPTY_TOKEN:
        return ""
    if "~" in token:
        raise InvalidToken(
            f"token {token[:80]!r} is a digest of a long string and cannot be decoded"
        )
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "_":
            m = _ESCAPE.match(token, i)
            if m is None:
                raise InvalidToken(f"bad escape at {i} in token {token[:80]!r}")
            byte = int(m.group(1), 16)
            if byte in _SAFE:
                raise InvalidToken(f"needless escape at {i} in token {token[:80]!r}")
            out.append(byte)
            i += 3
        elif ord(ch) < 128 and ord(ch) in _SAFE:
            out.append(ord(ch))
            i += 1
        else:
            raise InvalidToken(f"character {ch!r} at {i} cannot appear in token {token[:80]!r}")
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise InvalidToken(f"token {token[:80]!r} does not decode to UTF-8") from exc


def validate_prefix(prefix: str) -> str:
    """Check a subject prefix: dot-separated tokens of ``[A-Za-z0-9_-]``, no wildcards.

    Returns the prefix; raises ConfigError naming the problem.
    """
    if not prefix:
        raise ConfigError("prefix (WSGATE_PREFIX) must not be empty")
    for token in prefix.split("."):
        if not _PREFIX_TOKEN.fullmatch(token):
            raise ConfigError(
                f"prefix (WSGATE_PREFIX) {prefix!r}: each dot-separated part must be "
                f"letters, digits, '-' or '_', got {token!r}"
            )
    return prefix


def connect_subject(prefix: str, app_name: str) -> str:
    """Where gateways send connect requests for ``app_name``."""
    return f"{prefix}.connect.{encode_token(app_name)}"


def events_subject(prefix: str, app_name: str) -> str:
    """Where gateways send connection events for ``app_name``."""
    return f"{prefix}.events.{encode_token(app_name)}"


def gateway_subject(prefix: str, gateway_id: str) -> str:
    """Where commands for one gateway go. ``gateway_id`` is already a safe token."""
    return f"{prefix}.gw.{gateway_id}"


def worker_queue(app_name: str) -> str:
    """The queue group workers of ``app_name`` share, so each request goes to one of them."""
    return f"workers-{encode_token(app_name)}"


def ack_prefix(prefix: str, gateway_id: str) -> str:
    """Replies to one gateway's events go to ``<this>.<connection_id>.<sequence>``."""
    return f"{prefix}.ack.{gateway_id}"


def ack_batch_subject(prefix: str, gateway_id: str) -> str:
    """Where workers publish batches of final acks for one gateway."""
    return f"{prefix}.acks.{gateway_id}"


def presence_subject(prefix: str) -> str:
    """Where gateways announce that they are alive (their membership leases)."""
    return f"{prefix}.presence"


def replicas_subject(prefix: str) -> str:
    """Where state replicas announce that they are alive (placement of objects)."""
    return f"{prefix}.state.replicas"


def alarm_subject(prefix: str, namespace: str) -> str:
    """Where the state service sends the alarms of objects in ``namespace``."""
    return f"{prefix}.alarm.{encode_token(namespace)}"


def alarm_queue(namespace: str) -> str:
    """The queue group of workers that run ``namespace``'s alarm handler."""
    return f"alarms-{encode_token(namespace)}"


#: The kinds of message a worker takes on its own subjects.
WORKER_SUBJECT_KINDS = ("connect", "events", "alarm")


def worker_subject(prefix: str, worker_id: str, kind: str) -> str:
    """Where messages of ``kind`` (connect, events, alarm) for one worker go: the events of
    the durable objects whose activations it holds. ``worker_id`` is already a safe token."""
    if kind not in WORKER_SUBJECT_KINDS:
        raise ValueError(f"no worker subject for {kind!r}")
    return f"{prefix}.worker.{worker_id}.{kind}"

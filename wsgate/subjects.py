"""NATS subjects, and the encoding of user strings into subject tokens.

Subjects (``<prefix>`` defaults to ``wsgate`` and may itself hold several tokens; ``<gw>``
stands for a gateway's two tokens ``<node>.<gateway_id>``, ``<w>`` for a worker's
``<node>.<worker_id>``)::

    <prefix>.connect.<app>.<gw>          connect requests, request/reply, workers' queue group
    <prefix>.events.<app>.<gw>           connection events (reply: the ack subject)
    <prefix>.request.<app>.<gw>          plain HTTP requests to routes, request/reply,
                                         workers' queue group
    <prefix>.gw.<gw>                     final acks and commands for one gateway, in order
    <prefix>.ack.<gw>.<connection>.<seq> replies to one event: progress, retry, no responders
    <prefix>.presence.<gw>               one gateway's membership lease, heard by state services
    <prefix>.worker.<w>.connect.<gw>     the same connect and events, for the worker that
    <prefix>.worker.<w>.events.<gw>        hosts their durable object (no queue group)
    <prefix>.worker.<w>.alarm            alarms for the worker that hosts their object
    <prefix>.worker.<w>.call             calls for the worker that hosts their object
    <prefix>.worker.<w>.request          HTTP requests for the worker that hosts their object
    <prefix>.alarm.<namespace>           alarm events, request/reply, worker queue group
    <prefix>.call.<namespace>            calls of durable objects' methods, request/reply,
                                         worker queue group
    <prefix>.state.replicas              state replicas' announcements
    <prefix>.inbox.<role>.<node>.>       request inboxes (replies) of one role and identity

**Identities.** The node part of a gateway or worker id (``wsgate.ids``) is its identity on
NATS, and every subject that belongs to one gateway or worker carries that node as a token
of its own, before the id. NATS permissions wildcard whole tokens only, so this is what
lets ``wsgate.nats_permissions`` give a gateway identity ``<prefix>.gw.<node>.*`` and no
other gateway's commands. Subjects a gateway publishes on (connect, events, presence)
carry the sender's tokens too, so a receiver can tell which gateway sent a message
(:func:`sent_by`) and drop one that speaks for another gateway's connections.

**Patterns.** Every function here also builds the subscription and permission patterns
of its subjects: pass :data:`ANY` (one token: ``*``) for a name, or ``any_id_of(node)`` for
"any gateway or worker id of this identity". Nothing else makes a :class:`Wildcard`: user
strings are plain ``str`` and always encoded, so they can never become one.

User strings (app names, room names, tags, paths) never become tokens unencoded:
:func:`encode_token` maps every string to a non-empty token of ``[A-Za-z0-9_~-]`` with no
``.``, ``*``, ``>`` or whitespace, and it is injective, so no string can change routing or
collide with another. Everything here is pure.
"""

from __future__ import annotations

import functools
import hashlib
import re

from wsgate.errors import ConfigError, InvalidToken
from wsgate.ids import node_of, validate_node_name

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


class Wildcard(str):
    """A NATS wildcard standing where a subject function takes a name or an id: in
    subscriptions and permission patterns only. ``identity`` is the node an
    :func:`any_id_of` pattern keeps (``*``: any)."""

    identity: str = "*"


#: One token, whatever it is: ``*``.
ANY = Wildcard("*")


def any_id_of(identity: str) -> Wildcard:
    """Any gateway or worker id of one identity (node name), where a function takes an id:
    its subjects become ``<node>.*``. Raises ConfigError for an unusable node name."""
    pattern = Wildcard("*")
    pattern.identity = validate_node_name(identity)
    return pattern


def _token(name: str) -> str:
    return name if isinstance(name, Wildcard) else encode_token(name)


def _owner(an_id: str) -> str:
    """The two tokens ``<node>.<id>`` that name a gateway or worker in its own subjects."""
    if isinstance(an_id, Wildcard):
        return f"{an_id.identity}.*"
    return f"{node_of(an_id)}.{an_id}"


def under(subject_prefix: str) -> str:
    """Every subject below ``subject_prefix``: ``<subject_prefix>.>``."""
    return f"{subject_prefix}.>"


def sent_by(subject: str, gateway_id: str) -> bool:
    """Whether ``subject`` (a connect, events or presence subject, or a worker's connect or
    events subject) is one that gateway ``gateway_id`` sends on: it ends with that
    gateway's own tokens. NATS lets a gateway publish only under its own identity, so a
    message whose content names another gateway than this is an impostor's."""
    return subject.endswith(f".{_owner(gateway_id)}")


def connect_subject(prefix: str, app_name: str, gateway_id: str) -> str:
    """Where gateway ``gateway_id`` sends connect requests for ``app_name``."""
    return f"{prefix}.connect.{_token(app_name)}.{_owner(gateway_id)}"


def events_subject(prefix: str, app_name: str, gateway_id: str) -> str:
    """Where gateway ``gateway_id`` sends connection events for ``app_name``."""
    return f"{prefix}.events.{_token(app_name)}.{_owner(gateway_id)}"


def request_subject(prefix: str, app_name: str, gateway_id: str) -> str:
    """Where gateway ``gateway_id`` sends plain HTTP requests (no upgrade) for ``app_name``."""
    return f"{prefix}.request.{_token(app_name)}.{_owner(gateway_id)}"


def gateway_subject(prefix: str, gateway_id: str) -> str:
    """Where final acks and commands for one gateway go (GatewayBatch envelopes, read by
    one subscription, in order). ``gateway_id`` is already a safe token."""
    return f"{prefix}.gw.{_owner(gateway_id)}"


def worker_queue(app_name: str) -> str:
    """The queue group workers of ``app_name`` share, so each request goes to one of them."""
    return f"workers-{encode_token(app_name)}"


def ack_prefix(prefix: str, gateway_id: str) -> str:
    """Replies to one gateway's events go to ``<this>.<connection_id>.<sequence>``."""
    return f"{prefix}.ack.{_owner(gateway_id)}"


def ack_subject(prefix: str, gateway_id: str, connection_id: str, sequence: int | str) -> str:
    """The reply subject of one event: its progress acks, a retry, NATS' no-responders
    status. ``connection_id`` is already a safe token."""
    return f"{ack_prefix(prefix, gateway_id)}.{connection_id}.{sequence}"


#: The token that stands for the connection id in a batch's reply subject (no connection
#: id is one: each has a ``_``).
BATCH_REPLY_TOKEN = "batch"


def batch_reply_subject(prefix: str, gateway_id: str, number: int) -> str:
    """The reply subject of gateway ``gateway_id``'s EventBatch number ``number``: only
    NATS' no-responders status comes there (each event's acks go to its own
    :func:`ack_subject`)."""
    return f"{ack_prefix(prefix, gateway_id)}.{BATCH_REPLY_TOKEN}.{number}"


@functools.lru_cache(maxsize=1024)
def event_origin(prefix: str, gateway_id: str) -> tuple[str, str]:
    """What a real event of gateway ``gateway_id`` comes with, as two strings: the end of
    its subject (``subject.endswith(end)`` is :func:`sent_by`) and the start of its reply
    subject (``start + f"{connection_id}.{sequence}"`` is :func:`ack_subject`).

    Cached: a worker checks every event against them, and a cluster has few gateways
    (``gateway_id`` must be checked first: at most an id long, so the cache stays small).
    """
    return f".{_owner(gateway_id)}", f"{ack_prefix(prefix, gateway_id)}."


def presence_subject(prefix: str, gateway_id: str) -> str:
    """Where a gateway announces that it is alive (its membership lease)."""
    return f"{prefix}.presence.{_owner(gateway_id)}"


def replicas_subject(prefix: str) -> str:
    """Where state replicas announce that they are alive (placement of objects)."""
    return f"{prefix}.state.replicas"


def alarm_subject(prefix: str, namespace: str) -> str:
    """Where the state service sends the alarms of objects in ``namespace``."""
    return f"{prefix}.alarm.{_token(namespace)}"


def alarm_queue(namespace: str) -> str:
    """The queue group of workers that run ``namespace``'s alarm handler."""
    return f"alarms-{encode_token(namespace)}"


def call_subject(prefix: str, namespace: str) -> str:
    """Where calls of the methods of objects in ``namespace`` go (any worker serving it)."""
    return f"{prefix}.call.{_token(namespace)}"


def call_queue(namespace: str) -> str:
    """The queue group of workers that serve calls of ``namespace``'s objects."""
    return f"calls-{encode_token(namespace)}"


#: The kinds of message a worker takes on its own subjects.
WORKER_SUBJECT_KINDS = ("connect", "events", "alarm", "call", "request")
#: The kinds that come from a gateway, and name it.
_FROM_GATEWAY = ("connect", "events")


def worker_subject(prefix: str, worker_id: str, kind: str, gateway_id: str | None = None) -> str:
    """Where messages of ``kind`` (connect, events, alarm, call, request) for one worker go: the
    requests of the durable objects whose activations it holds. ``worker_id`` is already a
    safe token.

    A connect or an event names the gateway it comes from (``gateway_id``, required), as
    on the queue subjects; an alarm (from the state service), a call and an HTTP request
    (forwarded by a worker) name none.
    """
    if kind not in WORKER_SUBJECT_KINDS:
        raise ValueError(f"no worker subject for {kind!r}")
    if (kind in _FROM_GATEWAY) != (gateway_id is not None):
        raise ValueError(
            f"a worker's {kind} subject needs a gateway id exactly for connect and events"
        )
    subject = f"{prefix}.worker.{_owner(worker_id)}.{kind}"
    return subject if gateway_id is None else f"{subject}.{_owner(gateway_id)}"


#: The roles that make requests, each with inboxes of its own.
INBOX_ROLES = ("gateway", "worker", "state")


def inbox_prefix(prefix: str, role: str, identity: str) -> str:
    """The inbox prefix (nats-py's ``inbox_prefix``) of one role's identity: the replies to
    its requests come to ``<this>.<unique>.<n>``, which only that identity may read."""
    if role not in INBOX_ROLES:
        raise ValueError(f"no inbox for role {role!r}")
    return f"{prefix}.inbox.{role}.{identity}"

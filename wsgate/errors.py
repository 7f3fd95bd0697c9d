"""The exception tree of wsgate. Every exception wsgate raises on purpose is one of these.

::

    WsgateError
    ├── ConfigError(ValueError)             a setting is missing or malformed
    ├── InvalidToken(ValueError)            a string is not a token wsgate produced
    ├── InvalidConnectionId(ValueError)     a connection id does not parse
    ├── InvalidEnvelope(ValueError)         a message from NATS does not parse or breaks
    │                                       its envelope's contract (counted, dropped)
    ├── BusUnavailable(ConnectionError)     NATS cannot be reached at start
    │   └── BusRefused                      NATS refused the credentials at start
    ├── CallError                           a call of a durable object's method failed
    │   ├── NoSuchMethod                        its class has no public method of that name
    │   ├── CallFailed                          the method raised (remote_type: its class)
    │   ├── CallTooLarge(ValueError)            arguments or result over the call size limit
    │   ├── CallCycle                           the call would wait for itself (A → B → A)
    │   ├── CallTimeout(TimeoutError)           no answer in time
    │   ├── CallUnavailable(ConnectionError)    no worker serves it, or it cannot be activated
    │   └── InvalidCall(ValueError)             malformed: arguments, method, name
    └── StateError                          the state service refused or failed a call
        ├── StateUnavailable(ConnectionError)   it cannot be reached
        ├── StateTimeout(TimeoutError)          it did not answer in time
        ├── InvalidValue(TypeError)             a value is not JSON types plus bytes
        ├── InvalidObjectId(ValueError)         an object id is malformed (empty namespace)
        ├── InvalidRequest(ValueError)          a request is malformed (no operation, ...)
        ├── TransactionAborted                  a transaction outlived its deadline
        ├── ObjectActive                        a write from outside to an object that an
        │                                       activation holds
        ├── NotOwner                            a state replica was asked about an object
        │                                       another replica owns (names the owner)
        ├── SchemaOutdated                      the database's schema is older than the code
        ├── SchemaTooNew                        ... or newer
        ├── StorageFull                         the state service's disk is below its free
        │                                       space threshold: writes refused, reads served
        └── LimitExceeded(ValueError)           an input is over a documented limit
            ├── KeyTooLarge                     key over 2 KiB
            ├── ValueTooLarge                   value over 128 KiB
            ├── TooManyKeys                     over 128 keys in one call
            ├── TooManyTags                     over 10 tags on a connection
            ├── TagTooLarge                     a tag over 256 characters (or empty)
            ├── AttachmentTooLarge              an attachment over 16 KiB
            ├── ObjectNameTooLong(InvalidObjectId)  a namespace or name over the state
            │                                       service's WSGATE_MAX_OBJECT_NAME_BYTES
            └── ObjectQuotaExceeded             a write would take an object over a quota
                ├── TooManyObjectKeys           keys stored (WSGATE_MAX_KEYS_PER_OBJECT)
                ├── ObjectTooLarge              bytes of keys and values stored
                │                               (WSGATE_MAX_OBJECT_BYTES)
                └── TooManyMembers              connections joined
                                                (WSGATE_MAX_MEMBERS_PER_OBJECT)

The worker SDK adds its own errors under ``wsgate.worker.errors``, and the client
(:mod:`wsgate.client`) its ``ClientError`` subtree; both are rooted at WsgateError too.
"""

from __future__ import annotations


class WsgateError(Exception):
    """Root of every error wsgate raises on purpose."""


class ConfigError(WsgateError, ValueError):
    """A setting is missing or malformed; the message names the flag and variable."""


class InvalidToken(WsgateError, ValueError):
    """A string is not a subject token that :func:`wsgate.subjects.encode_token` made."""


class InvalidConnectionId(WsgateError, ValueError):
    """A connection id does not have the form ``<gateway_id>_<serial>``."""


class InvalidEnvelope(WsgateError, ValueError):
    """A message taken from NATS is not the envelope its subject carries, or breaks that
    envelope's contract (a field out of range, a malformed id). The role that took it
    counts it in its ``garbage`` metric and drops it. ``envelope`` names the expected
    message type; ``reason`` says what is wrong (for logs; bounded, never the payload)."""

    def __init__(self, envelope: str, reason: str) -> None:
        self.envelope = envelope
        self.reason = reason
        super().__init__(f"not a valid {envelope}: {reason}")


class BusUnavailable(WsgateError, ConnectionError):
    """NATS cannot be reached when a role starts (later outages are reconnected)."""


class BusRefused(BusUnavailable):
    """NATS refused the role's credentials when it started (a wrong password or nkey, a
    user or account its server does not know, an expired JWT); the message names the
    setting they came from."""


class StateError(WsgateError):
    """The state service refused or failed a call."""


class StateUnavailable(StateError, ConnectionError):
    """The state service cannot be reached."""


class StateTimeout(StateError, TimeoutError):
    """The state service did not answer within the deadline."""


class InvalidValue(StateError, TypeError):
    """A value holds something other than JSON types plus bytes (or an int out of range).

    ``path`` says where, as Python indexing from the root: ``value['a'][2]``; it is empty
    when unknown (e.g. the state service refused stored bytes that do not parse).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class InvalidObjectId(StateError, ValueError):
    """An object id is malformed: its namespace is empty."""


class InvalidRequest(StateError, ValueError):
    """A request to the state service is malformed (a write naming no operation, ...)."""


class TransactionAborted(StateError):
    """A transaction was aborted by the state service (it held its object longer than the
    transaction timeout); none of its writes were applied."""


class ObjectActive(StateError):
    """A write to a durable object from outside its activation (``env.storage(...)`` of a
    function route, say) while a worker holds the object's activation: the activation
    keeps the object's state in memory and is its one writer, so the write is refused
    rather than lost under it. Reads from outside are allowed (they see what it committed).
    ``holder`` is the id of the worker that holds it."""

    def __init__(self, message: str, *, holder: str = "") -> None:
        self.holder = holder
        super().__init__(message)


class NotOwner(StateError):
    """A state replica was asked about an object that another live replica owns (objects
    are placed on replicas by rendezvous hashing). ``owner`` is that replica's id and
    ``address`` its gRPC address, so the caller can ask it instead; both are empty when
    the replica knows of no owner (no live replica at all)."""

    def __init__(self, message: str, *, owner: str = "", address: str = "") -> None:
        self.owner = owner
        self.address = address
        super().__init__(message)


class SchemaOutdated(StateError):
    """The database's schema is older than this wsgate needs: run ``wsgate state migrate``."""


class SchemaTooNew(StateError):
    """The database's schema is newer than this wsgate knows: upgrade wsgate."""


class LimitExceeded(StateError, ValueError):
    """An input is over a documented limit. ``size`` and ``limit`` are in ``unit``
    (bytes unless the subclass says otherwise)."""

    unit = "bytes"

    def __init__(self, what: str, size: int, limit: int, key: str = "") -> None:
        self.what = what
        self.size = size
        self.limit = limit
        self.key = key
        about = f" (key {key[:64]!r})" if key else ""
        super().__init__(
            f"{what} is {size} {self.unit}, over the limit of {limit} {self.unit}{about}"
        )


class KeyTooLarge(LimitExceeded):
    """A key is longer than 2 KiB of UTF-8."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("key", size, limit, key)


class ValueTooLarge(LimitExceeded):
    """An encoded value is larger than 128 KiB."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("value", size, limit, key)


class TooManyKeys(LimitExceeded):
    """One call names more than 128 keys (``size`` and ``limit`` count keys)."""

    unit = "keys"

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("batch", size, limit, key)


class TooManyTags(LimitExceeded):
    """A connection is given more than 10 tags (``size`` and ``limit`` count tags)."""

    unit = "tags"

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("tag list", size, limit, key)


class TagTooLarge(LimitExceeded):
    """A tag is longer than 256 characters, or empty (``size`` and ``limit`` count
    characters; ``key`` is the tag)."""

    unit = "characters"

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("tag", size, limit, key)


class AttachmentTooLarge(LimitExceeded):
    """A connection's encoded attachment is larger than 16 KiB."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("attachment", size, limit, key)


class ObjectNameTooLong(LimitExceeded, InvalidObjectId):
    """An object's namespace or name is longer (in UTF-8 bytes) than the state service
    takes (``WSGATE_MAX_OBJECT_NAME_BYTES``); ``key`` is the start of the long part."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("object name", size, limit, key)


class ObjectQuotaExceeded(LimitExceeded):
    """A write would take an object over one of the state service's per-object quotas;
    nothing of it was applied. Deletes are always allowed (they free the quota), and so is
    a write that does not make the object bigger. ``size`` is what the object would have
    held, ``limit`` the quota."""


class TooManyObjectKeys(ObjectQuotaExceeded):
    """A write would leave an object with more keys than ``WSGATE_MAX_KEYS_PER_OBJECT``
    (``size`` and ``limit`` count keys; ``key`` is one of the write's)."""

    unit = "keys"

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("object's key count", size, limit, key)


class ObjectTooLarge(ObjectQuotaExceeded):
    """A write would leave an object holding more bytes (its keys' UTF-8 plus its encoded
    values) than ``WSGATE_MAX_OBJECT_BYTES`` (``key`` is one of the write's)."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("object's storage", size, limit, key)


class TooManyMembers(ObjectQuotaExceeded):
    """A join would give an object more connections than ``WSGATE_MAX_MEMBERS_PER_OBJECT``
    (``size`` and ``limit`` count connections; ``key`` is the connection id)."""

    unit = "connections"

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("object's connection count", size, limit, key)


class StorageFull(StateError):
    """The state service refused a write because its disk has less free space than its
    threshold (``WSGATE_MIN_FREE_DISK_BYTES``), or its database reported the disk full.
    Nothing of the write was applied; reads are still served, and writes are taken again
    once space returns (retry later). ``free_bytes`` and ``threshold_bytes`` are 0 when
    unknown (a database server's full disk)."""

    def __init__(self, message: str, *, free_bytes: int = 0, threshold_bytes: int = 0) -> None:
        self.free_bytes = free_bytes
        self.threshold_bytes = threshold_bytes
        super().__init__(message)


class CallError(WsgateError):
    """A call of a durable object's method (``env.objects(ns).get(name).call(...)``) gave
    no value. ``namespace``, ``name`` and ``method`` say which call."""

    def __init__(
        self, message: str, *, namespace: str = "", name: str = "", method: str = ""
    ) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.name = name
        self.method = method


class NoSuchMethod(CallError):
    """The object's class has no public method of that name (or the namespace is served by
    no class that has it)."""


class CallFailed(CallError):
    """The method raised. ``remote_type`` is the class name of its exception; the
    exception itself stays on the object's worker (logged there)."""

    def __init__(self, message: str, *, remote_type: str = "", **where: str) -> None:
        self.remote_type = remote_type
        super().__init__(message, **where)


class CallTooLarge(CallError, ValueError):
    """The encoded arguments or result are over the call size limit
    (:data:`wsgate.calls.MAX_CALL_BYTES`)."""


class CallCycle(CallError):
    """The call would wait for a turn that is waiting for it: the called object is one of
    those whose turns are waiting, in this chain of calls (A calls B, which calls A)."""


class CallTimeout(CallError, TimeoutError):
    """No answer within the call's timeout. The method may have run, or may still run."""


class CallUnavailable(CallError, ConnectionError):
    """No worker serves the namespace, or the object could not be activated in time."""


class InvalidCall(CallError, ValueError):
    """The call is malformed: arguments that are not JSON types plus bytes, a method name
    that is no identifier, a namespace or name the object store refuses."""

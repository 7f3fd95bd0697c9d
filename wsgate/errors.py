"""The exception tree of wsgate. Every exception wsgate raises on purpose is one of these.

::

    WsgateError
    ├── ConfigError(ValueError)             a setting is missing or malformed
    ├── InvalidToken(ValueError)            a string is not a token wsgate produced
    ├── InvalidConnectionId(ValueError)     a connection id does not parse
    ├── BusUnavailable(ConnectionError)     NATS cannot be reached at start
    └── StateError                          the state service refused or failed a call
        ├── StateUnavailable(ConnectionError)   it cannot be reached
        ├── StateTimeout(TimeoutError)          it did not answer in time
        ├── InvalidValue(TypeError)             a value is not JSON types plus bytes
        ├── InvalidObjectId(ValueError)         an object id is malformed (empty namespace)
        └── LimitExceeded(ValueError)           an input is over a documented limit
            ├── KeyTooLarge                     key over 2 KiB
            └── ValueTooLarge                   value over 128 KiB

The worker SDK adds its own errors under ``worker.errors`` (rooted at WsgateError too).
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


class BusUnavailable(WsgateError, ConnectionError):
    """NATS cannot be reached when a role starts (later outages are reconnected)."""


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


class LimitExceeded(StateError, ValueError):
    """An input is over a documented limit. ``size`` and ``limit`` are in bytes."""

    def __init__(self, what: str, size: int, limit: int, key: str = "") -> None:
        self.what = what
        self.size = size
        self.limit = limit
        self.key = key
        about = f" (key {key[:64]!r})" if key else ""
        super().__init__(f"{what} is {size} bytes, over the limit of {limit} bytes{about}")


class KeyTooLarge(LimitExceeded):
    """A key is longer than 2 KiB of UTF-8."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("key", size, limit, key)


class ValueTooLarge(LimitExceeded):
    """An encoded value is larger than 128 KiB."""

    def __init__(self, size: int, limit: int, key: str = "") -> None:
        super().__init__("value", size, limit, key)

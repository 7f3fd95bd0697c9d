"""WebSocket close codes as data (RFC 6455 section 7.4, IANA registry).

Ranges, and what a client should do on each:

- 1000 NORMAL: done; do not reconnect unless the app wants a new session.
- 1001 GOING_AWAY, 1012 SERVICE_RESTART, 1013 TRY_AGAIN_LATER, 1006 ABNORMAL: transient;
  reconnect with backoff and jitter.
- 1002, 1003, 1007, 1008, 1009, 1010: the client did something wrong; reconnecting
  unchanged will fail again.
- 1011 INTERNAL_ERROR, 1014 BAD_GATEWAY: a server fault; reconnect with backoff.
- 3000-3999: registered by libraries and frameworks; 4000-4999: the app's own codes.
- 1005 NO_STATUS, 1006 ABNORMAL, 1015 TLS_HANDSHAKE are reported, never sent.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Close codes wsgate uses by name."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


#: Longest close reason in bytes: a control frame carries at most 125 bytes, 2 of them the code.
MAX_REASON_BYTES = 123


def is_sendable(code: int) -> bool:
    """Whether an endpoint may put ``code`` in a close frame it sends (RFC 6455 7.4.1-2)."""
    return code in _SENDABLE or 3000 <= code <= 4999


_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

"""Whether an HTTP request is a valid WebSocket opening handshake, read from its headers.

The checks aiohttp's ``WebSocketResponse.can_prepare`` makes (RFC 6455 4.2.1), without a
``WebSocketResponse``: a throwaway one per upgrade made the instance dict of every real
socket lose CPython's key sharing, about 1.2 KiB more per open connection.
tests/unit/gateway/test_handshake.py holds the two to the same answers.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import hdrs
from multidict import CIMultiDictProxy

#: The Sec-WebSocket-Version values aiohttp accepts (13, and drafts 7 and 8).
_VERSIONS = frozenset({"13", "8", "7"})


def is_websocket_handshake(headers: CIMultiDictProxy[str]) -> bool:
    """``Upgrade: websocket``, ``upgrade`` among the ``Connection`` tokens, a supported
    ``Sec-WebSocket-Version`` and a ``Sec-WebSocket-Key`` of 16 bytes in base64."""
    if headers.get(hdrs.UPGRADE, "").lower().strip() != "websocket":
        return False
    # As aiohttp's parser decides that a request asks to upgrade (RFC 9110 7.6.1: a
    # comma-separated list, in one or several Connection headers).
    tokens = {
        token.strip(" \t").lower()
        for value in headers.getall(hdrs.CONNECTION, ())
        for token in value.split(",")
    }
    if "upgrade" not in tokens:
        return False
    if headers.get(hdrs.SEC_WEBSOCKET_VERSION, "") not in _VERSIONS:
        return False
    key = headers.get(hdrs.SEC_WEBSOCKET_KEY)
    if not key:
        return False
    try:
        return len(base64.b64decode(key)) == 16
    except binascii.Error:
        return False

"""The PROXY protocol header (HAProxy's spec, versions 1 and 2), parsed without I/O.

A load balancer in front of the gateway that speaks the PROXY protocol writes one header
at the very start of each TCP connection, before anything of the client (before the TLS
handshake too), naming the client's address. :class:`ProxyHeaderReader` takes the bytes
a socket holds, tells how many of them belong to the header (never one past it, so what
follows, such as a TLS ClientHello, stays unread in the socket), and parses the header
once it is complete. Its size is bounded: :data:`MAX_V1_BYTES` (the spec's 107) and
:data:`MAX_V2_BYTES` (the fixed 16 bytes, addresses and TLVs, which are skipped).

Which peers may send a header, and what is done with the address, is the listener's
business (``gateway/listener.py``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from wsgate.gateway.client_address import ClientAddress

#: A version 1 header's longest form, CRLF included (spec section 2.1).
MAX_V1_BYTES = 107
#: The longest version 2 header accepted: 16 fixed bytes, then addresses and TLVs. The
#: spec allows 16 + 65,535; real balancers send a few hundred bytes at most.
MAX_V2_BYTES = 16 + 4096
#: Enough to tell a version 1 header from a version 2 one and read a v2 header's length.
V2_FIXED_BYTES = 16

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_V2_ADDRESS_BYTES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyProtocolError(ValueError):
    """The connection does not start with a well-formed PROXY header (or it is too long)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``source`` is the client's address, or None when the header does
    not name one (v1 ``UNKNOWN``, v2 ``LOCAL`` such as a balancer's health check, or an
    unspecified or Unix family): the connection is then the proxy's own."""

    version: int
    source: ClientAddress | None


class ProxyHeaderReader:
    """Consumes a PROXY header from the front of a byte stream, one chunk at a time.

    Call :meth:`take` with the bytes the socket holds (peeked, not read); it returns how
    many leading bytes of them are the header's, which the caller then reads for good.
    Once :attr:`done`, :meth:`header` gives the result. Raises ProxyProtocolError as soon
    as the bytes cannot start a header, or a header grows past its bound.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._total: int | None = None  # the header's length, once known

    @property
    def done(self) -> bool:
        return self._total is not None and len(self._buffer) == self._total

    @property
    def consumed(self) -> int:
        """Bytes of the header taken so far."""
        return len(self._buffer)

    @property
    def wanted(self) -> int:
        """The most bytes the header may still need (what to peek at)."""
        if self._total is not None:
            return self._total - len(self._buffer)
        return MAX_V2_BYTES - len(self._buffer)

    def take(self, available: bytes) -> int:
        """How many leading bytes of ``available`` belong to the header; they are kept."""
        if self.done:
            return 0
        seen = bytes(self._buffer) + available
        if _starts(seen, V2_SIGNATURE):
            if len(seen) >= V2_FIXED_BYTES and self._total is None:
                if seen[12] >> 4 != 2:
                    raise ProxyProtocolError(f"unsupported PROXY version byte {seen[12]:#x}")
                (length,) = struct.unpack_from("!H", seen, 14)
                if V2_FIXED_BYTES + length > MAX_V2_BYTES:
                    raise ProxyProtocolError(f"PROXY v2 header of {16 + length} bytes is too long")
                self._total = V2_FIXED_BYTES + length
            limit = self._total if self._total is not None else V2_FIXED_BYTES
        elif _starts(seen, V1_PREFIX):
            end = seen.find(b"\r\n")
            if end < 0:
                if len(seen) >= MAX_V1_BYTES:
                    raise ProxyProtocolError("PROXY v1 header without CRLF in 107 bytes")
                limit = len(seen)  # everything before the CRLF is the header's
            else:
                self._total = limit = end + 2
                if limit > MAX_V1_BYTES:
                    raise ProxyProtocolError("PROXY v1 header longer than 107 bytes")
        else:
            raise ProxyProtocolError("the connection does not start with a PROXY header")
        taken = min(len(available), limit - len(self._buffer))
        self._buffer += available[:taken]
        return taken

    def header(self) -> ProxyHeader:
        """The parsed header (call once :attr:`done`). Raises ProxyProtocolError."""
        assert self.done, "the header is not complete"
        data = bytes(self._buffer)
        if data.startswith(V2_SIGNATURE):
            return _parse_v2(data)
        return _parse_v1(data)


def _starts(data: bytes, prefix: bytes) -> bool:
    """Whether ``data`` and ``prefix`` agree over the shorter of the two."""
    n = min(len(data), len(prefix))
    return data[:n] == prefix[:n]


def _parse_v1(data: bytes) -> ProxyHeader:
    try:
        line = data[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, None)  # the rest of the line is to be ignored (spec 2.1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 header {line[:107]!r}")
    _, family, source, destination, source_port, destination_port = parts
    version = 4 if family == "TCP4" else 6
    address = _ip(source, version)
    _ip(destination, version)
    _port(destination_port)
    return ProxyHeader(1, ClientAddress.of(address, _port(source_port)))


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"bad address {text[:45]!r} in a PROXY header") from None
    if address.version != version:
        raise ProxyProtocolError(f"{text} is not an IPv{version} address")
    return str(address)


def _port(text: str) -> int:
    # Decimal without leading zeros, 0..65535 (spec 2.1).
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"bad port {text[:8]!r} in a PROXY header")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"port {port} out of range in a PROXY header")
    return port


def _parse_v2(data: bytes) -> ProxyHeader:
    command = data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    body = data[V2_FIXED_BYTES:]
    if command == _V2_LOCAL:
        return ProxyHeader(2, None)  # the proxy's own connection (health checks)
    if command != _V2_PROXY:
        raise ProxyProtocolError(f"unknown PROXY v2 command {command:#x}")
    if family not in (_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX) or transport > 2:
        raise ProxyProtocolError(f"unknown PROXY v2 family byte {data[13]:#x}")
    needed = _V2_ADDRESS_BYTES.get(family, 0)
    if len(body) < needed:
        raise ProxyProtocolError(
            f"PROXY v2 header of {len(body)} address bytes, family {family} needs {needed}"
        )
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == _AF_INET:
        source = ipaddress.IPv4Address(body[0:4])
        (source_port,) = struct.unpack_from("!H", body, 8)
    elif family == _AF_INET6:
        source = ipaddress.IPv6Address(body[0:16])
        (source_port,) = struct.unpack_from("!H", body, 32)
    else:
        return ProxyHeader(2, None)  # no IP address to speak of: the connection is the proxy's
    # TLVs after the addresses are optional and none is needed here: skipped.
    return ProxyHeader(2, ClientAddress.of(str(source), source_port))

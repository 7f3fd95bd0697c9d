"""Who the client is: its address, and which peers may say so on its behalf.

A connection's peer is the client, unless the peer is one of the configured trusted
proxies (``WSGATE_TRUSTED_PROXIES``). Only such a peer may name the client, with a PROXY
protocol header (``gateway/proxy_protocol.py``) or with ``X-Forwarded-For``; anyone else's
headers are ignored, since a client could otherwise pick any address it likes and slip
past the per-address limit. No I/O here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """A client's IP address (normalized text, IPv4-mapped IPv6 shown as IPv4) and its
    port, None when unknown (X-Forwarded-For carries none)."""

    ip: str
    port: int | None = None

    @classmethod
    def of(cls, ip: str, port: int | None = None) -> ClientAddress:
        """From any textual form of an IP address (raises ValueError if it is none)."""
        return cls(str(normalize(ipaddress.ip_address(ip))), port)

    def __str__(self) -> str:
        """``host:port`` (IPv6 hosts in brackets), or the host alone without a port."""
        if self.port is None:
            return self.ip
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


def normalize(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, from a dual-stack socket) as the
    IPv4 address it is, so one client has one key."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The peers allowed to name the client (an empty set trusts nobody)."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, ip: str) -> bool:
        """Whether the address ``ip`` (normalized text) is one of the trusted proxies."""
        if not self._networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def forwarded_client(self, peer: ClientAddress, forwarded_for: Iterable[str]) -> ClientAddress:
        """The client behind ``peer`` according to the ``X-Forwarded-For`` header values
        (in the order received), when ``peer`` is trusted.

        Each proxy appends the address it got the request from, so the list is read from
        the right: the first address that is not a trusted proxy is the client; what lies
        to its left was written by the client itself and is ignored. When every address
        is trusted, the left-most is taken. An entry that is not an address ends the walk
        at the last good one. An untrusted ``peer``'s header is ignored: ``peer`` is the
        client.
        """
        if not self.trusts(peer.ip):
            return peer
        entries = [e.strip() for value in forwarded_for for e in value.split(",")]
        client = peer
        for entry in reversed(entries):
            address = _forwarded_address(entry)
            if address is None:
                break
            client = address
            if not self.trusts(address.ip):
                break
        return client


def _forwarded_address(entry: str) -> ClientAddress | None:
    """One X-Forwarded-For entry: ``1.2.3.4``, ``2001:db8::1``, and the forms some
    proxies write with a port, ``1.2.3.4:5678`` and ``[2001:db8::1]:5678``."""
    host, port = entry, None
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket:
            return None
        if rest:
            if not rest.startswith(":") or not _digits(rest[1:]):
                return None
            port = int(rest[1:])
    elif entry.count(":") == 1:
        host, _, digits = entry.partition(":")
        if not _digits(digits):
            return None
        port = int(digits)
    try:
        return ClientAddress.of(host, port if port is not None and port <= 65535 else None)
    except ValueError:
        return None


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5

"""The gateway's edge without sockets: PROXY headers, X-Forwarded-For, the per-address
count, and the settings that configure them."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.config import GatewayConfig
from wsgate.errors import ConfigError
from wsgate.gateway.client_address import ClientAddress, TrustedProxies
from wsgate.gateway.ip_limit import IpConnectionLimit
from wsgate.gateway.proxy_protocol import (
    MAX_V1_BYTES,
    MAX_V2_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
)

# -- PROXY protocol -------------------------------------------------------------------------


def v2_header(
    source: str, port: int, *, command: int = 1, tlvs: bytes = b"", family: int | None = None
) -> bytes:
    """A PROXY v2 header from ``source``:``port`` (to a fixed destination)."""
    address = ipaddress.ip_address(source)
    if address.version == 4:
        body = address.packed + bytes(4) + struct.pack("!HH", port, 443)
        fam = 0x11
    else:
        body = address.packed + bytes(16) + struct.pack("!HH", port, 443)
        fam = 0x21
    body += tlvs
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, fam if family is None else family])
        + (struct.pack("!H", len(body)) + body)
    )


def read_all(data: bytes, chunks: list[int] | None = None) -> tuple[ProxyHeader, int]:
    """Feed ``data`` as a socket would hold it (growing by ``chunks``); return the header
    and how many bytes were taken in all."""
    reader = ProxyHeaderReader()
    offset, held = 0, 0
    sizes = iter(chunks or [])
    while not reader.done:
        held = min(len(data), held + max(1, next(sizes, len(data))))
        peeked = data[offset:held][: reader.wanted]
        offset += reader.take(peeked)
    return reader.header(), offset


V1 = b"PROXY TCP4 198.51.100.9 10.0.0.1 4567 443\r\n"
AFTER = b"\x16\x03\x01\x02\x00 the TLS ClientHello that follows"


def test_a_v1_header_names_the_client_and_nothing_after_it_is_taken() -> None:
    header, taken = read_all(V1 + AFTER)
    assert header == ProxyHeader(1, ClientAddress("198.51.100.9", 4567))
    assert taken == len(V1)


def test_v1_tcp6_and_unknown() -> None:
    line = b"PROXY TCP6 2001:db8::5 2001:db8::1 1 65535\r\n"
    assert read_all(line)[0].source == ClientAddress("2001:db8::5", 1)
    assert read_all(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")[0].source is None
    assert read_all(b"PROXY UNKNOWN\r\n")[0].source is None


def test_a_v2_header_names_the_client_and_its_tlvs_are_skipped() -> None:
    data = v2_header("203.0.113.7", 5000, tlvs=b"\x04\x00\x03abc")
    assert read_all(data + AFTER) == (ProxyHeader(2, ClientAddress("203.0.113.7", 5000)), len(data))
    six = v2_header("2001:db8::7", 6000)
    assert read_all(six)[0].source == ClientAddress("2001:db8::7", 6000)
    # An IPv4-mapped source is the IPv4 client it stands for.
    mapped = v2_header("::ffff:192.0.2.1", 7)
    assert read_all(mapped)[0].source == ClientAddress("192.0.2.1", 7)


def test_v2_local_and_unspecified_name_no_client() -> None:
    assert read_all(v2_header("192.0.2.1", 1, command=0))[0].source is None
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert read_all(unspec)[0].source is None


@given(
    version=st.sampled_from([1, 2]),
    chunks=st.lists(st.integers(min_value=1, max_value=40), max_size=20),
)
def test_any_chunking_gives_the_same_header_and_stops_at_its_end(
    version: int, chunks: list[int]
) -> None:
    data = V1 if version == 1 else v2_header("203.0.113.7", 5000, tlvs=b"\x04\x00\x03abc")
    header, taken = read_all(data + AFTER, chunks)
    assert taken == len(data)
    assert header.source == (
        ClientAddress("198.51.100.9", 4567) if version == 1 else ClientAddress("203.0.113.7", 5000)
    )


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # no header at all
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello where the header should be
        b"PROXY TCP4 198.51.100.9 10.0.0.1 4567\r\n",  # a field short
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",  # IPv6 in a TCP4 line
        b"PROXY TCP4 198.51.100.9 10.0.0.1 04567 443\r\n",  # a leading zero
        b"PROXY TCP4 198.51.100.9 10.0.0.1 65536 443\r\n",  # out of range
        b"PROXY UDP4 198.51.100.9 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 198.51.100.9  10.0.0.1 1 2\r\n",  # two spaces
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # too short for IPv4 addresses
        V2_SIGNATURE + b"\x21\x51\x00\x00",  # family 5
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        read_all(data)


def test_v1_is_bounded_at_107_bytes() -> None:
    fits = b"PROXY UNKNOWN " + b"x" * (MAX_V1_BYTES - 16) + b"\r\n"
    assert len(fits) == MAX_V1_BYTES
    assert read_all(fits)[1] == MAX_V1_BYTES
    over = b"PROXY UNKNOWN " + b"x" * (MAX_V1_BYTES - 15) + b"\r\n"
    with pytest.raises(ProxyProtocolError, match="107"):
        read_all(over)
    with pytest.raises(ProxyProtocolError, match="CRLF"):
        read_all(b"PROXY TCP4 " + b"1" * 200)


def test_v2_is_bounded() -> None:
    room = MAX_V2_BYTES - 16 - 12
    fits = v2_header("192.0.2.1", 1, tlvs=b"\x04" + struct.pack("!H", room - 3) + bytes(room - 3))
    assert len(fits) == MAX_V2_BYTES
    assert read_all(fits)[1] == MAX_V2_BYTES
    over = v2_header("192.0.2.1", 1, tlvs=b"\x04" + struct.pack("!H", room - 2) + bytes(room - 2))
    with pytest.raises(ProxyProtocolError, match="too long"):
        read_all(over)


# -- X-Forwarded-For ------------------------------------------------------------------------

TRUSTED = TrustedProxies(
    GatewayConfig(trusted_proxies="10.0.0.0/8, 2001:db8:ffff::/48").trusted_networks
)
PROXY = ClientAddress("10.1.2.3", 40000)


@pytest.mark.parametrize(
    ("values", "client"),
    [
        ((), PROXY),  # no header: the proxy's own request
        (("198.51.100.9",), ClientAddress("198.51.100.9")),
        # The right-most address that is not a trusted proxy; the rest is the client's say.
        (("6.6.6.6, 198.51.100.9, 10.9.9.9",), ClientAddress("198.51.100.9")),
        (("6.6.6.6", "198.51.100.9", "10.9.9.9"), ClientAddress("198.51.100.9")),
        # Every entry trusted: the left-most.
        (("10.0.0.7, 10.0.0.8",), ClientAddress("10.0.0.7")),
        # Ports and brackets as some proxies write them; IPv4-mapped IPv6 as IPv4.
        (("198.51.100.9:5678",), ClientAddress("198.51.100.9", 5678)),
        (("[2001:db8::9]:5678",), ClientAddress("2001:db8::9", 5678)),
        (("2001:db8::9",), ClientAddress("2001:db8::9")),
        (("::ffff:198.51.100.9",), ClientAddress("198.51.100.9")),
        # Garbage ends the walk at the last good address.
        (("unknown, 10.0.0.7",), ClientAddress("10.0.0.7")),
        (("198.51.100.9, nonsense",), PROXY),
    ],
)
def test_x_forwarded_for_from_a_trusted_proxy(
    values: tuple[str, ...], client: ClientAddress
) -> None:
    assert TRUSTED.forwarded_client(PROXY, values) == client


def test_x_forwarded_for_from_anyone_else_is_ignored() -> None:
    direct = ClientAddress("198.51.100.1", 1234)
    assert TRUSTED.forwarded_client(direct, ["203.0.113.5"]) == direct
    nobody = TrustedProxies(())
    assert not nobody
    assert nobody.forwarded_client(PROXY, ["203.0.113.5"]) == PROXY


def test_client_address_text() -> None:
    assert str(ClientAddress("192.0.2.1", 80)) == "192.0.2.1:80"
    assert str(ClientAddress("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert str(ClientAddress("192.0.2.1")) == "192.0.2.1"
    assert ClientAddress.of("::ffff:192.0.2.1", 5) == ClientAddress("192.0.2.1", 5)


# -- the per-address count --------------------------------------------------------------------


def test_the_limit_per_address_at_and_over() -> None:
    limit = IpConnectionLimit(2)
    assert limit.acquire("a")
    assert limit.acquire("a")
    assert not limit.acquire("a")  # one over
    assert limit.acquire("b")  # another address has its own count
    limit.release("a")
    assert limit.held("a") == 1
    assert limit.acquire("a")
    for ip in ("a", "a", "b"):
        limit.release(ip)
    assert len(limit) == 0  # nothing kept for addresses with no connection


def test_a_limit_of_zero_is_off() -> None:
    limit = IpConnectionLimit(0)
    assert all(limit.acquire("a") for _ in range(10_000))
    assert len(limit) == 0


# -- settings ---------------------------------------------------------------------------------


def test_edge_settings_defaults() -> None:
    config = GatewayConfig()
    assert (config.tls_cert, config.tls_key) == ("", "")
    assert config.handshake_timeout_s == 10.0
    assert config.keepalive_timeout_s == 75.0
    assert config.max_connections_per_ip == 256
    assert config.trusted_networks == ()
    assert config.proxy_protocol == "off"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"tls_cert": "x.pem"}, "WSGATE_TLS_CERT and WSGATE_TLS_KEY"),
        ({"tls_key": "x.pem"}, "WSGATE_TLS_CERT and WSGATE_TLS_KEY"),
        ({"tls_cert": "/nonexistent/c", "tls_key": "/nonexistent/k"}, "WSGATE_TLS_CERT"),
        ({"handshake_timeout_s": 0}, "WSGATE_HANDSHAKE_TIMEOUT_S"),
        ({"tls_watch_interval_s": 0}, "WSGATE_TLS_WATCH_INTERVAL_S"),
        ({"keepalive_timeout_s": -1}, "WSGATE_KEEPALIVE_TIMEOUT_S"),
        ({"max_connections_per_ip": -1}, "WSGATE_MAX_CONNECTIONS_PER_IP"),
        ({"trusted_proxies": "10.0.0.0/8, lan"}, "WSGATE_TRUSTED_PROXIES.*'lan'"),
        ({"proxy_protocol": "v2"}, "WSGATE_PROXY_PROTOCOL"),
        ({"proxy_protocol": "on"}, "needs WSGATE_TRUSTED_PROXIES"),
    ],
)
def test_bad_edge_settings_name_their_variable(settings: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GatewayConfig(**settings)  # type: ignore[arg-type]


def test_good_edge_settings(tmp_path: Path) -> None:
    (tmp_path / "c").touch()
    (tmp_path / "k").touch()
    config = GatewayConfig(
        tls_cert=str(tmp_path / "c"),
        tls_key=str(tmp_path / "k"),
        trusted_proxies="10.0.0.1, fd00::/8",
        proxy_protocol="on",
        max_connections_per_ip=0,
    )
    assert [str(n) for n in config.trusted_networks] == ["10.0.0.1/32", "fd00::/8"]

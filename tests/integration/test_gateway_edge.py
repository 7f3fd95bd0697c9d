"""The gateway's edge against real sockets: the handshake deadline (slowloris), wss and
its certificate reloads, connections per client address, X-Forwarded-For and the PROXY
protocol from trusted proxies.

The state service and one worker (``tests.apps.edge``, which tells each client the address
the app saw) run in this process, on the session's nats-server, as do most gateways, each
with the settings of its test and short deadlines; all on one event loop for the module.
The SIGHUP reload is sent to a gateway process (on uvloop, as deployed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509

from tests.certs import CertFiles, Pki
from tests.harness import eventually, in_process_state_config
from tests.unit.gateway.test_gateway_edge import v2_header
from tests.wsraw import OP_TEXT, RawWebSocket
from wsgate.config import GatewayConfig, WorkerConfig
from wsgate.errors import ConfigError
from wsgate.gateway.server import Gateway
from wsgate.procs import Child, python_role_argv, spawn
from wsgate.stateservice.server import StateServer
from wsgate.worker.loader import load_app
from wsgate.worker.runtime import Worker

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

HOST = "127.0.0.1"
#: The handshake deadline of the gateways here: short, so the tests are, and long enough
#: for a slow machine to do what must happen inside it.
DEADLINE_S = 1.5
#: The keep-alive timeout of the gateways here (idle after a response).
KEEPALIVE_S = 2.0
HALF_REQUEST_LINE = b"GET /peer HT"


@dataclass
class Stack:
    nats_url: str
    #: The TLS gateway process of the SIGHUP test, and its certificate files.
    sighup_gateway: Child
    sighup_files: CertFiles


@pytest.fixture(scope="module")
def sighup_gateway(
    nats_url: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, CertFiles]]:
    """A gateway process with TLS that reloads its certificate only on SIGHUP. Started
    before this process holds any gRPC channel (a fork then is not safe)."""
    root = tmp_path_factory.mktemp("sighup")
    files = CertFiles(cert=root / "tls.crt", key=root / "tls.key")
    install(pki.server("before-sighup"), files)
    argv = python_role_argv(
        "gateway", "--nats-url", nats_url, "--port", "0",
        "--tls-cert", str(files.cert), "--tls-key", str(files.key),
        "--tls-watch-interval-s", "3600",  # only the signal reloads here
    )  # fmt: skip
    with open(root / "gateway.log", "wb") as log:
        child = spawn("gateway", argv, stdout=log, stderr=log)
        try:
            yield child, files
        finally:
            status = child.stop()
            print((root / "gateway.log").read_text(errors="replace")[-4000:], file=sys.stderr)
    assert status == 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    nats_url: str, sighup_gateway: tuple[Child, CertFiles], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The state service (a close event reaches it) and a worker on the edge app, in this
    process, on the session's nats-server; the gateways are the tests' own."""
    state_config = in_process_state_config(tmp_path_factory.mktemp("edge"), nats_url)
    async with StateServer(state_config) as state:
        worker_config = WorkerConfig(
            nats_url=nats_url, state_address=state.address, port=0, app="tests.apps.edge:app"
        )
        async with Worker(worker_config, load_app(worker_config.app)):
            yield Stack(nats_url, *sighup_gateway)


@contextlib.asynccontextmanager
async def gateway(stack: Stack, **settings: Any) -> AsyncIterator[Gateway]:
    config = GatewayConfig(
        host=HOST,
        port=0,
        nats_url=stack.nats_url,
        handshake_timeout_s=DEADLINE_S,
        keepalive_timeout_s=KEEPALIVE_S,
        **settings,
    )
    async with Gateway(config) as gw:
        yield gw


def sample(gw: Gateway, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def upgrade_request(path: str = "/peer", *headers: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_peer_socket(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *headers: str
) -> tuple[RawWebSocket, str]:
    """Upgrade to /peer on an open stream; return the socket and the address the app saw.
    Raises ConnectionError (the stream closed) if the upgrade is refused."""
    writer.write(upgrade_request("/peer", *headers))
    return await upgraded(reader, writer)


async def upgraded(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[RawWebSocket, str]:
    """The answer to an upgrade to /peer sent on the stream (see open_peer_socket)."""
    try:
        status = await asyncio.wait_for(reader.readline(), 10)
        if b" 101 " not in status:
            raise ConnectionError(f"upgrade refused: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        ws = RawWebSocket(reader, writer)
        first = await asyncio.wait_for(ws.read_frame(), 10)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        await shut(writer)
        raise ConnectionError(str(exc)) from exc
    assert first.opcode == OP_TEXT
    return ws, first.payload.decode()


async def connect_peer(port: int, *headers: str) -> tuple[RawWebSocket, str] | None:
    """A WebSocket to /peer, or None if the gateway refused it."""
    with contextlib.suppress(ConnectionError):
        return await open_peer_socket(*await asyncio.open_connection(HOST, port), *headers)
    return None


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close a stream, and wait until it is (with TLS, the close_notify exchanged)."""
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 10)


async def close(ws: RawWebSocket) -> None:
    await ws.send_close(1000)
    await asyncio.wait_for(ws.read_until_close(), 10)
    await shut(ws.writer)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the gateway closes the connection (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def closed_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the gateway closes a fresh connection without a word (a refusal at accept)."""
    writer.write(upgrade_request())
    with contextlib.suppress(ConnectionResetError):
        await writer.drain()
    data = await asyncio.wait_for(read_to_end(reader), 10)
    await shut(writer)
    return data == b""


# -- the handshake deadline -------------------------------------------------------------------


async def test_slowloris_connections_are_closed_at_the_deadline_and_a_timely_client_is_served(
    stack: Stack,
) -> None:
    async with gateway(stack) as gw:
        start = time.monotonic()
        slow = [await asyncio.open_connection(HOST, gw.port) for _ in range(20)]
        for _, writer in slow[:10]:
            writer.write(HALF_REQUEST_LINE)  # the rest never comes
        # slow[10:] send nothing at all.
        timely_reader, timely_writer = await asyncio.open_connection(HOST, gw.port)
        timely_writer.write(HALF_REQUEST_LINE)

        async def finish_just_inside() -> tuple[RawWebSocket, str]:
            await asyncio.sleep(DEADLINE_S - 0.5)  # the rest, half a second before the deadline
            timely_writer.write(b"TP/1.1\r\n" + upgrade_request().split(b"\r\n", 1)[1])
            return await upgraded(timely_reader, timely_writer)

        async def kept_alive() -> tuple[float, bytes]:
            """A plain request answered, then nothing: how long the idle connection lasts."""
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            answered = time.monotonic()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            await reader.readexactly(2)  # "OK"
            rest = await read_to_end(reader)
            await shut(writer)
            return time.monotonic() - answered, rest

        timely = asyncio.create_task(finish_just_inside())
        idle = asyncio.create_task(kept_alive())
        answers = await asyncio.gather(*(read_to_end(r) for r, _ in slow))
        closed_after = time.monotonic() - start
        ws, _ = await timely
        assert DEADLINE_S * 0.9 <= closed_after < DEADLINE_S + 3
        assert all(a.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for a in answers), answers
        assert sample(gw, "wsgate_gateway_handshake_timeouts_total", stage="headers") == 20
        # The WebSocket opened in time is past its deadline now, and stays open.
        await ws.send_frame(OP_TEXT, b"still here")
        assert (await asyncio.wait_for(ws.read_frame(), 10)).payload == b"still here"
        # An idle kept-alive connection is closed the keep-alive timeout after its last
        # response, without a word.
        idle_for, rest = await idle
        assert KEEPALIVE_S * 0.9 <= idle_for < KEEPALIVE_S + 3
        assert rest == b""
        for _, writer in slow:
            await shut(writer)
        await close(ws)


# -- wss --------------------------------------------------------------------------------------


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS handshake gets."""
    _, writer = await asyncio.open_connection(HOST, port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await shut(writer)
    return x509.load_der_x509_certificate(der).serial_number


def install(files: CertFiles, into: CertFiles) -> None:
    """Put a certificate and key where the gateway reads them (the key first: a watch
    that sees one file change alone fails that reload and takes the next)."""
    shutil.copyfile(files.key, into.key)
    shutil.copyfile(files.cert, into.cert)


@pytest.fixture
def cert_files(pki: Pki, tmp_path: Path) -> CertFiles:
    """A certificate and key at paths of this test's own."""
    files = CertFiles(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    install(pki.server("first"), files)
    return files


async def test_wss_with_certificate_reloads_when_the_files_change(
    stack: Stack, pki: Pki, cert_files: CertFiles
) -> None:
    context = pki.client_context()
    settings = {"tls_cert": str(cert_files.cert), "tls_key": str(cert_files.key)}
    async with gateway(stack, tls_watch_interval_s=0.05, **settings) as gw:
        assert gw.url.startswith("https://")
        first = serial_of(cert_files.cert)
        assert await served_serial(gw.port, context) == first
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"wss://{HOST}:{gw.port}/peer", ssl=context)
            assert (await ws.receive(timeout=10)).data.startswith("127.0.0.1:")

            second = pki.server("second")
            install(second, cert_files)
            reloads = sample(gw, "wsgate_gateway_tls_reloads_total", result="ok")

            async def new_serial() -> bool:
                return await served_serial(gw.port, context) == serial_of(second.cert)

            await eventually(new_serial, "the new certificate", timeout_s=10)
            assert sample(gw, "wsgate_gateway_tls_reloads_total", result="ok") > reloads
            # The connection opened before the reload is untouched.
            await ws.send_str("after the reload")
            assert (await ws.receive(timeout=10)).data == "after the reload"

            # A reload that fails keeps the certificate in use, and is counted.
            cert_files.key.write_text("not a key\n")
            await eventually(
                lambda: sample(gw, "wsgate_gateway_tls_reloads_total", result="failed") == 1,
                "the failed reload",
                timeout_s=10,
            )
            assert await served_serial(gw.port, context) == serial_of(second.cert)
            assert not gw.reload_tls()  # SIGHUP's reload fails the same way
            assert sample(gw, "wsgate_gateway_tls_reloads_total", result="failed") == 2
            await ws.close()


async def test_slow_tls_handshakes_are_cut_at_the_deadline(
    stack: Stack, pki: Pki, cert_files: CertFiles
) -> None:
    settings = {"tls_cert": str(cert_files.cert), "tls_key": str(cert_files.key)}
    async with gateway(stack, **settings) as gw:
        start = time.monotonic()
        silent = await asyncio.open_connection(HOST, gw.port)  # never says hello
        half_hello = await asyncio.open_connection(HOST, gw.port)
        half_hello[1].write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        # TLS done, then half a request: HTTP can answer this one, with a 408.
        tls_reader, tls_writer = await asyncio.open_connection(
            HOST, gw.port, ssl=pki.client_context()
        )
        tls_writer.write(HALF_REQUEST_LINE)
        cut = await asyncio.gather(read_to_end(silent[0]), read_to_end(half_hello[0]))
        answered = await read_to_end(tls_reader)
        assert cut == [b"", b""]
        assert time.monotonic() - start < DEADLINE_S + 3
        assert answered.startswith(b"HTTP/1.1 408")
        assert sample(gw, "wsgate_gateway_handshake_timeouts_total", stage="tls") == 2
        assert sample(gw, "wsgate_gateway_handshake_timeouts_total", stage="headers") == 1
        # A handshake with a certificate it does not trust fails, and is counted.
        stranger = ssl.create_default_context(cafile=str(pki.untrusted_ca))
        with pytest.raises(ssl.SSLError):
            await asyncio.open_connection(HOST, gw.port, ssl=stranger)
        await eventually(
            lambda: sample(gw, "wsgate_gateway_tls_handshake_errors_total") == 1,
            "the failed handshake counted",
            timeout_s=10,
        )
        for writer in (silent[1], half_hello[1], tls_writer):
            await shut(writer)


async def test_a_certificate_that_does_not_load_stops_the_start(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    other = pki.server("other")
    config = GatewayConfig(
        host=HOST,
        port=0,
        nats_url=stack.nats_url,
        tls_cert=str(pki.server("mismatch").cert),
        tls_key=str(other.key),
    )
    with pytest.raises(ConfigError, match="WSGATE_TLS_CERT"):
        async with Gateway(config):
            pass


async def test_sighup_reloads_the_certificate_of_a_gateway_process(pki: Pki, stack: Stack) -> None:
    context = pki.client_context()
    child, files = stack.sighup_gateway, stack.sighup_files
    port = int(child.info["port"])
    assert str(child.info["url"]).startswith("https://")
    assert await served_serial(port, context) == serial_of(files.cert)
    second = pki.server("after-sighup")
    install(second, files)
    assert await served_serial(port, context) != serial_of(second.cert)  # not without it
    os.kill(child.pid, signal.SIGHUP)

    async def new_serial() -> bool:
        return await served_serial(port, context) == serial_of(second.cert)

    await eventually(new_serial, "the certificate after SIGHUP", timeout_s=10)


# -- connections per client address -----------------------------------------------------------


async def test_connections_per_address_at_the_limit_and_one_over(stack: Stack) -> None:
    async with gateway(stack, max_connections_per_ip=2) as gw:

        async def refused() -> bool:
            counted = sample(gw, "wsgate_gateway_ip_limit_refusals_total", stage="accept")
            return await closed_at_once(*await asyncio.open_connection(HOST, gw.port)) and (
                sample(gw, "wsgate_gateway_ip_limit_refusals_total", stage="accept") == counted + 1
            )

        async def admitted() -> tuple[RawWebSocket, str]:
            opened = await eventually(lambda: connect_peer(gw.port), "a free slot", timeout_s=10)
            assert opened is not None
            return opened

        # Connections still in their handshake hold slots (the kernel queues connections
        # in order: these two are accepted, and counted, before the next one).
        silent = [await asyncio.open_connection(HOST, gw.port) for _ in range(2)]
        assert await refused()
        await shut(silent[0][1])
        first = await admitted()  # closing one gave its slot back
        await shut(silent[1][1])
        second = await admitted()
        # Two WebSockets open: at the limit. One more is one over.
        assert first[1].startswith("127.0.0.1:")
        assert first[1] != second[1]
        assert await refused()
        await close(first[0])
        third = await admitted()
        await close(second[0])
        await close(third[0])


async def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(stack: Stack) -> None:
    async with gateway(stack, max_connections_per_ip=2, trusted_proxies="127.0.0.1/32") as gw:

        async def via_proxy(client: str) -> tuple[RawWebSocket, str] | None:
            # What the client wrote itself, then what the proxy appended.
            return await connect_peer(gw.port, f"X-Forwarded-For: 6.6.6.6, {client}")

        held = [await via_proxy("203.0.113.7"), await via_proxy("203.0.113.7")]
        assert [opened and opened[1] for opened in held] == ["203.0.113.7", "203.0.113.7"]
        reader, writer = await asyncio.open_connection(HOST, gw.port)
        writer.write(upgrade_request("/peer", "X-Forwarded-For: 203.0.113.7"))
        assert (await reader.readline()).startswith(b"HTTP/1.1 429")
        await shut(writer)
        assert sample(gw, "wsgate_gateway_ip_limit_refusals_total", stage="upgrade") == 1
        assert sample(gw, "wsgate_gateway_upgrades_refused_total", reason="ip_limit") == 1
        other = await via_proxy("203.0.113.8")  # another client behind the same proxy
        assert other is not None
        assert other[1] == "203.0.113.8"
        assert held[0] is not None
        assert held[1] is not None
        await close(held[0][0])
        again = await eventually(lambda: via_proxy("203.0.113.7"), "the slot", timeout_s=10)
        assert again is not None
        assert again[1] == "203.0.113.7"
        for ws in (held[1][0], other[0], again[0]):
            await close(ws)

    async with gateway(stack, trusted_proxies="10.0.0.0/8") as gw:  # 127.0.0.1 not trusted
        spoofed = await connect_peer(gw.port, "X-Forwarded-For: 203.0.113.7")
        assert spoofed is not None
        assert spoofed[1].startswith("127.0.0.1:")
        await close(spoofed[0])


# -- the PROXY protocol -----------------------------------------------------------------------


async def test_proxy_protocol_names_the_client_before_tls(
    stack: Stack, pki: Pki, cert_files: CertFiles
) -> None:
    settings = {
        "trusted_proxies": "127.0.0.1/32",
        "proxy_protocol": "on",
        "max_connections_per_ip": 1,
        "tls_cert": str(cert_files.cert),
        "tls_key": str(cert_files.key),
    }
    context = pki.client_context()
    async with gateway(stack, **settings) as gw:
        # A proxy that never finishes its header (checked at the end: cut at the deadline).
        start = time.monotonic()
        slow_reader, slow_writer = await asyncio.open_connection(HOST, gw.port)
        slow_writer.write(b"PROXY TCP4 198.51.")

        async def via_proxy(header: bytes) -> tuple[RawWebSocket, str]:
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(header)
            await writer.start_tls(context, server_hostname=HOST)
            return await open_peer_socket(reader, writer)

        v1 = await via_proxy(b"PROXY TCP4 198.51.100.9 10.0.0.1 4567 443\r\n")
        v2 = await via_proxy(v2_header("2001:db8::5", 4568))
        assert (v1[1], v2[1]) == ("198.51.100.9:4567", "[2001:db8::5]:4568")
        # The header's client is what the per-address limit counts (1 here).
        over = await asyncio.open_connection(HOST, gw.port)
        over[1].write(b"PROXY TCP4 198.51.100.9 10.0.0.1 9999 443\r\n")
        assert await asyncio.wait_for(read_to_end(over[0]), 10) == b""
        assert sample(gw, "wsgate_gateway_ip_limit_refusals_total", stage="accept") == 1

        # The header and the ClientHello in one segment: TLS still finds its first byte.
        seen, served = await tls_after_preface(
            gw.port, context, b"PROXY TCP4 192.0.2.44 10.0.0.1 1 443\r\n"
        )
        assert served.startswith(b"HTTP/1.1 200")
        assert seen == serial_of(cert_files.cert)

        # A balancer's TCP health check (connect, close) is no error; no header, a
        # malformed one, or one too long are: closed and counted.
        await shut((await asyncio.open_connection(HOST, gw.port))[1])
        bad = [
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PROXY TCP4 198.51.100.9 10.0.0.1 4567\r\n",
            b"PROXY TCP4 " + b"1" * 200,
        ]
        for data in bad:
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(data)
            assert await asyncio.wait_for(read_to_end(reader), 10) == b""
            await shut(writer)
        assert sample(gw, "wsgate_gateway_proxy_protocol_errors_total") == 3
        assert await asyncio.wait_for(read_to_end(slow_reader), DEADLINE_S + 5) == b""
        assert DEADLINE_S * 0.9 <= time.monotonic() - start < DEADLINE_S + 3
        assert sample(gw, "wsgate_gateway_handshake_timeouts_total", stage="proxy") == 1
        await shut(slow_writer)
        await shut(over[1])
        for ws, _ in (v1, v2):
            await close(ws)


async def test_proxy_protocol_is_not_accepted_from_an_untrusted_peer(stack: Stack) -> None:
    settings = {"trusted_proxies": "10.0.0.0/8", "proxy_protocol": "on"}
    async with gateway(stack, **settings) as gw:
        reader, writer = await asyncio.open_connection(HOST, gw.port)
        # Served as direct: the address is the peer's, and a header would be a bad request.
        ws, seen = await open_peer_socket(reader, writer)
        assert seen.startswith("127.0.0.1:")
        await close(ws)
        reader, writer = await asyncio.open_connection(HOST, gw.port)
        writer.write(b"PROXY TCP4 198.51.100.9 10.0.0.1 4567 443\r\n" + upgrade_request())
        assert b" 400 " in await reader.readline()
        await shut(writer)


async def tls_after_preface(
    port: int, context: ssl.SSLContext, preface: bytes
) -> tuple[int, bytes]:
    """Send ``preface`` and the TLS ClientHello in one write, finish the handshake, GET
    /healthz; return the served certificate's serial and the response."""
    reader, writer = await asyncio.open_connection(HOST, port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOST)

    async def pump(preface: bytes = b"") -> None:
        writer.write(preface + outgoing.read())
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            raise ConnectionError("closed during the TLS handshake")
        incoming.write(data)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            await pump(preface)  # the preface and the ClientHello in one write
            preface = b""
    tls.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    writer.write(outgoing.read())
    response = b""
    while True:
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            incoming.write(data)
            continue
        except ssl.SSLZeroReturnError:
            break
        if not chunk:
            break
        response += chunk
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    await shut(writer)
    return x509.load_der_x509_certificate(der).serial_number, response

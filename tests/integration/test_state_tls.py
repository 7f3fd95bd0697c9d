"""mTLS between the state service and its clients, with certificates made at test time
(the ``pki`` fixture): who is served, who is refused, and what a refused client says.

In-process StateServers on 127.0.0.1 (SQLite; two PostgreSQL replicas for the server
name a worker checks when it follows a redirect to a replica's advertised address), and
one end-to-end run: a real worker process writing through a real state process over mTLS.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.certs import CertFiles, Pki
from tests.harness import Stack, eventually, in_process_state_config, metric, stack_context
from wsgate.config import WorkerConfig
from wsgate.errors import StateUnavailable
from wsgate.grpc_tls import ClientTls, client_tls
from wsgate.pgserver import PostgresServer
from wsgate.placement import Replica, object_key, owner_of
from wsgate.stateservice.server import StateServer
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(90)

#: A refused client's calls give up after this (they wait for the channel until then).
REFUSED_TIMEOUT_S = 1.0
#: The one name the replicas' certificate carries: they are dialled by IP address.
SERVICE_NAME = "state.wsgate.test"
FAILURES_METRIC = "wsgate_worker_state_connect_failures_total"


@pytest.fixture(scope="module")
def server_cert(pki: Pki) -> CertFiles:
    return pki.server("grpc-state")


@pytest.fixture(scope="module")
def worker_cert(pki: Pki) -> CertFiles:
    return pki.client("grpc-worker")


def trusted_tls(pki: Pki, worker_cert: CertFiles, server_name: str = "") -> ClientTls | None:
    """A worker's TLS as its settings make it (WSGATE_STATE_TLS_*)."""
    config = WorkerConfig(
        state_tls_ca=str(pki.ca),
        state_tls_cert=str(worker_cert.cert),
        state_tls_key=str(worker_cert.key),
        state_tls_server_name=server_name,
    )
    return client_tls(config)


def mtls_settings(pki: Pki, cert: CertFiles) -> dict[str, str]:
    return {"tls_cert": str(cert.cert), "tls_key": str(cert.key), "tls_client_ca": str(pki.ca)}


@pytest.fixture
async def server(
    tmp_path: Path, nats_url: str, pki: Pki, server_cert: CertFiles
) -> AsyncIterator[StateServer]:
    config = in_process_state_config(tmp_path, nats_url, **mtls_settings(pki, server_cert))
    async with StateServer(config) as server:
        yield server


async def test_a_client_with_a_trusted_certificate_is_served(
    server: StateServer, pki: Pki, worker_cert: CertFiles
) -> None:
    async with StateClient(server.address, tls=trusted_tls(pki, worker_cert)) as client:
        room = client.storage("room", "lobby")
        await room.put("topic", {"text": "over mTLS"})
        assert await room.get("topic") == {"text": "over mTLS"}
        assert client.connect_failures == 0


async def test_clients_without_a_trusted_certificate_are_refused(
    server: StateServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    intruder = pki.untrusted_client("grpc-intruder")
    # Each refused client, and what it must say about why.
    refused: dict[str, tuple[ClientTls | None, str]] = {
        "no certificate": (ClientTls.load(pki.ca), "has none (WSGATE_STATE_TLS_CERT"),
        "untrusted certificate": (
            ClientTls.load(pki.ca, intruder.cert, intruder.key),
            "has one it refused (WSGATE_STATE_TLS_CERT)",
        ),
        "plaintext": (None, "it may require TLS (set WSGATE_STATE_TLS_CA"),
    }

    async def try_to_write(tls: ClientTls | None) -> tuple[StateUnavailable | None, int]:
        failures: list[None] = []
        async with StateClient(
            server.address,
            timeout_s=REFUSED_TIMEOUT_S,
            tls=tls,
            on_connect_failure=lambda: failures.append(None),
        ) as client:
            try:
                await client.storage("room", "lobby").put("k", 1)
            except StateUnavailable as exc:
                assert client.connect_failures == len(failures)
                return exc, len(failures)
        return None, len(failures)

    # At once: each waits out its deadline.
    outcomes = await asyncio.gather(*(try_to_write(tls) for tls, _ in refused.values()))
    logged = [r.getMessage() for r in caplog.records if r.name == "wsgate.worker.state_endpoint"]
    for (who, (_, hint)), (error, failures) in zip(refused.items(), outcomes, strict=True):
        assert error is not None, f"{who}: served"
        assert "unreachable" in str(error), (who, str(error))
        assert hint in str(error), (who, str(error))
        # The handshake was refused: the connection failed, was counted and logged once.
        assert failures == 1, who
        assert any("cannot connect to the state service" in m and hint in m for m in logged), (
            who,
            logged,
        )
    # Nothing was written by the refused clients.
    async with StateClient(server.address, tls=ClientTls.load(pki.ca, *_pair(pki))) as client:
        assert await client.storage("room", "lobby").get("k") is None


def _pair(pki: Pki) -> tuple[Path, Path]:
    files = pki.client("grpc-reader")
    return files.cert, files.key


async def test_a_client_that_does_not_trust_the_servers_ca_refuses_the_server(
    tmp_path: Path, nats_url: str, pki: Pki, worker_cert: CertFiles
) -> None:
    # An impostor: a state service whose certificate the workers' CA did not sign.
    impostor = in_process_state_config(
        tmp_path, nats_url, **mtls_settings(pki, pki.untrusted_server("grpc-impostor"))
    )
    async with (
        StateServer(impostor) as server,
        StateClient(
            server.address, timeout_s=REFUSED_TIMEOUT_S, tls=trusted_tls(pki, worker_cert)
        ) as client,
    ):
        with pytest.raises(StateUnavailable, match="not signed by WSGATE_STATE_TLS_CA"):
            await client.storage("room", "lobby").put("secret", 1)
        assert client.connect_failures == 1


async def test_the_server_name_is_checked_whatever_address_a_redirect_dials(
    tmp_path: Path,
    nats_url: str,
    pki: Pki,
    worker_cert: CertFiles,
    postgres_server: PostgresServer,
) -> None:
    # Two replicas over PostgreSQL whose certificate names the service, not their
    # addresses: a worker dials the address the owner advertises (a pod IP), after a
    # NotOwner from the other replica, and checks the service's name there.
    named = pki.server("grpc-state-named", SERVICE_NAME)
    dsn = postgres_server.new_database_schema(f"grpc_tls_{tmp_path.name[-20:]}")
    configs = [
        in_process_state_config(
            tmp_path / name,
            nats_url,
            dsn=dsn,
            migrate="yes",
            replica_id=name,
            **mtls_settings(pki, named),
        )
        for name in ("tls-a", "tls-b")
    ]
    for config in configs:
        config.db_path.parent.mkdir()
    async with StateServer(configs[0]) as first, StateServer(configs[1]) as second:
        replicas = [Replica(s.replica_id, s.address) for s in (first, second)]
        for s in (first, second):
            await eventually(_sees(s, 2), f"{s.replica_id} to see both replicas", timeout_s=20)
        # An object the second replica owns, asked of the first.
        name = next(
            f"room{i}"
            for i in range(100)
            if owner_of(object_key("room", f"room{i}"), replicas) == replicas[1]
        )
        tls = trusted_tls(pki, worker_cert, server_name=SERVICE_NAME)
        async with StateClient(first.address, tls=tls) as client:
            await client.storage("room", name).put("k", "moved")
            assert await client.storage("room", name).get("k") == "moved"
            assert client.redirects >= 1
            assert client.connect_failures == 0
        # Without the name, 127.0.0.1 is checked, and the certificate does not carry it.
        async with StateClient(
            first.address, timeout_s=REFUSED_TIMEOUT_S, tls=trusted_tls(pki, worker_cert)
        ) as client:
            with pytest.raises(StateUnavailable, match="WSGATE_STATE_TLS_SERVER_NAME"):
                await client.storage("room", name).get("k")


def _sees(server: StateServer, count: int) -> Callable[[], Awaitable[bool]]:
    url = f"http://127.0.0.1:{server.probe_port}/metrics"

    async def sees() -> bool:
        return await metric(url, "wsgate_state_replicas") == count

    return sees


# -- end to end: processes -----------------------------------------------------------------


@pytest.fixture
def mtls_stack(tmp_path: Path, pki: Pki, server_cert: CertFiles) -> Iterator[Stack]:
    state_args = (
        "--tls-cert", str(server_cert.cert),
        "--tls-key", str(server_cert.key),
        "--tls-client-ca", str(pki.ca),
    )  # fmt: skip
    yield from stack_context(
        tmp_path, workers=0, state_args=state_args, gateway_args=("--connect-timeout-s", "2")
    )


def worker_args(pki: Pki, cert: CertFiles) -> tuple[str, ...]:
    return (
        "--state-tls-ca", str(pki.ca),
        "--state-tls-cert", str(cert.cert),
        "--state-tls-key", str(cert.key),
        "--state-timeout-s", "1",
        "--drain-timeout-s", "2",
    )  # fmt: skip


async def test_a_worker_process_writes_through_a_state_process_over_mtls(
    mtls_stack: Stack, pki: Pki, worker_cert: CertFiles
) -> None:
    stack = mtls_stack
    # A worker whose certificate the state service does not trust: it takes the request,
    # is refused at the handshake, and says so in its log and its metrics.
    intruder = stack.start_worker(
        "wsgate.examples.app:app", *worker_args(pki, pki.untrusted_client())
    )
    metrics_url = stack.worker_metrics_url(0)
    async with aiohttp.ClientSession() as session:
        attempt = asyncio.ensure_future(session.ws_connect(stack.ws_url("/counter/tls")))
        try:
            await eventually(_refused(metrics_url), "the worker's refused connection", timeout_s=20)
        finally:
            attempt.cancel()
            # The upgrade was refused (the object could not be reached) or cancelled here.
            await asyncio.gather(attempt, return_exceptions=True)
    stack.kill(intruder)  # its clean shutdown is not the point (and would wait on drains)
    log = (stack.log_dir / "worker0.log").read_text()
    assert "cannot connect to the state service" in log
    assert "has one it refused (WSGATE_STATE_TLS_CERT)" in log

    # The trusted worker: the counter's increments are written and read back.
    stack.start_worker("wsgate.examples.app:app", *worker_args(pki, worker_cert))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(stack.ws_url("/counter/tls")) as ws,
    ):
        assert json.loads((await ws.receive(timeout=20)).data)["value"] == 1
        await ws.send_str("increment")
        assert json.loads((await ws.receive(timeout=20)).data)["value"] == 2
    tls = ClientTls.load(pki.ca, *_pair(pki))
    async with StateClient(str(stack.state_info("address")), tls=tls) as client:
        assert await client.storage("counter", "tls").get("value") == 2
    assert "(mTLS)" in (stack.log_dir / "state.log").read_text()
    assert (
        await metric(stack.worker_metrics_url(0), "wsgate_worker_state_connect_failures_total") == 0
    )


def _refused(url: str) -> Callable[[], Awaitable[bool]]:
    async def refused() -> bool:
        return await metric(url, FAILURES_METRIC) >= 1

    return refused

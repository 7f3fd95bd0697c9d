"""Logging in to NATS without a password, on real nats-servers: by an nkey seed
(``WSGATE_NATS_NKEY_SEED``; the server's users, rendered by wsgate.nats_permissions, name
the nkeys' public keys) and by a ``.creds`` file (``WSGATE_NATS_CREDS``; the server in
operator mode trusts an operator, whose account signed the users' JWTs, each JWT carrying
its role's permissions). Keys and JWTs are made at test time (tests/nats_jwt.py).

Either way a role's identity uses its own subjects, is refused everything else (and counts
the refusal), and credentials the server does not know stop the role at start with
BusRefused naming the setting.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from tests.harness import eventually
from tests.nats_jwt import NKey, account_jwt, creds, new_nkey, operator_mode_config, user_jwt
from wsgate import subjects
from wsgate.bus import connect_bus
from wsgate.config import BusConfig, GatewayConfig, from_environ
from wsgate.errors import BusRefused, BusUnavailable
from wsgate.gateway.server import Gateway
from wsgate.nats_permissions import Identity, permissions, render_authorization
from wsgate.procs import start_nats_server
from wsgate.v1 import envelope_pb2 as pb

P = "wsgate"
#: The identities (node names) of the tests and their roles.
ROLES = {"gw-a": "gateway", "worker": "worker", "state": "state"}
GW_A, GW_B = "gw-a-aaaa1111", "gw-b-bbbb2222"


@dataclass
class Server:
    """A nats-server and the credential file of each identity (node name)."""

    url: str
    files: dict[str, str]
    work: Path

    def config(self, node: str, setting: str, path: str = "") -> BusConfig:
        return BusConfig(nats_url=self.url, node_name=node, **{setting: path or self.files[node]})


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Users by nkey, with their roles' permissions: what `wsgate nats-auth --nkey` makes."""
    work = tmp_path_factory.mktemp("nats-nkeys")
    keys = {node: new_nkey("user") for node in ROLES}
    files = {}
    for node, key in keys.items():
        files[node] = str(work / f"{node}.nk")
        Path(files[node]).write_text(key.seed + "\n")
    identities = [Identity(role, node, keys[node].public) for node, role in ROLES.items()]
    (work / "authorization.conf").write_text(render_authorization(P, identities, command="test"))
    server = start_nats_server(work, extra_config="include ./authorization.conf\n")
    try:
        yield Server(str(server.info["url"]), files, work)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def operator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Operator mode: one account, a user JWT of it per identity, in a .creds file."""
    work = tmp_path_factory.mktemp("nats-operator")
    operator, account = new_nkey("operator"), new_nkey("account")
    files = {}
    for node, role in ROLES.items():
        user = new_nkey("user")
        files[node] = str(work / f"{node}.creds")
        token = user_jwt(account, user, node, permissions(role, P, node))
        Path(files[node]).write_text(creds(token, user))
    config = operator_mode_config(operator, {account: account_jwt(operator, account)})
    server = start_nats_server(work, extra_config=config)
    try:
        yield Server(str(server.info["url"]), files, work)
    finally:
        server.stop()


class Refusals:
    """Counts what the server refused a connect_bus connection (the role's counter)."""

    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    async def reach(self, count: int) -> None:
        async def enough() -> bool:
            return self.count >= count

        await eventually(enough, f"{count} refusals", timeout_s=10)


async def test_roles_log_in_by_nkey_and_are_held_to_their_permissions(
    nkey_server: Server,
) -> None:
    """A gateway's connect request reaches a worker, whose answer comes back to the
    gateway's inbox; a command to another gateway and a subscription to its subjects are
    refused and counted."""
    gw_refusals, worker_refusals = Refusals(), Refusals()
    worker = await connect_bus(
        nkey_server.config("worker", "nats_nkey_seed"),
        "worker",
        role="worker",
        on_permission_violation=worker_refusals.inc,
    )
    gateway = await connect_bus(
        nkey_server.config("gw-a", "nats_nkey_seed"),
        "gateway",
        role="gateway",
        on_permission_violation=gw_refusals.inc,
    )
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(b"answer " + msg.data)

        await worker.subscribe(
            subjects.connect_subject(P, "main", subjects.ANY),
            queue=subjects.worker_queue("main"),
            cb=answer,
        )
        await worker.flush()
        reply = await gateway.request(subjects.connect_subject(P, "main", GW_A), b"c", timeout=5)
        assert reply.data == b"answer c"
        await gateway.publish(subjects.gateway_subject(P, GW_B), b"a command for B")
        await gateway.subscribe(subjects.gateway_subject(P, GW_B))
        await gw_refusals.reach(2)
        await worker.flush()
        assert worker_refusals.count == 0
    finally:
        await gateway.close()
        await worker.close()


async def test_an_nkey_the_server_does_not_know_is_refused_at_start(
    nkey_server: Server,
) -> None:
    """A well-formed seed of another user: the server refuses it, and connect_bus says so
    at once (BusRefused, not a wait for the bus), naming the setting."""
    stranger = nkey_server.work / "stranger.nk"
    stranger.write_text(new_nkey("user").seed)
    config = nkey_server.config("gw-a", "nats_nkey_seed", str(stranger))
    with pytest.raises(BusRefused, match=r"WSGATE_NATS_NKEY_SEED.*[Aa]uthorization [Vv]iolation"):
        await connect_bus(config, "gateway", role="gateway", wait_s=30)


async def test_a_gateway_runs_with_a_creds_file_from_the_environment(
    operator_server: Server,
) -> None:
    """The gateway role, configured by WSGATE_NATS_CREDS, announces its presence to the
    state identity (itself logged in by its .creds file) without a refusal."""
    heard: asyncio.Queue[pb.GatewayPresence] = asyncio.Queue()

    async def hear(msg: Msg) -> None:
        heard.put_nowait(pb.GatewayPresence.FromString(msg.data))

    state = await connect_bus(operator_server.config("state", "nats_creds"), "state", role="state")
    try:
        await state.subscribe(subjects.presence_subject(P, subjects.ANY), cb=hear)
        await state.flush()
        environ = {
            "WSGATE_NATS_URL": operator_server.url,
            "WSGATE_NODE_NAME": "gw-a",
            "WSGATE_NATS_CREDS": operator_server.files["gw-a"],
            "WSGATE_GATEWAY_PORT": "0",
        }
        async with Gateway(from_environ(GatewayConfig, environ)) as gateway:
            presence = await asyncio.wait_for(heard.get(), 10)
            assert presence.gateway_id == gateway.gateway_id
            violations = gateway.metrics.registry.get_sample_value(
                "wsgate_gateway_nats_permission_violations_total"
            )
            assert violations == 0
    finally:
        await state.close()


async def test_a_creds_file_is_held_to_the_permissions_in_its_jwt(
    operator_server: Server,
) -> None:
    refusals = Refusals()
    gateway = await connect_bus(
        operator_server.config("gw-a", "nats_creds"),
        "gateway",
        role="gateway",
        on_permission_violation=refusals.inc,
    )
    try:
        for subject in (
            subjects.gateway_subject(P, GW_B),
            subjects.presence_subject(P, GW_B),
            subjects.alarm_subject(P, "chat"),
        ):
            await gateway.publish(subject, b"forged")
        await gateway.subscribe(subjects.connect_subject(P, "main", subjects.ANY))
        await refusals.reach(4)
    finally:
        await gateway.close()


async def test_a_user_of_an_account_the_server_does_not_trust_is_refused_at_start(
    operator_server: Server,
) -> None:
    """A .creds file whose JWT an unknown account signed (an operator of one's own, say)."""
    foreign: NKey = new_nkey("account")
    user = new_nkey("user")
    path = operator_server.work / "foreign.creds"
    path.write_text(creds(user_jwt(foreign, user, "gw-a", permissions("gateway", P, "gw-a")), user))
    config = operator_server.config("gw-a", "nats_creds", str(path))
    with pytest.raises(BusRefused, match=r"WSGATE_NATS_CREDS.*[Aa]uthorization [Vv]iolation"):
        await connect_bus(config, "gateway", role="gateway", wait_s=30)


async def test_a_server_that_is_not_there_is_waited_for_then_unavailable() -> None:
    """Only a refusal ends the wait at once: no server at all is BusUnavailable after
    ``wait_s``, not BusRefused."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # a port nobody listens on
        url = f"nats://127.0.0.1:{placeholder.getsockname()[1]}"
        with pytest.raises(BusUnavailable, match="cannot reach NATS") as caught:
            await connect_bus(BusConfig(nats_url=url), "gateway", role="gateway", wait_s=0.5)
    assert not isinstance(caught.value, BusRefused)

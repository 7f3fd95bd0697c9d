"""Identities on the bus, on a real nats-server with TLS (client certificates required,
TLS before anything else) and the users and permissions that wsgate.nats_permissions
renders, as deploy/k8s ships them (here for two gateway identities, a worker and a state
service; the shipped file is the same renderer's output for one of each).

A gateway's credentials cannot send a command, an ack, an alarm or a presence for another
gateway, cannot take requests from the workers' queues, and cannot read another gateway's
subjects; a worker cannot pose as a gateway or as the state service. nats-py reports each
refusal through its error callback (a publish dropped, or a subscription refused). The
roles themselves, with their own credentials over TLS, serve a durable object end to end
without one refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.apps.sdk import app as sdk_app
from tests.certs import Pki
from tests.harness import eventually, in_process_state_config, metric
from wsgate import subjects
from wsgate.bus import connect_bus, connect_options, is_permission_violation
from wsgate.client import connect
from wsgate.config import BusConfig, GatewayConfig, WorkerConfig
from wsgate.gateway.server import Gateway
from wsgate.nats_permissions import Identity, render_authorization
from wsgate.procs import Child, start_nats_server
from wsgate.stateservice.server import StateServer
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.env import Env
from wsgate.worker.runtime import Worker

P = "wsgate"
GW_A, GW_B = "gw-a-aaaa1111", "gw-b-bbbb2222"
WORKER_ID = "worker-cccc3333"
#: Each identity: its role, node name (the NATS user's) and password.
IDENTITIES = {
    "gw-a": ("gateway", "gw-a-password"),
    "gw-b": ("gateway", "gw-b-password"),
    "worker": ("worker", "worker-password"),
    "state": ("state", "state-password"),
}


@dataclass
class Secured:
    url: str
    pki: Pki
    certs: dict[str, Any] = field(default_factory=dict)

    def config(self, node: str, **settings: Any) -> dict[str, Any]:
        """The NATS settings of identity ``node``: its user, password, client certificate."""
        _, password = IDENTITIES[node]
        cert = self.certs[node]
        return {
            "nats_url": self.url,
            "node_name": node,
            "nats_user": node,
            "nats_password": password,
            "nats_tls_ca": str(self.pki.ca),
            "nats_tls_cert": str(cert.cert),
            "nats_tls_key": str(cert.key),
            **settings,
        }


@pytest.fixture(scope="module")
def secured(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    work = tmp_path_factory.mktemp("secured-nats")
    server = pki.server("nats-server")
    identities = [Identity(role, node) for node, (role, _) in IDENTITIES.items()]
    (work / "authorization.conf").write_text(render_authorization(P, identities, command="test"))
    env = dict(os.environ)
    for identity in identities:
        env[identity.user_variable] = identity.node
        env[identity.password_variable] = IDENTITIES[identity.node][1]
    tls = (
        "tls {\n"
        f'  cert_file: "{server.cert}"\n  key_file: "{server.key}"\n  ca_file: "{pki.ca}"\n'
        "  verify: true\n  handshake_first: true\n  timeout: 5\n}\n"
        "include ./authorization.conf\n"
    )
    nats_server: Child = start_nats_server(work, extra_config=tls, env=env)
    try:
        certs = {node: pki.client(f"nats-{node}") for node in IDENTITIES}
        yield Secured(str(nats_server.info["url"]), pki, certs)
    finally:
        nats_server.stop()


class Bus:
    """One identity's connection, with the refusals the server reported to it."""

    def __init__(self, secured: Secured, node: str) -> None:
        role, _ = IDENTITIES[node]
        self.options = connect_options(BusConfig(**secured.config(node)), role)
        self.errors: list[str] = []
        self.nc = NatsClient()

    async def __aenter__(self) -> Bus:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        await self.nc.connect(
            **self.options, error_cb=on_error, allow_reconnect=False, connect_timeout=5
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    @property
    def refusals(self) -> list[str]:
        return [e for e in self.errors if is_permission_violation(Exception(e))]

    async def refused(self, count: int) -> list[str]:
        """Wait until the server has refused ``count`` things; they are returned."""

        async def enough() -> bool:
            return len(self.refusals) >= count

        await eventually(enough, f"{count} refusals", timeout_s=10)
        return self.refusals


class Inbox:
    """A subscription that collects what it hears."""

    def __init__(self) -> None:
        self.heard: list[Msg] = []

    async def hear(self, msg: Msg) -> None:
        self.heard.append(msg)


@contextlib.asynccontextmanager
async def buses(secured: Secured, *nodes: str) -> AsyncIterator[list[Bus]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Bus(secured, node)) for node in nodes]


async def test_each_identity_uses_its_own_subjects(secured: Secured) -> None:
    """The positive control: a gateway's requests, events, presence and the worker's
    and state's answers all flow, with no refusal."""
    async with buses(secured, "gw-a", "worker", "state") as (gw, worker, state):
        commands, acks, presence = Inbox(), Inbox(), Inbox()
        await gw.nc.subscribe(subjects.gateway_subject(P, GW_A), cb=commands.hear)
        await gw.nc.subscribe(
            subjects.ack_subject(P, GW_A, subjects.ANY, subjects.ANY), cb=acks.hear
        )
        await state.nc.subscribe(subjects.presence_subject(P, subjects.ANY), cb=presence.hear)

        async def answer(msg: Msg) -> None:
            await msg.respond(b"answer")

        queue = subjects.worker_queue("main")
        await worker.nc.subscribe(
            subjects.connect_subject(P, "main", subjects.ANY), queue=queue, cb=answer
        )
        await worker.nc.subscribe(
            subjects.events_subject(P, "main", subjects.ANY), queue=queue, cb=answer
        )
        for bus in (gw, worker, state):
            await bus.nc.flush()
        reply = await gw.nc.request(subjects.connect_subject(P, "main", GW_A), b"c", timeout=5)
        assert reply.data == b"answer"
        await gw.nc.publish(
            subjects.events_subject(P, "main", GW_A),
            b"e",
            reply=subjects.ack_subject(P, GW_A, f"{GW_A}_1", 1),
        )
        await gw.nc.publish(subjects.presence_subject(P, GW_A), b"p")
        await worker.nc.publish(subjects.gateway_subject(P, GW_A), b"from the worker")
        await state.nc.publish(subjects.gateway_subject(P, GW_A), b"from the state")

        async def all_heard() -> bool:
            return len(commands.heard) == 2 and len(acks.heard) == 1 and len(presence.heard) == 1

        await eventually(all_heard, "the messages", timeout_s=10)
        for bus in (gw, worker, state):
            await bus.nc.flush()
            assert bus.errors == []


async def test_a_gateway_cannot_speak_for_another_gateway(secured: Secured) -> None:
    """Commands, acks, alarms, presence, connect requests and events in another
    gateway's name are dropped by the server; whoever listens there hears nothing."""
    async with buses(secured, "gw-a", "gw-b", "worker", "state") as (gw, victim, worker, state):
        victims_ears = Inbox()
        for subject in (
            subjects.gateway_subject(P, GW_B),
            subjects.ack_subject(P, GW_B, subjects.ANY, subjects.ANY),
        ):
            await victim.nc.subscribe(subject, cb=victims_ears.hear)
        workers_ears = Inbox()
        for subject in (
            subjects.alarm_subject(P, subjects.ANY),
            subjects.worker_subject(P, subjects.any_id_of("worker"), "alarm"),
            subjects.connect_subject(P, subjects.ANY, subjects.ANY),
            subjects.events_subject(P, subjects.ANY, subjects.ANY),
        ):
            await worker.nc.subscribe(subject, cb=workers_ears.hear)
        states_ears = Inbox()
        await state.nc.subscribe(subjects.presence_subject(P, subjects.ANY), cb=states_ears.hear)
        for bus in (victim, worker, state):
            await bus.nc.flush()

        leaving = pb.GatewayPresence(gateway_id=GW_B, leaving=True).SerializeToString()
        forged = [
            subjects.gateway_subject(P, GW_B),  # commands and final acks for B
            subjects.ack_subject(P, GW_B, f"{GW_B}_1", 1),  # a fake progress ack
            subjects.alarm_subject(P, "chat"),  # fire an alarm
            subjects.worker_subject(P, WORKER_ID, "alarm"),
            subjects.presence_subject(P, GW_B),  # B is leaving: evict its members
            subjects.connect_subject(P, "main", GW_B),  # requests in B's name
            subjects.events_subject(P, "main", GW_B),
        ]
        for subject in forged:
            await gw.nc.publish(subject, leaving)
        refusals = await gw.refused(len(forged))
        assert {r.split('"')[1] for r in refusals} == set(forged)
        for bus in (victim, worker, state):
            await bus.nc.flush()  # anything delivered would be in before the PONG
        assert victims_ears.heard == []
        assert workers_ears.heard == []
        assert states_ears.heard == []


async def test_a_gateway_cannot_take_the_workers_requests_or_read_another_gateway(
    secured: Secured,
) -> None:
    async with buses(secured, "gw-a", "gw-b") as (gw, other):
        spy = Inbox()
        wanted = [
            (subjects.connect_subject(P, "main", subjects.ANY), subjects.worker_queue("main")),
            (subjects.events_subject(P, "main", subjects.ANY), subjects.worker_queue("main")),
            (subjects.alarm_subject(P, "chat"), subjects.alarm_queue("chat")),
            (subjects.gateway_subject(P, GW_B), ""),
            (subjects.ack_subject(P, GW_B, subjects.ANY, subjects.ANY), ""),
            (subjects.under(subjects.inbox_prefix(P, "gateway", "gw-b")), ""),
            (subjects.presence_subject(P, subjects.ANY), ""),
        ]
        for subject, queue in wanted:
            await gw.nc.subscribe(subject, queue=queue, cb=spy.hear)
        refusals = await gw.refused(len(wanted))
        assert all("subscription" in r for r in refusals), refusals
        # What those subscriptions would have heard goes past them.
        await other.nc.publish(subjects.events_subject(P, "main", GW_B), b"event")
        await other.nc.publish(subjects.presence_subject(P, GW_B), b"presence")
        await other.nc.flush()
        await gw.nc.flush()
        assert spy.heard == []
        assert other.errors == []


async def test_a_worker_cannot_pose_as_a_gateway_or_as_the_state_service(
    secured: Secured,
) -> None:
    async with buses(secured, "worker") as (worker,):
        posing = [
            subjects.presence_subject(P, GW_A),
            subjects.connect_subject(P, "main", GW_A),
            subjects.events_subject(P, "main", GW_A),
            subjects.alarm_subject(P, "chat"),
            subjects.replicas_subject(P),
        ]
        for subject in posing:
            await worker.nc.publish(subject, b"x")
        await worker.nc.subscribe(subjects.gateway_subject(P, GW_A))
        await worker.refused(len(posing) + 1)


async def test_no_way_in_without_tls_the_ca_s_certificate_and_the_password(
    secured: Secured,
) -> None:
    base = secured.config("gw-a")
    stranger = secured.pki.untrusted_client()
    attempts = {
        "plaintext": connect_options(
            BusConfig(nats_url=secured.url, nats_user="gw-a", nats_password="gw-a-password"),
            "gateway",
        ),
        "no client certificate": connect_options(
            BusConfig(**{**base, "nats_tls_cert": "", "nats_tls_key": ""}), "gateway"
        ),
        "an untrusted certificate": connect_options(
            BusConfig(
                **{**base, "nats_tls_cert": str(stranger.cert), "nats_tls_key": str(stranger.key)}
            ),
            "gateway",
        ),
        "a wrong password": connect_options(
            BusConfig(**{**base, "nats_password": "wrong"}), "gateway"
        ),
    }

    async def quiet(exc: Exception) -> None:
        pass

    for what, options in attempts.items():
        nc = NatsClient()
        try:
            with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
                await nc.connect(
                    **options, error_cb=quiet, allow_reconnect=False, connect_timeout=1
                )
        finally:
            await nc.close()
        assert not nc.is_connected, what


async def test_the_roles_serve_over_tls_with_their_own_credentials(
    secured: Secured, tmp_path: Path
) -> None:
    """State service, worker and gateway, each with its identity's credentials and client
    certificate: a durable object's connect, events (through the queue, then straight to
    its host), an alarm answered by the worker and its broadcast by the state service, the
    gateway's presence. Nobody is refused anything, and nobody is taken for an impostor;
    requests that speak for another gateway are dropped and counted."""
    settings = secured.config("state")
    state_config = in_process_state_config(tmp_path, settings.pop("nats_url"), **settings)
    async with StateServer(state_config) as state:
        worker_config = WorkerConfig(
            **secured.config("worker"),
            app="tests.apps.sdk:app",
            state_address=state.address,
            port=0,
        )
        gateway_config = GatewayConfig(**secured.config("gw-a"), port=0, presence_interval_s=0.2)
        async with Worker(worker_config, sdk_app) as worker, Gateway(gateway_config) as gateway:
            url = gateway.url.replace("http://", "ws://") + "/room/secured"
            async with connect(url) as ws:
                await ws.send("state")
                joined = json.loads(await ws.receive())["joined"]
                assert joined.startswith(f"{gateway.gateway_id}_")
                await ws.send("state")  # now straight to the object's host
                assert json.loads(await ws.receive()) == {"joined": joined}
                await ws.send("alarm 50")
                assert await ws.receive() == "alarm set"
                assert await ws.receive() == "alarm secured"  # state -> gateway
                # A call of the object's method, over the worker's own credentials (its
                # call subjects and its inbox), and a plain HTTP request through the
                # gateway (the request subjects, the answer to the gateway's inbox).
                room = worker_env(worker).objects("Room").get("secured")
                assert await room.call("members") == [joined]
            async with (
                aiohttp.ClientSession() as http,
                http.get(gateway.url + "/room/secured") as resp,
            ):
                assert (resp.status, await resp.text()) == (400, "Expected websocket")

            # Within its own subjects, a gateway's identity still cannot act for another
            # gateway's connection, nor steer a worker's answer to someone else's subject:
            # the worker drops such requests and counts them.
            gw_id, other = gateway.gateway_id, "gw-a-zzzz0000"
            event = pb.ConnectionEvent(connection_id=f"{other}_1", sequence=1, path="/room/secured")
            event.message.text = "state"
            own_event = pb.ConnectionEvent(connection_id=joined, sequence=9, path="/room/secured")
            own_event.message.text = "state"
            connect_request = pb.ConnectRequest(connection_id=f"{gw_id}_zz", path="/room/secured")
            async with Bus(secured, "gw-a") as intruder:
                for subject, payload, reply in (
                    (
                        subjects.events_subject(P, "main", gw_id),
                        event,
                        subjects.ack_subject(P, other, f"{other}_1", 1),
                    ),
                    (
                        subjects.events_subject(P, "main", gw_id),
                        own_event,
                        subjects.gateway_subject(P, GW_B),
                    ),
                    (
                        subjects.connect_subject(P, "main", gw_id),
                        connect_request,
                        f"{subjects.inbox_prefix(P, 'gateway', 'gw-b')}.steered.1",
                    ),
                ):
                    await intruder.nc.publish(subject, payload.SerializeToString(), reply=reply)
                await intruder.nc.flush()
                assert intruder.errors == []
            impostors = "wsgate_worker_impostor_requests_total"

            async def dropped() -> bool:
                return worker.metrics.registry.get_sample_value(impostors) == 3

            await eventually(dropped, "the impostors dropped", timeout_s=10)

            state_metrics = f"http://127.0.0.1:{state.probe_port}/metrics"

            async def heard() -> bool:
                return await metric(state_metrics, "wsgate_state_presence_announcements_total") >= 2

            await eventually(heard, "the gateway's presence", timeout_s=10)
            counted = {
                "gateway violations": gateway.metrics.registry.get_sample_value(
                    "wsgate_gateway_nats_permission_violations_total"
                ),
                "worker violations": worker.metrics.registry.get_sample_value(
                    "wsgate_worker_nats_permission_violations_total"
                ),
                "state violations": await metric(
                    state_metrics, "wsgate_state_nats_permission_violations_total"
                ),
                "state impostors": await metric(
                    state_metrics, "wsgate_state_presence_impostors_total"
                ),
            }
            assert counted == dict.fromkeys(counted, 0.0)


def worker_env(worker: Worker) -> Env:
    """The environment the worker's handlers get (to make a call as a handler does)."""
    return worker._env


async def test_a_refusal_is_counted_by_the_role(secured: Secured) -> None:
    """connect_bus, which opens every role's connection, reports each refusal to the role
    (which counts it in /metrics: see the end to end test above)."""
    counted = asyncio.Event()
    nc = await connect_bus(
        BusConfig(**secured.config("gw-a")),
        "test",
        role="gateway",
        on_permission_violation=counted.set,
    )
    try:
        await nc.publish(subjects.gateway_subject(P, GW_B), b"x")
        await asyncio.wait_for(counted.wait(), 10)
    finally:
        await nc.close()

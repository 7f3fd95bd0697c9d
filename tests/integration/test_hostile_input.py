"""Hostile input: random bytes and random protobufs on every NATS subject each role listens
on, and at every method of the state service's gRPC API, while a real client exchanges
acknowledged messages with a durable object and an echo route.

One stack of real processes for the module (nats-server, the state service, a worker on
``tests/apps/hostile.py``, a gateway). The subjects come from ``wsgate/subjects.py`` and the
running roles' ids (:func:`listened_subjects`); the gRPC methods from the descriptors in
``wsgate/v1/`` (:data:`METHODS`). Hypothesis draws the payloads
(``tests/protobuf_strategies.py``): random bytes; a message of one of the envelope types
with random fields, its strings drawn from junk and from ids that look valid (the running
gateway's and worker's, connection ids of the running gateway that it never handed out,
ids with a trailing newline, ids far too long); such a message cut short or with junk
appended. Hostile messages never name the client's own connections or object: that would
be a peer allowed to publish impersonating a role, which is NATS permissions' business,
not the envelopes'.

Then: every process is alive and ready, each role's ``garbage`` counter grew on every kind
of subject by at least the payloads protobuf itself cannot parse as that subject's envelope
(and the gateway counted a refusal for every message sent to it), every gRPC call ended with
a clean status, and the client's answers came back all of them, in order, with the stored
count exact. The stack's teardown checks that each process exits cleanly.

Hypothesis settings, for CI (the module's tests take about 10 s on the 2-core machine, 4 s
of it the stack's start, up to 20 s when the machine is loaded): ``derandomize=True`` (the
same examples every run; the ids in them are the running roles'), ``deadline=None`` (every
example is I/O on real processes), ``max_examples`` 60 for the bus (each example goes to
every subject, 10 of them, and answers a connect request and an alarm event) and 15 per
gRPC method (one call each, 300 in all).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.harness import Stack, eventually, metric, stack_context
from tests.loop_thread import LoopThread
from tests.protobuf_strategies import messages, payloads
from wsgate import subjects
from wsgate.batches import single_command
from wsgate.config import DEFAULT_APP_NAME, DEFAULT_PREFIX
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.v1 import state_pb2 as pb
from wsgate.values import decode_value

T = TypeVar("T")

#: A namespace no worker runs: the test answers its alarm events itself, with hostile
#: payloads, to reach the state service's reply inbox.
HOSTILE_ALARMS = "hostile-alarms"
#: How long one step on the loop thread may take.
STEP_TIMEOUT_S = 30.0
#: How long the client waits for one answer (a redelivery takes the ack timeout, 5 s).
ANSWER_TIMEOUT_S = 15.0
#: How long counters may take to show what was sent (processing is asynchronous).
SETTLE_TIMEOUT_S = 20.0

BUS_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
GRPC_SETTINGS = settings(BUS_SETTINGS, max_examples=15)

#: The envelope each kind of subject carries (the ``subject`` label of the roles' garbage
#: metrics): a payload protobuf cannot parse as it must be counted as garbage there.
ENVELOPE_OF_KIND: dict[str, type[ProtoMessage]] = {
    "command": envelope.GatewayBatch,
    "ack": envelope.EventAck,
    "connect": envelope.ConnectRequest,
    "events": envelope.ConnectionEvent,
    "alarm": envelope.AlarmEvent,
    "replicas": envelope.StateReplica,
    "presence": envelope.GatewayPresence,
    "connect_reply": envelope.ConnectDecision,
    "alarm_reply": envelope.AlarmResult,
}
ENVELOPES: list[Descriptor] = list(envelope.DESCRIPTOR.message_types_by_name.values())
#: Every method of every service of the state API, from the generated descriptors.
METHODS: list[MethodDescriptor] = [
    method for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods
]
#: What a hostile call may end with: refused as the caller's fault, or served.
CLEAN_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def undecodable(kind: str, payload: bytes) -> bool:
    """Whether protobuf itself cannot parse ``payload`` as ``kind``'s envelope (the oracle
    of what must be counted, independent of the roles' own checks)."""
    try:
        ENVELOPE_OF_KIND[kind].FromString(payload)
    except DecodeError:
        return True
    return False


# -- what the roles listen on -------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """A subject one role listens on, and the kind of subject (its garbage label)."""

    role: str
    kind: str
    subject: str


def listened_subjects(
    prefix: str, app_name: str, gateway_id: str, worker_id: str, alarm_namespaces: list[str]
) -> list[Listener]:
    """Every subject a role of the stack subscribes to, built from ``wsgate/subjects.py``
    and the running roles' ids. The gateway's per-event ack subjects are a wildcard: the
    entry is its prefix, to which a test appends ``.<connection id>.<sequence>``."""
    own = subjects.worker_subject
    return [
        Listener("gateway", "command", subjects.gateway_subject(prefix, gateway_id)),
        Listener("gateway", "ack", subjects.ack_prefix(prefix, gateway_id)),
        Listener("worker", "connect", subjects.connect_subject(prefix, app_name, gateway_id)),
        Listener("worker", "connect", own(prefix, worker_id, "connect", gateway_id)),
        Listener("worker", "events", subjects.events_subject(prefix, app_name, gateway_id)),
        Listener("worker", "events", own(prefix, worker_id, "events", gateway_id)),
        *(
            Listener("worker", "alarm", subjects.alarm_subject(prefix, namespace))
            for namespace in alarm_namespaces
        ),
        Listener("worker", "alarm", own(prefix, worker_id, "alarm")),
        Listener("worker", "replicas", subjects.replicas_subject(prefix)),
        Listener("state", "presence", subjects.presence_subject(prefix, gateway_id)),
    ]


@dataclass(frozen=True)
class Roles:
    """The running stack: ids and where each role answers."""

    gateway_id: str
    worker_id: str
    gateway_url: str
    worker_probe: str
    state_probe: str
    state_address: str

    def metrics_url(self, role: str) -> str:
        return {
            "gateway": f"{self.gateway_url}/metrics",
            "worker": f"{self.worker_probe}/metrics",
            "state": f"{self.state_probe}/metrics",
        }[role]

    def garbage(self, role: str, kind: str) -> Any:
        return metric(self.metrics_url(role), f"wsgate_{role}_garbage_total", {"subject": kind})

    def hostile_strings(self) -> st.SearchStrategy[str]:
        """Junk, and ids that look valid: the running roles', connection ids of the running
        gateway it never handed out (serials far above what the test reaches), ids of
        gateways that do not exist, ids with trailing junk, and far too long ones."""
        gw, worker = self.gateway_id, self.worker_id
        unused = [f"{gw}_zz{n}" for n in range(10)]
        looks_valid = [gw, worker, *unused, "node-abcdefgh", "node-abcdefgh_1", "main", "/echo"]
        junk = [
            "",
            f"{gw}\n",
            f"{unused[0]}\n",
            f"{worker} ",
            "*",
            ">",
            "a.b",
            "/counter/" + "x" * 300,
            "a" * 70_000,
            "\x00",
        ]
        return st.one_of(
            st.sampled_from(looks_valid),
            st.sampled_from(junk),
            st.sampled_from(["/counter/", "/echo/", ""]).flatmap(
                lambda head: st.text(max_size=12).map(lambda tail: head + tail)
            ),
        )

    def ack_suffixes(self) -> st.SearchStrategy[str]:
        """``<connection id>.<sequence>`` tails of ack subjects: valid NATS tokens (the
        server refuses others), most of them no ack this gateway waits for."""
        connections = st.sampled_from(
            [f"{self.gateway_id}_zz{n}" for n in range(3)] + ["x", "node-abcdefgh_1", "_"]
        )
        sequences = st.sampled_from(
            ["1", "0", "2", "-1", "+1", "1_0", "x", str(2**63), str(2**64), "9" * 30]
        )
        return st.one_of(
            st.tuples(connections, sequences).map(".".join),
            st.just("x"),
            st.just("a.b.c.d"),
        )


# -- the event loop thread and the client's traffic ---------------------------------------


@dataclass
class Traffic:
    """A client exchanging acknowledged messages throughout: ``increment`` to a counter
    object (each answered with the new count) and numbered messages to ``/echo``, one at a
    time, each awaited."""

    ws_base: str
    counter: str = field(default_factory=lambda: f"hostile-{uuid.uuid4().hex}")
    counts: list[int] = field(default_factory=list)
    echoes_sent: list[str] = field(default_factory=list)
    echoes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start on the running loop."""
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def finish(self) -> None:
        """Stop after the exchanges in flight are answered, and close the sockets."""
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), ANSWER_TIMEOUT_S)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(self._count(session), self._echo(session))

    async def _count(self, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(f"{self.ws_base}/counter/{self.counter}") as ws:
            self.counts.append(int(await self._answer(ws)))  # connecting counts one
            while not self.stop.is_set() and not self.problems:
                await ws.send_str("increment")
                self.counts.append(int(await self._answer(ws)))
                await asyncio.sleep(0.02)  # a steady rate, not a flood

    async def _echo(self, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(f"{self.ws_base}/echo") as ws:
            while not self.stop.is_set() and not self.problems:
                text = f"echo-{len(self.echoes_sent)}"
                self.echoes_sent.append(text)
                await ws.send_str(text)
                self.echoes.append(await self._answer(ws))
                await asyncio.sleep(0.02)  # a steady rate, not a flood

    async def _answer(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        msg = await ws.receive(timeout=ANSWER_TIMEOUT_S)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            self.problems.append(f"got {msg.type.name} {msg.data!r} {msg.extra!r}")
            raise AssertionError(self.problems[-1])
        return str(msg.data)

    @property
    def exchanges(self) -> int:
        return len(self.counts) + len(self.echoes)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # An alarm that fails is not retried: each answer the test gives is the last one.
    yield from stack_context(
        tmp_path_factory.mktemp("hostile"),
        app="tests.apps.hostile:app",
        state_args=("--alarm-max-retries", "0"),
    )


@pytest.fixture(scope="module")
def roles(hostile_stack: Stack) -> Roles:
    state = hostile_stack.state_child()
    return Roles(
        gateway_id=str(hostile_stack.gateways[0].info["gateway_id"]),
        worker_id=str(hostile_stack.workers[0].info["worker_id"]),
        gateway_url=hostile_stack.url,
        worker_probe=f"http://127.0.0.1:{hostile_stack.workers[0].info['probe_port']}",
        state_probe=f"http://127.0.0.1:{state.info['probe_port']}",
        state_address=str(state.info["address"]),
    )


@pytest.fixture(scope="module")
def loop_thread(hostile_stack: Stack) -> Iterator[LoopThread]:
    # After the stack: no gRPC channel may exist in this process while children are forked.
    thread = LoopThread("hostile", STEP_TIMEOUT_S)
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="module")
def traffic(hostile_stack: Stack, loop_thread: LoopThread) -> Iterator[Traffic]:
    """The client's traffic, started before any hostility and running to the last test."""

    async def start() -> Traffic:
        traffic = Traffic(hostile_stack.ws_url(""))
        traffic.start()
        return traffic

    traffic = loop_thread.run(start())
    loop_thread.run(
        eventually(
            lambda: traffic.exchanges >= 10 or bool(traffic.problems),
            "traffic",
            timeout_s=SETTLE_TIMEOUT_S,
        )
    )
    try:
        yield traffic
    finally:
        with contextlib.suppress(Exception):
            loop_thread.run(traffic.finish())


@dataclass
class Hostility:
    """The test's side of the bus: its NATS connection, the gRPC channel, and the answers
    it gives to requests only it takes (connects of ``/held``, alarms of HOSTILE_ALARMS)."""

    nc: NatsClient
    channel: grpc.aio.Channel
    #: ws://host:port of the gateway.
    ws_base: str
    held_answers: dict[str, bytes] = field(default_factory=dict)
    alarm_answers: dict[str, bytes] = field(default_factory=dict)
    alarms_answered: list[str] = field(default_factory=list)

    async def answer_held_connect(self, msg: Msg) -> None:
        """The gateway's connect request for ``/held?n=<key>``: answered at once with the
        payload for ``key`` (the worker answers a second later; the first answer counts).
        The test's own hostile requests come here too: should one look like that, its
        answer goes to the test's own inbox, where nobody listens."""
        if not msg.reply:
            return
        try:
            request = envelope.ConnectRequest.FromString(msg.data)
        except DecodeError:
            return
        if request.path == "/held":
            key = request.query.removeprefix("n=")
            if key in self.held_answers:
                await self.nc.publish(msg.reply, self.held_answers[key])

    async def answer_alarm(self, msg: Msg) -> None:
        """An alarm event of HOSTILE_ALARMS, from the state service: answered with the
        payload for its object."""
        event = envelope.AlarmEvent.FromString(msg.data)
        payload = self.alarm_answers.get(event.name)
        if payload is not None and msg.reply:
            await self.nc.publish(msg.reply, payload)
            self.alarms_answered.append(event.name)


@pytest.fixture(scope="module")
def hostility(
    hostile_stack: Stack, roles: Roles, loop_thread: LoopThread, traffic: Traffic
) -> Iterator[Hostility]:
    async def start() -> Hostility:
        nc = NatsClient()
        await nc.connect(hostile_stack.nats_url)
        hostility = Hostility(
            nc, grpc.aio.insecure_channel(roles.state_address), hostile_stack.ws_url("")
        )
        await nc.subscribe(
            subjects.connect_subject(DEFAULT_PREFIX, DEFAULT_APP_NAME, subjects.ANY),
            cb=hostility.answer_held_connect,
        )
        await nc.subscribe(
            subjects.alarm_subject(DEFAULT_PREFIX, HOSTILE_ALARMS), cb=hostility.answer_alarm
        )
        await nc.flush()
        return hostility

    async def stop(hostility: Hostility) -> None:
        await hostility.channel.close()
        await hostility.nc.close()

    hostility = loop_thread.run(start())
    try:
        yield hostility
    finally:
        loop_thread.run(stop(hostility))


async def all_alive_and_ready(stack: Stack, roles: Roles) -> None:
    for child in stack.children():
        assert child.process.poll() is None, f"{child.name} exited: {child.process.returncode}"
    async with aiohttp.ClientSession() as session:
        for url in (roles.gateway_url, roles.worker_probe, roles.state_probe):
            async with session.get(f"{url}/readyz") as resp:
                assert resp.status == 200, f"{url}/readyz: {resp.status}"


# -- the tests ----------------------------------------------------------------------------


def test_requests_without_a_reply_subject_are_counted_and_dropped(
    roles: Roles, loop_thread: LoopThread, hostility: Hostility
) -> None:
    """Well-formed requests that nobody could answer: each counted once, nothing run (a
    connect request without one used to run its handler and fail on the answer). Before
    the fuzz tests, so that nothing else is counted meanwhile."""
    gw = roles.gateway_id
    sends = [
        (
            "connect",
            subjects.connect_subject(DEFAULT_PREFIX, DEFAULT_APP_NAME, gw),
            envelope.ConnectRequest(connection_id=f"{gw}_zz1", path="/echo"),
        ),
        (
            "events",
            subjects.events_subject(DEFAULT_PREFIX, DEFAULT_APP_NAME, gw),
            envelope.ConnectionEvent(
                connection_id=f"{gw}_zz1",
                sequence=1,
                path="/echo",
                message=envelope.Message(text="x"),
            ),
        ),
        (
            "alarm",
            subjects.alarm_subject(DEFAULT_PREFIX, "tick"),
            envelope.AlarmEvent(namespace="tick", name="n", firing_id="f"),
        ),
    ]
    before = {kind: loop_thread.run(roles.garbage("worker", kind)) for kind, _, _ in sends}

    async def send() -> None:
        for _, subject, message in sends:
            await hostility.nc.publish(subject, message.SerializeToString())
        await hostility.nc.flush()

    loop_thread.run(send())

    async def each_counted_once() -> bool:
        grown = [await roles.garbage("worker", kind) - before[kind] for kind, _, _ in sends]
        assert all(n <= 1 for n in grown), grown
        return all(n == 1 for n in grown)

    loop_thread.run(
        eventually(each_counted_once, "each kind counted once", timeout_s=SETTLE_TIMEOUT_S)
    )


def test_requests_that_are_not_their_envelope_get_the_protocols_error_answer(
    roles: Roles, loop_thread: LoopThread, hostility: Hostility
) -> None:
    """A connect request that is garbage is refused with 400; an alarm event that is, or
    that names a namespace without a handler, is answered as failed (the state service
    retries it with backoff): neither is left to time out."""
    own_alarm = subjects.worker_subject(DEFAULT_PREFIX, roles.worker_id, "alarm")

    async def ask() -> tuple[Any, ...]:
        nc = hostility.nc
        connect = await nc.request(
            subjects.connect_subject(DEFAULT_PREFIX, DEFAULT_APP_NAME, roles.gateway_id),
            b"\xff\xff",
            timeout=10,
        )
        garbage_alarm = await nc.request(own_alarm, b"\xff\xff", timeout=10)
        no_handler = envelope.AlarmEvent(namespace="nobody", name="n", firing_id="f")
        unhandled = await nc.request(own_alarm, no_handler.SerializeToString(), timeout=10)
        return connect, garbage_alarm, unhandled

    connect, garbage_alarm, unhandled = loop_thread.run(ask())
    decision = envelope.ConnectDecision.FromString(connect.data)
    assert decision.reject.status == 400
    for answer in (garbage_alarm, unhandled):
        result = envelope.AlarmResult.FromString(answer.data)
        assert not result.ok
        assert "not a valid AlarmEvent" in result.error


def test_a_command_in_reply_to_an_event_not_yet_sent_is_garbage(
    roles: Roles, loop_thread: LoopThread, hostility: Hostility
) -> None:
    """No worker can answer an event the connection has not produced: such a command is
    counted as garbage and its frame never reaches the client."""

    async def scenario() -> tuple[str, Any]:
        before = await roles.garbage("gateway", "command")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{hostility.ws_base}/whoami") as ws,
        ):
            connection_id = (await ws.receive(timeout=ANSWER_TIMEOUT_S)).data
            forged = envelope.GatewayCommand(
                connection_ids=[connection_id],
                send=envelope.Message(text="from the future"),
                in_reply_to=2**40,
            )
            subject = subjects.gateway_subject(DEFAULT_PREFIX, roles.gateway_id)
            await hostility.nc.publish(subject, single_command(forged))
            await hostility.nc.flush()

            async def counted() -> bool:
                return await roles.garbage("gateway", "command") != before

            await eventually(counted, "the forged command counted", timeout_s=SETTLE_TIMEOUT_S)
            # Frames leave in order: had the forged one been taken, it would come first.
            await ws.send_str("after")
            after = (await ws.receive(timeout=ANSWER_TIMEOUT_S)).data
            await ws.close()
            return connection_id, after

    connection_id, after = loop_thread.run(scenario())
    assert connection_id.startswith(f"{roles.gateway_id}_")
    assert after == "after"


@dataclass
class Sent:
    """What the bus fuzz sent, per (role, kind of subject)."""

    messages: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Of those, how many protobuf cannot parse as the subject's envelope.
    undecodable: Counter[tuple[str, str]] = field(default_factory=Counter)
    held_statuses: list[tuple[bytes, int]] = field(default_factory=list)


def test_garbage_on_every_subject_is_counted_and_no_role_falls_over(
    hostile_stack: Stack,
    roles: Roles,
    loop_thread: LoopThread,
    traffic: Traffic,
    hostility: Hostility,
) -> None:
    listeners = listened_subjects(
        DEFAULT_PREFIX, DEFAULT_APP_NAME, roles.gateway_id, roles.worker_id, ["tick"]
    )
    kinds = {(listener.role, listener.kind) for listener in listeners} | {
        ("gateway", "connect_reply"),
        ("state", "alarm_reply"),
    }
    before = {key: loop_thread.run(roles.garbage(*key)) for key in kinds}
    refusals_before = loop_thread.run(gateway_refusals(roles))
    announcements_before = loop_thread.run(
        metric(roles.metrics_url("state"), "wsgate_state_presence_announcements_total")
    )
    impostors_before = loop_thread.run(
        metric(roles.metrics_url("state"), "wsgate_state_presence_impostors_total")
    )
    exchanges_before = traffic.exchanges
    sent = Sent()
    counter = iter(range(1_000_000))
    strings = roles.hostile_strings()

    @BUS_SETTINGS
    @given(
        payload=payloads(ENVELOPES, strings),
        reply=st.sampled_from(["", "inbox"]),
        headers=st.sampled_from(
            [None, {"Status": "503"}, {"Wsgate-Hops": "junk"}, {"Wsgate-Hops": "-5"}]
        ),
        ack_suffix=roles.ack_suffixes(),
    )
    # Explicit examples first: surely garbage on every subject, and the empty payload.
    @example(
        payload=b"\xff\xff\xff", reply="inbox", headers=None, ack_suffix=f"{roles.gateway_id}_zz1.1"
    )
    @example(payload=b"", reply="", headers=None, ack_suffix="x")
    def publish_everywhere(
        payload: bytes, reply: str, headers: dict[str, str] | None, ack_suffix: str
    ) -> None:
        n = str(next(counter))
        loop_thread.run(publish(hostility, listeners, payload, reply, headers, ack_suffix, n, sent))

    publish_everywhere()

    def settled() -> bool:
        return len(hostility.alarms_answered) == len(hostility.alarm_answers)

    loop_thread.run(
        eventually(
            settled, "the state service's alarm events, all answered", timeout_s=SETTLE_TIMEOUT_S
        )
    )

    # The connect decisions that reached the gateway are those it answered 502 (the app
    # answers 409, a second later, when it was first).
    sent.undecodable["gateway", "connect_reply"] = sum(
        status == 502 and undecodable("connect_reply", payload)
        for payload, status in sent.held_statuses
    )

    async def counted() -> bool:
        for role, kind in kinds:
            grown = await roles.garbage(role, kind) - before[role, kind]
            if grown < max(1, sent.undecodable[role, kind]):
                return False
        return True

    async def report() -> dict[tuple[str, str], tuple[float, int]]:
        return {
            key: (await roles.garbage(*key) - before[key], sent.undecodable[key])
            for key in sorted(kinds)
        }

    try:
        loop_thread.run(eventually(counted, "the garbage counted", timeout_s=SETTLE_TIMEOUT_S))
    except AssertionError as timed_out:
        raise AssertionError(
            f"garbage counted (grown, undecodable sent): {loop_thread.run(report())}"
        ) from timed_out
    # The state's alarm inbox: exactly the answers protobuf cannot parse.
    assert (
        loop_thread.run(roles.garbage("state", "alarm_reply")) - before["state", "alarm_reply"]
        == sent.undecodable["state", "alarm_reply"]
    )
    # Every message sent to the gateway is refused and counted: as garbage, or as a stale
    # ack or a command for an unknown connection.
    to_gateway = sum(n for (role, kind), n in sent.messages.items() if role == "gateway")
    assert loop_thread.run(gateway_refusals(roles)) - refusals_before >= to_gateway
    # Every presence announcement is counted: as garbage, or heard (a gateway that looks
    # real but is not; it has no members to sweep).
    presence = loop_thread.run(roles.garbage("state", "presence")) - before["state", "presence"]
    heard = (
        loop_thread.run(
            metric(roles.metrics_url("state"), "wsgate_state_presence_announcements_total")
        )
        - announcements_before
    )
    # Or refused as an impostor: its payload names another gateway than its subject.
    impostors = (
        loop_thread.run(metric(roles.metrics_url("state"), "wsgate_state_presence_impostors_total"))
        - impostors_before
    )
    assert presence + heard + impostors >= sent.messages["state", "presence"]
    # Each /held upgrade got an HTTP answer; an undecodable decision a 502 (or the app's
    # 409 if the worker answered first).
    for payload, status in sent.held_statuses:
        assert status == 101 or 400 <= status <= 599, (payload, status)
        if undecodable("connect_reply", payload):
            assert status in (502, 409), (payload, status)
    loop_thread.run(all_alive_and_ready(hostile_stack, roles))
    loop_thread.run(
        eventually(
            lambda: traffic.exchanges >= exchanges_before + 20 or bool(traffic.problems),
            "the client's traffic to go on",
            timeout_s=SETTLE_TIMEOUT_S,
        )
    )
    assert not traffic.problems


async def gateway_refusals(roles: Roles) -> float:
    url = roles.metrics_url("gateway")
    total = 0.0
    for kind in ("command", "ack"):
        total += await roles.garbage("gateway", kind)
    for reason in ("stale", "unknown_connection"):
        total += await metric(url, "wsgate_gateway_drops_total", {"reason": reason})
    return total


async def publish(
    hostility: Hostility,
    listeners: list[Listener],
    payload: bytes,
    reply: str,
    headers: dict[str, str] | None,
    ack_suffix: str,
    n: str,
    sent: Sent,
) -> None:
    """One example: ``payload`` on every subject, as an alarm's answer and as a connect
    decision."""
    nc = hostility.nc
    reply_subject = nc.new_inbox() if reply else ""
    for listener in listeners:
        subject = listener.subject
        # The gateway subscribes to <ack prefix>.*.*: a tail of another length reaches no one.
        delivered = listener.kind != "ack" or ack_suffix.count(".") == 1
        if listener.kind == "ack":
            subject = f"{subject}.{ack_suffix}"
        await nc.publish(subject, payload, reply=reply_subject, headers=headers)
        key = (listener.role, listener.kind)
        sent.messages[key] += delivered
        sent.undecodable[key] += delivered and undecodable(listener.kind, payload)
    # The state service's alarm inbox: an alarm due now, answered with the payload.
    hostility.alarm_answers[n] = payload
    sent.messages["state", "alarm_reply"] += 1
    sent.undecodable["state", "alarm_reply"] += undecodable("alarm_reply", payload)
    stub = pb_stub(hostility.channel, "Alarms", "SetAlarm")
    await stub(
        pb.SetAlarmRequest(
            object=pb.ObjectId(namespace=HOSTILE_ALARMS, name=n), at_ms=time.time_ns() // 10**6
        ).SerializeToString(),
        timeout=10,
    )
    await nc.flush()
    # The gateway's connect inbox: an upgrade of /held, whose decision is the payload.
    hostility.held_answers[n] = payload
    url = f"{hostility.ws_base}/held?n={n}"
    sent.held_statuses.append((payload, await upgrade_status(url)))


async def upgrade_status(url: str) -> int:
    """The HTTP status of an upgrade (101 if it opened; then it is closed at once)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def pb_stub(channel: grpc.aio.Channel, service: str, method: str) -> Any:
    return channel.unary_unary(f"/wsgate.v1.{service}/{method}")


@dataclass(frozen=True)
class Call:
    """One hostile call: a method and the request messages sent (bytes, not parsed)."""

    method: MethodDescriptor
    requests: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"Call({self.method.full_name}, {self.requests!r})"


def hostile_calls(
    method: MethodDescriptor, strings: st.SearchStrategy[str]
) -> st.SearchStrategy[Call]:
    """What is sent to ``method``: random bytes, a random message of its own request type
    (mostly), or a random message of another type; one to three of them on a stream."""
    own = messages(method.input_type, strings).map(lambda m: m.SerializeToString())
    other = payloads(ENVELOPES + [m.input_type for m in METHODS], strings)
    request = st.one_of(own, own, other)
    count = st.integers(1, 3) if method.client_streaming else st.just(1)
    return count.flatmap(lambda n: st.tuples(*[request] * n).map(lambda r: Call(method, r)))


async def call_status(channel: grpc.aio.Channel, call: Call) -> grpc.StatusCode | None:
    """Make ``call`` with the bytes as they are, read every answer, and return the status.

    A stream is written in lockstep (each request, then its answer), as the project's own
    client does: a write racing the server's end of the call fails on the client, and gRPC
    then reports its own INTERNAL ("Internal error from Core") instead of the server's
    status. If a write still loses that race, the status is not observable: None.
    """
    method = call.method
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            stream = channel.stream_stream(path)(timeout=10)
            for request in call.requests:
                try:
                    await stream.write(request)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return None
                if await stream.read() is grpc.aio.EOF:
                    break
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await stream.done_writing()
            while await stream.read() is not grpc.aio.EOF:
                pass
        elif method.server_streaming:
            async for _ in channel.unary_stream(path)(call.requests[0], timeout=10):
                pass
        else:
            await channel.unary_unary(path)(call.requests[0], timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_hostile_calls_to_every_grpc_method_end_with_a_clean_status(
    hostile_stack: Stack,
    roles: Roles,
    loop_thread: LoopThread,
    traffic: Traffic,
    hostility: Hostility,
) -> None:
    exchanges_before = traffic.exchanges
    strings = roles.hostile_strings()
    for method in METHODS:

        @GRPC_SETTINGS
        @given(call=hostile_calls(method, strings))
        def call_cleanly(call: Call) -> None:
            status = loop_thread.run(call_status(hostility.channel, call))
            assert status is None or status in CLEAN_CODES, f"{call!r} ended with {status}"

        call_cleanly()
    # Still serving: a read, the probes, and the client's traffic.
    loop_thread.run(all_alive_and_ready(hostile_stack, roles))
    loop_thread.run(
        eventually(
            lambda: traffic.exchanges >= exchanges_before + 20 or bool(traffic.problems),
            "the client's traffic to go on",
            timeout_s=SETTLE_TIMEOUT_S,
        )
    )
    assert not traffic.problems


def test_the_client_lost_nothing_and_the_stored_count_is_exact(
    loop_thread: LoopThread, traffic: Traffic, hostility: Hostility
) -> None:
    """Run last in the module: every answer came back, in order, and the object stored
    exactly as many increments as were acknowledged."""
    loop_thread.run(
        eventually(
            lambda: len(traffic.counts) >= 20 or bool(traffic.problems),
            "the client's traffic",
            timeout_s=SETTLE_TIMEOUT_S,
        )
    )
    loop_thread.run(traffic.finish())
    assert not traffic.problems
    counts = list(traffic.counts)
    assert counts == list(range(1, len(counts) + 1)), "answers lost, doubled or out of order"
    assert traffic.echoes == traffic.echoes_sent

    async def stored() -> Any:
        request = pb.GetRequest(object=pb.ObjectId(namespace="counter", name=traffic.counter))
        request.keys.append("value")
        response = await hostility.channel.unary_unary(
            "/wsgate.v1.State/Get", response_deserializer=pb.GetResponse.FromString
        )(request.SerializeToString(), timeout=10)
        return decode_value(response.entries[0].value)

    assert loop_thread.run(stored()) == counts[-1]

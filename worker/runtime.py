"""The worker: takes connect requests, connection events and alarms from NATS and runs the
app's handlers for them.

Workers of one app share a queue group, so each request goes to one of them.

- **Function routes** are stateless: any worker serves any event; everything a handler
  needs arrives in the envelope or lives in the state service.
- **Durable object routes** run in their object's one activation
  (:mod:`wsgate.worker.activations`): a request for an object hosted elsewhere is forwarded to the
  host, on its own subjects (``<prefix>.worker.<node>.<worker_id>.connect|events|alarm``),
  which gateways also use directly once an ack named the host.

A connect request or an event is taken only if its subject (which names the gateway that
sent it: NATS lets a gateway's identity publish on its own subjects only), its connection
id and its reply subject (that gateway's inbox or ack subject) all name the same gateway.
Anything else is a gateway speaking for another's connections, or steering the answer to
someone else's subject: dropped and counted (``wsgate_worker_impostor_requests_total``).

Every handler runs in a Task of its own, so ``asyncio.timeout``, ``wait_for``, TaskGroups
and cancellation inside it behave as in any asyncio program. At most
``max_concurrent_events`` requests are handled at once; the reply (the decision, the ack)
is sent only when the handler has finished, which gives the gateway its per-connection
order. While a request waits or runs, the gateway hears a progress ack every third of its
ack wait, so a slow handler, or a durable object's busy queue, is not redelivered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Mapping

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsgate import envelopes, ids, subjects
from wsgate.batches import BatchWriter, ack_entry, command_entry, final_ack_entry
from wsgate.bus import connect_bus, drain_bus, write_now
from wsgate.config import WorkerConfig
from wsgate.eager import start_eagerly, start_task
from wsgate.errors import InvalidEnvelope
from wsgate.fanout import payload_budget
from wsgate.grpc_tls import client_tls
from wsgate.placement import ANNOUNCE_FRACTION, ReplicaDirectory, ReplicaWatch
from wsgate.probes import ProbeServer
from wsgate.service import Service, ServicePhase
from wsgate.supervision import (
    OVERDUE_TASK_WAIT_S,
    Supervisor,
    Teardown,
    cancel_and_wait,
    stop_task,
)
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.activations import Activations
from wsgate.worker.alarm_runner import AlarmRunner
from wsgate.worker.app import App, ConnectRequest, Reject, Route
from wsgate.worker.auth import Verified, authenticate, with_auth_subprotocol
from wsgate.worker.batched_events import BatchedEvent, unbatching
from wsgate.worker.call_runner import CallRunner
from wsgate.worker.connection import Connection, current_connection
from wsgate.worker.decisions import (
    accept_decision,
    check_accept,
    connect_handler_result,
    connect_outcome,
    refused,
    reject_decision,
)
from wsgate.worker.durable import check_plain_accept
from wsgate.worker.env import Env
from wsgate.worker.errors import InvalidResponse, Unauthorized
from wsgate.worker.event_policy import (
    EVENT_KINDS,
    EventKind,
    HandlerOutcome,
    Settlement,
    settle,
)
from wsgate.worker.failpoints import Failpoints
from wsgate.worker.gate import OutputGate, current_gate
from wsgate.worker.http import (
    HttpRequest,
    Response,
    as_connect_request,
    expected_websocket,
    plain_response,
)
from wsgate.worker.intake import IntakeWatchdog
from wsgate.worker.jwt_verifier import JWTVerifier
from wsgate.worker.membership import leave_all
from wsgate.worker.metrics import WorkerMetrics
from wsgate.worker.object_calls import ObjectCalls
from wsgate.worker.server_api import ServerApi
from wsgate.worker.server_api_grpc import GrpcServerApi
from wsgate.worker.server_api_http import HttpServerApi
from wsgate.worker.state_client import StateClient
from wsgate.worker.work import REQUEST_KEY_PREFIX, Work

log = logging.getLogger(__name__)


#: How often running handlers are checked for a progress ack being due.
PROGRESS_SWEEP_S = 0.1
#: How often the intake is checked (at most; a shorter stall setting checks more often).
INTAKE_CHECK_S = 0.5
#: How long handler tasks cancelled at the drain deadline get to finish (their ``finally``
#: and ``except CancelledError`` blocks) before close() goes on without them, logging them.
CANCELLED_HANDLER_WAIT_S = OVERDUE_TASK_WAIT_S


#: The answer to a connect request that is not one (the upgrade gets 400).
_BAD_CONNECT_REQUEST = reject_decision(400, "Bad connect request").SerializeToString()

#: The answers to a plain HTTP request without a handler, and to one whose handler failed.
_EXPECTED_WEBSOCKET = expected_websocket().SerializeToString()
_INTERNAL_ERROR = plain_response(500, "Internal Server Error").SerializeToString()

#: The parameters of an event's path when no route matches it any more.
_NO_PARAMS: Mapping[str, str] = types.MappingProxyType({})

#: A route and the parameters of the path it matched.
Resolved = tuple[Route, Mapping[str, str]]


#: How often a worker looks whether a state replica's announcement ran out (each
#: announcement carries its own timeout).
REPLICA_TICK_S = 0.25


#: An event being handled: where and when to send its next progress ack (reply subject,
#: sequence, interval, when due). A tuple, not an object: one is made for every event,
#: and the sweep replaces it when it sends.
_Running = tuple[str, int, float, float]

# The members bound once: on Python 3.11 reading an Enum member off its class costs about
# four times a plain attribute, and an event reads several.
_MESSAGE = EventKind.MESSAGE
_CLOSED = EventKind.CLOSED
_RETURNED = HandlerOutcome.RETURNED


class HandlerCancelled(Exception):
    """A handler was cancelled from inside (it cancelled its own Task): it failed."""


class Worker(Service):
    """One worker process's event loop side.

    Use ``async with Worker(config, app)`` or :meth:`start` then :meth:`close` (idempotent).
    The constructor reads the TLS files of the state client (ConfigError if one is unusable).
    """

    def __init__(self, config: WorkerConfig, app: App) -> None:
        super().__init__()
        self.config = config
        self.app = app
        self.worker_id = ids.new_worker_id(config.node)
        self._failpoints = Failpoints.parse(config.failpoints)
        self.metrics = WorkerMetrics()
        self._state = StateClient(
            config.state_address,
            timeout_s=config.state_timeout_s,
            tls=client_tls(config),
            on_connect_failure=self.metrics.state_connect_failures.inc,
        )
        self._env = Env(self._state, self)
        #: What start() did, undone by close() (newest first).
        self._teardown = Teardown("worker", log)
        #: The background loops; a crash turns /readyz to 503.
        self._supervisor = Supervisor(
            "worker",
            on_crash=lambda task: self.metrics.background_crashes.labels(task).inc(),
            logger=log,
        )
        self._probes = ProbeServer(
            config.host,
            config.port,
            is_ready=self._is_ready,
            registry=self.metrics.registry,
            not_ready_reason=self._supervisor.not_ready_reason,
        )
        #: Handler slots: how many are free, and the requests waiting for one, in order
        #: (a semaphore of its own: asyncio's costs two generator expressions per acquire).
        self._free_slots = config.max_concurrent_events
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: The Tasks of the requests being handled, by a serial number: a Task's coroutine
        #: removes its own by the key it was given, as it does not know its Task without
        #: asyncio.current_task(), which costs a getpid() on Python 3.11.
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._task_serial = 0
        self._subscriptions: list[Subscription] = []
        self._nc: NatsClient | None = None
        self._running: dict[int, _Running] = {}
        #: What goes to each gateway at the end of this turn of the event loop, in order.
        self._outgoing: dict[str, BatchWriter] = {}
        self._outgoing_bytes = 0
        self._publishing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._alarms: AlarmRunner | None = None
        self._calls: CallRunner | None = None
        #: The ports of the server API, HTTP and gRPC (-1: not served).
        self.api_port = -1
        self.api_grpc_port = -1
        self._activations: Activations | None = None
        self._replicas: ReplicaWatch | None = None
        self._intake = IntakeWatchdog(config.intake_stall_s, time.monotonic())
        self._intake_stopped: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Connect to the state service and NATS, then take requests.

        Raises BusUnavailable if NATS cannot be reached.
        """
        self._enter_running()
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        config = self.config
        # Each step registers its undo once done: close() undoes exactly what was started,
        # newest first. The order of the drain follows from it (see close()).
        undo = self._teardown.push
        spawn = self._supervisor.spawn
        try:
            undo("probes", self._probes.close)  # also undoes a start that failed halfway
            await self._probes.start()
            await self._state.start()
            undo("state client", self._state.close)
            self._nc = nc = await connect_bus(
                config,
                f"wsgate-worker {self.worker_id}",
                role="worker",
                on_permission_violation=self.metrics.nats_permission_violations.inc,
            )
            undo("nats", functools.partial(drain_bus, nc))
            # State replicas announce themselves on the bus: route each call to the owner
            # of its object (until one is heard, to config.state_address).
            self._replicas = ReplicaWatch(
                nc,
                config.prefix,
                ReplicaDirectory(),
                timeout_s=REPLICA_TICK_S / ANNOUNCE_FRACTION,
                on_change=self._state.replicas_changed,
                on_garbage=self.metrics.garbage.labels("replicas").inc,
            )
            await self._replicas.start(spawn)
            undo("replica watch", self._replicas.close)
            self._state.use_replicas(self._replicas)
            self._activations = Activations(
                worker_id=self.worker_id,
                prefix=config.prefix,
                nc=nc,
                state=self._state,
                env=self._env,
                metrics=self.metrics,
                turn_timeout_s=config.turn_timeout_s,
                max_activations=config.max_activations,
                idle_s=config.activation_idle_s,
                commit_timeout_s=config.commit_timeout_s,
                drain_timeout_s=config.drain_timeout_s,
                publish_command=self._publish_command,
                queue_ack=self._queue_ack,
                failpoints=self._failpoints,
            )
            await self._activations.start(spawn)
            # Progress acks go on while the handlers drain: stopped after them.
            self._sweeper = spawn("progress_sweep", self._sweep())
            undo("progress sweep", functools.partial(stop_task, self._sweeper))
            undo("handler tasks", self._finish_handlers)
            undo("activations", self._activations.close)
            queue = subjects.worker_queue(config.app_name)
            own = subjects.worker_subject
            prefix, app, anyone = config.prefix, config.app_name, subjects.ANY
            take_connect = self._spawner(self._connect)
            take_request = self._spawner(self._http_request)
            # Events come alone or in EventBatches: each is taken as if it came alone.
            take_events = unbatching(
                nc, self._spawner(self._event), functools.partial(self._garbage, "events")
            )
            for subject, group, take in (
                (subjects.connect_subject(prefix, app, anyone), queue, take_connect),
                (subjects.events_subject(prefix, app, anyone), queue, take_events),
                # What gateways and other workers send to this worker, the host of objects.
                (own(prefix, self.worker_id, "connect", anyone), "", take_connect),
                (own(prefix, self.worker_id, "events", anyone), "", take_events),
                # Plain HTTP requests to routes (no upgrade), for on_request.
                (subjects.request_subject(prefix, app, anyone), queue, take_request),
                (own(prefix, self.worker_id, "request"), "", take_request),
            ):
                self._subscriptions.append(await nc.subscribe(subject, queue=group, cb=take))
            self._alarms = AlarmRunner(
                nc,
                self.app,
                self._env,
                prefix=config.prefix,
                max_concurrent=config.max_concurrent_events,
                drain_timeout_s=config.drain_timeout_s,
                activations=self._activations,
                worker_id=self.worker_id,
                on_garbage=self.metrics.garbage.labels("alarm").inc,
            )
            undo("alarm runner", self._alarms.close)
            await self._alarms.start()
            # Calls of durable objects' methods: made by handlers (env.objects), run here.
            calls = ObjectCalls(nc, config.prefix, config.turn_timeout_s)
            self._env.bind_calls(calls)
            self._calls = CallRunner(
                nc,
                self.app.durable_classes,
                self._activations,
                prefix=config.prefix,
                worker_id=self.worker_id,
                max_concurrent=config.max_concurrent_events,
                on_garbage=self.metrics.garbage.labels("call").inc,
            )
            undo("call runner", self._calls.close)
            await self._calls.start()
            if config.api_port >= 0 or config.api_grpc_port >= 0:
                # The server API: the rest of a backend reaches connections and objects.
                jwt = JWTVerifier.from_env() if JWTVerifier.configured() else None
                api = ServerApi(
                    config,
                    nc=nc,
                    state=self._state,
                    calls=calls,
                    classes=self.app.durable_classes,
                    jwt=jwt,
                )
                if config.api_port >= 0:
                    http_api = HttpServerApi(api)
                    undo("server api (HTTP)", http_api.close)
                    self.api_port = await http_api.start(config.host, config.api_port)
                if config.api_grpc_port >= 0:
                    grpc_api = GrpcServerApi(api)
                    undo("server api (gRPC)", grpc_api.close)
                    self.api_grpc_port = await grpc_api.start(config.host, config.api_grpc_port)
            # First undone: no new requests while the rest drains (until here, NATS' drain
            # ends the subscriptions).
            undo("subscriptions", self._unsubscribe)
            # Make sure the server has the subscriptions before we call ourselves ready.
            await nc.flush()
        except BaseException:
            await self.close()
            raise
        tls = self._state.tls
        log.info(
            "worker %s serving %d route(s) of app %r; state service at %s (%s)",
            self.worker_id, len(self.app.routes), config.app_name, config.state_address,
            "plaintext" if tls is None else tls.describe(),
        )  # fmt: skip

    @property
    def probe_port(self) -> int:
        """The port of /healthz, /readyz and /metrics."""
        return self._probes.port

    def _is_ready(self) -> bool:
        nc = self._nc
        return (
            self.phase is ServicePhase.RUNNING
            and nc is not None
            and nc.is_connected
            and self._intake_stopped is None
        )

    async def close(self) -> None:
        """Drain: readiness turns 503, no new requests are taken, running alarm handlers
        finish, activations finish and release their objects, running handlers finish and
        are acknowledged (up to ``drain_timeout_s``; then they are cancelled, awaited up to
        CANCELLED_HANDLER_WAIT_S, and their events redelivered elsewhere), then the
        progress sweep stops and the replica watch, NATS, the state client and the probes
        close.

        Each of those steps runs even if one before it failed (the failure is logged with
        the step's name); only the steps start() got to are undone. Idempotent."""
        if not await self._enter_closing():
            return
        try:
            await self._teardown.unwind()
        finally:
            self._mark_closed()

    async def _unsubscribe(self) -> None:
        """Take no new requests (the first step of close())."""
        for sub in self._subscriptions:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                # NATS' drain ends it all the same, later.
                log.warning("unsubscribing from %s failed: %r", sub.subject, exc)

    async def _finish_handlers(self) -> None:
        """Handlers still running get until ``drain_timeout_s``; then they are cancelled
        and awaited (bounded: one that ignores its cancellation is logged and left)."""
        if self._tasks:
            _, pending = await asyncio.wait(
                self._tasks.values(), timeout=self.config.drain_timeout_s
            )
            if pending:
                log.warning(
                    "%d handler(s) still running at the drain deadline: cancelled; their "
                    "events go to another worker",
                    len(pending),
                )
                await cancel_and_wait(pending, CANCELLED_HANDLER_WAIT_S, "handler task", log)
                self._settle_unstarted()
        if self._background:
            # The final acks of the last handlers, on their way out before NATS drains.
            await asyncio.wait(self._background, timeout=CANCELLED_HANDLER_WAIT_S)

    # -- dispatch ------------------------------------------------------------------------

    def _spawner(
        self, handler: Callable[[Msg], Coroutine[None, None, None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """Run each request in a Task of its own, at most max_concurrent_events at once.

        nats-py calls a subscription's callback for one message at a time; waiting for a
        slot here is what pushes back when the worker is saturated.
        """

        async def spawn(msg: Msg) -> None:
            if self._free_slots:
                self._free_slots -= 1
            else:
                await self._wait_for_slot()
            self._intake.taken(time.monotonic())
            self.metrics.in_flight.value += 1
            assert self._loop is not None
            key = self._task_serial = self._task_serial + 1
            task = start_task(self._loop, self._handled(handler, msg, key))
            if not task.done():  # (an eager Task of Python 3.12 may have finished already)
                self._tasks[key] = task

        return spawn

    async def _wait_for_slot(self) -> None:
        """Wait until a handler slot is handed to this request (first come, first served)."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._slot_waiters.append(waiter)
        self._intake.waiting(+1)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed over as it was cancelled: to the next one
            else:
                # Still queued, unless a release already skipped it (it was cancelled).
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(waiter)
            raise
        finally:
            self._intake.waiting(-1)

    def _release_slot(self) -> None:
        """A slot is free: to the first request waiting for one, if any."""
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free_slots += 1

    async def _handled(
        self, handler: Callable[[Msg], Coroutine[None, None, None]], msg: Msg, key: int
    ) -> None:
        """A request's Task (listed in ``_tasks`` under ``key``): ``handler(msg)``, then its
        slot back. In the Task's own ``finally`` rather than a done callback, which costs a
        callback scheduled on the loop per request. (A Task cancelled before its first step
        never gets here: the drain settles those, :meth:`_settle_unstarted`.)"""
        try:
            await handler(msg)
        except Exception:
            log.exception("request handling failed")
        finally:
            self._tasks.pop(key, None)
            # _request_done, inlined: this runs for every request.
            if self._slot_waiters:
                self._release_slot()
            else:
                self._free_slots += 1
            self.metrics.in_flight.value -= 1

    def _settle_unstarted(self) -> None:
        """Handler Tasks that are done but still listed were cancelled before their first
        step (their ``finally`` never ran): their slots back."""
        for key, task in list(self._tasks.items()):
            if task.done():
                del self._tasks[key]
                self._release_slot()
                self.metrics.in_flight.dec()

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        """Send ``command`` to the gateway that holds ``connection_id`` (CommandSink): it
        leaves at the end of this turn of the event loop, in this gateway's GatewayBatch,
        after everything queued for that gateway before it (see :meth:`_queue_ack`).

        Raises nats' ConnectionClosedError once NATS is closed, MaxPayloadError for a
        command that no NATS message can carry (as publishing it would have).
        """
        nc = self._nc
        assert nc is not None
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        entry = command_entry(command)
        if len(entry) > nc.max_payload:
            raise nats.errors.MaxPayloadError
        self._queue(ids.gateway_of(connection_id), entry)
        self.metrics.commands.inc()
        if self._outgoing_bytes >= nc.max_payload:
            # A handler that sends a lot: out now, and it waits while NATS' buffer is full,
            # as it did when each command was published at once.
            self._flush_outgoing()
            publishing = self._publishing
            if publishing is not None:
                await asyncio.wait((publishing,))  # not cancelled with the handler

    async def _publish_command(self, command: pb.GatewayCommand) -> None:
        await self.send_command(command.connection_ids[0], command)

    async def _connect(self, msg: Msg) -> None:
        try:
            request = envelopes.read_connect_request(msg.data)
        except InvalidEnvelope as exc:
            self._garbage("connect", msg, exc)
            if msg.reply:
                # The protocol's error answer: the upgrade is refused, not left to time out.
                await self._answer(msg, _BAD_CONNECT_REQUEST)
            return
        if not msg.reply:
            self._garbage("connect", msg, InvalidEnvelope("ConnectRequest", "no reply subject"))
            return
        gateway_id = ids.gateway_of(request.connection_id)  # read_connect_request checked it
        inbox = subjects.inbox_prefix(self.config.prefix, "gateway", ids.node_of(gateway_id))
        if not (subjects.sent_by(msg.subject, gateway_id) and msg.reply.startswith(f"{inbox}.")):
            self._impostor("connect request", request.connection_id, msg)
            return
        resolved = self.app.resolve(request.path)
        connect: ConnectRequest | None = None
        verified: Verified | None = None
        if resolved is not None and resolved[0].auth is not None:
            # Before anything of the app runs, and before a durable object is activated.
            # (A forwarded connect is verified again by its host: it trusts no one's word.)
            connect = ConnectRequest.from_envelope(request, resolved[1])
            refusal = None
            try:
                verified = authenticate(resolved[0].auth, connect)
            except Unauthorized as exc:
                refusal = refused(exc, self.metrics)
                decision = reject_decision(refusal.status, refusal.body, refusal.headers)
            except Exception:
                self.metrics.handler_errors.inc()
                log.exception("the authenticator of %s failed", resolved[0])
                decision = reject_decision(500, "Internal Server Error")
            if verified is None:
                self.metrics.connects.labels("reject").inc()
                await msg.respond(decision.SerializeToString())
                return
            connect = dataclasses.replace(connect, claims=verified.claims)
        if resolved is not None and resolved[0].object_class is not None:
            # The activation answers, or the host it was forwarded to.
            work = Work.for_connect(msg, request, resolved[1], verified)
            await self._to_activation(resolved, work)
            return
        decision = await self._decide(request, resolved, connect, verified)
        self.metrics.connects.labels(decision.WhichOneof("outcome")).inc()
        await self._answer(msg, decision.SerializeToString())

    async def _to_activation(self, resolved: Resolved, work: Work) -> None:
        """Hand ``work`` to its object's activation; return once this worker is done."""
        route, params = resolved
        cls = route.object_class
        if cls is None or self._activations is None:
            raise RuntimeError(f"{route} is not served by a durable object class")
        self._activations.submit(cls, params[route.object_param], work)
        await work.done

    async def _decide(
        self,
        envelope: pb.ConnectRequest,
        resolved: Resolved | None,
        request: ConnectRequest | None = None,
        verified: Verified | None = None,
    ) -> pb.ConnectDecision:
        """Run a function route's on_connect; ``request`` is the envelope's, when already
        made (with the claims ``verified`` by the route's authenticator)."""
        if resolved is None:
            return reject_decision(404, "Not found")
        route, params = resolved
        gate = OutputGate(f"{envelope.connection_id}:0")
        conn = Connection(
            envelope.connection_id,
            envelope.path,
            params,
            sink=self,
            env=self._env,
            connecting=True,
            gate=gate,
        )
        if request is None:
            request = ConnectRequest.from_envelope(envelope, params)
        current_gate.set(gate)
        try:
            outcome = connect_outcome(
                await connect_handler_result(
                    self._guarded(
                        route.connect_handler(conn, request) if route.connect_handler else None
                    ),
                    self.metrics,
                )
            )
            # The Accept carries what on_connect sent: only once its writes are durable.
            await gate.open()
            if isinstance(outcome, Reject):
                return reject_decision(outcome.status, outcome.body, outcome.headers)
            check_plain_accept(outcome)
            outcome = with_auth_subprotocol(outcome, verified)
            check_accept(outcome, request)
        except Exception:
            gate.abandon()
            self.metrics.handler_errors.inc()
            log.exception("on_connect failed for %s on %s", envelope.connection_id, route)
            return reject_decision(500, "Internal Server Error")
        finally:
            current_gate.set(None)
        return accept_decision(outcome, conn.end_connect())

    async def _guarded(self, call: Awaitable[object] | None) -> object:
        """Await a handler; a handler that cancelled itself has failed (as an exception),
        while a cancellation from outside (the worker shutting down) goes on."""
        if call is None:
            return None
        try:
            return await call
        except asyncio.CancelledError:
            if not self._cancelled_itself():
                raise
            raise HandlerCancelled("the handler was cancelled") from None

    def _cancelled_itself(self) -> bool:
        """In a handler's Task that met a CancelledError: whether the handler cancelled
        itself (it has then failed, and the cancellation is taken back: True), rather than
        being cancelled from outside (the worker shutting down: False, it goes on)."""
        task = asyncio.current_task()
        if self.phase is not ServicePhase.RUNNING or task is None or not task.cancelling():
            return False
        task.uncancel()
        return True

    async def _event(self, msg: Msg) -> None:
        """One connection event, in its request's Task (one coroutine per event: what is
        synchronous is done in plain calls).

        The event is checked (:meth:`_admit_event`: dropped unanswered if it fails); while
        it is handled, the sweep sends progress acks. A durable object's event goes to its
        activation, which acks it. A function route's handler (:func:`_handler_call`) runs
        here; then its settlement (:func:`settle`) decides what becomes of its output, and
        its final ack, with what it sent, is queued for its gateway. A handler that fails is
        logged and counted, and settled as failed; a failure after it (a close that is not
        best-effort, leaving the objects) propagates: the event is not acked, and the
        gateway sends it again.
        """
        admitted = self._admit_event(msg)
        if admitted is None:
            return
        event, event_kind, gateway_id, connection_id, sequence = admitted
        started = time.perf_counter()
        key = id(msg)
        ack_wait_ms = event.ack_wait_ms
        if ack_wait_ms:
            # Progress acks come from one sweep over all running handlers, not a timer each.
            interval_s = ack_wait_ms / 3000
            self._running[key] = (msg.reply, sequence, interval_s, started + interval_s)
        path = event.path
        resolved = self.app.resolve(path)
        try:
            if resolved is not None and resolved[0].object_class is not None:
                # Acked by the activation (here, or where it was forwarded).
                await self._to_activation(resolved, Work.for_event(msg, event, resolved[1]))
                return
            # Idempotency keys of this run's writes: the same for every delivery of the event.
            gate = OutputGate(connection_id, sequence)
            conn = Connection(
                connection_id,
                path,
                resolved[1] if resolved else _NO_PARAMS,
                sink=self,
                env=self._env,
                closed=event_kind is _CLOSED,
                sequence=sequence,
                redelivered=event.redelivered,
                gate=gate,
                loop=self._loop,
            )
            if resolved is None:
                # The app was redeployed without this route while the connection lived.
                outcome = HandlerOutcome.NO_ROUTE
            else:
                # The handler, then the wait until its writes are durable: here rather than
                # in coroutines of their own, one fewer each per event.
                current_connection.set(conn)
                current_gate.set(gate)
                try:
                    try:
                        call = _handler_call(resolved[0], event_kind, event, conn)
                        if call is not None:
                            await call
                    except asyncio.CancelledError:
                        if not self._cancelled_itself():
                            raise
                        raise HandlerCancelled("the handler was cancelled") from None
                    # What the handler sent leaves with the ack: only once its writes are
                    # durable. Most handlers write nothing: nothing to wait for (no await).
                    if gate.holds_writes:
                        if gate.closed:
                            self.metrics.gate_waits.inc()
                        await gate.open()
                except Exception:
                    outcome = self._handler_failed(connection_id, sequence)
                else:
                    outcome = _RETURNED
            settlement = settle(event_kind, outcome, closed=conn.closed)
            messages = None
            if settlement.release_output and settlement.close is None:
                # The common case: carry_out's, without a coroutine (None: wait for it).
                messages = conn.take_event_output()
            if messages is None:
                messages = await carry_out(settlement, conn, gate)
            ack = final_ack_entry(connection_id, sequence, messages)  # a GatewayBatch entry
            if settlement.leave_objects:
                # After the app's close handler: the connection leaves every object. A
                # failure propagates, so the event is not acked and is delivered again.
                await leave_all(self._state, connection_id)
        finally:
            self._running.pop(key, None)
            self.metrics.handler_seconds.observe(time.perf_counter() - started)
        self._queue(gateway_id, ack)

    def _admit_event(self, msg: Msg) -> tuple[pb.ConnectionEvent, EventKind, str, str, int] | None:
        """The event ``msg`` carries, its kind, the gateway that sent it, its connection id
        and its sequence (each field read once: every read of a protobuf field makes a new
        Python object); counted. None, logged and counted, for what is dropped unanswered:
        garbage (the protocol has no error ack, and a retry would have the gateway send the
        same bytes again at once: a real gateway resends after its ack wait), and an event
        whose subject, connection id and reply subject do not all name one gateway.
        """
        try:
            event, gateway_id = envelopes.read_event_and_gateway(msg.data)
            if not msg.reply:
                raise InvalidEnvelope("ConnectionEvent", "no reply subject")
        except InvalidEnvelope as exc:
            self._garbage("events", msg, exc)
            return None
        connection_id = event.connection_id
        sequence = event.sequence
        # subjects.sent_by and subjects.ack_subject, their gateway's parts made once.
        subject_end, reply_start = subjects.event_origin(self.config.prefix, gateway_id)
        reply = f"{reply_start}{connection_id}.{sequence}"
        if type(msg) is BatchedEvent:
            # Its reply is the batch's (subjects.batch_reply_subject), of the same gateway;
            # from here on, the event's own.
            from_gateway = msg.reply.startswith(f"{reply_start}{subjects.BATCH_REPLY_TOKEN}.")
        else:
            from_gateway = msg.reply == reply
        if not (from_gateway and msg.subject.endswith(subject_end)):
            self._impostor("event", connection_id, msg)
            return None
        msg.reply = reply
        kind = EVENT_KINDS[event.WhichOneof("kind") or ""]  # read_event made sure it is one
        metrics = self.metrics
        (metrics.message_events if kind is _MESSAGE else metrics.closed_events).inc()
        if event.redelivered:
            metrics.redelivered.inc()
        return event, kind, gateway_id, connection_id, sequence

    def _handler_failed(self, connection_id: str, sequence: int) -> HandlerOutcome:
        """In ``except``: a handler (or a write it made) failed. Logged and counted."""
        self.metrics.handler_errors.inc()
        log.exception("handler failed for %s#%d", connection_id, sequence)
        return HandlerOutcome.FAILED

    def _impostor(self, what: str, connection_id: str, msg: Msg) -> None:
        self.metrics.impostors.inc()
        log.warning(
            "dropped a %s for %s that came on %s with reply subject %s",
            what,
            connection_id,
            msg.subject[:200],
            msg.reply[:200],
        )

    def _garbage(self, subject: str, msg: Msg, exc: InvalidEnvelope) -> None:
        """Count and log a message that is not its subject's envelope (``subject``: the
        kind of subject, the metric's label)."""
        self.metrics.garbage.labels(subject).inc()
        log.warning("dropped a message on %s (%d bytes): %s", msg.subject, len(msg.data), exc)

    async def _http_request(self, msg: Msg) -> None:
        """A plain HTTP request to a route (no upgrade): its request handler's response, or
        ``400 Expected websocket`` for a route without one (and for a path no route
        serves, as the gateway answered before there were request handlers). A route's
        authenticator checks the request first (401). A durable object's route answers in
        the object's activation."""
        try:
            request = envelopes.read_http_request(msg.data)
            if not msg.reply:
                raise InvalidEnvelope("HttpRequest", "no reply subject")
        except InvalidEnvelope as exc:
            self._garbage("request", msg, exc)
            return
        resolved = self.app.resolve(request.path)
        if resolved is None or resolved[0].request_handler is None:
            await self._answer(msg, _EXPECTED_WEBSOCKET)
            return
        route, params = resolved
        verified: Verified | None = None
        if route.auth is not None:
            try:
                verified = authenticate(route.auth, as_connect_request(request, params))
            except Unauthorized as exc:
                reject = refused(exc, self.metrics)
                answer = plain_response(reject.status, reject.body, reject.headers)
                await self._answer(msg, answer.SerializeToString())
                return
            except Exception:
                self.metrics.handler_errors.inc()
                log.exception("the authenticator of %s failed", route)
                await self._answer(msg, _INTERNAL_ERROR)
                return
        if route.object_class is not None:
            work = Work.for_request(msg, request, params)
            work.verified = verified
            await self._to_activation(resolved, work)
            return
        handler = route.request_handler
        assert handler is not None  # checked above
        claims = verified.claims if verified is not None else None
        gate = OutputGate(f"{REQUEST_KEY_PREFIX}{request.request_id}")
        current_gate.set(gate)
        try:
            async with asyncio.timeout(self.config.turn_timeout_s):
                response = await handler(HttpRequest.from_envelope(request, params, claims))
                if not isinstance(response, Response):
                    raise InvalidResponse(
                        f"on_request returned {type(response).__name__}, not a Response"
                    )
                # The response leaves only once what the handler wrote is durable.
                await gate.open()
            answer = response.to_envelope()
            assert self._nc is not None
            if answer.ByteSize() > payload_budget(self._nc):
                raise InvalidResponse(f"a response of {answer.ByteSize()} bytes is over NATS'")
        except TimeoutError:
            gate.abandon()
            log.warning(
                "the request handler of %s ran past %g s", route, self.config.turn_timeout_s
            )
            answer = plain_response(504, "The app did not answer in time")
        except Exception:
            gate.abandon()
            self.metrics.handler_errors.inc()
            log.exception("the request handler of %s failed", route)
            answer = plain_response(500, "Internal Server Error")
        await self._answer(msg, answer.SerializeToString())

    async def _answer(self, msg: Msg, payload: bytes) -> None:
        assert self._nc is not None
        try:
            await self._nc.publish(msg.reply, payload)
        except nats.errors.Error as exc:
            log.warning("an answer on %s was lost: %r", msg.subject, exc)

    def _queue_ack(self, gateway_id: str, ack: pb.EventAck) -> None:
        """Send a final ack to its gateway, after everything queued for it before (the
        commands the handler sent)."""
        self._queue(gateway_id, ack_entry(ack))

    def _queue(self, gateway_id: str, entry: bytes) -> None:
        """Final acks and commands leave in one GatewayBatch per gateway at the end of this
        turn of the event loop, on the gateway's command subject, in the order queued.
        Under load many handlers finish in one turn, and one NATS message for all of them
        costs both sides far less than one each; and the gateway, which reads that subject
        with one subscription in order, sees a handler's commands before its ack (NATS
        keeps one publisher's order, and that is all the order relied on)."""
        writer = self._outgoing.get(gateway_id)
        if writer is None:
            assert self._nc is not None
            writer = self._outgoing[gateway_id] = BatchWriter(self._nc.max_payload)
            if len(self._outgoing) == 1:
                assert self._loop is not None
                self._loop.call_soon(self._flush_outgoing)
        writer.add(entry)
        self._outgoing_bytes += len(entry)

    def _flush_outgoing(self) -> None:
        outgoing, self._outgoing = self._outgoing, {}
        self._outgoing_bytes = 0
        if not outgoing:
            return  # flushed already (a large send)
        prefix = self.config.prefix
        batches = [
            (subjects.gateway_subject(prefix, gateway_id), payload)
            for gateway_id, writer in outgoing.items()
            for payload in writer.payloads()
        ]
        assert self._loop is not None
        # nats-py's publish only appends to its buffer unless that is full: then it waits,
        # and the next turn's batches wait for these, to keep each gateway's order.
        task = start_eagerly(self._loop, self._publish_quietly(batches, self._publishing))
        write_now(self._nc)  # this turn's batches leave now, not in the flusher's next step
        if task is not None:  # asyncio holds tasks weakly: keep it until it is done
            self._publishing = task
            self._background.add(task)
            task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if self._publishing is task:
            self._publishing = None

    async def _publish_quietly(
        self, batches: list[tuple[str, bytes]], before: asyncio.Task[None] | None
    ) -> None:
        assert self._nc is not None
        if before is not None and not before.done():
            await asyncio.wait((before,))
        for subject, payload in batches:
            try:
                await self._nc.publish(subject, payload)
            except nats.errors.Error as exc:
                # The gateway will resend the events; their handlers may run again.
                log.warning("acks and commands to %s lost: %r", subject, exc)

    async def _sweep(self) -> None:
        """Every PROGRESS_SWEEP_S, a progress ack for each request that has waited long
        enough; now and then, a look at the intake."""
        assert self._nc is not None
        intake_every = min(INTAKE_CHECK_S, self.config.intake_stall_s / 4)
        next_intake_check = time.monotonic() + intake_every
        while True:
            await asyncio.sleep(PROGRESS_SWEEP_S)
            now = time.perf_counter()
            running = self._running
            for key, entry in list(running.items()):
                reply, sequence, interval_s, due = entry
                # Not if the event was settled while an earlier progress ack was published.
                if due <= now and running.get(key) is entry:
                    running[key] = (reply, sequence, interval_s, now + interval_s)
                    progress = pb.EventAck(sequence=sequence, in_progress=True)
                    with contextlib.suppress(nats.errors.Error):
                        await self._nc.publish(reply, progress.SerializeToString())
            if time.monotonic() >= next_intake_check:
                next_intake_check = time.monotonic() + intake_every
                self._check_intake()

    def _check_intake(self) -> None:
        if self.phase is not ServicePhase.RUNNING:
            return  # draining: the subscriptions end on purpose
        reason = self._intake.check(self._subscriptions, time.monotonic())
        if reason != self._intake_stopped:
            if reason is not None:
                log.error("worker %s takes no requests: %s; /readyz is 503", self.worker_id, reason)
            else:
                log.warning("worker %s takes requests again; /readyz is 200", self.worker_id)
            self._intake_stopped = reason
            self.metrics.intake_stalled.set(0 if reason is None else 1)


def _handler_call(
    route: Route, kind: EventKind, event: pb.ConnectionEvent, conn: Connection
) -> Awaitable[None] | None:
    """The call of ``route``'s handler for ``event`` of ``kind`` on ``conn`` (not awaited
    yet), or None when the route has no handler for that kind."""
    if kind is _MESSAGE:
        on_message = route.message_handler
        if on_message is not None:
            data = event.message
            return on_message(conn, data.text if data.WhichOneof("data") == "text" else data.binary)
    elif kind is _CLOSED:
        on_close = route.close_handler
        if on_close is not None:
            closed = event.closed
            return on_close(conn, closed.code, closed.reason)
    return None


async def carry_out(settlement: Settlement, conn: Connection, gate: OutputGate) -> list[bytes]:
    """Do what ``settlement`` says to the output of ``conn``'s handler run (gated by
    ``gate``): drop it or let it go, send the close; returns the frames still buffered, for
    the final ack (serialized). Raises what a close that is not best-effort raised."""
    if not settlement.release_output:
        # Its output was gated by what failed (or by writes still running): dropped.
        gate.abandon()
        conn.abandon_output()
    close = settlement.close
    if close is not None:
        if close.best_effort:
            with contextlib.suppress(Exception):
                await conn.close(close.code, close.reason)
        else:
            await conn.close(close.code, close.reason)
    return await conn.end_event()

"""The scenarios: steady mixed load (:mod:`tests.load.traffic`) while faults are injected
into the cluster, and the checks of what the clients saw.

Every scenario holds when, from the clients' side:

- nothing acknowledged was lost, nothing arrived twice, nothing out of order, counters
  exact (``lost``, ``duplicates`` and ``reordered`` are 0);
- every send found a connection (a client reconnecting waits up to 30 s for one);
- no socket dropped, except in (d) where the stopped gateway's clients get 1001 (and only
  1001) and every one of them reconnects to the other gateway;
- the cluster recovered within the scenario's stated bound: ``recovery_s`` is how long
  after a fault (or a restart) answers were still slower than the recovery threshold
  (``max(RECOVERY_FLOOR_S, 5 x the p99 before the first fault)``) or errors were seen;
- (g) every role's RSS and open fds stayed flat over the second half of the churn.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.load.cluster import Cluster, Node
from tests.load.traffic import Shape, Timeline, Traffic, Verdict

#: Answers slower than this (or 5 x the steady p99, whichever is more) mean "not recovered".
RECOVERY_FLOOR_S = 0.5

Faults = Callable[[Cluster, Timeline, float], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    letter: str
    name: str
    description: str
    faults: Faults
    #: The stated bound on ``recovery_s``.
    recovery_bound_s: float
    #: (d): the stopped gateway's clients are dropped with 1001 and reconnect.
    drops_gateway_clients: bool = False


async def _until(timeline: Timeline, at_s: float) -> None:
    """Wait until ``at_s`` on the run's timeline (the load goes on meanwhile)."""
    await asyncio.sleep(max(0.0, at_s - timeline.now()))


async def _do(timeline: Timeline, label: str, action: Callable[[], object]) -> None:
    """Run a blocking Docker operation off the event loop, marking when it was issued."""
    timeline.fault(label)
    await asyncio.to_thread(action)


async def steady(cluster: Cluster, timeline: Timeline, duration_s: float) -> None:
    await _until(timeline, duration_s)


def down_then_up(
    pick: Callable[[Cluster], Node],
    verb: str,
    act: Callable[[Node], None],
    *,
    at: float,
    back_at: float,
) -> Faults:
    """A fault: at ``at`` of the run, ``act`` on the node ``pick`` chooses (marked
    ``"<verb> <node>"``) and wait for its process to end; at ``back_at``, start the same
    container again (marked ``"<node> started"``)."""

    async def faults(cluster: Cluster, timeline: Timeline, duration_s: float) -> None:
        victim = pick(cluster)
        await _until(timeline, duration_s * at)
        await _do(timeline, f"{verb} {victim.name}", lambda: act(victim))
        await asyncio.to_thread(victim.wait_exited)
        await _until(timeline, duration_s * back_at)
        await _do(timeline, f"{victim.name} started", victim.start)
        await _until(timeline, duration_s)

    return faults


def _kill(node: Node) -> None:
    node.kill("SIGKILL")


def _terminate(node: Node) -> None:
    node.kill("SIGTERM")


def _stop(node: Node) -> None:
    node.stop(timeout_s=10)


# (b) restarts the worker late: the recovery measured is the cluster's own (leases
# expiring, events redelivered to the other workers), not the restart's.
kill_worker = down_then_up(lambda c: c.workers[0], "kill -9", _kill, at=1 / 4, back_at=3 / 4)
restart_nats = down_then_up(lambda c: c.nats[1], "stop", _stop, at=1 / 3, back_at=2 / 3)
stop_gateway = down_then_up(lambda c: c.gateways[0], "SIGTERM", _terminate, at=1 / 4, back_at=3 / 4)
kill_state_replica = down_then_up(lambda c: c.state[1], "kill -9", _kill, at=1 / 3, back_at=2 / 3)


async def rolling_restart(cluster: Cluster, timeline: Timeline, duration_s: float) -> None:
    """Each worker in turn: SIGTERM (it drains), start again, wait until it is ready: a
    Deployment's rolling update with maxUnavailable 1."""
    await _until(timeline, duration_s / 6)
    for worker in cluster.workers:
        await _do(timeline, f"restart {worker.name}", lambda w=worker: _restart(w))
    await _until(timeline, duration_s)


def _restart(node: Node) -> None:
    node.stop(timeout_s=30)
    node.start()


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("a", "steady", "steady mixed load, no fault", steady, 0.0),
        Scenario("b", "worker-kill", "kill -9 of a worker, restarted later", kill_worker, 20.0),
        Scenario("c", "nats-restart", "stop and restart one NATS server", restart_nats, 15.0),
        Scenario(
            "d",
            "gateway-stop",
            "SIGTERM of a gateway: its clients move to the other",
            stop_gateway,
            15.0,
            drops_gateway_clients=True,
        ),
        Scenario(
            "e",
            "state-kill",
            "kill -9 of a state replica, then restart it",
            kill_state_replica,
            20.0,
        ),
        Scenario(
            "f",
            "rolling-restart",
            "rolling restart of every worker, one at a time",
            rolling_restart,
            10.0,
        ),
    )
}


# --- the figures -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def recovery_s(timeline: Timeline, end_s: float) -> tuple[float, float]:
    """(the time to recover, the threshold used). After each fault (up to the next one),
    the disturbance lasts until the last answer to a message sent in that window that took
    longer than the threshold, or the last error seen in it; the time to recover is the
    longest such disturbance, from its fault."""
    if not timeline.faults:
        return 0.0, 0.0
    first = timeline.faults[0][0]
    before = [latency for sent, latency in timeline.answers if sent < first]
    threshold = max(RECOVERY_FLOOR_S, 5 * percentile(before, 0.99))
    worst = 0.0
    marks = [at for at, _ in timeline.faults] + [end_s]
    for start, stop in itertools.pairwise(marks):
        disturbed = [
            sent + latency
            for sent, latency in timeline.answers
            if latency > threshold and start - threshold <= sent < stop
        ] + [at for at in timeline.error_times if start <= at < stop]
        if disturbed:
            worst = max(worst, max(disturbed) - start)
    return worst, threshold


@dataclass
class Result:
    """One scenario's figures and checks; ``as_dict()`` is its JSON."""

    scenario: Scenario
    duration_s: float
    shape: Shape
    verdict: Verdict
    failures: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        total = self.verdict.total
        timeline = self.verdict.timeline
        latencies = [latency for _, latency in timeline.answers]
        received = sum(timeline.received.values())
        recovery, threshold = recovery_s(timeline, self.duration_s)
        seconds = range(int(self.duration_s) + 1)
        return {
            "name": self.scenario.name,
            "letter": self.scenario.letter,
            "description": self.scenario.description,
            "ok": self.ok,
            "failures": self.failures,
            "duration_s": round(self.duration_s, 1),
            "connections": self.shape.connections,
            "msgs_per_s": round(received / self.duration_s, 1) if self.duration_s else 0.0,
            "answered": total.answered,
            "p50_ms": round(1000 * percentile(latencies, 0.50), 2),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
            "errors": sum(timeline.errors.values()),
            "lost": total.lost,
            "duplicates": total.duplicates,
            "reordered": total.reordered,
            "in_doubt": total.in_doubt,
            "dropped_sockets": total.dropped_sockets,
            "reconnects": total.dropped_sockets - _ended(total.problems),
            "drop_codes": sorted(set(total.drop_codes)),
            "recovery_s": round(recovery, 2),
            "recovery_bound_s": self.scenario.recovery_bound_s,
            "recovery_threshold_ms": round(1000 * threshold, 1),
            "faults": [[round(at, 2), label] for at, label in timeline.faults],
            "timeline": {
                "second": list(seconds),
                "received": [timeline.received.get(s, 0) for s in seconds],
                "p99_ms": [
                    round(1000 * percentile(timeline.latencies.get(s, []), 0.99), 2)
                    for s in seconds
                ],
                "errors": [timeline.errors.get(s, 0) for s in seconds],
            },
            "problems": total.problems[:20],
            **self.extra,
        }


def cpu_share(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Per node: the share of one core it used over ``seconds`` (0.5: half a core), for the
    capacity model."""
    shares = {}
    for node, used in after.items():
        start = before.get(node, 0.0)
        if start > used:  # restarted meanwhile: its count began again
            start = 0.0
        shares[node] = round((used - start) / seconds, 3)
    return shares


def _ended(problems: list[str]) -> int:
    return sum(1 for p in problems if " ended with " in p)


def check(result: Result, gateway_clients: int) -> None:
    """Fill ``result.failures`` with every assertion of the module's docstring that failed."""
    figures = result.as_dict()
    failures = result.failures
    for name in ("lost", "duplicates", "reordered"):
        if figures[name]:
            failures.append(f"{name}: {figures[name]}")
    if figures["answered"] == 0:
        failures.append("nothing was answered")
    total = result.verdict.total
    if total.send_failures:  # a client found no connection to send on, even after waiting
        failures.append(f"send failures: {total.send_failures}")
    if result.scenario.drops_gateway_clients:
        if set(total.drop_codes) - {1001}:
            failures.append(f"dropped with {sorted(set(total.drop_codes))}, expected 1001 only")
        if total.dropped_sockets != gateway_clients:
            failures.append(
                f"{total.dropped_sockets} sockets dropped, expected the stopped gateway's "
                f"{gateway_clients}"
            )
        if _ended(total.problems):
            failures.append(f"{_ended(total.problems)} clients did not reconnect")
    elif total.dropped_sockets:
        failures.append(f"dropped sockets: {total.dropped_sockets}")
    if figures["recovery_s"] > result.scenario.recovery_bound_s:
        failures.append(
            f"recovered in {figures['recovery_s']} s, bound {result.scenario.recovery_bound_s} s"
        )


async def run_scenario(
    cluster: Cluster, scenario: Scenario, duration_s: float, shape: Shape
) -> Result:
    """Connect the clients, load for ``duration_s`` while the faults run, settle, check."""
    run = f"{scenario.name}-{uuid.uuid4().hex[:6]}"
    urls = [(lambda path, i=i: cluster.gateway_url(i, path)) for i in range(len(cluster.gateways))]
    traffic = Traffic(urls, shape, run)
    await traffic.connect()
    gateway_clients = sum(1 for p in traffic.pacers if p.client.url.startswith(urls[0]("")))
    cpu_before = await asyncio.to_thread(cluster.cpu_seconds)
    traffic.timeline.started = started = time.monotonic()
    traffic.start()
    try:
        await scenario.faults(cluster, traffic.timeline, duration_s)
    finally:
        await traffic.stop()
    cpu_after = await asyncio.to_thread(cluster.cpu_seconds)
    elapsed = time.monotonic() - started
    counts = await traffic.final_counts()
    result = Result(scenario, duration_s, shape, traffic.verdict(counts))
    result.extra["cpu_share"] = cpu_share(cpu_before, cpu_after, elapsed)
    check(result, gateway_clients)
    await asyncio.to_thread(ensure_running, cluster)
    return result


def ensure_running(cluster: Cluster) -> None:
    """Start whatever a scenario left stopped, so the next one finds the whole cluster."""
    for node in cluster.nodes:
        node.docker.reload()
        if node.docker.status != "running":
            node.start()


# --- (g) the churn soak ------------------------------------------------------------------


@dataclass(frozen=True)
class ChurnBounds:
    """How much a process may grow over the second half of the churn.

    PostgreSQL is reported, not bounded: its RSS (summed over its backends) grows as they
    touch more of the shared buffer cache, up to ``shared_buffers`` (128 MB here), which
    is the cache filling, not a leak; its backends come and go with the replicas' pools.
    """

    rss_bytes: int = 4 * 1024 * 1024
    fds: int = 8
    unbounded: frozenset[str] = frozenset({"postgres"})


CHURN = Scenario("g", "churn", "short connections (connect, one message, close)", steady, 0.0)


async def _churn(
    cluster: Cluster, connections: int, concurrency: int, run: str, samples: list[dict[str, Any]]
) -> tuple[dict[str, int], list[str]]:
    """``connections`` short connections: three echo for every increment of a counter (a
    durable object's connection costs the cluster about three times an echo's: its
    connect, message and close are turns, each committed). The role usage is sampled
    40 times along the way. Returns each counter's answered count, and what went wrong
    with each connection that failed."""
    answered: dict[str, int] = {}
    done = 0
    step = max(1, connections // 40)
    indexes = iter(range(connections))

    failures: list[str] = []

    async def one(session: aiohttp.ClientSession, i: int) -> str | None:
        """None when the connection got its answer; else what went wrong."""
        gateway = i % len(cluster.gateways)
        if i % 4 == 3:
            counter = f"{run}-churn-{i % 50}"
            path, text, expected = f"/counter/{counter}", f"inc {i}", f"{i} "
        else:
            counter, path, text, expected = "", "/echo", f"churn:{i}", f"churn:{i}"
        try:
            async with session.ws_connect(cluster.gateway_url(gateway, path)) as ws:
                await ws.send_str(text)
                reply = await ws.receive(timeout=30)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{path}: {type(exc).__name__}: {exc}"
        if reply.type is not aiohttp.WSMsgType.TEXT or not reply.data.startswith(expected):
            return f"{path}: answered {reply.type.name} {str(reply.data)[:80]!r}"
        if counter:
            answered[counter] = answered.get(counter, 0) + 1
        return None

    async def churner(session: aiohttp.ClientSession) -> None:
        nonlocal done
        for i in indexes:  # shared: each index is taken by one churner
            failure = await one(session, i)
            if failure is not None:
                failures.append(failure)
            done += 1
            if done % step == 0:
                usage = await asyncio.to_thread(cluster.usage)
                samples.append({"connections": done, "usage": usage})

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(churner(session) for _ in range(concurrency)))
    return answered, failures


async def run_churn(
    cluster: Cluster,
    connections: int,
    shape: Shape,
    *,
    concurrency: int = 50,
    bounds: ChurnBounds = ChurnBounds(),
) -> Result:
    """(g): the churn, under the steady mixed load, and the usage of every role."""
    run = f"churn-{uuid.uuid4().hex[:6]}"
    urls = [(lambda path, i=i: cluster.gateway_url(i, path)) for i in range(len(cluster.gateways))]
    traffic = Traffic(urls, shape, run)
    await traffic.connect()
    traffic.timeline.started = time.monotonic()
    traffic.start()
    samples: list[dict[str, Any]] = [{"connections": 0, "usage": cluster.usage()}]
    started = time.monotonic()
    try:
        answered, churn_failures = await _churn(cluster, connections, concurrency, run, samples)
    finally:
        await traffic.stop()
    duration = time.monotonic() - started
    counts = await traffic.final_counts()
    result = Result(CHURN, duration, shape, traffic.verdict(counts))
    check(result, 0)
    if churn_failures:
        result.failures.append(
            f"{len(churn_failures)} churned connections failed, e.g. {churn_failures[:3]}"
        )
    finals = await _counter_values(cluster, list(answered))
    for counter, expected in answered.items():
        if finals[counter] != expected:
            result.failures.append(f"{counter}: {finals[counter]} != {expected} answered")
    growth = _growth(samples)
    for node, (rss, fds) in growth.items():
        if node in bounds.unbounded:
            continue
        if rss > bounds.rss_bytes or fds > bounds.fds:
            result.failures.append(
                f"{node} grew {rss / 2**20:.2f} MiB and {fds} fds over the second half"
            )
    result.extra = {
        "churned": connections,
        "churn_per_s": round(connections / duration, 1),
        "growth_second_half": {
            node: {"rss_mib": round(rss / 2**20, 2), "fds": fds}
            for node, (rss, fds) in growth.items()
        },
        "bounds": {"rss_mib": bounds.rss_bytes / 2**20, "fds": bounds.fds},
        "usage": samples,
    }
    return result


def _growth(samples: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per node: (RSS, fds) at the end minus at the middle of the churn."""
    middle = samples[len(samples) // 2]["usage"]
    end = samples[-1]["usage"]
    return {
        node: (end[node][0] - middle[node][0], end[node][1] - middle[node][1])
        for node in end
        if node in middle
    }


async def _counter_values(cluster: Cluster, counters: list[str]) -> dict[str, int]:
    values = {}
    async with aiohttp.ClientSession() as session:
        for counter in counters:
            async with session.ws_connect(cluster.gateway_url(0, f"/counter/{counter}")) as ws:
                await ws.send_str("get final")
                reply = await ws.receive(timeout=30)
                values[counter] = int(str(reply.data).split(" ")[1])
    return values

"""Steady mixed load from the host against every gateway, and what the clients saw.

Three kinds of client, each a :class:`wsgate.client.Client` with the default reconnect
policy and the other gateways as ``fallback_urls`` (clients are spread over the gateways):

- **echo**: sends ``ID:SEQ`` at a steady pace, up to ``window`` unanswered, and expects each
  back;
- **chat members**: every member of a room posts ``SEQ`` at a steady pace; the room
  broadcasts each post to all its members, the poster included (that copy is the poster's
  answer). Members all join before anyone posts;
- **counter clients**: several per counter, each sending ``inc RID`` and expecting
  ``RID VALUE``.

What counts (:class:`Verdict`):

- **answered**: a message whose answer came back (the echo, the poster's own copy of its
  post, the counter's reply): acknowledged; its latency goes to the timeline;
- **lost**: acknowledged and then missing: a post some member never received (live or in
  the history replayed after a reconnect), or an increment missing from the counter's final
  value; also a message sent on a connection that never dropped and never answered;
- **in doubt**: sent on a connection that then dropped and never answered: the client
  cannot know whether it arrived (at most once across reconnects); it is excused, and a
  counter's final value may include it or not;
- **duplicates**: an answer or a live broadcast received twice, or two increments given
  the same value (a lost update);
- **reordered**: per connection, an answer older than one already received;
- **dropped sockets**: connections the server ended (each reconnect counts one);
- **errors**: dropped sockets, sends that found no connection, and unanswered messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wsgate.client import Client, ClientError, ReconnectPolicy

#: How the clients reconnect: the library's defaults, a little faster to start.
RECONNECT = ReconnectPolicy(initial_delay=0.2, max_delay=5.0, send_timeout=30.0)


@dataclass(frozen=True)
class Shape:
    """How much load: connections of each kind and their pace (seconds between sends)."""

    echo_clients: int = 100
    echo_interval_s: float = 0.5
    window: int = 4
    rooms: int = 6
    members: int = 4
    post_interval_s: float = 1.0
    counters: int = 10
    counter_clients: int = 3
    increment_interval_s: float = 0.5
    #: A message unanswered this long after the load stops counts as unanswered.
    settle_timeout_s: float = 30.0

    @property
    def connections(self) -> int:
        return self.echo_clients + self.rooms * self.members + self.counters * self.counter_clients


class Timeline:
    """Per-second counts of what the clients saw, and the faults, from ``started``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.received: defaultdict[int, int] = defaultdict(int)
        self.errors: defaultdict[int, int] = defaultdict(int)
        self.latencies: defaultdict[int, list[float]] = defaultdict(list)
        #: (sent at, latency), both in seconds from the start: for the time to recover.
        self.answers: list[tuple[float, float]] = []
        self.error_times: list[float] = []
        self.faults: list[tuple[float, str]] = []

    def now(self) -> float:
        return self.clock() - self.started

    def receive(self) -> None:
        self.received[int(self.now())] += 1

    def answer(self, sent_at: float, latency: float) -> None:
        self.latencies[int(sent_at + latency)].append(latency)
        self.answers.append((sent_at, latency))

    def error(self) -> None:
        at = self.now()
        self.errors[int(at)] += 1
        self.error_times.append(at)

    def fault(self, label: str) -> None:
        self.faults.append((self.now(), label))


@dataclass
class Tally:
    """What one kind of client counted."""

    sent: int = 0
    answered: int = 0
    lost: int = 0
    in_doubt: int = 0
    duplicates: int = 0
    reordered: int = 0
    dropped_sockets: int = 0
    send_failures: int = 0
    drop_codes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for name in ("sent", "answered", "lost", "in_doubt", "duplicates", "reordered",
                     "dropped_sockets", "send_failures"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.drop_codes += other.drop_codes
        self.problems += other.problems[: max(0, 20 - len(self.problems))]


class _Pacer:
    """A connection's sender and receiver bookkeeping, shared by the three kinds."""

    def __init__(self, name: str, client: Client, timeline: Timeline, window: int) -> None:
        self.name = name
        self.client = client
        self.timeline = timeline
        self.window = asyncio.Semaphore(window)
        #: Unanswered: request key -> sent at (seconds on the timeline); insertion ordered.
        self.outstanding: dict[str, float] = {}
        self.in_doubt: set[str] = set()
        self.tally = Tally()
        self.settled = asyncio.Event()
        self.settled.set()
        self._last_drops = 0

    def note_drops(self) -> None:
        """Requests unanswered when a connection dropped are in doubt from then on."""
        drops = self.client.drops
        if len(drops) > self._last_drops:
            self.in_doubt.update(self.outstanding)
            self._last_drops = len(drops)

    async def send(self, key: str, text: str) -> None:
        """Send ``text``, awaited as ``key``, once fewer than ``window`` are unanswered."""
        await self.window.acquire()
        self.note_drops()
        self.outstanding[key] = self.timeline.now()
        self.settled.clear()
        self.tally.sent += 1
        try:
            await self.client.send(text)
        except ClientError as exc:
            # Not handed to any connection: nothing to await, and the window stays open.
            self.tally.send_failures += 1
            self.tally.problems.append(f"{self.name}: send failed: {exc}")
            self.timeline.error()
            del self.outstanding[key]
            self.window.release()
            if not self.outstanding:
                self.settled.set()

    def answered(self, key: str) -> bool:
        """Record the answer to ``key``; False when nothing awaited it (a duplicate)."""
        self.timeline.receive()
        sent_at = self.outstanding.pop(key, None)
        if sent_at is None:
            self.tally.duplicates += 1
            self.tally.problems.append(f"{self.name}: answer to {key} again")
            return False
        self.timeline.answer(sent_at, self.timeline.now() - sent_at)
        self.tally.answered += 1
        self.in_doubt.discard(key)
        self.window.release()
        if not self.outstanding:
            self.settled.set()
        return True

    def finish(self) -> None:
        """After the load: the unanswered are lost unless in doubt; count the drops."""
        self.note_drops()
        for key in self.outstanding:
            if key in self.in_doubt:
                self.tally.in_doubt += 1
            else:
                self.tally.lost += 1
                self.tally.problems.append(f"{self.name}: {key} never answered")
                self.timeline.error()
        drops = self.client.drops
        self.tally.dropped_sockets += len(drops)
        self.tally.drop_codes += [code for code, _ in drops]
        if self.client.closed:  # ended by the server for good, not by our close()
            self.tally.dropped_sockets += 1
            self.tally.drop_codes.append(self.client.close_code or 0)
            self.tally.problems.append(f"{self.name}: ended with {self.client.close_code}")


class Traffic:
    """The clients of one run: ``connect()``, ``start()``, then ``stop()`` and ``verdict()``."""

    def __init__(self, urls: Sequence[Callable[[str], str]], shape: Shape, run: str) -> None:
        """``urls[i](path)`` is gateway i's ws:// URL for ``path``; ``run`` makes this
        run's object names unique."""
        self.urls = urls
        self.shape = shape
        self.run = run
        self.timeline = Timeline()
        self.echo: list[_Pacer] = []
        self.members: dict[str, list[tuple[str, _Pacer]]] = {}
        self.counters: dict[str, list[_Pacer]] = {}
        #: Per member: posts received live (poster, seq) in order, and from replays.
        self._live: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self._replayed: dict[str, set[tuple[str, int]]] = defaultdict(set)
        #: Per counter: every value an increment was answered with.
        self._values: dict[str, list[int]] = defaultdict(list)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._arrival = asyncio.Event()  # a live post arrived somewhere
        self._gateway = itertools.count()

    # --- connecting ---

    async def _client(self, path: str) -> Client:
        first = next(self._gateway) % len(self.urls)
        order = [self.urls[(first + i) % len(self.urls)](path) for i in range(len(self.urls))]
        client = Client(order[0], fallback_urls=order[1:], reconnect=RECONNECT, max_queue=4096)
        await client.connect()
        return client

    async def connect(self) -> None:
        """Open every connection (members join their rooms before anyone posts)."""
        shape = self.shape
        echo_clients = await asyncio.gather(
            *(self._client("/echo") for _ in range(shape.echo_clients))
        )
        self.echo = [
            _Pacer(f"echo-{i}", c, self.timeline, shape.window) for i, c in enumerate(echo_clients)
        ]
        for r in range(shape.rooms):
            room = f"{self.run}-room-{r}"
            names = [f"m{m}" for m in range(shape.members)]
            clients = await asyncio.gather(
                *(self._client(f"/chat/{room}?name={name}") for name in names)
            )
            self.members[room] = [
                (name, _Pacer(f"{room}/{name}", c, self.timeline, shape.window))
                for name, c in zip(names, clients, strict=True)
            ]
        for k in range(shape.counters):
            counter = f"{self.run}-counter-{k}"
            clients = await asyncio.gather(
                *(self._client(f"/counter/{counter}") for _ in range(shape.counter_clients))
            )
            self.counters[counter] = [
                _Pacer(f"{counter}/{i}", c, self.timeline, shape.window)
                for i, c in enumerate(clients)
            ]
        self._start_readers()

    def _start_readers(self) -> None:
        for pacer in self.echo:
            self._spawn(self._read_echo(pacer))
        for room, members in self.members.items():
            for name, pacer in members:
                self._spawn(self._read_room(room, name, pacer))
        for counter, pacers in self.counters.items():
            for pacer in pacers:
                self._spawn(self._read_counter(counter, pacer))

    def _spawn(self, coro: object) -> None:
        self._tasks.append(asyncio.create_task(coro))  # type: ignore[arg-type]

    @property
    def pacers(self) -> list[_Pacer]:
        rooms = [p for members in self.members.values() for _, p in members]
        counters = [p for pacers in self.counters.values() for p in pacers]
        return [*self.echo, *rooms, *counters]

    # --- sending ---

    def start(self) -> None:
        """Every connection starts sending at its pace (first sends spread over a period)."""
        shape = self.shape
        for i, pacer in enumerate(self.echo):
            self._spawn(self._send_echo(pacer, i, shape.echo_interval_s))
        for members in self.members.values():
            for _, pacer in members:
                self._spawn(self._send_posts(pacer, shape.post_interval_s))
        for pacers in self.counters.values():
            for pacer in pacers:
                self._spawn(self._send_increments(pacer, shape.increment_interval_s))

    async def _paced(self, interval_s: float, send: Callable[[int], object]) -> None:
        # Spread the first sends so the load is steady rather than in waves.
        await asyncio.sleep(interval_s * random.random())
        for seq in itertools.count():
            if self._stopping.is_set():
                return
            started = time.monotonic()
            await send(seq)  # type: ignore[misc]
            # Pacing is the load's rate, not a wait for an event.
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def _send_echo(self, pacer: _Pacer, index: int, interval_s: float) -> None:
        await self._paced(interval_s, lambda seq: pacer.send(str(seq), f"{index}:{seq}"))

    async def _send_posts(self, pacer: _Pacer, interval_s: float) -> None:
        await self._paced(interval_s, lambda seq: pacer.send(str(seq), str(seq)))

    async def _send_increments(self, pacer: _Pacer, interval_s: float) -> None:
        await self._paced(interval_s, lambda seq: pacer.send(str(seq), f"inc {seq}"))

    # --- receiving ---

    async def _messages(self, pacer: _Pacer):  # type: ignore[no-untyped-def]
        with contextlib.suppress(ClientError):
            async for message in pacer.client:
                yield str(message)

    def _in_order(self, pacer: _Pacer, last: int, seq: int) -> int:
        if seq <= last:
            pacer.tally.reordered += 1
            pacer.tally.problems.append(f"{pacer.name}: {seq} after {last}")
            return last
        return seq

    async def _read_echo(self, pacer: _Pacer) -> None:
        last = -1
        async for text in self._messages(pacer):
            _, _, seq = text.partition(":")
            if pacer.answered(seq):
                last = self._in_order(pacer, last, int(seq))

    async def _read_room(self, room: str, name: str, pacer: _Pacer) -> None:
        last: dict[str, int] = {}
        async for text in self._messages(pacer):
            post = json.loads(text)
            key = (post["from"], int(post["text"]))
            if post.get("replay"):
                self._replayed[f"{room}/{name}"].add(key)
                continue
            live = self._live[f"{room}/{name}"]
            self._arrival.set()
            if key in live:
                pacer.tally.duplicates += 1
                pacer.tally.problems.append(f"{pacer.name}: {key} received twice")
                continue
            live.append(key)
            last[key[0]] = self._in_order(pacer, last.get(key[0], -1), key[1])
            if key[0] == name:
                pacer.answered(str(key[1]))
            else:
                self.timeline.receive()

    async def _read_counter(self, counter: str, pacer: _Pacer) -> None:
        last = -1
        async for text in self._messages(pacer):
            request_id, _, value = text.partition(" ")
            if pacer.answered(request_id):
                self._values[counter].append(int(value))
                last = self._in_order(pacer, last, int(value))

    # --- ending ---

    async def stop(self) -> None:
        """Stop sending, wait (bounded) for every answer and broadcast, close every client."""
        self._stopping.set()
        timeout = self.shape.settle_timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(p.settled.wait() for p in self.pacers))
                await self._broadcasts_arrived()
        for pacer in self.pacers:
            pacer.finish()
        await asyncio.gather(*(p.client.close() for p in self.pacers), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _expected_posts(self, room: str) -> set[tuple[str, int]]:
        """The posts of ``room`` that their posters saw come back: acknowledged."""
        return {
            key
            for name, _ in self.members[room]
            for key in self._live[f"{room}/{name}"]
            if key[0] == name
        }

    async def _broadcasts_arrived(self) -> None:
        # A member may get a post after the poster's own copy came back: wait for the
        # arrivals until none is missing (bounded by the caller's timeout).
        while self._missing_posts():
            self._arrival.clear()
            await self._arrival.wait()

    def _missing_posts(self) -> dict[str, set[tuple[str, int]]]:
        missing = {}
        for room, members in self.members.items():
            expected = self._expected_posts(room)
            for name, _ in members:
                member = f"{room}/{name}"
                seen = set(self._live[member]) | self._replayed[member]
                if expected - seen:
                    missing[member] = expected - seen
        return missing

    async def final_counts(self) -> dict[str, int]:
        """Each counter's value, read over a new connection (``get`` changes nothing)."""
        values = {}
        for counter in self.counters:
            async with Client(self.urls[0](f"/counter/{counter}")) as client:
                await client.send("get final")
                answer = str(await client.receive(timeout=30))
                values[counter] = int(answer.split(" ")[1])
        return values

    def verdict(self, final_counts: dict[str, int]) -> Verdict:
        """What the clients saw, checked: see the module's docstring."""
        echo, chat, counters = Tally(), Tally(), Tally()
        for pacer in self.echo:
            echo.add(pacer.tally)
        for members in self.members.values():
            for _, pacer in members:
                chat.add(pacer.tally)
        for member, posts in sorted(self._missing_posts().items()):
            chat.lost += len(posts)
            chat.problems.append(f"{member} missed {len(posts)} posts, e.g. {min(posts)}")
        for counter, pacers in self.counters.items():
            tally = Tally()
            for pacer in pacers:
                tally.add(pacer.tally)
            values = self._values[counter]
            doubled = len(values) - len(set(values))
            tally.duplicates += doubled
            final = final_counts.get(counter, -1)
            if final < tally.answered:
                tally.lost += tally.answered - final
                tally.problems.append(f"{counter}: {final} < {tally.answered} answered")
            elif final > tally.answered + tally.in_doubt:
                tally.duplicates += final - tally.answered - tally.in_doubt
                tally.problems.append(
                    f"{counter}: {final} > {tally.answered} answered + {tally.in_doubt} in doubt"
                )
            counters.add(tally)
        return Verdict(echo=echo, chat=chat, counters=counters, timeline=self.timeline)


@dataclass
class Verdict:
    """Every kind's tally and the timeline."""

    echo: Tally
    chat: Tally
    counters: Tally
    timeline: Timeline

    @property
    def total(self) -> Tally:
        total = Tally()
        for tally in (self.echo, self.chat, self.counters):
            total.add(tally)
        return total

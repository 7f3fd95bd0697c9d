"""Placement of durable objects on state replicas: rendezvous hashing spreads objects evenly,
moves only a lost replica's objects when it dies and only a newcomer's when one joins, and
the directory of live replicas follows announcements and their timeouts."""

from __future__ import annotations

import random
from collections import Counter

from wsgate.placement import (
    Replica,
    ReplicaDirectory,
    gateway_key,
    object_key,
    owner_of,
    task_key,
    weight,
)

#: The stated bound of the spread: with 3 replicas, each owns 1/3 of 10,000 objects within
#: 5 % (binomial: one standard deviation is 47 objects, 1.4 %, so 5 % is 3.5 of them).
SPREAD_BOUND = 0.05

NAMES = [f"room-{i}" for i in range(10_000)]


def replicas(count: int, seed: int = 7) -> list[Replica]:
    """Replicas with ids of the shape the state service draws (state-<12 hex>)."""
    rng = random.Random(seed)
    return [Replica(f"state-{rng.getrandbits(48):012x}", f"10.0.0.{i}:7070") for i in range(count)]


def placement(names: list[str], live: list[Replica]) -> dict[str, Replica]:
    placed = {}
    for name in names:
        owner = owner_of(object_key("chat", name), live)
        assert owner is not None
        placed[name] = owner
    return placed


def test_10000_objects_spread_over_3_replicas_within_the_bound() -> None:
    for seed in (1, 2, 3):  # three different sets of replica ids
        live = replicas(3, seed)
        counts = Counter(placement(NAMES, live).values())
        share = len(NAMES) / 3
        assert set(counts) == set(live)
        for replica, count in counts.items():
            assert abs(count - share) <= SPREAD_BOUND * share, (replica, count)


def test_a_dead_replicas_objects_move_and_no_other_object_does() -> None:
    live = replicas(3)
    before = placement(NAMES, live)
    dead = live[1]
    after = placement(NAMES, [r for r in live if r != dead])
    moved = {name for name in NAMES if before[name] != after[name]}
    assert moved == {name for name in NAMES if before[name] == dead}
    # ... and they spread over both survivors, not onto one.
    survivors = Counter(after[name] for name in moved)
    assert len(survivors) == 2
    assert min(survivors.values()) >= 0.4 * len(moved)


def test_a_new_replica_takes_a_fair_share_from_every_other_and_nothing_else_moves() -> None:
    live = replicas(4)
    before = placement(NAMES, live[:3])
    after = placement(NAMES, live)
    moved = [name for name in NAMES if before[name] != after[name]]
    assert all(after[name] == live[3] for name in moved)
    quarter = len(NAMES) / 4
    assert abs(len(moved) - quarter) <= 2 * SPREAD_BOUND * quarter
    # Taken from each of the three, about equally.
    losers = Counter(before[name] for name in moved)
    assert set(losers) == set(live[:3])


def test_everyone_agrees_whatever_order_they_list_the_replicas_in() -> None:
    live = replicas(5)
    shuffled = list(reversed(live))
    for name in NAMES[:500]:
        assert owner_of(object_key("ns", name), live) == owner_of(object_key("ns", name), shuffled)


def test_weights_are_stable_and_keys_of_different_kinds_do_not_collide() -> None:
    # A fixed value: placement must not change between processes or versions (Python's
    # hash() would, with PYTHONHASHSEED).
    assert weight("state-a", object_key("chat", "lobby")) == 1215918599894561585
    assert object_key("a", "b\x00c") != object_key("a\x00b", "c")
    assert len({object_key("x", "y"), gateway_key("x"), task_key("x")}) == 3
    assert owner_of("anything", []) is None


def test_the_directory_follows_announcements_timeouts_and_leaving() -> None:
    own = Replica("state-own", "127.0.0.1:1")
    other = Replica("state-b", "127.0.0.1:2")
    directory = ReplicaDirectory(own)
    assert directory.live(0.0) == [own]  # a replica is always alive to itself
    directory.heard(other, 3.0, False, now=10.0)
    assert directory.live(12.9) == sorted([own, other])
    assert directory.live(13.0) == [own]  # its announcement ran out
    directory.heard(other, 3.0, False, now=20.0)
    directory.heard(other, 3.0, True, now=20.5)  # leaving: gone at once
    assert directory.live(20.6) == [own]
    # Hearing itself changes nothing.
    directory.heard(Replica("state-own", "elsewhere:9"), 3.0, True, now=21.0)
    assert directory.live(21.0) == [own]


def test_a_replica_restarted_at_another_address_replaces_its_old_entry() -> None:
    directory = ReplicaDirectory()
    directory.heard(Replica("state-b", "10.0.0.1:7070"), 3.0, False, now=0.0)
    directory.heard(Replica("state-b", "10.0.0.2:7070"), 3.0, False, now=1.0)
    assert directory.live(1.0) == [Replica("state-b", "10.0.0.2:7070")]


def test_without_expiring_the_directory_keeps_counting_a_replica_past_its_timeout() -> None:
    # What a process that stalled does with the first announcement it reads afterwards:
    # the others' may still be queued, so nobody is declared dead until the timer says so.
    directory = ReplicaDirectory()
    b, c = Replica("state-b", "h:1"), Replica("state-c", "h:2")
    directory.heard(b, 3.0, False, now=0.0)
    directory.heard(c, 3.0, False, now=10.0)
    assert directory.live(10.0, expire=False) == [b, c]
    assert directory.live(10.0) == [c]

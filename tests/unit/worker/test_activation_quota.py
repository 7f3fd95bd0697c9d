"""An activation's count of its object against the quotas (worker/activation_quota.py),
and what the activation does with commits the state service refuses for a quota or for
its disk; with the recording host of test_activation_release instead of a worker."""

from __future__ import annotations

import asyncio

from tests.unit.worker.test_activation_release import Host, Poster, event
from wsgate.errors import ObjectTooLarge, TooManyMembers, TooManyObjectKeys
from wsgate.state_errors import Reason
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.activation import Activation
from wsgate.worker.activation_quota import ObjectQuota
from wsgate.worker.object_cache import StorageCache
from wsgate.worker.work import Work

QUOTAS = pb.ObjectQuotas(max_keys=3, max_bytes=40, max_members=2)


def quota(keys: int = 0, size: int = 0, members: int = 0) -> ObjectQuota:
    return ObjectQuota(pb.ObjectUsage(keys=keys, bytes=size, members=members), QUOTAS)


def test_known_keys_are_counted_exactly_at_the_limit_and_one_over() -> None:
    cache = StorageCache()
    cache.whole = True  # every key known: the count is exact
    count = quota()
    changes = {"a": b"1" * 9, "b": b"1" * 9, "c": b"1" * 19}  # 3 keys, 40 bytes
    assert count.refusal(cache, changes) is None
    assert count.decides(cache, changes)
    count.wrote(1, cache, changes)
    for key, value in changes.items():
        cache.set(key, value)
    assert (count.keys, count.bytes) == (3, 40)
    refused = count.refusal(cache, {"d": b""})
    assert isinstance(refused, TooManyObjectKeys)
    assert (refused.size, refused.limit) == (4, 3)
    refused = count.refusal(cache, {"a": b"1" * 10})
    assert isinstance(refused, ObjectTooLarge)
    assert (refused.size, refused.limit) == (41, 40)
    assert count.refusal(cache, {"a": b"1", "b": None}) is None  # shrinking: always
    assert count.decides(cache, {"d": b""})


def test_an_unknown_key_counts_as_new_until_settled_with_the_service() -> None:
    cache = StorageCache()  # a fresh activation knows no key
    count = quota(keys=3, size=30)
    overwrite = {"a": b"1" * 9}
    refused = count.refusal(cache, overwrite)
    assert isinstance(refused, TooManyObjectKeys)  # "a" might be new ...
    assert not count.decides(cache, overwrite)  # ... so the count cannot tell alone
    # The service says what the object holds, and the cache learns "a".
    cache.fill("a", b"1" * 5)
    count.settle(1, cache, pb.ObjectUsage(keys=3, bytes=30), {})
    assert count.refusal(cache, overwrite) is None
    assert count.decides(cache, overwrite)


def test_settling_counts_the_running_turns_writes_of_unknown_keys() -> None:
    cache = StorageCache()
    count = quota(keys=2, size=20)
    count.wrote(1, cache, {"x": b"1" * 9})  # x was unknown: counted as new
    cache.set("x", b"1" * 9)
    assert (count.keys, count.bytes, count.uncertain) == (3, 30, True)
    # x held 5 bytes before the turn (a key of the 2 committed ones).
    count.settle(1, cache, pb.ObjectUsage(keys=2, bytes=20), {"x": b"1" * 4})
    assert (count.keys, count.bytes, count.uncertain) == (2, 25, False)


def test_members_at_the_limit_and_one_over() -> None:
    count = quota(members=1)
    assert count.join_refusal("c1") is None
    count.joined(1)
    refused = count.join_refusal("c2")
    assert isinstance(refused, TooManyMembers)
    assert (refused.size, refused.limit, refused.key) == (3, 2, "c2")
    count.left(2)
    assert count.join_refusal("c2") is None


class _Refusing(Host):
    """Commits are refused with ``reason`` ``times`` times, then succeed."""

    commit_timeout_s = 10.0

    def __init__(self, reason: str, times: int) -> None:
        super().__init__()
        self.reason = reason
        self.times = times
        self.commits = 0
        self.handed = asyncio.Event()

    def handed_back(self, activation: Activation, works: list[Work]) -> None:
        super().handed_back(activation, works)
        self.handed.set()

    async def commit(self, turns: pb.ObjectTurns) -> pb.ObjectTurnsResult:
        self.commits += 1
        if self.commits <= self.times:
            info = pb.ErrorInfo(reason=self.reason)
            return pb.ObjectTurnsResult(refused=pb.TurnsRefused(details=self.reason, info=info))
        return pb.ObjectTurnsResult(committed=pb.TurnsCommitted())


async def test_a_commit_refused_for_the_disk_is_tried_again_and_released_once_it_passes() -> None:
    host = _Refusing(Reason.STORAGE_FULL, times=2)
    activation = Activation(host, Poster, "p", epoch=1, lease_s=10)
    first = event(1, "post")
    activation.enqueue(first)
    await asyncio.wait_for(first.done, 10)
    assert host.commits == 3
    assert (host.commands, host.acks) == (["post"], [1])
    second = event(2, "again")  # the activation goes on
    activation.enqueue(second)
    await asyncio.wait_for(second.done, 10)
    assert host.commands == ["post", "again"]
    activation.stop("the test is over", quiet=True)


async def test_a_commit_refused_for_a_quota_releases_nothing_and_hands_the_turn_back() -> None:
    host = _Refusing(Reason.OBJECT_TOO_LARGE, times=1)
    activation = Activation(host, Poster, "p", epoch=1, lease_s=10)
    first = event(1, "post")
    activation.enqueue(first)
    await asyncio.wait_for(host.handed.wait(), 10)
    # Its frames never left; the turn goes to a fresh activation (which counts anew).
    assert host.handed_back_works == [first]
    assert first.retried
    assert (host.commands, host.acks, host.commits) == ([], [], 1)

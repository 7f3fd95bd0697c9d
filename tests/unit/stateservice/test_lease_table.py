"""LeaseTable: who holds which object until when, as pure bookkeeping on a clock the test
moves (claims, grants, renewals, releases, revocations, loading after a restart)."""

from __future__ import annotations

import pytest

from wsgate.stateservice.leases import Claim, Lease, LeaseTable
from wsgate.stateservice.storage import ObjectId

OBJ = ObjectId("room", "lobby")
OTHER_OBJ = ObjectId("room", "other")
W1 = "worker-1"
W2 = "worker-2"
LEASE_S = 10.0


def granted_table(epoch: int = 1, now: float = 100.0) -> LeaseTable:
    """A table in which W1 holds OBJ with ``epoch``, granted at ``now``."""
    table = LeaseTable(LEASE_S)
    assert table.claim(OBJ, W1, now) == (Claim.GRANT, None)
    table.granted(OBJ, W1, epoch, now)
    return table


# -- claims ------------------------------------------------------------------------------


def test_the_first_asker_gets_a_pending_grant() -> None:
    table = LeaseTable(LEASE_S)
    assert table.claim(OBJ, W1, 100.0) == (Claim.GRANT, None)
    assert table.get(OBJ) == Lease(W1, 0, 100.0 + LEASE_S)
    assert len(table) == 1


def test_a_second_asker_hears_held_while_the_grant_is_pending() -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    claim, lease = table.claim(OBJ, W2, 100.5)
    assert claim is Claim.HELD
    assert lease is not None
    assert (lease.holder, lease.epoch) == (W1, 0)
    assert table.get(OBJ) == Lease(W1, 0, 100.0 + LEASE_S)  # unchanged by the refusal


def test_a_pending_grant_does_not_run_out() -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    # Long past its nominal end: still being granted, so still held.
    claim, lease = table.claim(OBJ, W2, 100.0 + 10 * LEASE_S)
    assert claim is Claim.HELD
    assert lease is not None
    assert lease.holder == W1


def test_a_second_asker_hears_held_after_the_grant() -> None:
    table = granted_table(epoch=7, now=100.0)
    claim, lease = table.claim(OBJ, W2, 105.0)
    assert claim is Claim.HELD
    assert lease == Lease(W1, 7, 100.0 + LEASE_S)


def test_granted_stores_the_epoch_and_a_full_lease_from_then() -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    table.granted(OBJ, W1, 3, 102.0)
    assert table.get(OBJ) == Lease(W1, 3, 102.0 + LEASE_S)
    assert table.live(OBJ, 102.0 + LEASE_S - 0.001) is not None


@pytest.mark.parametrize("pending", [True, False])
def test_the_holder_asking_again_gets_a_grant(pending: bool) -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    if not pending:
        table.granted(OBJ, W1, 4, 100.0)
    assert table.claim(OBJ, W1, 101.0) == (Claim.GRANT, None)
    assert table.get(OBJ) == Lease(W1, 0, 101.0 + LEASE_S)  # a new grant is in progress


def test_objects_are_claimed_independently() -> None:
    table = granted_table()
    assert table.claim(OTHER_OBJ, W2, 100.0) == (Claim.GRANT, None)
    leases = [table.get(obj) for obj in (OBJ, OTHER_OBJ)]
    assert [lease.holder if lease else None for lease in leases] == [W1, W2]


# -- expiry ------------------------------------------------------------------------------


def test_a_lease_is_live_until_just_before_its_end() -> None:
    table = granted_table(now=100.0)
    assert table.live(OBJ, 100.0 + LEASE_S - 0.001) is not None
    assert table.claim(OBJ, W2, 100.0 + LEASE_S - 0.001)[0] is Claim.HELD


def test_an_expired_lease_goes_to_the_next_asker_at_its_end_exactly() -> None:
    table = granted_table(now=100.0)
    end = 100.0 + LEASE_S
    assert table.live(OBJ, end) is None
    assert table.get(OBJ) is not None  # still there, expired
    assert table.claim(OBJ, W2, end) == (Claim.GRANT, None)
    assert table.get(OBJ) == Lease(W2, 0, end + LEASE_S)
    # ... and the old holder hears HELD now.
    claim, lease = table.claim(OBJ, W1, end + 1)
    assert claim is Claim.HELD
    assert lease is not None
    assert lease.holder == W2


def test_live_of_an_unknown_object_is_none() -> None:
    table = LeaseTable(LEASE_S)
    assert table.live(OBJ, 0.0) is None
    assert table.get(OBJ) is None


# -- failed grants -----------------------------------------------------------------------


def test_a_failed_grant_frees_the_object() -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    table.grant_failed(OBJ, W1)
    assert table.get(OBJ) is None
    assert len(table) == 0
    assert table.claim(OBJ, W2, 100.0) == (Claim.GRANT, None)


def test_grant_failed_of_another_worker_changes_nothing() -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    table.grant_failed(OBJ, W2)
    assert table.get(OBJ) == Lease(W1, 0, 100.0 + LEASE_S)


def test_grant_failed_does_not_free_a_granted_lease() -> None:
    table = granted_table(epoch=2)
    table.grant_failed(OBJ, W1)
    assert table.get(OBJ) == Lease(W1, 2, 100.0 + LEASE_S)


def test_grant_failed_of_an_unknown_object_is_harmless() -> None:
    table = LeaseTable(LEASE_S)
    table.grant_failed(OBJ, W1)
    assert len(table) == 0


# -- renewals ----------------------------------------------------------------------------


def test_renew_extends_the_holders_leases() -> None:
    table = granted_table(epoch=1, now=100.0)
    table.claim(OTHER_OBJ, W1, 100.0)
    table.granted(OTHER_OBJ, W1, 5, 100.0)
    assert table.renew(W1, [(OBJ, 1), (OTHER_OBJ, 5)], 108.0) == []
    assert table.get(OBJ) == Lease(W1, 1, 108.0 + LEASE_S)
    assert table.get(OTHER_OBJ) == Lease(W1, 5, 108.0 + LEASE_S)
    # Past the first end, before the renewed one: still held.
    assert table.claim(OBJ, W2, 100.0 + LEASE_S + 1)[0] is Claim.HELD


def test_renew_reports_the_positions_of_the_leases_not_held() -> None:
    table = granted_table(epoch=3, now=100.0)
    pending = ObjectId("room", "pending")
    theirs = ObjectId("room", "theirs")
    table.claim(pending, W1, 100.0)  # epoch 0: being granted
    table.claim(theirs, W2, 100.0)
    table.granted(theirs, W2, 1, 100.0)
    lost = table.renew(
        W1,
        [
            (OBJ, 2),  # 0: wrong epoch
            (theirs, 1),  # 1: another worker's
            (ObjectId("room", "unknown"), 1),  # 2: nobody's
            (OBJ, 3),  # 3: held: renewed
            (pending, 0),  # 4: a pending grant is not renewable
        ],
        105.0,
    )
    assert lost == [0, 1, 2, 4]
    assert table.get(OBJ) == Lease(W1, 3, 105.0 + LEASE_S)
    # What was not renewed kept its end.
    assert table.get(theirs) == Lease(W2, 1, 100.0 + LEASE_S)
    assert table.get(pending) == Lease(W1, 0, 100.0 + LEASE_S)


def test_renew_with_a_wrong_epoch_does_not_extend() -> None:
    table = granted_table(epoch=3, now=100.0)
    assert table.renew(W1, [(OBJ, 4)], 105.0) == [0]
    assert table.live(OBJ, 100.0 + LEASE_S) is None


def test_renew_of_nothing_loses_nothing() -> None:
    assert LeaseTable(LEASE_S).renew(W1, [], 0.0) == []


def test_an_expired_lease_nobody_took_can_still_be_renewed() -> None:
    table = granted_table(epoch=2, now=100.0)
    late = 100.0 + 3 * LEASE_S
    assert table.live(OBJ, late) is None
    assert table.renew(W1, [(OBJ, 2)], late) == []
    assert table.live(OBJ, late) == Lease(W1, 2, late + LEASE_S)
    assert table.claim(OBJ, W2, late + 1)[0] is Claim.HELD


def test_an_expired_lease_someone_took_cannot_be_renewed() -> None:
    table = granted_table(epoch=2, now=100.0)
    late = 100.0 + LEASE_S
    table.claim(OBJ, W2, late)
    table.granted(OBJ, W2, 3, late)
    assert table.renew(W1, [(OBJ, 2)], late + 1) == [0]
    assert table.get(OBJ) == Lease(W2, 3, late + LEASE_S)


# -- release and revoke ------------------------------------------------------------------


def test_release_by_the_holder_with_its_epoch() -> None:
    table = granted_table(epoch=4)
    assert table.release(OBJ, W1, 4) is True
    assert table.get(OBJ) is None
    assert table.claim(OBJ, W2, 100.0) == (Claim.GRANT, None)


@pytest.mark.parametrize(
    ("worker", "epoch"),
    [(W2, 4), (W1, 3), (W1, 5)],
    ids=["other-worker", "older-epoch", "newer-epoch"],
)
def test_release_with_the_wrong_worker_or_epoch_keeps_the_lease(worker: str, epoch: int) -> None:
    table = granted_table(epoch=4)
    assert table.release(OBJ, worker, epoch) is False
    assert table.get(OBJ) == Lease(W1, 4, 100.0 + LEASE_S)


def test_release_of_a_pending_grant_is_refused() -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    assert table.release(OBJ, W1, 0) is False
    assert table.get(OBJ) is not None


def test_release_of_an_unknown_object_is_refused() -> None:
    assert LeaseTable(LEASE_S).release(OBJ, W1, 1) is False


@pytest.mark.parametrize("pending", [True, False])
def test_revoke_forgets_the_lease(pending: bool) -> None:
    table = LeaseTable(LEASE_S)
    table.claim(OBJ, W1, 100.0)
    if not pending:
        table.granted(OBJ, W1, 1, 100.0)
    table.revoke(OBJ)
    assert table.get(OBJ) is None
    assert len(table) == 0
    assert table.renew(W1, [(OBJ, 1)], 101.0) == [0]
    table.revoke(OBJ)  # twice: harmless


# -- loading and counting ----------------------------------------------------------------


def test_load_gives_each_lease_a_full_lease_from_now() -> None:
    table = LeaseTable(LEASE_S)
    table.load([(OBJ, 7, W1), (OTHER_OBJ, 2, W2)], 500.0)
    assert table.get(OBJ) == Lease(W1, 7, 500.0 + LEASE_S)
    assert table.get(OTHER_OBJ) == Lease(W2, 2, 500.0 + LEASE_S)
    assert table.claim(OBJ, W2, 500.0 + LEASE_S - 0.001)[0] is Claim.HELD
    assert table.claim(OBJ, W2, 500.0 + LEASE_S)[0] is Claim.GRANT
    # A loaded lease renews with its stored epoch.
    assert table.renew(W2, [(OTHER_OBJ, 2)], 505.0) == []


def test_the_table_counts_leases_loaded_pending_and_revoked() -> None:
    table = LeaseTable(LEASE_S)
    assert len(table) == 0
    table.load([(ObjectId("room", str(i)), 1, W1) for i in range(3)], 0.0)
    table.claim(OBJ, W2, 0.0)  # a pending grant counts too
    assert len(table) == 4
    table.revoke(ObjectId("room", "0"))
    assert len(table) == 3
    assert table.get(ObjectId("room", "0")) is None


@pytest.mark.parametrize("lease_s", [0.0, -1.0, float("nan")])
def test_lease_s_must_be_positive(lease_s: float) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        LeaseTable(lease_s)

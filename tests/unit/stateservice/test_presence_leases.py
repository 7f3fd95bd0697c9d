"""Gateway leases, as pure bookkeeping on a clock the test moves."""

from __future__ import annotations

from wsgate.stateservice.presence import (
    MAX_SWEEP_INTERVAL_S,
    MIN_SWEEP_INTERVAL_S,
    GatewayLeases,
    sweep_interval,
)

GW = "gw-abcdefgh"
OTHER = "gw-bcdefghi"


def test_a_lease_runs_out_exactly_at_its_end() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=1.0, leaving=False, now=100.0)
    leases.member_joined(GW, now=100.0)
    assert leases.due(now=100.999) == []  # just before the end
    assert leases.due(now=101.0) == [(GW, 1)]  # at it


def test_an_announcement_renews_the_lease() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.member_joined(GW, now=0.0)
    for t in range(10):
        leases.heard(GW, lease_s=1.0, leaving=False, now=100.0 + t * 0.5)
    assert leases.due(now=105.4) == []
    assert leases.due(now=105.5) == [(GW, 1)]


def test_a_gateway_without_members_is_never_due() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=1.0, leaving=False, now=0.0)
    assert leases.due(now=1000.0) == []


def test_leaving_ends_the_lease_at_once() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=10.0, leaving=False, now=0.0)
    leases.member_joined(GW, now=0.0)
    leases.heard(GW, lease_s=0.0, leaving=True, now=1.0)
    assert leases.due(now=1.0) == [(GW, 1)]


def test_a_gateway_never_heard_from_gets_a_grace_lease_from_its_first_member() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.member_joined(GW, now=50.0)
    leases.member_joined(GW, now=70.0)  # later members do not extend it
    assert leases.due(now=79.999) == []
    assert leases.due(now=80.0) == [(GW, 2)]


def test_the_grace_lease_is_at_least_the_longest_lease_heard() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(OTHER, lease_s=45.0, leaving=False, now=0.0)
    leases.member_joined(GW, now=0.0)
    assert leases.due(now=44.9) == []
    assert [gw for gw, _ in leases.due(now=45.0)] == [GW]


def test_members_that_join_during_a_sweep_keep_the_gateway_due() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=1.0, leaving=False, now=0.0)
    leases.member_joined(GW, now=0.0)
    ((gateway, joins),) = leases.due(now=2.0)
    leases.member_joined(GW, now=2.0)  # a late worker, while the sweep runs
    leases.swept(gateway, joins)
    assert leases.due(now=2.1) == [(GW, 1)]
    leases.swept(GW, 1)
    assert leases.due(now=2.2) == []


def test_a_late_member_of_an_expired_gateway_is_due_at_once() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=1.0, leaving=False, now=0.0)
    leases.member_joined(GW, now=0.0)
    leases.swept(GW, 1)
    leases.member_joined(GW, now=5.0)
    assert leases.due(now=5.0) == [(GW, 1)]


def test_after_an_outage_every_lease_gets_the_grace_period() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=1.0, leaving=False, now=0.0)
    leases.member_joined(GW, now=0.0)
    leases.heard(OTHER, lease_s=0.0, leaving=True, now=0.0)
    leases.member_joined(OTHER, now=0.0)
    leases.extend_all(now=10.0)
    assert leases.due(now=39.9) == [(OTHER, 1)]  # leaving stays leaving
    assert sorted(leases.due(now=40.0)) == [(GW, 1), (OTHER, 1)]


def test_old_gateways_with_nothing_to_sweep_are_forgotten() -> None:
    leases = GatewayLeases(grace_s=30)
    leases.heard(GW, lease_s=1.0, leaving=False, now=0.0)
    leases.heard(OTHER, lease_s=1.0, leaving=False, now=0.0)
    leases.member_joined(OTHER, now=0.0)
    assert leases.forget_old(now=100.999, after_s=100) == 0
    assert leases.forget_old(now=101.0, after_s=100) == 1  # OTHER still has members
    assert GW not in leases
    assert OTHER in leases


def test_sweeps_come_every_quarter_of_the_shortest_lease_within_bounds() -> None:
    assert sweep_interval(None) == MAX_SWEEP_INTERVAL_S
    assert sweep_interval(1.0) == 0.25
    assert sweep_interval(10.0) == MAX_SWEEP_INTERVAL_S
    assert sweep_interval(0.001) == MIN_SWEEP_INTERVAL_S

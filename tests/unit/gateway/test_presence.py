"""The lease a gateway announces with its presence: five announcement intervals, in
milliseconds that fit the wire (the state service's side is
tests/unit/stateservice/test_presence_leases.py)."""

from __future__ import annotations

import pytest

from wsgate.gateway.presence import LEASE_INTERVALS, lease_ms


@pytest.mark.parametrize(("interval_s", "expected"), [(2.0, 10_000), (0.1, 500), (1e-9, 1)])
def test_a_gateway_lease_is_five_intervals(interval_s: float, expected: int) -> None:
    assert LEASE_INTERVALS == 5
    assert lease_ms(interval_s) == expected


def test_the_lease_fits_the_wire() -> None:
    assert lease_ms(1e9) == 2**32 - 1

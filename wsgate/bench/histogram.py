"""Latency histograms with a bounded relative error, mergeable across processes.

Each load-generator process records its round trips here and ships the histogram to the
parent as JSON; the parent merges them and reads percentiles. Buckets are logarithmic
(each spans a factor of :data:`GROWTH`), so a percentile read back is within 1% of the
exact one at any scale, and a histogram of millions of samples stays a few hundred
buckets. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: Each bucket spans values within a factor of 1.01: the relative error of a percentile.
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)


class LatencyHistogram:
    """Counts of latencies in nanoseconds, by logarithmic bucket."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.total = 0

    def record_ns(self, latency_ns: int) -> None:
        """Count one latency (values below 1 ns count as 1 ns)."""
        index = int(math.log(max(latency_ns, 1)) / _LOG_GROWTH)
        self._counts[index] = self._counts.get(index, 0) + 1
        self.total += 1

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram."""
        for index, count in other._counts.items():
            self._counts[index] = self._counts.get(index, 0) + count
        self.total += other.total

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile (0 < q <= 100) in milliseconds: the smallest recorded
        value (to 1%) that at least ``q`` percent of the samples do not exceed.

        Raises ValueError if the histogram is empty or ``q`` is out of range.
        """
        if not 0 < q <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {q}")
        if not self.total:
            raise ValueError("no samples")
        rank = max(1, math.ceil(q / 100 * self.total))
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen >= rank:
                # The bucket's geometric middle: within GROWTH**0.5 of any value in it.
                return float(GROWTH ** (index + 0.5) / 1e6)
        raise AssertionError("unreachable: counts add up to total")  # pragma: no cover

    def to_json(self) -> list[list[int]]:
        """``[[bucket, count], ...]``, for :meth:`from_json` in another process."""
        return [[index, self._counts[index]] for index in sorted(self._counts)]

    @classmethod
    def from_json(cls, data: Iterable[Sequence[int]]) -> LatencyHistogram:
        """The histogram :meth:`to_json` described. Raises ValueError if malformed."""
        histogram = cls()
        for pair in data:
            if len(pair) != 2 or not all(isinstance(x, int) for x in pair) or pair[1] < 0:
                raise ValueError(f"not a [bucket, count] pair: {pair!r}")
            index, count = pair
            histogram._counts[index] = histogram._counts.get(index, 0) + count
            histogram.total += count
        return histogram

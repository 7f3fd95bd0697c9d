"""Counters and histograms for the hot path, exported through prometheus_client.

prometheus_client's own metrics take a lock on every update, which shows in profiles at
tens of thousands of events a second. A role runs on one event-loop thread, so plain
integers suffice; they are read only when ``/metrics`` is scraped, by a collector
registered in the role's registry.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

#: Buckets for latencies in seconds, from 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class FastCounter:
    """A counter (or, with ``dec``, a gauge) updated from one thread only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount


class FastCounterFamily:
    """Counters told apart by label values (a fixed, small set), updated from one thread."""

    __slots__ = ("counters", "label_names")

    def __init__(self, label_names: Sequence[str]) -> None:
        self.label_names = tuple(label_names)
        self.counters: dict[tuple[str, ...], FastCounter] = {}

    def labels(self, *values: str) -> FastCounter:
        """The counter of these label values (made on first use)."""
        counter = self.counters.get(values)
        if counter is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"expected values for {self.label_names}, got {values}")
            counter = self.counters[values] = FastCounter()
        return counter


class FastHistogram:
    """A histogram updated from one thread only; ``buckets`` are upper bounds, ascending."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = list(buckets)
        self.counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*map(str, self._bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class FastMetrics(Collector):
    """Registers fast metrics by name and exports them on scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counters: list[tuple[str, str, FastCounter]] = []
        self._gauges: list[tuple[str, str, FastCounter]] = []
        self._histograms: list[tuple[str, str, FastHistogram]] = []
        self._families: list[tuple[str, str, FastCounterFamily]] = []
        registry.register(self)

    def counter(self, name: str, documentation: str) -> FastCounter:
        """A counter exported as ``<name>_total``."""
        metric = FastCounter()
        self._counters.append((name, documentation, metric))
        return metric

    def gauge(self, name: str, documentation: str) -> FastCounter:
        """A value that goes up and down."""
        metric = FastCounter()
        self._gauges.append((name, documentation, metric))
        return metric

    def counter_family(
        self, name: str, documentation: str, label_names: Sequence[str]
    ) -> FastCounterFamily:
        """Counters with labels, exported as ``<name>_total{...}``."""
        family = FastCounterFamily(label_names)
        self._families.append((name, documentation, family))
        return family

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> FastHistogram:
        """A histogram with the given bucket bounds."""
        metric = FastHistogram(buckets)
        self._histograms.append((name, documentation, metric))
        return metric

    def collect(self) -> Iterator[Metric]:
        for name, doc, counter in self._counters:
            yield CounterMetricFamily(name, doc, value=counter.value)
        for name, doc, gauge in self._gauges:
            yield GaugeMetricFamily(name, doc, value=gauge.value)
        for name, doc, family in self._families:
            exported = CounterMetricFamily(name, doc, labels=family.label_names)
            for values, counter in family.counters.items():
                exported.add_metric(values, counter.value)
            yield exported
        for name, doc, histogram in self._histograms:
            yield HistogramMetricFamily(
                name, doc, buckets=histogram.cumulative(), sum_value=histogram.sum
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())

"""A short version of the load and chaos scenarios, in the suite: (a) steady load, (b) kill
-9 of a worker and (f) a rolling restart of every worker, on the whole cluster in
containers (3 NATS, PostgreSQL and 3 state replicas, 3 workers, 2 gateways), with fewer
connections and shorter runs than ``./scripts/load all``. Each asserts what the clients saw
(tests/load/scenarios.py): nothing acknowledged lost, doubled or reordered, counters exact,
every chat member got every broadcast, no socket dropped, recovery within its bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.load.cluster import Cluster, running_cluster
from tests.load.containers import ContainerSession
from tests.load.images import Images
from tests.load.report import text_summary
from tests.load.scenarios import SCENARIOS, run_scenario
from tests.load.traffic import Shape

pytestmark = pytest.mark.timeout(240)

#: A quarter of the full run's connections: this machine runs the whole cluster and the
#: clients on two cores beside the rest of the suite.
SHAPE = Shape(echo_clients=24, rooms=3, members=3, counters=4, counter_clients=2)


@pytest.fixture(scope="module")
def cluster(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work_dir: Path = tmp_path_factory.mktemp("load")
    with ContainerSession() as session, running_cluster(session, images, work_dir) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("name", "duration_s"),
    # (b) needs the worker's leases (10 s) to expire well before it is restarted at 3/4.
    [("steady", 12.0), ("worker-kill", 28.0), ("rolling-restart", 20.0)],
)
async def test_the_scenario_holds(cluster: Cluster, name: str, duration_s: float) -> None:
    result = await run_scenario(cluster, SCENARIOS[name], duration_s, SHAPE)
    figures = result.as_dict()
    print(text_summary([figures]))
    assert result.ok, f"{name}: {result.failures}; e.g. {figures['problems'][:5]}"
    assert figures["answered"] > SHAPE.connections * duration_s / 4
    if name != "steady":
        assert len(figures["faults"]) >= 2

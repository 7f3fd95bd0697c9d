"""Durable objects build on the app, never the reverse: ``wsgate.worker.app`` imports
nothing of ``wsgate.worker.durable``, not even for type checking, and no chain of
run-time imports leads from one to the other. Checked on the import graph that
import-linter uses (grimp), so it holds for every code path, not just those a test runs."""

from __future__ import annotations

import grimp
import pytest

APP = "wsgate.worker.app"
DURABLE = "wsgate.worker.durable"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("wsgate", cache_dir=None)


@pytest.fixture(scope="module")
def run_time_graph() -> grimp.ImportGraph:
    return grimp.build_graph("wsgate", exclude_type_checking_imports=True, cache_dir=None)


def test_durable_builds_on_the_app(graph: grimp.ImportGraph) -> None:
    # The graph sees these modules' imports at all (else the checks below prove nothing).
    assert graph.direct_import_exists(importer=DURABLE, imported=APP)


def test_the_app_imports_nothing_of_durable_objects(graph: grimp.ImportGraph) -> None:
    assert not graph.direct_import_exists(importer=APP, imported=DURABLE)


def test_no_run_time_import_chain_leads_from_the_app_to_durable_objects(
    run_time_graph: grimp.ImportGraph,
) -> None:
    assert run_time_graph.find_shortest_chain(importer=APP, imported=DURABLE) is None

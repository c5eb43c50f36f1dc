"""One temporary Prefect server for every flow test of the session, and the flow's run of the
digits loop that the tests read (and copy where they change it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.flows import flow_project, flow_run


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    # the first start of a fresh server migrates its database: give it time
    with prefect_test_harness(server_startup_timeout=240):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def flow_demo(prefect_server, tmp_path_factory) -> tuple[Path, object]:
    """The flow's first run on a fresh two-round project, and its final state. Tests must not
    change the project (``copy_project`` it)."""
    project = flow_project(tmp_path_factory.mktemp("flow"))
    return project, flow_run(project)

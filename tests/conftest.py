"""Shared fixtures: the real params.yaml, shrunk for tests (tiny models, few epochs, CPU), and the
tiny projects the end-to-end tests share, each trained once per test run (tests/helpers/); and how
pytest-xdist's workers share the run out (``make test``: ``-n auto --dist loadgroup``)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.project import (  # noqa: F401  (the names test modules import from here)
    ROOT,
    built_once,
    load_params,
    make_project,
    quick,
    run,
    shrink,
    training_runs,
    venv_env,
    write_params,
)

# keep every tool from calling home, in this process and in the ones it starts
for key, value in {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GIT_AUTHOR_NAME": "tests",
    "GIT_AUTHOR_EMAIL": "tests@example.com",
    "GIT_COMMITTER_NAME": "tests",
    "GIT_COMMITTER_EMAIL": "tests@example.com",
}.items():
    os.environ.setdefault(key, value)
# every stage `dvc repro` runs is a Python process importing torch, timm and MLflow: with bytecode
# cached (apart from the source tree, shared by the sessions) each import takes half the time
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault(
    "PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "noisy-student-tests-pycache")
)
sys.dont_write_bytecode = False
sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
# Prefect's settings, database and profiles of the tests stay out of the user's ~/.prefect
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # runs go to each test's own project store
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: each keeps to its own
    import torch

    torch.set_num_threads(1)


# Tests that share a session project run on one worker, so that the project is built once per run,
# not once per worker, and a test that changes it and puts it back (the registry's alias) races no
# other. pytest-xdist's `--dist loadgroup` would group `xdist_group` marks, but under pytest 9.2
# it silently drops them (pytest-xdist#1386), so here `--dist loadgroup` groups by these paths.
GROUPS = {
    "prefect": ("tests/flows/",),  # one Prefect server and the flow's project (flow_demo)
    "repro": ("tests/pipeline/test_dvc_repro.py",),  # tests running commands in repro_demo
    "trained": tuple(
        f"tests/library/{module}.py"
        for module in (
            "report/test_report", "models/test_export", "test_predict",
            "tracking/test_registry", "pseudo_labels/test_foreign", "pseudo_labels/test_to_label",
        )
    ),
}  # fmt: skip
# what each group's project is built by: a test using one outside its group's paths is refused
GROUP_FIXTURES = {"prefect_server": "prefect", "trained_project": "trained"}


def group_of(nodeid: str) -> str | None:
    return next((g for g, paths in GROUPS.items() if nodeid.startswith(paths)), None)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedProjectScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with our groups as scopes, every other test a scope of its
        own; the scopes go out largest first, then in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    return SharedProjectScheduling(config, log)


def _queue_position(item: pytest.Item) -> tuple[int, bool]:
    """Longest first, so that the short tests fill in at the end: the pipeline's end-to-end runs,
    the other slow tests, the fast ones. Outside the repro group, the tests reading `dvc repro`'s
    project come last: by then the worker running the repro group has built it."""
    slow = item.get_closest_marker("slow") is not None
    kind = 0 if slow and item.nodeid.startswith("tests/pipeline/") else 1 if slow else 2
    borrowed = "repro_demo" in item.fixturenames and group_of(item.nodeid) != "repro"
    return kind, borrowed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, group in GROUP_FIXTURES.items():
            if fixture in item.fixturenames and group_of(item.nodeid) != group:
                raise pytest.UsageError(
                    f"{item.nodeid} uses {fixture}: put its module in tests/conftest.py "
                    f"GROUPS[{group!r}], so that the project is built once per run"
                )
    if hasattr(config, "workerinput"):  # under xdist; one process keeps the order as written
        items.sort(key=_queue_position)


@pytest.fixture(autouse=True)
def _tracking_uri_stays_out_of_the_environment():
    """Tests read their stores with ``mlflow.set_tracking_uri``, which MLflow 3 also exports as
    ``MLFLOW_TRACKING_URI``: left set, the next test's pipeline (which honours that variable)
    would log into the previous test's store."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def params() -> dict[str, Any]:
    return load_params()


@pytest.fixture
def tiny_params() -> dict[str, Any]:
    return shrink(load_params())


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A project folder after the loop up to the register stage, one round (tiny models, a real
    sqlite MLflow store, registry included): what the report, export, predict and registry tests
    read. The steps come from its dvc.yaml, as the flow's do. Tests must not change it (write
    elsewhere, or put back)."""
    from flows.stages import dvc_yaml_plan, run_in_process
    from noisy_student.core.layout import Layout
    from noisy_student.core.settings import load_settings

    params = shrink(load_params())
    params["students"] = params["students"][:1]
    params["students"][0]["epochs"] = 3
    root = make_project(tmp_path_factory.mktemp("trained"), params)
    with contextlib.chdir(root):  # MLflow's sqlite store and ./mlruns land here
        settings = load_settings()
        run_in_process(dvc_yaml_plan(settings, root), settings, Layout.at(), until="register")
    return root


@pytest.fixture(scope="session")
def repro_demo(tmp_path_factory, worker_id) -> tuple[Path, str]:
    """The digits loop, two rounds (``quick`` params), by `dvc repro` in a fresh git + DVC
    repository, and what the command printed. Built once per test run, whichever worker asks
    first; the other workers read it (the Prefect tests compare their runs with it). Shared:
    tests that change it work on a copy (``tests.helpers.project.copy_project``)."""

    def build(project: Path) -> str:
        make_project(project, quick(load_params()))
        result = run(["dvc", "repro"], project)
        return result.stdout + result.stderr

    base = tmp_path_factory.getbasetemp()
    project = (base if worker_id == "master" else base.parent) / "repro"
    return project, built_once(project, build)

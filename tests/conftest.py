"""Shared fixtures: the real params.yaml, shrunk for tests (tiny models, few epochs, CPU), and the
tiny projects the end-to-end tests share, each trained once per session (tests/helpers/)."""

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
def repro_demo(tmp_path_factory) -> tuple[Path, str]:
    """The digits loop, two rounds (``quick`` params), by `dvc repro` in a fresh git + DVC
    repository, and what the command printed. Shared: tests that change it work on a copy
    (``tests.helpers.project.copy_project``)."""
    project = make_project(tmp_path_factory.mktemp("repro"), quick(load_params()))
    result = run(["dvc", "repro"], project)
    return project, result.stdout + result.stderr

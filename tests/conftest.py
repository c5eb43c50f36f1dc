"""Shared fixtures: the real params.yaml, shrunk for tests (tiny models, few epochs, CPU)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
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
# Prefect's settings, database and profiles of the tests stay out of the user's ~/.prefect
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # runs go to each test's own project store


@pytest.fixture(autouse=True)
def _tracking_uri_stays_out_of_the_environment():
    """Tests read their stores with ``mlflow.set_tracking_uri``, which MLflow 3 also exports as
    ``MLFLOW_TRACKING_URI``: left set, the next test's pipeline (which honours that variable)
    would log into the previous test's store."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def load_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def shrink(params: dict[str, Any]) -> dict[str, Any]:
    """The real params with small models and few epochs: minutes of CPU for the whole loop."""
    p = copy.deepcopy(params)
    p["data"]["image_size"] = 16
    p["augment"]["preview_images"] = 2
    p["augment"]["preview_samples"] = 1
    p["pseudo_label"]["threshold"] = 0.6  # tiny models are rarely more confident
    p["teacher"].update(model="test_resnet", epochs=30, batch_size=8, warmup_epochs=1, lr=0.005)
    for student in p["students"]:
        student.update(model="test_resnet", epochs=6, batch_size=32, warmup_epochs=0, lr=0.005)
        student.update(drop_path_rate=0.0)
    p["flow"].update(retries=0, retry_delay_seconds=0)  # a failing test fails at once
    return p


@pytest.fixture
def params() -> dict[str, Any]:
    return load_params()


@pytest.fixture
def tiny_params() -> dict[str, Any]:
    return shrink(load_params())


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def venv_env() -> dict[str, str]:
    """Environment whose PATH finds this interpreter's `python`, `dvc` and `mlflow` first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def make_project(dest: Path, params: dict[str, Any]) -> Path:
    """A fresh git + DVC repository holding the pipeline's code and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for package in ("tasks", "flows", "configs"):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    write_params(dest / "params.yaml", params)
    (dest / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n.prefect/\ncheckpoints/\n")
    env = venv_env()
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


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


def training_runs(runs: list) -> list:
    """MLflow runs of trainings only: under `dvc repro` the report stage logs a run of its own."""
    return [r for r in runs if r.data.tags.get("stage") != "report"]

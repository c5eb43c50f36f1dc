"""Shared storage: a DVC remote lets a second machine reproduce a result with `dvc pull` and
`dvc repro`; runs go to an MLflow tracking server (SQL backend, artifact store) named in the
environment."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from noisy_student.core.settings import MlflowSettings
from noisy_student.tracking.runs import tracking_uri, ui_url
from tests.helpers.project import (
    SCAN,
    dvc_status,
    load_params,
    make_project,
    quick,
    ran,
    run,
    training_runs,
    venv_env,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination", str(store / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                message = f"mlflow server did not start:\n{server.stderr.read()}"
                raise AssertionError(message) from None
            time.sleep(1)
    yield url, store
    server.terminate()
    server.wait(timeout=60)


def test_the_environment_names_the_tracking_server(monkeypatch):
    cfg = MlflowSettings(
        experiment="e",
        tracking_uri="sqlite:////p/m.db",
        ui_url="http://x:5000",
        registered_model="m",
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg) == "sqlite:////p/m.db" and ui_url(cfg) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(cfg) == ui_url(cfg) == "http://mlflow.internal:5000"


@pytest.mark.slow
def test_a_second_machine_reproduces_from_the_remote_and_runs_go_to_the_server(
    tmp_path, mlflow_server
):
    url, store = mlflow_server
    params = quick(load_params(), rounds=1)
    first = make_project(tmp_path / "first", params)
    env = {**venv_env(), "MLFLOW_TRACKING_URI": url}
    result = subprocess.run(
        ["dvc", "repro"], cwd=first, env=env, capture_output=True, text=True, check=True
    )
    assert "Running stage 'evaluate'" in result.stdout

    # every training ran against the server: runs, metrics, models and artifacts are there
    client = mlflow.MlflowClient(url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "noisy-student"]
    runs = {
        r.info.run_name: r for r in training_runs(client.search_runs([experiment.experiment_id]))
    }
    assert sorted(runs) == ["student_1", "teacher"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    metrics = json.loads((first / "metrics.json").read_text())
    assert runs["student_1"].data.metrics["test_accuracy"] == pytest.approx(
        metrics["student_1"]["test_accuracy"]
    )
    mlflow.set_tracking_uri(url)
    assert len(mlflow.search_logged_models([experiment.experiment_id], output_format="list")) == 2
    assert list(store.glob("artifacts/**/train_batch.png"))
    assert not (first / "mlflow.db").exists()  # nothing went to the local default

    # one place configures the remote (.dvc/config, versioned with the code)
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "--default", "storage", str(remote)], first)
    run(["dvc", "push"], first)
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "results"], first)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    run(["dvc", "pull"], second)
    assert dvc_status(second) == {}
    output = run(["dvc", "repro"], second).stdout
    assert ran(output) == [SCAN]  # it finds the same data: nothing else runs
    for path in ("metrics.json", "pseudo_labels/student_1.parquet", "models/student_1/card.json"):
        assert (second / path).read_bytes() == (first / path).read_bytes(), path
    assert Path(second / "models/teacher/model.safetensors").exists()

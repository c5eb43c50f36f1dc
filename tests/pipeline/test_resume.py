"""Faults: a training killed with SIGKILL mid-epoch resumes from its last checkpoint and ends
exactly where an uninterrupted run ends; a killed run's MLflow run never stays RUNNING."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import load_params, make_project, run, shrink, training_runs, venv_env

pytestmark = pytest.mark.slow


def project_params() -> dict:
    params = shrink(load_params())
    params["students"] = params["students"][:1]
    params["teacher"]["epochs"] = 40
    return params


def checkpointed_epoch(folder: Path, label: str) -> int:
    """The newest epoch with a complete checkpoint (its JSON is written last)."""
    names = [p.name for p in folder.glob(f"{label}.epoch*.json")] if folder.exists() else []
    return max(
        (int(n.removeprefix(f"{label}.epoch").removesuffix(".json")) for n in names), default=0
    )


def kill_training_after(project: Path, epoch: int) -> None:
    """Start the teacher's training and SIGKILL it once checkpoint ``epoch`` is written."""
    folder = project / "checkpoints/teacher"
    process = subprocess.Popen(
        [sys.executable, "-m", "noisy_student.training.train", "--name", "teacher"],
        cwd=project,
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while True:
        if checkpointed_epoch(folder, "teacher") >= epoch:
            break
        assert process.poll() is None, "the training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert not (project / "models/teacher").exists()  # nothing half-written


def runs(project: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    return mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")


def test_killed_training_resumes_and_ends_as_if_never_killed(tmp_path):
    params = project_params()
    killed = make_project(tmp_path / "killed", params)
    whole = make_project(tmp_path / "whole", params)
    for project in (killed, whole):
        run(["dvc", "repro", "augment"], project)

    kill_training_after(killed, epoch=5)
    (interrupted,) = runs(killed)
    assert interrupted.info.status == "RUNNING"  # a SIGKILL cannot be caught...

    output = run(["dvc", "repro"], killed)
    assert "teacher: resumed after epoch" in output.stderr
    resumed_at = int(output.stderr.split("teacher: resumed after epoch ")[1].split()[0])
    assert 5 <= resumed_at < 40  # from the checkpoint, not from scratch
    run(["dvc", "repro"], whole)

    for path in (
        "models/teacher/model.safetensors",
        "pseudo_labels/student_1.csv",
        "pseudo_labels/student_1.json",
        "models/student_1/model.safetensors",
        "metrics.json",
    ):
        assert (killed / path).read_bytes() == (whole / path).read_bytes(), path
    assert not (killed / "checkpoints/teacher").exists()  # removed once the model is saved

    # ...so the same run carries on: one teacher run, FINISHED, every epoch logged once
    by_name = {r.info.run_name: r for r in training_runs(runs(killed))}
    assert sorted(by_name) == ["student_1", "teacher"]
    teacher = by_name["teacher"]
    assert teacher.info.run_id == interrupted.info.run_id
    assert teacher.info.status == "FINISHED"
    steps = [
        m.step
        for m in mlflow.MlflowClient().get_metric_history(teacher.info.run_id, "val_accuracy")
    ]
    assert sorted(steps) == list(range(1, 41))


def killed_project(tmp_path: Path, epoch: int) -> tuple[Path, dict]:
    """A project whose 20-epoch teacher training was killed after checkpoint ``epoch``."""
    params = project_params()
    params["teacher"]["epochs"] = 20
    project = make_project(tmp_path / "p", params)
    run(["dvc", "repro", "augment"], project)
    kill_training_after(project, epoch=epoch)
    return project, params


def test_a_killed_run_without_its_checkpoint_is_marked_failed(tmp_path):
    project, _ = killed_project(tmp_path, epoch=2)
    shutil.rmtree(project / "checkpoints")  # lost with the machine, say
    run(["dvc", "repro", "train_teacher"], project)
    statuses = sorted(r.info.status for r in runs(project))
    assert statuses == ["FAILED", "FINISHED"]


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    project, params = killed_project(tmp_path, epoch=3)
    params["teacher"]["lr"] = 0.004
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro", "train_teacher"], project)
    assert "resumed" not in output.stderr and "starting afresh" in output.stderr
    assert sorted(r.info.status for r in runs(project)) == ["FAILED", "FINISHED"]
    assert os.listdir(project / "models/teacher")

"""Faults: a training killed with SIGKILL mid-epoch resumes from its last checkpoint and ends
exactly where an uninterrupted run ends; a killed run's MLflow run never stays RUNNING."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.helpers.faults import kill_training_after
from tests.helpers.project import (
    copy_project,
    load_params,
    make_project,
    mlflow_runs,
    quick,
    run,
    training_runs,
)

pytestmark = pytest.mark.slow
EPOCHS = quick(load_params())["teacher"]["epochs"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A project of the shared `dvc repro` one's params whose teacher training was killed after
    checkpoint 3. Shared: each test works on a copy."""
    project = make_project(tmp_path_factory.mktemp("killed"), quick(load_params()))
    run(["dvc", "repro", "augment"], project)
    kill_training_after(project, epoch=3)
    return project


def test_killed_training_resumes_and_ends_as_if_never_killed(killed, repro_demo, tmp_path):
    whole = repro_demo[0]  # the same params, never interrupted
    killed = copy_project(killed, tmp_path / "killed")
    (interrupted,) = training_runs(mlflow_runs(killed))
    assert interrupted.info.status == "RUNNING"  # a SIGKILL cannot be caught...

    output = run(["dvc", "repro", "evaluate"], killed)  # the loop up to the test accuracies
    assert "teacher: resumed after epoch" in output.stderr
    resumed_at = int(output.stderr.split("teacher: resumed after epoch ")[1].split()[0])
    assert 3 <= resumed_at < EPOCHS  # from the checkpoint, not from scratch

    for path in (
        "models/teacher/model.safetensors",
        "pseudo_labels/student_1.parquet",
        "pseudo_labels/student_1.json",
        "models/student_1/model.safetensors",
        "metrics.json",
    ):
        assert (killed / path).read_bytes() == (whole / path).read_bytes(), path
    assert not (killed / "checkpoints/teacher").exists()  # removed once the model is saved

    # ...so the same run carries on: one teacher run, FINISHED, every epoch logged once
    by_name = {r.info.run_name: r for r in training_runs(mlflow_runs(killed))}
    assert sorted(by_name) == ["student_1", "student_2", "teacher"]
    teacher = by_name["teacher"]
    assert teacher.info.run_id == interrupted.info.run_id
    assert teacher.info.status == "FINISHED"
    (loop,) = [r for r in mlflow_runs(killed) if r.data.tags.get("stage") == "loop"]
    assert {r.data.tags["mlflow.parentRunId"] for r in by_name.values()} == {loop.info.run_id}
    steps = [
        m.step
        for m in mlflow.MlflowClient().get_metric_history(teacher.info.run_id, "val_accuracy")
    ]
    assert sorted(steps) == list(range(1, EPOCHS + 1))


def test_a_killed_run_without_its_checkpoint_is_marked_failed(killed, tmp_path):
    project = copy_project(killed, tmp_path / "p")
    shutil.rmtree(project / "checkpoints")  # lost with the machine, say
    run(["dvc", "repro", "train_teacher"], project)
    statuses = sorted(r.info.status for r in training_runs(mlflow_runs(project)))
    assert statuses == ["FAILED", "FINISHED"]


def test_checkpoints_of_other_settings_are_not_resumed(killed, tmp_path):
    project = copy_project(killed, tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"]["lr"] = 0.004
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro", "train_teacher"], project)
    assert "resumed" not in output.stderr and "starting afresh" in output.stderr
    statuses = sorted(r.info.status for r in training_runs(mlflow_runs(project)))
    assert statuses == ["FAILED", "FINISHED"]
    assert os.listdir(project / "models/teacher")

"""DDP training launched by torchrun from params (runtime.devices), two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from noisy_student.core.settings import RuntimeSettings
from noisy_student.training.distributed import torchrun_command
from tests.helpers.faults import checkpointed_epoch, descendants
from tests.helpers.project import (
    copy_project,
    load_params,
    make_project,
    quick,
    ran,
    run,
    shrink,
    training_runs,
    venv_env,
    write_params,
)


def noise_free(params: dict) -> dict:
    """Nothing random but the data order, and no BatchNorm (whose statistics are per process)."""
    for key in params["augment"]["teacher"]:
        if key.endswith("_p"):
            params["augment"]["teacher"][key] = 0.0
    params["teacher"].update(model="test_nfnet", epochs=3, batch_size=8, warmup_epochs=0)
    params["teacher"].update(drop_rate=0.0, drop_path_rate=0.0, randaugment_n=0)
    return params


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    params = noise_free(shrink(load_params()))
    params["runtime"]["devices"] = 1
    single = make_project(tmp_path / "devices_1", params)
    output = run(["dvc", "repro", "train_teacher"], single)
    outputs = {1: output.stdout + output.stderr}
    # the same project with two processes: only the training reruns, into an MLflow store of
    # its own
    double = copy_project(single, tmp_path / "devices_2")
    shutil.rmtree(double / "mlruns", ignore_errors=True)
    (double / "mlflow.db").unlink()
    params["runtime"]["devices"] = 2
    write_params(double / "params.yaml", params)
    output = run(["dvc", "repro", "train_teacher"], double)
    outputs[2] = output.stdout + output.stderr
    assert ran(outputs[2]) == ["scan", "train_teacher"]  # scan: always run, finds no change

    assert "torch.distributed.run" not in outputs[1]
    a = load_file(single / "models/teacher/model.safetensors")
    b = load_file(double / "models/teacher/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the same updates, up to the order of float additions
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)
    curves = [(p / "models/teacher/history.csv").read_text().splitlines() for p in (single, double)]
    val = [[line.split(",")[3] for line in c[1:]] for c in curves]
    assert [float(x) for x in val[0]] == pytest.approx([float(x) for x in val[1]], abs=0.006)

    # rank 0 alone wrote the model and logged to MLflow: one run, its metrics once per epoch
    mlflow.set_tracking_uri(f"sqlite:///{double}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")
    (teacher,) = training_runs(runs)
    assert teacher.info.status == "FINISHED" and teacher.data.params["runtime.devices"] == "2"
    history = mlflow.MlflowClient().get_metric_history(teacher.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert not (double / "checkpoints/teacher").exists()


@pytest.mark.slow
def test_the_whole_loop_runs_distributed_and_resumes_after_a_kill(tmp_path):
    params = quick(load_params(), rounds=1, teacher_epochs=30)  # a teacher well above chance
    params["teacher"]["batch_size"] = 16  # 8 per process
    params["runtime"]["devices"] = 2
    project = make_project(tmp_path / "p", params)
    run(["dvc", "repro", "augment"], project)

    # the machine goes away: every process of the run is killed at once
    stage = subprocess.Popen(
        ["dvc", "repro", "train_teacher"],
        cwd=project,
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = project / "checkpoints/teacher"
    deadline = time.monotonic() + 300
    while not all(checkpointed_epoch(folder, f"teacher.rank{r}") >= 3 for r in (0, 1)):
        assert stage.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    for pid in [stage.pid, *descendants(stage.pid)]:  # torchrun's workers have sessions of
        os.kill(pid, signal.SIGKILL)  # their own: a machine that goes away takes them all
    stage.wait(timeout=30)

    output = run(["dvc", "repro", "evaluate"], project)  # the loop up to the test accuracies
    assert "teacher: resumed after epoch" in output.stderr
    metrics = json.loads((project / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student_1"}
    assert metrics["teacher"]["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")
    runs = training_runs(runs)
    assert sorted(r.info.run_name for r in runs) == ["student_1", "teacher"]
    assert {r.info.status for r in runs} == {"FINISHED"}  # the killed run carried on


def test_torchrun_command_for_one_and_several_machines():
    base = {**load_params()["runtime"], "devices": 4}
    one = torchrun_command(
        RuntimeSettings.model_validate(base), "tasks.train_teacher", ["--name", "x"]
    )
    assert one[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "1", "--standalone",
        "-m", "tasks.train_teacher", "--name", "x",
    ]  # fmt: skip
    several = RuntimeSettings.model_validate({**base, "nodes": 2, "rdzv_endpoint": "node0:29400"})
    command = torchrun_command(several, "tasks.train_teacher", [])
    assert "--standalone" not in command
    assert command[command.index("--rdzv_endpoint") + 1] == "node0:29400"

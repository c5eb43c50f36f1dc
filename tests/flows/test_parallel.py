"""The flow's parallel work: the pool's pseudo-labels in shards on a local Dask cluster, and
trainings under torchrun (DDP) logged under the flow's MLflow parent run."""

from __future__ import annotations

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

from tests.helpers.flows import flow_project, flow_run, outcomes
from tests.helpers.project import (
    copy_project,
    dvc_status,
    mlflow_runs,
    run,
    write_params,
)

pytestmark = pytest.mark.slow


def test_sharded_pseudo_labels_on_dask_equal_the_single_process_ones(flow_demo, tmp_path):
    """The flow labels the pool in 3 shards on a local Dask cluster of 2 workers; the stage's
    command labels it in one process with the same teacher: the same table, byte for byte.
    (On a copy of the flow's demo project cut to one round: its teacher is trained.)"""
    project = copy_project(flow_demo[0], tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["students"] = params["students"][:1]
    params["pseudo_label"]["shards"] = 3
    params["pseudo_label"]["batch_size"] = 128  # 1049 pool images: shards of 384, 384, 281
    params["flow"]["dask_workers"] = 2
    write_params(project / "params.yaml", params)
    state = flow_run(project)
    assert state.is_completed(), state.message
    assert outcomes(state)["pseudo_label@0"] == "ran"
    sharded = {
        name: (project / "pseudo_labels" / name).read_bytes()
        for name in ("student_1.parquet", "student_1.json")
    }
    assert not list((project / "pseudo_labels").glob(".*shards"))  # merged, then removed
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="label student_1 rows"))
        )
    assert sorted(t.name for t in task_runs) == [
        "label student_1 rows 0-384",
        "label student_1 rows 384-768",
        "label student_1 rows 768-1049",
    ]
    params["pseudo_label"]["shards"] = 1
    write_params(tmp_path / "one_process.yaml", params)
    one = ["python", "-m", "tasks.pseudo_label", "student_1", "--params"]
    run([*one, str(tmp_path / "one_process.yaml")], project)
    for name, expected in sharded.items():
        assert (project / "pseudo_labels" / name).read_bytes() == expected, name


def test_the_flow_trains_with_ddp_under_its_parent_run(prefect_server, tmp_path):
    project = flow_project(tmp_path / "p", rounds=1, teacher_epochs=20)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"]["batch_size"] = 16
    params["pseudo_label"]["threshold"] = 0.3  # a teacher of 40 steps: keep some of its labels
    params["runtime"]["devices"] = 2  # each training step starts two torchrun processes
    write_params(project / "params.yaml", params)
    state = flow_run(project)
    assert state.is_completed(), state.message
    runs = mlflow_runs(project)
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "flow"]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(children) == ["student_1", "teacher"]  # rank 0 alone logged
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["runtime.devices"] == "2"
    assert dvc_status(project) == {}

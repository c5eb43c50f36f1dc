"""The Prefect flow `self-training` against a real (temporary) Prefect server, on tiny real data."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import ROOT, load_params, make_project, run, shrink, venv_env, write_params
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

import noisy_student.training.train
from flows.dvc_project import DvcProject, params_for_run
from flows.self_training import self_training
from flows.stages import check_against_dag, plan
from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import load_settings

STAGES = [
    "prepare",
    "augment",
    "train_teacher",
    "pseudo_label@0",
    "train_student@0",
    "pseudo_label@1",
    "train_student@1",
    "evaluate",
    "export",
    "report",
]


def tiny_project(path: Path, rounds: int = 2) -> Path:
    params = shrink(load_params())
    while len(params["students"]) < rounds:
        extra = dict(params["students"][-1])
        extra.update(name=f"student_{len(params['students']) + 1}", teacher=extra["name"])
        params["students"].append(extra)
    return make_project(path, params)


def test_flow_follows_the_dvc_dag(tmp_path):
    """Same stages as dvc.yaml, every dependency before its dependents (three rounds here)."""
    project = tiny_project(tmp_path / "p", rounds=3)
    names, edges = DvcProject(project).dag()
    order = [step.stage for step in plan(load_settings(project / "params.yaml"))]
    assert sorted(order) == sorted(names) and len(order) == len(set(order)) == 12
    position = {stage: i for i, stage in enumerate(order)}
    assert edges, "dvc.yaml's stages depend on each other"
    for upstream, downstream in edges:
        assert position[upstream] < position[downstream], (upstream, downstream)


def test_a_flow_that_drifted_from_dvc_yaml_is_refused():
    steps = plan(load_settings(ROOT / "params.yaml"))
    names = [step.stage for step in steps]
    check_against_dag(steps, names, [("prepare", "augment")])
    with pytest.raises(PipelineError, match=r"only in dvc.yaml: \['bench'\]"):
        check_against_dag(steps, [*names, "bench"], [])
    with pytest.raises(PipelineError, match="runs prepare before augment"):
        check_against_dag(steps, names, [("augment", "prepare")])


def test_not_a_dvc_project_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no dvc.yaml"):
        DvcProject(tmp_path)


# --- against a Prefect server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server():
    # the first start of a fresh server migrates its database: give it time
    with prefect_test_harness(server_startup_timeout=240):
        yield PREFECT_API_URL.value()


def flow_run(project: Path, overrides: dict | None = None):
    return self_training(overrides, str(project), return_state=True)


def outcomes(state) -> dict[str, str]:
    return state.result()["outcomes"]


def dvc_status(project: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], project).stdout)


def mlflow_runs(project: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    return mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")


@pytest.fixture(scope="module")
def flow_demo(prefect_server, tmp_path_factory):
    project = tiny_project(tmp_path_factory.mktemp("flow"))
    state = flow_run(project)
    return project, state


@pytest.mark.slow
def test_flow_run_is_versioned_like_dvc_repro(flow_demo):
    project, state = flow_demo
    assert state.is_completed(), state.message
    assert outcomes(state) == dict.fromkeys(STAGES, "ran")
    assert dvc_status(project) == {}
    output = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in output
    assert all(f"Stage '{s}' didn't change, skipping" in output for s in STAGES)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    assert lock["stages"]["pseudo_label@1"]["outs"][0]["path"] == "pseudo_labels/student_2.csv"
    experiments = run(["dvc", "exp", "list", "--names-only"], project).stdout.split()
    assert state.state_details.flow_run_id is not None
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(state.state_details.flow_run_id).name
    assert name in experiments
    # the experiment commit holds what `dvc exp show` and `dvc diff` need
    listed = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout
    ref = next(line for line in listed.split() if line.endswith(f"/{name}"))
    files = run(["git", "show", "--name-only", "--format=", ref], project).stdout.split()
    assert {"dvc.lock", "metrics.json", "pseudo_labels/student_1.json"} <= set(files)


@pytest.mark.slow
def test_flow_run_is_one_mlflow_parent_run(flow_demo):
    project, state = flow_demo
    flow_run_id = str(state.state_details.flow_run_id)
    runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get("stage") == "flow"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(children) == ["student_1", "student_2", "teacher"]
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["prefect.flow_run_id"] == flow_run_id
    metrics = json.loads((project / "metrics.json").read_text())
    for name in children:
        assert parent.data.metrics[f"test_accuracy/{name}"] == pytest.approx(
            metrics[name]["test_accuracy"], abs=1e-4
        )
    assert parent.data.params["pseudo_label.threshold"] == "0.6"
    # the report's pictures are the parent run's artifacts (no run of its own in a flow)
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/report.html",
        "report/plots",
    }
    pictures = client.list_artifacts(parent.info.run_id, "report/plots")
    assert len(pictures) == len(list((project / "reports/plots/images").glob("*.png"))) == 6


@pytest.mark.slow
def test_flow_publishes_prefect_artifacts(flow_demo):
    project, state = flow_demo
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    by_key = {a.key: a for a in artifacts if a.key}
    table = by_key["self-training-rounds"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["model"] for row in rows] == ["teacher", "student_1", "student_2"]
    for row in rows[1:]:
        summary = json.loads((project / f"pseudo_labels/{row['model']}.json").read_text())
        assert row["pseudo_labels_kept"] == summary["kept"]
        assert {f"kept {c}": n for c, n in summary["kept_per_class"].items()}.items() <= row.items()
    markdown = by_key["self-training-runs"].data
    for child in mlflow_runs(project):
        assert f"/runs/{child.info.run_id}" in markdown
    assert any(a.type == "progress" and a.data == 100.0 for a in artifacts)
    # the report, pictures inline: the Prefect UI renders markdown images from data URIs
    report = by_key["self-training-report"]
    assert report.type == "markdown"
    inlined = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report.data)
    pictures = sorted((project / "reports/plots/images").glob("*.png"))
    assert [base64.b64decode(data) for data in inlined] == [p.read_bytes() for p in pictures]


@pytest.mark.slow
def test_second_run_skips_every_stage(flow_demo):
    project, _ = flow_demo
    state = flow_run(project)
    assert state.is_completed()
    assert outcomes(state) == dict.fromkeys(STAGES, "skipped")
    assert dvc_status(project) == {}


@pytest.mark.slow
def test_overrides_apply_to_one_run_only(flow_demo, tmp_path):
    project = tmp_path / "copy"  # the shared project stays as the other tests expect
    shutil.copytree(flow_demo[0], project)
    params_text = (project / "params.yaml").read_text()

    state = flow_run(project, {"pseudo_label.threshold": 0.5})
    assert state.is_completed(), state.message
    first, first_accuracy = state, json.loads((project / "metrics.json").read_text())
    assert outcomes(state) == {
        **dict.fromkeys(STAGES[:3], "skipped"),
        **dict.fromkeys(STAGES[3:], "ran"),
    }
    assert (project / "params.yaml").read_text() == params_text
    assert json.loads((project / "pseudo_labels/student_1.json").read_text())["threshold"] == 0.5
    run_id = state.result()["mlflow_run_id"]
    runs = mlflow_runs(project)
    this_run = [r for r in runs if run_id in (r.info.run_id, r.data.tags.get("mlflow.parentRunId"))]
    assert len(this_run) == 3  # the parent and the two students it retrained
    assert {r.data.params["pseudo_label.threshold"] for r in this_run} == {"0.5"}
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert recorded["overrides"] == {"pseudo_label.threshold": 0.5}

    # params.yaml's values again: DVC's run-cache gives back the earlier results, no training
    state = flow_run(project)
    assert outcomes(state) == {
        **dict.fromkeys(STAGES[:3], "skipped"),
        **dict.fromkeys(STAGES[3:], "restored"),
    }
    assert dvc_status(project) == {}
    assert json.loads((project / "pseudo_labels/student_1.json").read_text())["threshold"] == 0.6
    # the champion is the workspace's again, though evaluate was restored, not run
    registry = json.loads((project / "reports/registry.json").read_text())
    champion = mlflow.MlflowClient().get_model_version_by_alias("noisy-student", "champion")
    assert champion.tags["model_name"] == registry["champion"]
    assert champion.run_id == next(
        m["run_id"] for m in registry["models"] if m["model"] == registry["champion"]
    )

    # the two runs' plots side by side: `dvc plots diff <experiment> <experiment>`
    with get_client(sync_client=True) as client:
        names = [client.read_flow_run(s.state_details.flow_run_id).name for s in (first, state)]
    plots = json.loads(run(["dvc", "plots", "diff", *names, "--json"], project).stdout)["data"]
    values = plots["test accuracy per round"][0]["content"]["data"]["values"]
    by_rev = {(v["rev"], v["model"]): float(v["test_accuracy"]) for v in values}
    second_accuracy = json.loads((project / "metrics.json").read_text())
    for name in ("teacher", "student_1", "student_2"):
        assert by_rev[(names[0], name)] == pytest.approx(
            first_accuracy[name]["test_accuracy"], abs=1e-6
        )
        assert by_rev[(names[1], name)] == pytest.approx(
            second_accuracy[name]["test_accuracy"], abs=1e-6
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"pseudo_label.threshold": "high"},
            "pseudo_label.threshold: Input should be a valid number",
        ),
        ({"pseudo_label.treshold": 0.5}, "params.yaml has no key 'treshold'"),
    ],
)
def test_bad_overrides_fail_before_any_work(flow_demo, overrides, message):
    project, _ = flow_demo
    params_text = (project / "params.yaml").read_text()
    runs_before = len(mlflow_runs(project))
    state = flow_run(project, overrides)
    assert state.is_failed()
    with pytest.raises(PipelineError, match=message):
        state.result()
    assert (project / "params.yaml").read_text() == params_text
    assert len(mlflow_runs(project)) == runs_before


@pytest.fixture
def failing_round(monkeypatch):
    """Make training of student_2 raise the queued errors, one per call, then train for real."""
    real = noisy_student.training.train.train
    errors: list[Exception] = []
    calls: list[str] = []

    def train(settings, name, **kwargs):
        calls.append(name)
        if name == "student_2" and errors:
            raise errors.pop(0)
        return real(settings, name, **kwargs)

    monkeypatch.setattr(noisy_student.training.train, "train", train)
    return errors, calls


@pytest.mark.slow
def test_failed_round_resumes_at_the_failed_stage(prefect_server, tmp_path, failing_round):
    errors, calls = failing_round
    project = tiny_project(tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["flow"].update(retries=1, retry_delay_seconds=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    errors.append(PipelineError("disk full"))  # bad input is never retried
    state = flow_run(project)
    assert state.is_failed()
    assert calls == ["teacher", "student_1", "student_2"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES[:6]
    parent = next(r for r in mlflow_runs(project) if r.data.tags.get("stage") == "flow")
    assert parent.info.status == "FAILED"
    teacher_weights = (project / "models/teacher/model.safetensors").stat().st_mtime_ns

    calls.clear()
    state = flow_run(project)
    assert state.is_completed(), state.message
    assert outcomes(state) == {
        **dict.fromkeys(STAGES[:6], "skipped"),
        **dict.fromkeys(STAGES[6:], "ran"),
    }
    assert calls == ["student_2"]
    assert (project / "models/teacher/model.safetensors").stat().st_mtime_ns == teacher_weights
    assert dvc_status(project) == {}

    # an unexpected error is retried (flow.retries) and the run completes
    calls.clear()
    errors.append(RuntimeError("CUDA error: unspecified launch failure"))
    state = flow_run(project, {"students.1.epochs": 2})
    assert state.is_completed(), state.message
    assert calls == ["student_2", "student_2"]


@pytest.mark.slow
def test_served_deployment_runs_through_the_api(prefect_server, tmp_path):
    """Two deployment runs started at the same moment: one waits for the other (the project's
    run lock), both complete, and neither corrupts the outputs or the MLflow store."""
    project = tiny_project(tmp_path / "p")
    env = {**venv_env(), "PREFECT_API_URL": prefect_server}
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.serve"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    client.read_deployment_by_name("self-training/demo")
                    break
                except Exception:
                    if serve.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(
                            f"no deployment served:\n{serve.stdout.read()}"
                        ) from None
                    time.sleep(1)
            started = [run_deployment("self-training/demo", timeout=0) for _ in range(2)]
            deadline = time.monotonic() + 900
            while True:
                states = [client.read_flow_run(r.id).state for r in started]
                if all(state.is_final() for state in states):
                    break
                assert time.monotonic() < deadline, [s.name for s in states]
                time.sleep(2)
            assert all(state.is_completed() for state in states), [s.message for s in states]
            logs = [
                log.message
                for r in started
                for log in client.read_logs(LogFilter(flow_run_id={"any_": [r.id]}))
            ]
    finally:
        serve.terminate()
        serve.wait(timeout=60)
    assert any("another self-training run holds" in message for message in logs)
    assert set(json.loads((project / "metrics.json").read_text())) == {
        "teacher",
        "student_1",
        "student_2",
    }
    assert dvc_status(project) == {}
    assert os.path.exists(project / "pseudo_labels/student_2.csv")
    runs = mlflow_runs(project)
    parents = [r for r in runs if r.data.tags.get("stage") == "flow"]
    trainings = [r for r in runs if r.data.tags.get("stage") != "flow"]
    assert len(parents) == 2 and len(trainings) == 3  # the second run trained nothing again
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_sharded_pseudo_labels_on_dask_equal_the_single_process_ones(prefect_server, tmp_path):
    """The flow labels the pool in 3 shards on a local Dask cluster of 2 workers; the stage's
    command labels it in one process with the same teacher: the same table, byte for byte."""
    params = shrink(load_params())
    params["students"] = params["students"][:1]
    params["pseudo_label"]["shards"] = 3
    params["pseudo_label"]["batch_size"] = 128  # 1049 pool images: shards of 384, 384, 281
    params["flow"]["dask_workers"] = 2
    project = make_project(tmp_path / "p", params)
    state = flow_run(project)
    assert state.is_completed(), state.message
    sharded = {
        name: (project / "pseudo_labels" / name).read_bytes()
        for name in ("student_1.csv", "student_1.json")
    }
    assert not list((project / "pseudo_labels").glob(".*shards"))  # merged, then removed
    with get_client(sync_client=True) as client:
        names = [t.name for t in client.read_task_runs() if t.name.startswith("label student_1")]
    assert sorted(names) == [
        "label student_1 rows 0-384",
        "label student_1 rows 384-768",
        "label student_1 rows 768-1049",
    ]
    params["pseudo_label"]["shards"] = 1
    write_params(tmp_path / "one_process.yaml", params)
    one = ["python", "-m", "noisy_student.pseudo_labels.labeling", "student_1", "--params"]
    run([*one, str(tmp_path / "one_process.yaml")], project)
    for name, expected in sharded.items():
        assert (project / "pseudo_labels" / name).read_bytes() == expected, name


@pytest.mark.slow
def test_a_worker_of_the_process_pool_runs_the_deployment(prefect_server, tmp_path):
    """`python -m flows.deploy` registers the deployment on a process work pool; a
    `prefect worker start` process picks the run up and runs the flow to Completed."""
    params = shrink(load_params())
    params["students"] = params["students"][:1]
    project = make_project(tmp_path / "p", params)
    env = {**venv_env(), "PREFECT_API_URL": prefect_server}
    deploy = [sys.executable, "-m", "flows.deploy", "--pool", "test-pool", "--name", "w"]
    subprocess.run(deploy, cwd=project, env=env, check=True, capture_output=True)
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "test-pool", "--limit", "1"],
        cwd=tmp_path,  # the deployment's pull step takes the run to the project
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        flow_run_ = run_deployment("self-training/w", timeout=900, poll_interval=2)
        assert flow_run_.state.is_completed(), flow_run_.state.message
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("test-pool")
            ran_by = client.read_flow_run(flow_run_.id).work_pool_name
    finally:
        worker.terminate()
        try:
            output = worker.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:  # its shutdown is Prefect's; seen to hang under load
            worker.kill()
            output = worker.communicate()[0]
    assert pool.type == "process" and ran_by == "test-pool"
    assert "Worker" in output and str(flow_run_.id) in output
    assert set(json.loads((project / "metrics.json").read_text())) == {"teacher", "student_1"}
    assert dvc_status(project) == {}


@pytest.mark.slow
def test_the_flow_trains_with_ddp_under_its_parent_run(prefect_server, tmp_path):
    params = shrink(load_params())
    params["students"] = params["students"][:1]
    params["teacher"]["batch_size"] = 16
    params["runtime"]["devices"] = 2  # each training step starts two torchrun processes
    project = make_project(tmp_path / "p", params)
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


def test_overrides_hold_for_the_run_and_leave_params_yaml_as_it_was(tmp_path):
    params = tmp_path / "params.yaml"
    text = "# knobs\nseed: 0  # the seed\npseudo_label:\n  threshold: 0.8  # keep above\n"
    params.write_text(text)
    with params_for_run(params, {"pseudo_label.threshold": 0.9}):
        during = params.read_text()
        assert yaml.safe_load(during) == {"seed": 0, "pseudo_label": {"threshold": 0.9}}
        assert "# keep above" in during  # comments survive the round trip
    assert params.read_text() == text
    with pytest.raises(RuntimeError), params_for_run(params, {"seed": 3}):
        raise RuntimeError("stage crashed")
    assert params.read_text() == text
    with pytest.raises(PipelineError, match="no key 'sede'"), params_for_run(params, {"sede": 1}):
        pass
    assert params.read_text() == text

"""The Prefect flow `self-training` against a real (temporary) Prefect server, on tiny real data:
its plan against dvc.yaml's DAG, a run versioned like `dvc repro`, MLflow parent and child runs,
Prefect artifacts, overrides for one run, bad overrides, a failed round resumed at its stage."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import get_client

import flows.stages
import noisy_student.training.launch
from flows.dvc_project import DvcProject, params_for_run
from flows.stages import dag_order, dvc_yaml_plan, plan
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.pseudo_labels.to_label import to_label
from tests.helpers.flows import (
    flow_artifacts,
    flow_project,
    flow_run,
    flow_run_name,
    outcomes,
    table_rows,
)
from tests.helpers.project import (
    ROOT,
    SCAN,
    STAGES,
    copy_project,
    dvc_status,
    load_params,
    loop_results,
    make_project,
    mlflow_runs,
    ran,
    registry_champion,
    run,
    shrink,
    stages_between,
    stages_from,
)

# --- the plan: dvc.yaml's stages, in an order its DAG allows ---------------------------------


def test_flow_follows_the_dvc_dag(tmp_path):
    """Same stages as dvc.yaml, every dependency before its dependents (three rounds here)."""
    project = flow_project(tmp_path / "p", rounds=3)
    names, edges = DvcProject(project).dag()
    settings = load_settings(project / "params.yaml")
    order = [step.stage for step in dvc_yaml_plan(settings, project)]
    assert sorted(order) == sorted(names) and len(order) == len(set(order)) == 14
    position = {stage: i for i, stage in enumerate(order)}
    assert edges, "dvc.yaml's stages depend on each other"
    for upstream, downstream in edges:
        assert position[upstream] < position[downstream], (upstream, downstream)


def test_the_plan_is_exactly_dvc_yamls_stages_and_a_stage_without_module_is_refused(tmp_path):
    project = make_project(tmp_path / "p", shrink(load_params()))
    settings = load_settings(project / "params.yaml")
    names, edges = DvcProject(project).dag()
    steps = dvc_yaml_plan(settings, project)
    assert [step.stage for step in steps] == STAGES  # dvc.yaml's stages, nothing more or less
    assert [step.model for step in steps if step.model] == ["teacher", "student_1", "student_2"]
    # the order comes from the DAG, not from the order DVC lists the stages in
    shuffled = dag_order(names[::-1], edges)
    position = {stage: i for i, stage in enumerate(shuffled)}
    assert sorted(shuffled) == sorted(names)
    for upstream, downstream in edges:
        assert position[upstream] < position[downstream], (upstream, downstream)
    assert dag_order(["b", "a", "c"], []) == ["b", "a", "c"]  # dvc.yaml's order where free
    assert dag_order(["prepare", "augment"], [("augment", "prepare")]) == ["augment", "prepare"]
    with pytest.raises(PipelineError, match=r"the stages \['a', 'b'\] form a cycle"):
        dag_order(["a", "b"], [("a", "b"), ("b", "a")])
    # a stage of dvc.yaml the code does not have: a clear error, before any work
    with pytest.raises(PipelineError, match=r"stage 'bench' has no module tasks/bench.py"):
        plan(settings, [*names, "bench"], edges)


def test_a_stage_module_that_fails_to_import_is_not_called_missing(monkeypatch):
    """Only a missing tasks/<stage>.py is reported as such; a module that is there but imports
    something absent fails with that import's own error."""

    def import_module(name: str):
        raise ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript")

    monkeypatch.setattr(flows.stages, "importlib", SimpleNamespace(import_module=import_module))
    settings = load_settings(ROOT / "params.yaml")
    with pytest.raises(ModuleNotFoundError, match="onnxscript"):
        plan(settings, ["export"], [])


def test_not_a_dvc_project_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no dvc.yaml"):
        DvcProject(tmp_path)


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


# --- against a Prefect server ----------------------------------------------------------------


@pytest.mark.slow
def test_flow_run_is_versioned_like_dvc_repro(flow_demo, repro_demo):
    project, state = flow_demo
    assert state.is_completed(), state.message
    # one result per params and data: the flow, in this long-lived process and another git + DVC
    # repository, trained the models and wrote the pseudo-labels `dvc repro` did, byte for byte
    assert loop_results(project) == loop_results(repro_demo[0])
    assert outcomes(state) == dict.fromkeys(STAGES, "ran")
    assert dvc_status(project) == {}
    output = run(["dvc", "repro"], project).stdout
    assert ran(output) == [SCAN]  # always run; the images are the same, so nothing else runs
    assert all(f"Stage '{s}' didn't change, skipping" in output for s in STAGES[1:])
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    outs = [out["path"] for out in lock["stages"]["pseudo_label@1"]["outs"]]
    assert "pseudo_labels/student_2.parquet" in outs
    experiments = run(["dvc", "exp", "list", "--names-only"], project).stdout.split()
    assert state.state_details.flow_run_id is not None
    name = flow_run_name(state)
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
    assert len(pictures) == len(list((project / "reports/plots/images").glob("*.png"))) == 8


@pytest.mark.slow
def test_flow_publishes_prefect_artifacts(flow_demo):
    project, state = flow_demo
    artifacts = flow_artifacts(state)
    by_key = {a.key: a for a in artifacts if a.key}
    rows = table_rows(by_key["self-training-rounds"])
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
    assert outcomes(state) == {SCAN: "ran", **dict.fromkeys(STAGES[1:], "skipped")}
    assert dvc_status(project) == {}


@pytest.mark.slow
def test_label_next_publishes_the_champions_picks_after_the_loop(flow_demo, tmp_path):
    """`label_next`: after the loop (here all skipped), the champion's picks by params.yaml's
    to_label section (12 by margin, for this run) are written to to_label/ and published as
    Prefect artifacts, contact sheet inline; DVC sees nothing new."""
    project = copy_project(flow_demo[0], tmp_path / "copy")
    overrides = {"to_label.count": 12, "to_label.strategy": "margin"}
    state = flow_run(project, overrides, label_next=True)
    assert state.is_completed(), state.message
    assert outcomes(state) == {SCAN: "ran", **dict.fromkeys(STAGES[1:], "skipped")}
    folder = str((project / "to_label").resolve())
    assert state.result()["to_label"] == {"picked": 12, "folder": folder}
    picked = pd.read_csv(project / "to_label/picked.csv", dtype={"id": str})
    with contextlib.chdir(project):  # the same picks as the command would make
        mine = to_label(load_settings(overrides=overrides), Layout.at(), out=tmp_path / "mine")
    assert picked["id"].tolist() == mine["id"].tolist() and mine["rank"].tolist() == [*range(1, 13)]
    assert mine["score"].to_numpy() == pytest.approx(1 - mine["margin"].to_numpy())  # by margin
    by_key = {a.key: a for a in flow_artifacts(state) if a.key}
    rows = table_rows(by_key["images-to-label"])
    assert [row["id"] for row in rows] == picked["id"].tolist()
    (sheet,) = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", by_key[
        "images-to-label-sheet"].data)  # fmt: skip
    assert base64.b64decode(sheet) == (project / "to_label/contact_sheet.png").read_bytes()
    assert dvc_status(project) == {}
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["to_label"] == load_params()["to_label"]  # the overrides held for that run only


@pytest.mark.slow
def test_overrides_apply_to_one_run_only(flow_demo, tmp_path):
    """A new threshold and a first round made to fail, for one run: round 1 is not promoted and
    round 2 learns from the teacher, as under `dvc repro`; then params.yaml's results return."""
    # a copy: the shared project stays as the other tests expect
    project = copy_project(flow_demo[0], tmp_path / "copy")
    params_text = (project / "params.yaml").read_text()

    overrides = {"pseudo_label.threshold": 0.5, "students.0.epochs": 1, "students.0.lr": 1e-6}
    state = flow_run(project, overrides)
    assert state.is_completed(), state.message
    student_1 = json.loads((project / "models/student_1/standing.json").read_text())
    assert not student_1["promoted"] and student_1["best"] == "teacher"
    pseudo = project / "pseudo_labels"
    assert json.loads((pseudo / "student_2.json").read_text())["teacher"] == "teacher"
    assert (pseudo / "student_2.parquet").read_bytes() == (
        pseudo / "student_1.parquet"
    ).read_bytes()
    final = json.loads((project / "models/student_2/standing.json").read_text())
    store = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    parent = store.get_run(state.result()["mlflow_run_id"])
    assert parent.data.tags["champion"] == final["best"] == registry_champion(project)
    assert parent.data.tags["loop_end"] == final["reason"]
    first, first_accuracy = state, json.loads((project / "metrics.json").read_text())
    assert outcomes(state) == {
        SCAN: "ran",
        **dict.fromkeys(stages_between("prepare", "pseudo_label@0"), "skipped"),
        **dict.fromkeys(stages_from("pseudo_label@0"), "ran"),
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
    assert recorded["overrides"] == overrides

    # params.yaml's values again: DVC's run-cache gives back the earlier results, no training
    state = flow_run(project)
    assert outcomes(state) == {
        SCAN: "ran",
        **dict.fromkeys(stages_between("prepare", "pseudo_label@0"), "skipped"),
        **dict.fromkeys(stages_from("pseudo_label@0"), "restored"),
    }
    assert dvc_status(project) == {}
    assert json.loads((project / "pseudo_labels/student_1.json").read_text())["threshold"] == 0.6
    # the champion is the workspace's again, though register was restored, not run
    registry = json.loads((project / "reports/registry.json").read_text())
    champion = mlflow.MlflowClient().get_model_version_by_alias("noisy-student", "champion")
    assert champion.tags["model_name"] == registry["champion"]
    assert champion.run_id == next(
        m["run_id"] for m in registry["models"] if m["model"] == registry["champion"]
    )

    # the two runs' plots side by side: `dvc plots diff <experiment> <experiment>`
    names = [flow_run_name(s) for s in (first, state)]
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
    real = noisy_student.training.launch.train
    errors: list[Exception] = []
    calls: list[str] = []

    def train(settings, name, layout, **kwargs):
        calls.append(name)
        if name == "student_2" and errors:
            raise errors.pop(0)
        return real(settings, name, layout, **kwargs)

    monkeypatch.setattr(noisy_student.training.launch, "train", train)
    return errors, calls


@pytest.mark.slow
def test_failed_round_resumes_at_the_failed_stage(prefect_server, tmp_path, failing_round):
    errors, calls = failing_round
    project = flow_project(tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["flow"].update(retries=1, retry_delay_seconds=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    errors.append(PipelineError("disk full"))  # bad input is never retried
    state = flow_run(project)
    assert state.is_failed()
    assert calls == ["teacher", "student_1", "student_2"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == stages_between(SCAN, "train_student@1")
    parent = next(r for r in mlflow_runs(project) if r.data.tags.get("stage") == "flow")
    assert parent.info.status == "FAILED"
    teacher_weights = (project / "models/teacher/model.safetensors").stat().st_mtime_ns

    calls.clear()
    state = flow_run(project)
    assert state.is_completed(), state.message
    assert outcomes(state) == {
        SCAN: "ran",
        **dict.fromkeys(stages_between("prepare", "train_student@1"), "skipped"),
        **dict.fromkeys(stages_from("train_student@1"), "ran"),
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

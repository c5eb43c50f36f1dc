"""`dvc repro` of the real pipeline in fresh git repositories, on tiny real data."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers.images import folder_params, write_image_folders
from tests.helpers.project import (
    ONE_ROUND,
    SCAN,
    STAGES,
    copy_project,
    dvc_status,
    load_params,
    make_project,
    mlflow_runs,
    quick,
    ran,
    registry_champion,
    run,
    shrink,
    stages_from,
    training_runs,
    write_params,
)

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_in_order(repro_demo):
    project, output = repro_demo
    assert ran(output) == STAGES
    metrics = json.loads((project / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "student_1", "student_2"]
    assert all(0.0 <= m["test_accuracy"] <= 1.0 for m in metrics.values())
    assert metrics["teacher"]["test_accuracy"] > 0.3
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    data = next(iter(shown.values()))["data"]
    assert (
        data["metrics.json"]["data"]["student_2"]["test_accuracy"]
        == metrics["student_2"]["test_accuracy"]
    )
    assert "| student_2 |" in (project / "reports" / "comparison.md").read_text()
    # the outputs are hard links into DVC's cache (.dvc/config), not second copies: files and
    # directories' files alike
    for output in ("models/teacher/model.safetensors", "data/prepared/unlabeled/images.npy"):
        assert (project / output).stat().st_nlink == 2, output


def test_pseudo_label_table(repro_demo):
    project, _ = repro_demo
    pool = pd.read_csv(project / "data/prepared/unlabeled/index.csv")
    table = pd.read_parquet(project / "pseudo_labels/student_1.parquet")
    prob_cols = [f"p_{i}" for i in range(10)]
    assert list(table.columns) == [
        "id",
        "pred",
        "pred_class",
        "confidence",
        "energy",
        "kept",
        "copies",
        *prob_cols,
    ]
    assert table["energy"].notna().all()  # the filter is off by default: no `foreign` column
    assert ((table["copies"] > 0) == table["kept"]).all()  # a kept row trains at least once
    assert table["id"].tolist() == pool["id"].tolist()
    # float16 probabilities (pseudo_label.probs): 11 significant bits; confidence stays float32
    assert (table[prob_cols].dtypes == "float16").all() and table["confidence"].dtype == "float32"
    probs = table[prob_cols].to_numpy(np.float64)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(probs.max(axis=1), table["confidence"], atol=5e-4)
    threshold = quick(load_params())["pseudo_label"]["threshold"]
    # the CSV rounds to 6 digits; class balancing (the default) may leave out confident rows of
    # a frequent class, never keep one below the threshold
    assert (table["confidence"][table["kept"]] >= threshold - 1e-5).all()
    summary = json.loads((project / "pseudo_labels/student_1.json").read_text())
    assert summary["balance"] is True
    assert len({n for n in summary["trained_per_class"].values() if n > 0}) == 1
    kept = table["kept"].to_numpy()
    correct = (table["pred"].to_numpy() == pool["true_label"].to_numpy())[kept].mean()
    assert summary["kept"] == kept.sum()
    assert summary["kept_accuracy"] == pytest.approx(correct)


def test_every_training_is_an_mlflow_run(repro_demo):
    project, _ = repro_demo
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")
    by_name = {r.info.run_name: r for r in training_runs(runs)}
    assert sorted(by_name) == ["student_1", "student_2", "teacher"]
    (report,) = [r for r in runs if r.data.tags.get("stage") == "report"]
    # each stage is a process of its own, yet one run groups the loop, as a flow run does: the
    # teacher opened it, each student found it through its teacher's card, the report tagged it
    (loop,) = [r for r in runs if r.data.tags.get("stage") == "loop"]
    for r in [*by_name.values(), report]:
        assert r.data.tags["mlflow.parentRunId"] == loop.info.run_id
    champion = json.loads((project / "reports/registry.json").read_text())["champion"]
    assert loop.data.tags["champion"] == champion and loop.data.tags["loop_end"]
    assert loop.info.status == "FINISHED" and loop.data.params["seed"] == "0"
    metrics = json.loads((project / "metrics.json").read_text())
    client = mlflow.MlflowClient()
    params = quick(load_params())
    for name, expected_round in (("teacher", 0), ("student_1", 1), ("student_2", 2)):
        r = by_name[name]
        assert r.info.status == "FINISHED"
        assert r.data.tags["stage"] == ("teacher" if name == "teacher" else "student")
        assert r.data.tags["round"] == str(expected_round)
        assert r.data.metrics["test_accuracy"] == pytest.approx(metrics[name]["test_accuracy"])
        epochs = (
            params["teacher"]["epochs"] if name == "teacher" else params["students"][0]["epochs"]
        )
        for key in ("train_loss", "val_accuracy"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == list(
                range(1, epochs + 1)
            )
    models = mlflow.search_logged_models(
        output_format="list", experiment_ids=[runs[0].info.experiment_id]
    )
    assert len(models) == 3


def dvc_plots(project, *revisions: str) -> dict:
    command = ["dvc", "plots", "diff", *revisions] if revisions else ["dvc", "plots", "show"]
    return json.loads(run([*command, "--json"], project).stdout)["data"]


def test_report_registry_export_and_dvc_plots(repro_demo):
    project, _ = repro_demo
    metrics = json.loads((project / "metrics.json").read_text())
    registry = json.loads((project / "reports/registry.json").read_text())
    standing = json.loads((project / "models/student_2/standing.json").read_text())
    best = standing["best"]  # chosen on validation, whatever the test accuracies say
    assert registry["champion"] == best
    assert metrics[best]["val_accuracy"] == max(m["val_accuracy"] for m in metrics.values())
    assert [m["version"] for m in registry["models"]] == [1, 2, 3]
    page = (project / "reports/report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 8
    assert f"Champion, chosen on validation: {best} " in page
    assert (project / "exports/final.onnx").stat().st_size > 0

    plots = dvc_plots(project)
    assert "errors" not in json.dumps(plots)
    accuracy = plots["test accuracy per round"][0]["content"]["data"]["values"]
    assert {row["model"]: float(row["test_accuracy"]) for row in accuracy} == pytest.approx(
        {name: m["test_accuracy"] for name, m in metrics.items()}, abs=1e-6
    )
    confusion = plots["reports/test_predictions/student_2.csv"][0]["content"]
    assert len(confusion["data"]["values"]) == 539  # one row per test image
    for plot_id in (
        "reports/plots/learning_curves/teacher.csv",
        "reports/plots/confidence/student_2.csv",
        "reports/plots/kept_per_class/student_1.csv",
        "reports/plots/reliability/teacher.csv",
        f"reports/plots/images/05_confusion-{best}.png",
        f"reports/plots/images/06_class_scores-{best}.png",
        "reports/plots/images/07_reliability.png",
        "reports/plots/images/08_augmentation_preview.png",
    ):
        assert plot_id in plots, sorted(plots)
    recall = plots["recall per class, per model (weak classes)"][0]["content"]["data"]["values"]
    assert len(recall) == 10 * len(metrics)  # every class of every model


def test_second_repro_skips_everything(repro_demo):
    project, _ = repro_demo
    output = run(["dvc", "repro"], project).stdout
    assert ran(output) == [SCAN]  # it finds the same images: nothing after it runs
    assert all(f"Stage '{s}' didn't change, skipping" in output for s in STAGES[1:])
    assert dvc_status(project) == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    assert {
        "data/prepared",
        "models/teacher",
        "models/student_2",
        "pseudo_labels/student_1.parquet",
    } <= outs


def test_threshold_change_reruns_only_downstream_stages_in_a_queued_recipes_experiment(
    repro_demo, tmp_path
):
    """On a copy (the shared project stays as the other tests expect): a new threshold in
    params.yaml, then a recipe of configs/ queued as a DVC experiment on top (`dvc exp run
    --queue -S ...`) and run by DVC's queue worker in a temporary copy of the project (`dvc exp
    run --run-all`; `--temp` runs in such a copy too, without the queue): only the stages from
    the first pseudo-labels on run again, with both values; the workspace keeps its outputs until
    `dvc exp apply`; the trainings land in the project's MLflow store, none in a store inside
    the copy."""
    project = copy_project(repro_demo[0], tmp_path / "copy")
    before = (project / "pseudo_labels/student_1.json").read_text()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pseudo_label"]["threshold"] = 0.5
    write_params(project / "params.yaml", params)
    recipe = [sys.executable, "-m", "noisy_student.recipes", "configs/no_class_balance.yaml"]
    output = run([*recipe, "--queue"], project)
    assert "dvc exp run --queue -n no_class_balance -S pseudo_label.balance=false" in output.stdout
    assert "Queued experiment 'no_class_balance'" in output.stdout + output.stderr
    assert (project / "pseudo_labels/student_1.json").read_text() == before  # nothing ran yet
    output = run(["dvc", "exp", "run", "--run-all"], project)
    assert ran(output.stdout) == [SCAN, *stages_from("pseudo_label@0")]
    assert (project / "pseudo_labels/student_1.json").read_text() == before
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = {
        exp["name"]: exp
        for entry in shown
        for branch in entry.get("experiments") or []
        for exp in branch["revs"]
    }
    params = experiments["no_class_balance"]["data"]["params"]["params.yaml"]["data"]
    assert params["pseudo_label"]["balance"] is False
    assert params["pseudo_label"]["threshold"] == 0.5
    run(["dvc", "exp", "apply", "no_class_balance"], project)
    summary = json.loads((project / "pseudo_labels/student_1.json").read_text())
    assert summary["threshold"] == 0.5
    # unbalanced: each pseudo-label kept once, whatever its class
    assert summary["balance"] is False and summary["trained_images"] == summary["kept"]
    # the experiment's trainings in the project's MLflow store, named after the experiment, with
    # the test accuracies `dvc exp show` lists for it
    runs = training_runs(mlflow_runs(project))
    tagged = {
        r.data.tags["model_name"]: r
        for r in runs
        if r.data.tags.get("dvc_experiment") == "no_class_balance"
    }
    assert set(tagged) == {"student_1", "student_2"}
    metrics = experiments["no_class_balance"]["data"]["metrics"]["metrics.json"]["data"]
    for name, tracked in tagged.items():
        assert tracked.data.metrics["test_accuracy"] == pytest.approx(
            metrics[name]["test_accuracy"]
        )


def outputs_bytes(project) -> dict[str, bytes]:
    """Every model's and pseudo-label table's bytes."""
    files = [*project.glob("models/*/*"), *project.glob("pseudo_labels/*")]
    return {str(f.relative_to(project)): f.read_bytes() for f in files}


def move_one(source, target) -> None:
    """One image from class folder ``source`` into ``target``: a relabeled image."""
    image = sorted(source.iterdir())[0]
    image.rename(target / image.name)


def test_users_own_folders(tmp_path):
    """Their photos' own bytes in shards (data.storage: encoded), through the whole loop."""
    images = write_image_folders(tmp_path / "images", images_per_class=6, pool=30)
    params = folder_params(shrink(load_params()), images)
    params["data"].update(storage="encoded", shard_images=8)
    for cls in ("class_0", "class_1", "class_2"):  # a validation folder of its own
        (images / "val" / cls).mkdir(parents=True)
        for _ in range(2):
            move_one(images / "test" / cls, images / "val" / cls)
    params["data"]["val_dir"] = str(images / "val")
    params["students"] = params["students"][:1]
    params["teacher"]["epochs"] = 3
    params["students"][0]["epochs"] = 1
    params["pseudo_label"]["threshold"] = 0.0  # three classes of 6 images: keep every label
    # the table keeps each image's two largest probabilities; the student learns from them
    params["pseudo_label"].update(top_k=2, probs="float16", labels="soft")
    project = make_project(tmp_path / "project", params)
    output = run(["dvc", "repro"], project)
    assert ran(output.stdout) == ONE_ROUND
    assert "skipped 1 non-image file" in output.stderr
    assert len(list((project / "data/prepared/unlabeled").glob("images-*.arrow"))) == 4  # 30 / 8
    metrics = json.loads((project / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "student_1"]
    table = pd.read_parquet(project / "pseudo_labels/student_1.parquet")
    assert len(table) == 30 and set(table["pred_class"]) <= {"class_0", "class_1", "class_2"}
    assert not any(c.startswith("p_") for c in table.columns)
    assert table["top_probs"].map(len).eq(2).all() and table["top_probs"].iloc[0].dtype == "float16"
    assert (table["top_classes"].map(lambda c: c[0]) == table["pred"]).all()
    summary = json.loads((project / "pseudo_labels/student_1.json").read_text())
    assert "kept_accuracy" not in summary  # the pool's truth is unknown
    rounds = pd.read_csv(project / "reports/plots/rounds.csv")
    assert rounds["kept_accuracy"].isna().all()
    assert "Champion, chosen on validation: " in (project / "reports/report.html").read_text()
    plots = dvc_plots(project)
    assert "errors" not in json.dumps(plots)
    assert len(plots["reports/plots/images/03_pseudo_labels-student_1.png"]) == 1
    # predict sees each image as pseudo-labeling did: timm's centre crop at eval_crop_pct
    from noisy_student.core.settings import load_settings
    from noisy_student.predict import predict

    card = json.loads((project / "models/teacher/card.json").read_text())
    assert card["eval_crop_pct"] == params["data"]["eval_crop_pct"] == 0.875
    with contextlib.chdir(project):
        predict(load_settings(), images / "pool", model="teacher", out=tmp_path / "pool.csv")
    predicted = pd.read_csv(tmp_path / "pool.csv").set_index("id")["class"]
    assert predicted[table["id"]].tolist() == table["pred_class"].tolist()

    # DVC sees the files, not the folders' paths: a relabeled test image reruns evaluation and
    # what follows it; every model, pseudo-label table and the champion stay as they were
    before, champion = outputs_bytes(project), registry_champion(project)
    predictions = project / "reports/test_predictions/teacher.csv"
    actual = pd.read_csv(predictions)["actual"].value_counts().to_dict()
    move_one(images / "test" / "class_0", images / "test" / "class_1")
    output = run(["dvc", "repro"], project)
    assert ran(output.stdout) == [SCAN, "prepare", "evaluate", "register", "report"]
    assert outputs_bytes(project) == before and registry_champion(project) == champion
    now = pd.read_csv(predictions)["actual"].value_counts().to_dict()
    assert (now["class_0"], now["class_1"]) == (actual["class_0"] - 1, actual["class_1"] + 1)
    # to_label's picks, sorted by a person (who agrees with each guess) into the labeled folders
    # and out of the pool: the labeled set grows by them, the pool shrinks by them, and the
    # stages that depend on them are out of date
    command = [sys.executable, "-m", "noisy_student.pseudo_labels.to_label", "--count", "3"]
    run(command, project)
    picked = pd.read_csv(project / "to_label/picked.csv")
    assert len(picked) == 3 and len(list((project / "to_label/unsorted").iterdir())) == 3
    for row in picked.itertuples():
        source = Path(row.source)
        assert source.is_relative_to(images / "pool")
        source.rename(images / "labeled" / row.guess / source.name)
    run(["dvc", "repro", "prepare"], project)
    prepared = project / "data/prepared"
    labeled = pd.read_csv(prepared / "labeled/index.csv")["source"].map(lambda s: Path(s).name)
    pool = pd.read_csv(prepared / "unlabeled/index.csv")["source"].map(lambda s: Path(s).name)
    moved = {Path(s).name for s in picked["source"]}
    assert moved <= set(labeled) and not moved & set(pool) and len(pool) == 27
    # the stages that read the labeled set or the pool; evaluate, register and export follow
    # once the models they read change
    stale = {"augment", "train_teacher", "pseudo_label@0", "train_student@0", "report"}
    assert set(dvc_status(project)) == stale
    # a relabeled labeled image: the trainings are out of date (prepared again, not retrained)
    move_one(images / "labeled" / "class_0", images / "labeled" / "class_1")
    run(["dvc", "repro", "prepare"], project)
    assert {"augment", "train_teacher", "train_student@0"} <= set(dvc_status(project))


def failing(student: dict) -> dict:
    """A round made to fail: one epoch at a learning rate that barely moves the weights."""
    return {**student, "epochs": 1, "warmup_epochs": 0, "lr": 1e-6}


def test_a_round_that_does_not_pay_is_not_promoted_and_the_loop_stops(repro_demo, tmp_path):
    """Two failed rounds in a row (selection.patience 2): round 2 learns from the teacher, the
    best so far; round 3 finishes at once, untrained; the teacher is what users take away."""
    project = copy_project(repro_demo[0], tmp_path / "copy")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["selection"].update(margin=0.0, patience=2)
    third = {**params["students"][1], "name": "student_3", "teacher": "student_2"}
    params["students"] = [failing(params["students"][0]), failing(params["students"][1]), third]
    write_params(project / "params.yaml", params)
    output = run(["dvc", "repro"], project).stdout
    assert "train_teacher" not in ran(output) and "pseudo_label@0" not in ran(output)

    standing = {
        name: json.loads((project / f"models/{name}/standing.json").read_text())
        for name in ("teacher", "student_1", "student_2", "student_3")
    }
    assert [s["promoted"] for s in standing.values()] == [True, False, False, False]
    assert [s["best"] for s in standing.values()] == ["teacher"] * 4
    assert standing["student_2"]["stopped"] and not standing["student_3"]["trained"]
    assert not (project / "models/student_3/model.safetensors").exists()
    # round 2 learned from the teacher, not from the student that did not pay
    pseudo = project / "pseudo_labels"
    assert json.loads((pseudo / "student_2.json").read_text())["teacher"] == "teacher"
    assert (pseudo / "student_2.parquet").read_bytes() == (
        pseudo / "student_1.parquet"
    ).read_bytes()
    assert json.loads((pseudo / "student_3.json").read_text())["stopped"] is True
    assert len(pd.read_parquet(pseudo / "student_3.parquet")) == 0

    # export, predict, the registry and the report agree: the teacher is the champion
    assert registry_champion(project) == "teacher"
    champion = mlflow_champion(project, params["mlflow"]["registered_model"])
    assert champion.tags["model_name"] == "teacher"
    onnx_model = onnx_metadata(project / "exports/final.onnx")
    assert onnx_model["model"] == "teacher"
    photos = write_image_folders(tmp_path / "photos", images_per_class=1, pool=3) / "pool"
    out = tmp_path / "predictions.csv"
    predict = [sys.executable, "-m", "noisy_student.predict", str(photos), "--out", str(out)]
    assert "teacher classified 3 images" in run(predict, project).stderr
    assert (
        "Champion, chosen on validation: teacher " in (project / "reports/report.html").read_text()
    )
    comparison = (project / "reports/comparison.md").read_text()
    assert "loop stops" in comparison and "student_3" not in json.loads(
        (project / "metrics.json").read_text()
    )
    # a stopped loop is a finished result: the next repro skips every stage after the scan
    assert ran(run(["dvc", "repro"], project).stdout) == [SCAN]


def mlflow_champion(project, name: str):
    client = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    return client.get_model_version_by_alias(name, "champion")


def onnx_metadata(path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}

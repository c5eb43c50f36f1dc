"""The report stage: its arithmetic, its pictures, the self-contained page, the data behind the DVC
plots and the MLflow runs it logs to, on a real (tiny) trained project."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.models.promotion import mcnemar
from noisy_student.report import figures
from noisy_student.report.gather import verdict
from noisy_student.report.plots import histogram_rows
from noisy_student.report.render import prefect_markdown
from noisy_student.report.report import report
from noisy_student.tracking.runs import ParentRun, start_parent_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_mcnemar_counts_the_images_that_changed_and_tests_the_split():
    previous = np.array([1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    current = np.array([1, 0, 1, 1, 1, 1, 0, 1], dtype=bool)
    gained, lost, p = mcnemar(previous, current)
    assert (gained, lost) == (3, 1)
    assert p == pytest.approx(2 * (1 + 4) / 16)  # two-sided exact binomial, 4 trials, k <= 1
    assert mcnemar(previous, previous) == (0, 0, 1.0)
    _, _, p_big = mcnemar(np.zeros(60, bool), np.r_[np.ones(30, bool), np.zeros(30, bool)])
    assert p_big < 1e-8  # 30 gained, none lost


def test_verdicts():
    assert verdict(0.04, 0.001) == "paid off"
    assert verdict(-0.04, 0.001) == "worse"
    assert verdict(0.04, 0.2) == "no clear change"


def test_confidence_histogram_rows_add_up():
    confidence = pd.Series([0.05, 0.51, 0.52, 0.99, 1.0])
    kept = pd.Series([False, False, True, True, True])
    rows = histogram_rows(confidence, kept)
    assert len(rows) == 20 and rows["images"].sum() == 5 and rows["kept"].sum() == 3
    assert rows["confidence"].iloc[-1] == "0.95-1.00" and rows["images"].iloc[-1] == 2
    assert rows["confidence"].tolist() == sorted(rows["confidence"])  # DVC's axis order


def test_round_picture_without_the_pool_truth(tmp_path):
    """User data: no truth, so one colour and no right/wrong; class balancing marked."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "pred": rng.integers(0, 3, 200),
            "confidence": rng.uniform(0.3, 1.0, 200),
            "correct": np.nan,
        }
    )
    table["kept"] = table["confidence"] >= 0.7
    path = tmp_path / "round.png"
    figures.pseudo_label_round(
        "student_1", "teacher", table, ["cat", "dog", "fox"], 0.7, {"cat": 30, "dog": 30}, path
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 800


def test_round_picture_with_the_out_of_class_filter_and_its_line_in_the_comparison(tmp_path):
    from noisy_student.evaluation.rounds import COLUMNS, comparison_markdown
    from noisy_student.models import promotion

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"pred": rng.integers(0, 3, 200), "confidence": rng.uniform(0.3, 1, 200),
                          "energy": rng.normal(-5, 2, 200), "correct": np.nan})  # fmt: skip
    table["foreign"] = table["energy"] > -2.0
    table["kept"] = (table["confidence"] >= 0.7) & ~table["foreign"]
    path = tmp_path / "round.png"
    figures.pseudo_label_round(
        "student_1", "teacher", table, ["cat", "dog", "fox"], 0.7, None, path, "energy", -2.0
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 1200  # the third panel: energy
    row = dict.fromkeys(COLUMNS, np.nan)
    row |= {"model": "teacher", "round": 0, "architecture": "r", "val_accuracy": 0.8,
            "test_accuracy": 0.8}  # fmt: skip
    student = row | {"model": "student_1", "round": 1, "taught_by": "teacher", "promoted": True,
                     "kept": 90, "pool_images": 200, "held_out_foreign": 7}  # fmt: skip
    final = promotion.first("teacher", "1" * 8 + "0" * 2, "t")
    text = comparison_markdown(pd.DataFrame([row, student], columns=COLUMNS), final)
    assert "| 90/200 (7 held out as foreign) |" in text


def elsewhere(project, out) -> Layout:
    """The project's layout with the report's outputs moved under ``out``."""
    return Layout.at(project).replace(plots=out / "plots", report=out / "report.html")


@pytest.fixture(scope="module")
def reported(trained_project, tmp_path_factory):
    """The report stage run once on the shared project, its outputs written elsewhere."""
    out = tmp_path_factory.mktemp("reports")
    with contextlib.chdir(trained_project):
        settings = load_settings()
        page = report(settings, elsewhere(trained_project, out))
    assert page == out / "report.html"
    return trained_project, settings, page, out


@pytest.mark.slow
def test_report_page_holds_every_picture(reported):
    project, settings, page, out = reported
    text = page.read_text()
    registry = json.loads((project / "reports/registry.json").read_text())
    pictures = sorted((out / "plots/images").glob("*.png"))
    assert [p.name for p in pictures] == [
        "01_test_accuracy.png",
        "02_learning_curves.png",
        "03_pseudo_labels-student_1.png",
        f"04_confusion-{registry['champion']}.png",  # the champion's
        f"05_class_scores-{registry['champion']}.png",
        "06_reliability.png",
        "07_augmentation_preview.png",
    ]
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in pictures]
    assert all(p.read_bytes().startswith(PNG) for p in pictures)
    assert (out / "plots/images/07_augmentation_preview.png").read_bytes() == (
        project / "artifacts/augment/preview.png"
    ).read_bytes()
    assert 'src="http' not in text and "<script" not in text  # nothing to fetch: self-contained
    assert f"Champion, chosen on validation: {registry['champion']} " in text
    assert f"models:/{settings.mlflow.registered_model}@champion" in text
    assert "Round 1: student_1 " in text and "promoted" in text


@pytest.mark.slow
def test_report_data_matches_what_the_stages_wrote(reported):
    project, _, _, out = reported
    rounds = pd.read_csv(out / "plots/rounds.csv")
    metrics = json.loads((project / "metrics.json").read_text())
    assert rounds["model"].tolist() == ["teacher", "student_1"]
    for row in rounds.to_dict("records"):
        assert row["test_accuracy"] == pytest.approx(metrics[row["model"]]["test_accuracy"])
    summary = json.loads((project / "pseudo_labels/student_1.json").read_text())
    student = rounds.iloc[1]
    assert student["kept"] == summary["kept"]
    assert student["kept_accuracy"] == pytest.approx(summary["kept_accuracy"])
    delta = metrics["student_1"]["test_accuracy"] - metrics["teacher"]["test_accuracy"]
    assert student["vs_previous"] == pytest.approx(delta, abs=1e-6)
    tests = len(pd.read_csv(project / "reports/test_predictions/teacher.csv"))
    assert (student["gained"] - student["lost"]) == pytest.approx(delta * tests, abs=1e-6)
    histogram = pd.read_csv(out / "plots/confidence/student_1.csv")
    assert histogram["images"].sum() == summary["pool_images"]
    assert histogram["kept"].sum() == summary["kept"]
    per_class = pd.read_csv(out / "plots/kept_per_class/student_1.csv", dtype={"class": str})
    assert (
        dict(zip(per_class["class"], per_class["kept"], strict=True)) == (summary["kept_per_class"])
    )
    # the weak classes and the calibration, from evaluate's predictions, agree with metrics.json
    scores = pd.read_csv(out / "plots/class_scores.csv", dtype={"class": str})
    for name, m in metrics.items():
        mine = scores[scores["model"] == name]
        assert dict(zip(mine["class"], mine["recall"], strict=True)) == pytest.approx(
            m["test_recall"], abs=1e-5
        )
        bins = pd.read_csv(out / f"plots/reliability/{name}.csv")
        assert bins["images"].sum() == tests
        used = bins[bins["images"] > 0]
        ece = (used["images"] / tests * (used["accuracy"] - used["confidence"]).abs()).sum()
        assert ece == pytest.approx(m["test_ece"], abs=1e-4)  # confidences rounded in the CSV
        assert 0.0 <= m["test_macro_f1"] <= 1.0
    curves = pd.read_csv(out / "plots/learning_curves/teacher.csv")
    history = pd.read_csv(project / "models/teacher/history.csv")
    assert curves["val_accuracy"].tolist() == history["val_accuracy"].tolist()


@pytest.mark.slow
def test_report_under_dvc_repro_is_an_mlflow_run_of_its_own(reported):
    project, settings, _, _ = reported
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=[settings.mlflow.experiment],
        filter_string="tags.stage = 'report'",
        output_format="list",
    )
    run = max(runs, key=lambda r: r.info.start_time)
    assert run.info.run_name == "report" and run.info.status == "FINISHED"
    registry = json.loads((project / "reports/registry.json").read_text())
    assert run.data.tags["champion"] == registry["champion"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/plots"} <= artifacts
    pictures = mlflow.MlflowClient().list_artifacts(run.info.run_id, "report/plots")
    assert len(pictures) == 7
    metrics = json.loads((project / "metrics.json").read_text())
    assert run.data.metrics["test_accuracy/student_1"] == pytest.approx(
        metrics["student_1"]["test_accuracy"]
    )


@pytest.mark.slow
def test_report_in_a_flow_goes_to_the_parent_run(trained_project, tmp_path):
    out = tmp_path / "reports"
    with contextlib.chdir(trained_project):
        settings = load_settings()
        parent: ParentRun = start_parent_run(settings.mlflow, "flow-run", {"stage": "flow"}, {})
        before = len(mlflow.search_runs(experiment_names=[settings.mlflow.experiment]))
        report(settings, elsewhere(trained_project, out), parent=parent)
        after = len(mlflow.search_runs(experiment_names=[settings.mlflow.experiment]))
    assert after == before  # no run of its own
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(parent.run_id, "report/plots")}
    assert "report/plots/01_test_accuracy.png" in names
    client.set_terminated(parent.run_id)


@pytest.mark.slow
def test_prefect_markdown_inlines_the_pictures(reported):
    project, _, _, out = reported
    markdown = prefect_markdown(elsewhere(project, out))
    inlined = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert len(inlined) == 7
    assert all(base64.b64decode(data).startswith(PNG) for data in inlined)
    assert "| 1 | student_1 | test_resnet |" in markdown


@pytest.mark.slow
def test_missing_inputs_are_one_line_errors(trained_project, tmp_path):
    layout = Layout.at(trained_project).replace(
        plots=tmp_path / "p", report=tmp_path / "report.html"
    )
    with contextlib.chdir(trained_project):
        settings = load_settings()
        with pytest.raises(PipelineError, match=r"nothing.json: not found; run the evaluate"):
            report(settings, layout.replace(metrics=tmp_path / "nothing.json"))
        empty = tmp_path / "predictions"
        empty.mkdir()
        with pytest.raises(PipelineError, match=r"teacher.csv: not found; run the evaluate"):
            report(settings, layout.replace(test_predictions=empty))
        with pytest.raises(PipelineError, match=r"none.json: not found; run the register"):
            report(settings, layout.replace(registry=tmp_path / "none.json"))
    assert not (tmp_path / "p").exists() and not (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_a_stale_pseudo_label_table_is_refused(trained_project, tmp_path):
    pseudo = tmp_path / "pseudo_labels"
    shutil.copytree(trained_project / "pseudo_labels", pseudo)
    table = pd.read_parquet(pseudo / "student_1.parquet")
    table.iloc[:-1].to_parquet(pseudo / "student_1.parquet", index=False)
    layout = Layout.at(trained_project).replace(pseudo_labels=pseudo, plots=tmp_path / "p")
    with contextlib.chdir(trained_project), pytest.raises(PipelineError, match="do not match"):
        report(load_settings(), layout)

"""The report's pictures (PNG, in report order) and the CSVs behind dvc.yaml's plots."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.settings import Settings
from noisy_student.evaluation.scores import class_scores, reliability
from noisy_student.report import figures
from noisy_student.report.gather import Inputs

IMAGES = "images"  # under PLOTS_DIR: the PNGs, in the report's order


def histogram_rows(confidence: pd.Series, kept: pd.Series) -> pd.DataFrame:
    """The confidence histogram as rows for DVC's bar template: 20 bins over 0..1."""
    edges = np.linspace(0.0, 1.0, 21)
    images, _ = np.histogram(confidence, bins=edges)
    kept_counts, _ = np.histogram(confidence[kept.astype(bool)], bins=edges)
    labels = [f"{a:.2f}-{b:.2f}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return pd.DataFrame({"confidence": labels, "images": images, "kept": kept_counts})


def test_arrays(predictions: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A prediction table's true and predicted classes as indices."""
    index = {c: i for i, c in enumerate(classes)}
    return (
        predictions["actual"].map(index).to_numpy(np.int64),
        predictions["predicted"].map(index).to_numpy(np.int64),
    )


def class_table(inputs: Inputs) -> pd.DataFrame:
    """Per model and class: precision and recall on the test set (from evaluate's predictions)."""
    rows = []
    for name, table in inputs.predictions.items():
        scores = class_scores(*test_arrays(table, inputs.classes), inputs.classes)
        rows += [
            {"model": name, "class": c, "precision": scores["precision"][c],
             "recall": scores["recall"][c]}
            for c in inputs.classes
        ]  # fmt: skip
    return pd.DataFrame(rows)


def write_plots(inputs: Inputs, settings: Settings, preview: Path, out: Path) -> list[Path]:
    """The PNGs (in report order) and the CSVs behind the DVC plots, under ``out``."""
    images = out / IMAGES
    for folder in (images, out / "learning_curves", out / "confidence", out / "kept_per_class"):
        folder.mkdir(parents=True)
    pictures: list[Path] = []

    def picture(kind: str, model: str = "") -> Path:
        # NN_<kind>[-<model>].png: sorted by name they are in the report's order
        suffix = f"-{model}" if model else ""
        pictures.append(images / f"{len(pictures) + 1:02d}_{kind}{suffix}.png")
        return pictures[-1]

    inputs.rounds.to_csv(out / "rounds.csv", index=False, float_format="%.6g")
    figures.accuracy_per_round(
        inputs.rounds, settings.report.supervised_accuracy, picture("test_accuracy")
    )
    for member, history in inputs.histories.items():
        columns = ["epoch", "train_loss", "val_accuracy"]
        history[columns].to_csv(out / "learning_curves" / f"{member}.csv", index=False)
    figures.learning_curves(inputs.histories, picture("learning_curves"))
    for student in inputs.rounds["model"].tolist()[1:]:
        table, summary = inputs.pseudo[student], inputs.summaries[student]
        histogram_rows(table["confidence"], table["kept"]).to_csv(
            out / "confidence" / f"{student}.csv", index=False
        )
        per_class = pd.DataFrame(
            {"class": list(summary["kept_per_class"]), "kept": summary["kept_per_class"].values()}
        )
        per_class.to_csv(out / "kept_per_class" / f"{student}.csv", index=False)
        figures.pseudo_label_round(
            student,
            summary.get("teacher") or "its teacher",
            table,
            inputs.classes,
            summary["threshold"],
            summary["trained_per_class"] if summary.get("balance") else None,
            picture("pseudo_labels", student),
            summary.get("ood_score", "energy"),
            summary.get("ood_cut"),
        )
    final = inputs.registry["champion"]  # chosen on validation
    test = inputs.predictions[final]
    accuracy = float((test["actual"] == test["predicted"]).mean())
    figures.confusion(
        test["actual"].tolist(),
        test["predicted"].tolist(),
        inputs.classes,
        f"{final} on {len(test)} test images: {100 * accuracy:.1f}% right",
        picture("confusion", final),
    )
    scores = class_table(inputs)
    scores.to_csv(out / "class_scores.csv", index=False, float_format="%.6g")
    champion = scores[scores["model"] == final]
    macro_f1 = class_scores(*test_arrays(test, inputs.classes), inputs.classes)["macro_f1"]
    figures.class_scores(
        champion, f"{final}: recall and precision per class (macro-F1 {macro_f1:.3f})",
        picture("class_scores", final),
    )  # fmt: skip
    (out / "reliability").mkdir()
    bins = {}
    for name, table in inputs.predictions.items():
        actual, predicted = test_arrays(table, inputs.classes)
        bins[name] = reliability(table["confidence"].to_numpy(), actual == predicted)
        bins[name].to_csv(out / "reliability" / f"{name}.csv", index=False, float_format="%.6g")
    figures.reliability_diagram(bins, picture("reliability"))
    if preview.exists():
        shutil.copyfile(preview, picture("augmentation_preview"))
    return pictures

"""The report as one self-contained HTML page, and as markdown for Prefect."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pandas as pd

from noisy_student.core.layout import Layout
from noisy_student.report.gather import SIGNIFICANCE, Inputs
from noisy_student.report.plots import IMAGES


def _pct(value: float) -> str:
    return "" if value != value else f"{100 * value:.1f}%"


def _pts(value: float) -> str:
    return "" if value != value else f"{100 * value:+.1f} pts"


def table_rows(rounds: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The rounds table as plain strings, for the HTML page and the Prefect artifact alike."""
    header = [
        "round",
        "model",
        "architecture",
        "taught by",
        "pseudo-labels kept",
        "kept correct",
        "val accuracy",
        "promoted",
        "test accuracy",
        "vs previous round",
        "right/wrong vs previous",
        "McNemar p",
        "verdict",
        "vs teacher",
        "registry version",
    ]
    rows = []
    for r in rounds.to_dict("records"):
        first = r["round"] == 0
        kept = "" if first else f"{int(r['kept'])}/{int(r['pool_images'])}"
        changed = "" if first else f"+{int(r['gained'])} / -{int(r['lost'])}"
        version = r["registry_version"]
        rows.append(
            [
                str(r["round"]),
                r["model"],
                r["architecture"],
                "" if first else str(r["taught_by"]),
                kept,
                _pct(r["kept_accuracy"]),
                _pct(r["val_accuracy"]),
                "" if first else ("yes" if r["promoted"] else "no"),
                _pct(r["test_accuracy"]),
                _pts(r["vs_previous"]),
                changed,
                "" if first else f"{r['p_value']:.2g}",
                r["verdict"],
                _pts(r["vs_teacher"]),
                "" if version is None or version != version else str(int(version)),
            ]
        )
    return header, rows


def headline(rounds: pd.DataFrame, registry: dict, supervised: float | None) -> list[str]:
    """A few sentences (`code` in backticks): the champion (chosen on validation) and where it
    is, each round's decision and its verdict on the test set."""
    records = rounds.to_dict("records")
    by_name = {r["model"]: r for r in records}
    champion = by_name[registry["champion"]]
    lines = [
        f"Champion, chosen on validation: {champion['model']} ({champion['architecture']}), "
        f"validation accuracy {_pct(champion['val_accuracy'])}, test accuracy "
        f"{_pct(champion['test_accuracy'])}"
        + (
            ": no student beat the teacher on validation."
            if champion["round"] == 0
            else f", {_pts(champion['vs_teacher'])} over the teacher."
        )
    ]
    version = champion["registry_version"]
    if version is not None and version == version:
        uri = f"models:/{registry['registered_model']}@{registry['alias']}"
        lines.append(
            f"MLflow model registry: `{registry['registered_model']}` version {version}, alias "
            f'`{registry["alias"]}`; load it with `mlflow.pytorch.load_model("{uri}")`.'
        )
    else:
        lines.append("Not in the MLflow model registry (evaluate's log says why).")
    if supervised is not None:
        lines.append(
            f"Supervised-only reference (`report.supervised_accuracy`): {_pct(supervised)}; the "
            f"champion is {_pts(champion['test_accuracy'] - supervised)} from it."
        )
    for r in records[1:]:
        lines.append(
            f"Round {r['round']}: {r['decision']}. On the test set, {r['verdict']} "
            f"({_pts(r['vs_previous'])} against "
            f"{records[r['round'] - 1]['model']}; right on {int(r['gained'])} test images it got "
            f"wrong, wrong on {int(r['lost'])} it got right; McNemar p = {r['p_value']:.2g})."
        )
    final = champion["model"]
    lines.append(
        f"Use it: `python -m noisy_student.predict <folder>` classifies a folder with {final} "
        "(`--model <name>` for another round); `exports/final.onnx` is the same model for ONNX "
        "Runtime."
    )
    return lines


TITLES = {
    "test_accuracy": "Test accuracy per round",
    "learning_curves": "Learning curves",
    "pseudo_labels": "Pseudo-labels for {model}",
    "confusion": "Confusion matrix of {model}, the final model",
    "class_scores": "Weak classes of {model}, the champion",
    "reliability": "Calibration: reliability of every model",
    "augmentation_preview": "Augmentation preview",
}


CAPTIONS = {
    "test_accuracy": "Test accuracy of each model in loop order (dashed: how many of the "
    "pseudo-labels each student learned from were right, where the pool's truth is known; dotted: "
    "the supervised-only reference, if known).",
    "learning_curves": "Every training: loss on its noised training images and accuracy on the "
    "validation split, per epoch.",
    "pseudo_labels": "The teacher's confidence over the unlabeled pool (grey: below the "
    "threshold, left out) and how many pseudo-labels of each class the student kept; where the "
    "pool's truth is known, blue labels were right and red ones wrong.",
    "confusion": "The final model on the test set: counts per (true, predicted) class; colour is "
    "the share of the true class.",
    "class_scores": "Recall (blue: share of a class's test images found) and precision (grey: "
    "share of the images predicted as the class that were right), weakest class by recall first; "
    "macro-F1 weighs every class the same. Every model's: reports/plots/class_scores.csv.",
    "reliability": "Test images binned by the model's confidence (15 bins): the bin's accuracy "
    "against its mean confidence. On the dotted line the confidence can be trusted; below it the "
    "model is over-confident (what a pseudo-label threshold relies on). metrics.json's test_ece "
    "sums the gaps, weighted by the bins' images.",
    "augmentation_preview": "Labeled images (left) beside draws of the teacher's and the "
    "student's augmentation: an augmented image must still show its class.",
}


def _kind(picture: Path) -> tuple[str, str]:
    kind, _, model = picture.stem.split("_", 1)[1].partition("-")
    return kind, model


def caption(picture: Path) -> str:
    return CAPTIONS.get(_kind(picture)[0], "")


def title(picture: Path) -> str:
    kind, model = _kind(picture)
    return TITLES.get(kind, kind.replace("_", " ")).format(model=model)


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _html_text(line: str) -> str:
    """Escaped, with `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(line, quote=False))


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; color: #222;
       padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:nth-child(2), td:nth-child(3), td:nth-child(10) { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1.5em 0; }
figcaption { color: #555; font-size: 0.92em; } code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(inputs: Inputs, pictures: list[Path], supervised: float | None) -> str:
    header, rows = table_rows(inputs.rounds)
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Noisy Student self-training report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Noisy Student self-training report</h1>",
    ]
    sentences = headline(inputs.rounds, inputs.registry, supervised)
    parts += [f"<p>{_html_text(line)}</p>" for line in sentences]
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</table>")
    parts.append(
        f"<p>McNemar's exact test compares a student with the model before it on the test images "
        f"exactly one of them got right; below {SIGNIFICANCE} the change is more than the test "
        f"set's noise. Test accuracy is measured on {len(next(iter(inputs.predictions.values())))}"
        " test images, which no training saw.</p>"
    )
    for picture in pictures:
        parts += [
            f"<figure><h2>{esc(title(picture))}</h2>",
            f'<img src="{data_uri(picture)}" alt="{esc(title(picture))}">',
            f"<figcaption>{esc(caption(picture))}</figcaption></figure>",
        ]
    parts.append(
        "<p>Reproduce: <code>dvc repro</code>. The same pictures: <code>dvc plots show</code>, "
        "across experiments <code>dvc plots diff</code>; data behind them in "
        "<code>reports/plots/</code>.</p></body></html>"
    )
    return "\n".join(parts) + "\n"


def prefect_markdown(layout: Layout) -> str:
    """The report as markdown with its pictures inline (data URIs, which the Prefect UI shows),
    rebuilt from the files the report stage left, so a flow run that skipped it publishes too."""
    plots_dir = layout.plots
    rounds = pd.read_csv(plots_dir / "rounds.csv", dtype={"model": str, "architecture": str})
    rounds["verdict"] = rounds["verdict"].fillna("")  # the teacher's, empty in the CSV
    rounds["taught_by"] = rounds["taught_by"].fillna("")
    rounds["registry_version"] = [
        None if v != v else int(v) for v in rounds["registry_version"]
    ]  # NaN (not registered) -> None, as gather() has it
    registry = json.loads(layout.registry.read_text())
    header, rows = table_rows(rounds)
    lines = ["# Noisy Student self-training report", ""]
    lines += [line + "  " for line in headline(rounds, registry, None)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for picture in sorted((plots_dir / IMAGES).glob("*.png")):
        lines += ["", f"## {title(picture)}", "", caption(picture), ""]
        lines.append(f"![{title(picture)}]({data_uri(picture)})")
    return "\n".join(lines) + "\n"

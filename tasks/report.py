"""Stage `report`: did each round pay off, and why; one HTML file with every picture in it.

    python -m tasks.report

Reads what the other stages wrote (never the test images: evaluate's per-image test predictions
stand in for them) and writes

- ``reports/report.html``: one self-contained page (pictures embedded as base64 PNG), to open in a
  browser, attach to a ticket, or read in MLflow's artifact view: the champion, a table of the
  rounds (each student against the model before it, with McNemar's exact test on the test
  images both got), test accuracy per round, learning curves, each round's pseudo-labels
  (confidence histogram with the threshold, kept count per class, and which labels were right
  where the pool's truth is known), the final model's confusion matrix, the augmentation preview;
- ``reports/plots/``: the same pictures as PNGs (``images/``) and the data behind them as CSVs,
  which dvc.yaml's top-level ``plots:`` declares for ``dvc plots show`` / ``dvc plots diff``.

The pictures also go to MLflow (under ``report/`` of the flow's parent run, or of a run named
``report`` tagged ``stage=report`` under plain ``dvc repro``); the flow publishes them as a
Prefect markdown artifact (``prefect_markdown``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from tasks import cli, figures, tracking
from tasks.atomic import atomic_path, write_text
from tasks.augment import AUGMENT_DIR
from tasks.data import PREPARED_DIR, UNKNOWN, load_classes
from tasks.errors import PipelineError
from tasks.evaluate import METRICS_FILE, PREDICTIONS_DIR, REGISTRY_FILE
from tasks.models import MODELS_DIR, load_card
from tasks.pseudo_label import PSEUDO_DIR
from tasks.settings import Settings

log = logging.getLogger(__name__)
REPORT_FILE = Path("reports/report.html")
PLOTS_DIR = Path("reports/plots")
IMAGES = "images"  # under PLOTS_DIR: the PNGs, in the report's order
SIGNIFICANCE = 0.05  # McNemar p below this: a round's change is more than the test set's noise


@dataclass(frozen=True)
class Inputs:
    """Everything the report shows, read from the other stages' outputs."""

    rounds: pd.DataFrame  # one row per model, loop order (also reports/plots/rounds.csv)
    histories: dict[str, pd.DataFrame]  # per trained network (an ensemble: per member)
    pseudo: dict[str, pd.DataFrame]  # per student: pred, confidence, kept, correct (NaN: unknown)
    summaries: dict[str, dict]  # per student: pseudo_labels/<student>.json
    predictions: dict[str, pd.DataFrame]  # per model: the test predictions evaluate wrote
    classes: list[str]
    registry: dict  # reports/registry.json


def _read_json(path: Path, stage: str) -> dict:
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the {stage} stage first")
    return json.loads(path.read_text())


def _read_csv(path: Path, stage: str, **kwargs) -> pd.DataFrame:
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the {stage} stage first")
    return pd.read_csv(path, **kwargs)


def mcnemar(previous_right: np.ndarray, right: np.ndarray) -> tuple[int, int, float]:
    """Images this model got right and the previous one wrong (gained), the reverse (lost), and
    McNemar's exact two-sided p-value: how likely so uneven a split is if neither model is better.
    """
    from scipy.stats import binomtest

    gained = int((right & ~previous_right).sum())
    lost = int((previous_right & ~right).sum())
    if gained + lost == 0:
        return 0, 0, 1.0
    return gained, lost, float(binomtest(gained, gained + lost, 0.5).pvalue)


def verdict(delta: float, p_value: float) -> str:
    if p_value >= SIGNIFICANCE:
        return "no clear change"
    return "paid off" if delta > 0 else "worse"


def round_rows(
    settings: Settings,
    metrics: dict,
    predictions: dict[str, pd.DataFrame],
    summaries: dict[str, dict],
    architectures: dict[str, str],
    registry: dict,
) -> pd.DataFrame:
    versions = {m["model"]: m["version"] for m in registry.get("models", [])}
    rows = []
    names = settings.model_names()
    for round_, name in enumerate(names):
        acc = metrics[name]["test_accuracy"]
        row: dict = {
            "round": round_,
            "model": name,
            "architecture": architectures[name],
            "test_accuracy": acc,
            "vs_previous": math.nan,
            "vs_teacher": math.nan,
            "gained": math.nan,
            "lost": math.nan,
            "p_value": math.nan,
            "verdict": "",
            "kept": math.nan,
            "pool_images": math.nan,
            "kept_fraction": math.nan,
            "kept_accuracy": math.nan,
            "registry_version": versions.get(name),
        }
        if round_ > 0:
            previous = names[round_ - 1]
            right = (predictions[name]["actual"] == predictions[name]["predicted"]).to_numpy()
            before = predictions[previous]
            previous_right = (before["actual"] == before["predicted"]).to_numpy()
            gained, lost, p_value = mcnemar(previous_right, right)
            delta = acc - metrics[previous]["test_accuracy"]
            summary = summaries[name]
            kept_accuracy = summary.get("kept_accuracy")
            row.update(
                vs_previous=delta,
                vs_teacher=acc - metrics["teacher"]["test_accuracy"],
                gained=gained,
                lost=lost,
                p_value=p_value,
                verdict=verdict(delta, p_value),
                kept=summary["kept"],
                pool_images=summary["pool_images"],
                kept_fraction=summary["kept_fraction"],
                kept_accuracy=math.nan if kept_accuracy is None else kept_accuracy,
            )
        rows.append(row)
    return pd.DataFrame(rows)


def gather(
    settings: Settings,
    *,
    models_dir: Path,
    pseudo_dir: Path,
    data_dir: Path,
    metrics_file: Path,
    predictions_dir: Path,
    registry_file: Path,
) -> Inputs:
    names = settings.model_names()
    metrics = _read_json(metrics_file, "evaluate")
    missing = [n for n in names if n not in metrics]
    if missing:
        raise PipelineError(f"{metrics_file}: no test accuracy for {missing}; run evaluate again")
    registry = _read_json(registry_file, "evaluate")
    classes = load_classes(data_dir)
    architectures = {name: load_card(models_dir / name).model for name in names}

    histories: dict[str, pd.DataFrame] = {}
    for name in names:
        history = _read_csv(models_dir / name / "history.csv", f"train ({name})")
        for member, curve in history.groupby("member", sort=False):
            histories[str(member)] = curve.reset_index(drop=True)

    predictions = {
        name: _read_csv(
            predictions_dir / f"{name}.csv",
            "evaluate",
            dtype={"id": str, "actual": str, "predicted": str},  # class "01" stays "01"
        )
        for name in names
    }
    index = _read_csv(data_dir / "unlabeled" / "index.csv", "prepare", dtype={"id": str})
    truth = index["true_label"].to_numpy(np.int64)
    truth_known = bool((truth != UNKNOWN).all())
    pseudo, summaries = {}, {}
    for student in names[1:]:
        summaries[student] = _read_json(pseudo_dir / f"{student}.json", "pseudo_label")
        table = _read_csv(
            pseudo_dir / f"{student}.csv",
            "pseudo_label",
            usecols=["id", "pred", "confidence", "kept"],
            dtype={"id": str},
        )
        if table["id"].tolist() != index["id"].tolist():
            raise PipelineError(f"{pseudo_dir / student}.csv: rows do not match the prepared pool")
        table["correct"] = table["pred"].to_numpy() == truth if truth_known else np.nan
        pseudo[student] = table
    rounds = round_rows(settings, metrics, predictions, summaries, architectures, registry)
    return Inputs(rounds, histories, pseudo, summaries, predictions, classes, registry)


def histogram_rows(confidence: pd.Series, kept: pd.Series) -> pd.DataFrame:
    """The confidence histogram as rows for DVC's bar template: 20 bins over 0..1."""
    edges = np.linspace(0.0, 1.0, 21)
    images, _ = np.histogram(confidence, bins=edges)
    kept_counts, _ = np.histogram(confidence[kept.astype(bool)], bins=edges)
    labels = [f"{a:.2f}-{b:.2f}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return pd.DataFrame({"confidence": labels, "images": images, "kept": kept_counts})


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
    names = settings.model_names()
    for round_, student in enumerate(names[1:], start=1):
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
            names[round_ - 1],
            table,
            inputs.classes,
            summary["threshold"],
            summary["trained_per_class"] if summary.get("balance") else None,
            picture("pseudo_labels", student),
        )
    final = names[-1]
    test = inputs.predictions[final]
    accuracy = float((test["actual"] == test["predicted"]).mean())
    figures.confusion(
        test["actual"].tolist(),
        test["predicted"].tolist(),
        inputs.classes,
        f"{final} on {len(test)} test images: {100 * accuracy:.1f}% right",
        picture("confusion", final),
    )
    if preview.exists():
        shutil.copyfile(preview, picture("augmentation_preview"))
    return pictures


# --- the page --------------------------------------------------------------------------------


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
        "pseudo-labels kept",
        "kept correct",
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
                kept,
                _pct(r["kept_accuracy"]),
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
    """A few sentences (`code` in backticks): the champion and where it is, each round's verdict."""
    records = rounds.to_dict("records")
    by_name = {r["model"]: r for r in records}
    champion = by_name[registry["champion"]]
    lines = [
        f"Champion: {champion['model']} ({champion['architecture']}), test accuracy "
        f"{_pct(champion['test_accuracy'])}"
        + (
            ": no student beat the teacher."
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
            f"Round {r['round']}, {r['model']}: {r['verdict']} ({_pts(r['vs_previous'])} against "
            f"{records[r['round'] - 1]['model']}; right on {int(r['gained'])} test images it got "
            f"wrong, wrong on {int(r['lost'])} it got right; McNemar p = {r['p_value']:.2g})."
        )
    final = records[-1]["model"]
    lines.append(
        f"Use it: `python -m tasks.predict <folder>` classifies a folder with {final} "
        "(`--model <name>` for another round); `exports/final.onnx` is the same model for ONNX "
        "Runtime."
    )
    return lines


TITLES = {
    "test_accuracy": "Test accuracy per round",
    "learning_curves": "Learning curves",
    "pseudo_labels": "Pseudo-labels for {model}",
    "confusion": "Confusion matrix of {model}, the final model",
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


def prefect_markdown(plots_dir: Path = PLOTS_DIR, registry_file: Path = REGISTRY_FILE) -> str:
    """The report as markdown with its pictures inline (data URIs, which the Prefect UI shows),
    rebuilt from the files the report stage left, so a flow run that skipped it publishes too."""
    rounds = pd.read_csv(plots_dir / "rounds.csv", dtype={"model": str, "architecture": str})
    rounds["verdict"] = rounds["verdict"].fillna("")  # the teacher's, empty in the CSV
    rounds["registry_version"] = [
        None if v != v else int(v) for v in rounds["registry_version"]
    ]  # NaN (not registered) -> None, as gather() has it
    registry = json.loads(registry_file.read_text())
    header, rows = table_rows(rounds)
    lines = ["# Noisy Student self-training report", ""]
    lines += [line + "  " for line in headline(rounds, registry, None)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for picture in sorted((plots_dir / IMAGES).glob("*.png")):
        lines += ["", f"## {title(picture)}", "", caption(picture), ""]
        lines.append(f"![{title(picture)}]({data_uri(picture)})")
    return "\n".join(lines) + "\n"


# --- MLflow ----------------------------------------------------------------------------------


def attach_to_run(
    settings: Settings,
    run_id: str,
    report_file: Path = REPORT_FILE,
    plots_dir: Path = PLOTS_DIR,
) -> None:
    """The page and its pictures as artifacts of run ``run_id``, under ``report/``."""
    client = mlflow.MlflowClient(tracking.tracking_uri(settings.mlflow))
    client.log_artifact(run_id, str(report_file), "report")
    client.log_artifacts(run_id, str(plots_dir / IMAGES), "report/plots")


def log_to_mlflow(
    settings: Settings,
    report_file: Path,
    plots_dir: Path,
    rounds: pd.DataFrame,
    champion: str,
    parent: tracking.ParentRun | None,
) -> str | None:
    """The report in MLflow: in the flow's parent run, or in a run of its own (``report``, tagged
    ``stage=report``, with each model's test accuracy) under plain ``dvc repro``."""
    cfg = settings.mlflow
    try:
        if parent is not None:
            attach_to_run(settings, parent.run_id, report_file, plots_dir)
            return parent.run_id
        client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
        tags = {"stage": "report", "champion": champion, **tracking.process_tags()}
        run_id = client.create_run(
            tracking.experiment_id(cfg), run_name="report", tags=tags
        ).info.run_id
        try:
            attach_to_run(settings, run_id, report_file, plots_dir)
            for r in rounds.to_dict("records"):
                client.log_metric(run_id, f"test_accuracy/{r['model']}", r["test_accuracy"])
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except MlflowException as exc:
        log.warning("could not log the report to MLflow: %s", exc)
        return None


def report(
    settings: Settings,
    *,
    models_dir: Path = MODELS_DIR,
    pseudo_dir: Path = PSEUDO_DIR,
    data_dir: Path = PREPARED_DIR,
    metrics_file: Path = METRICS_FILE,
    predictions_dir: Path = PREDICTIONS_DIR,
    registry_file: Path = REGISTRY_FILE,
    preview: Path = AUGMENT_DIR / "preview.png",
    plots_dir: Path = PLOTS_DIR,
    report_file: Path = REPORT_FILE,
    parent: tracking.ParentRun | None = None,
) -> Path:
    """Write ``report_file`` and ``plots_dir``; log them to MLflow. Returns the page's path."""
    inputs = gather(
        settings,
        models_dir=models_dir,
        pseudo_dir=pseudo_dir,
        data_dir=data_dir,
        metrics_file=metrics_file,
        predictions_dir=predictions_dir,
        registry_file=registry_file,
    )
    with atomic_path(plots_dir) as staged:
        pictures = write_plots(inputs, settings, preview, staged)
        page = render_html(inputs, pictures, settings.report.supervised_accuracy)
    write_text(report_file, page)
    log.info("report: %s (%d pictures), data for `dvc plots show` in %s", report_file,
             len(pictures), plots_dir)  # fmt: skip
    log_to_mlflow(
        settings, report_file, plots_dir, inputs.rounds, inputs.registry["champion"], parent
    )
    return report_file


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    cli.run(lambda args, settings: report(settings), p.parse_args())


if __name__ == "__main__":
    main()

"""What the report shows, read from the other stages' outputs (never the test images: evaluate's
per-image test predictions stand in for them), and whether each round paid off."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.splits import UNKNOWN, load_classes
from noisy_student.evaluation.rounds import rounds_table
from noisy_student.models import promotion
from noisy_student.pseudo_labels.table import read_columns

SIGNIFICANCE = 0.05  # McNemar p below this: a round's change is more than the test set's noise


@dataclass(frozen=True)
class Inputs:
    """Everything the report shows, read from the other stages' outputs."""

    rounds: pd.DataFrame  # one row per model, loop order (also reports/plots/rounds.csv)
    histories: dict[str, pd.DataFrame]  # per trained network (an ensemble: per member)
    # per student: pred, confidence, energy (and knn_distance), kept, correct (NaN: unknown),
    # foreign (if filtered)
    pseudo: dict[str, pd.DataFrame]
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


def verdict(delta: float, p_value: float) -> str:
    if p_value >= SIGNIFICANCE:
        return "no clear change"
    return "paid off" if delta > 0 else "worse"


def round_rows(
    rounds: pd.DataFrame, predictions: dict[str, pd.DataFrame], registry: dict
) -> pd.DataFrame:
    """The rounds table (evaluation/rounds.py) with each student against the model before it
    (McNemar's test on the test images) and the registry's versions."""
    versions = {m["model"]: m["version"] for m in registry.get("models", [])}
    records = rounds.to_dict("records")
    rows = []
    for r in records:
        name, acc = r["model"], r["test_accuracy"]
        row: dict = {
            "round": r["round"],
            "model": name,
            "architecture": r["architecture"],
            "taught_by": r["taught_by"] or "",
            "val_accuracy": r["val_accuracy"],
            "promoted": bool(r["promoted"]),
            "decision": r["decision"],
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
        if r["round"] > 0:
            previous = records[r["round"] - 1]
            right = (predictions[name]["actual"] == predictions[name]["predicted"]).to_numpy()
            before = predictions[previous["model"]]
            previous_right = (before["actual"] == before["predicted"]).to_numpy()
            gained, lost, p_value = promotion.mcnemar(previous_right, right)
            delta = acc - previous["test_accuracy"]
            row.update(
                vs_previous=delta,
                vs_teacher=acc - records[0]["test_accuracy"],
                gained=gained,
                lost=lost,
                p_value=p_value,
                verdict=verdict(delta, p_value),
                kept=int(r["kept"]),
                pool_images=int(r["pool_images"]),
                kept_fraction=r["kept_fraction"],
                kept_accuracy=r["kept_accuracy"],
            )
        rows.append(row)
    return pd.DataFrame(rows)


def gather(settings: Settings, layout: Layout) -> Inputs:
    names = promotion.trained_models(settings, layout)
    metrics_file, registry_file = layout.metrics, layout.registry
    data_dir, pseudo_dir = layout.prepared, layout.pseudo_labels
    metrics = _read_json(metrics_file, "evaluate")
    missing = [n for n in names if n not in metrics]
    if missing:
        raise PipelineError(f"{metrics_file}: no test accuracy for {missing}; run evaluate again")
    registry = _read_json(registry_file, "register")
    classes = load_classes(data_dir)

    histories: dict[str, pd.DataFrame] = {}
    for name in names:
        history = _read_csv(layout.model(name) / "history.csv", f"train ({name})")
        for member, curve in history.groupby("member", sort=False):
            histories[str(member)] = curve.reset_index(drop=True)

    predictions = {
        name: _read_csv(
            layout.test_predictions / f"{name}.csv",
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
        path = layout.pseudo_table(student)
        if not path.exists():
            raise PipelineError(f"{path}: not found; run the pseudo_label stage first")
        table = read_columns(
            path, ["id", "pred", "confidence", "energy", "knn_distance", "foreign", "kept"]
        )
        if table["id"].tolist() != index["id"].tolist():
            raise PipelineError(f"{path}: rows do not match the prepared pool")
        table["correct"] = table["pred"].to_numpy() == truth if truth_known else np.nan
        pseudo[student] = table
    rounds = round_rows(rounds_table(settings, layout, metrics), predictions, registry)
    return Inputs(rounds, histories, pseudo, summaries, predictions, classes, registry)

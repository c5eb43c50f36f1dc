"""The rounds table: one row per model of the loop, what it scored and what it learned from.

The one table behind ``reports/comparison.md``, the report's rounds and the Prefect run's table.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.models.card import load_card

COLUMNS = [
    "round",
    "model",
    "architecture",
    "test_accuracy",
    "kept",
    "pool_images",
    "kept_fraction",
    "kept_accuracy",
    "kept_per_class",
]


def rounds_table(settings: Settings, layout: Layout, metrics: dict) -> pd.DataFrame:
    """``metrics``: metrics.json's content (test accuracy per model). A student's pseudo-label
    columns are NaN where its summary is missing; ``kept_per_class`` is a dict (None: unknown)."""
    rows = []
    for round_, name in enumerate(settings.model_names()):
        row = {
            "round": round_,
            "model": name,
            "architecture": load_card(layout.model(name)).model,
            "test_accuracy": metrics[name]["test_accuracy"],
            "kept": math.nan,
            "pool_images": math.nan,
            "kept_fraction": math.nan,
            "kept_accuracy": math.nan,
            "kept_per_class": None,
        }
        summary_file = layout.pseudo_summary(name)
        if round_ > 0 and summary_file.exists():
            summary = json.loads(summary_file.read_text())
            accuracy = summary.get("kept_accuracy")
            row.update(
                kept=summary["kept"],
                pool_images=summary["pool_images"],
                kept_fraction=summary["kept_fraction"],
                kept_accuracy=math.nan if accuracy is None else accuracy,
                kept_per_class=summary["kept_per_class"],
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def comparison_markdown(rounds: pd.DataFrame) -> str:
    """``reports/comparison.md``'s table: every round against the teacher."""
    teacher_acc = rounds["test_accuracy"].iloc[0]
    lines = [
        "| model | architecture | pseudo-labels kept | kept correct | test accuracy | vs teacher |",
        "|---|---|---|---|---|---|",
    ]
    for r in rounds.to_dict("records"):
        kept = "-" if math.isnan(r["kept"]) else f"{int(r['kept'])}/{int(r['pool_images'])}"
        correct = "-" if math.isnan(r["kept_accuracy"]) else f"{100 * r['kept_accuracy']:.1f}%"
        delta = "" if r["round"] == 0 else f"{100 * (r['test_accuracy'] - teacher_acc):+.1f} pts"
        lines.append(
            f"| {r['model']} | {r['architecture']} | {kept} | {correct} | "
            f"{100 * r['test_accuracy']:.1f}% | {delta} |"
        )
    return "\n".join(lines) + "\n"

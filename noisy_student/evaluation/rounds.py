"""The rounds table: one row per model of the loop, what it scored and what it learned from.

The one table behind ``reports/comparison.md``, the report's rounds and the Prefect run's table.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.models import promotion
from noisy_student.models.card import load_card

COLUMNS = [
    "round",
    "model",
    "architecture",
    "taught_by",
    "val_accuracy",
    "promoted",
    "decision",
    "test_accuracy",
    "kept",
    "pool_images",
    "kept_fraction",
    "kept_accuracy",
    "kept_per_class",
    "held_out_foreign",
]


def rounds_table(settings: Settings, layout: Layout, metrics: dict) -> pd.DataFrame:
    """``metrics``: metrics.json's content (test accuracy per model). One row per trained model
    (rounds after the loop stopped have none). ``taught_by``: the model whose pseudo-labels a
    student learned from; ``promoted``: whether it became the best so far, on validation. A
    student's pseudo-label columns are NaN where its summary is missing; ``kept_per_class`` is a
    dict (None: unknown)."""
    rows = []
    for round_, name in enumerate(promotion.trained_models(settings, layout)):
        standing = promotion.load_standing(layout.model(name))
        row = {
            "round": round_,
            "model": name,
            "architecture": load_card(layout.model(name)).model,
            "taught_by": None if round_ == 0 else promotion.round_teacher(settings, layout, name),
            "val_accuracy": standing.val_accuracy,
            "promoted": standing.promoted,
            "decision": standing.reason,
            "test_accuracy": metrics[name]["test_accuracy"],
            "kept": math.nan,
            "pool_images": math.nan,
            "kept_fraction": math.nan,
            "kept_accuracy": math.nan,
            "kept_per_class": None,
            "held_out_foreign": math.nan,
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
                # confident enough, but held out by the out-of-class filter (NaN: filter off)
                held_out_foreign=summary.get("foreign_above_threshold", math.nan),
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def comparison_markdown(rounds: pd.DataFrame, final: promotion.Standing) -> str:
    """``reports/comparison.md``'s table: every round against the teacher, then the champion
    (chosen on validation) and how the loop ended."""
    teacher_acc = rounds["test_accuracy"].iloc[0]
    lines = [
        "| model | architecture | taught by | pseudo-labels kept | kept correct | val accuracy "
        "| promoted | test accuracy | vs teacher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds.to_dict("records"):
        kept = "-" if math.isnan(r["kept"]) else f"{int(r['kept'])}/{int(r['pool_images'])}"
        if not math.isnan(r["held_out_foreign"]):
            kept += f" ({int(r['held_out_foreign'])} held out as foreign)"
        correct = "-" if math.isnan(r["kept_accuracy"]) else f"{100 * r['kept_accuracy']:.1f}%"
        delta = "" if r["round"] == 0 else f"{100 * (r['test_accuracy'] - teacher_acc):+.1f} pts"
        promoted = "" if r["round"] == 0 else ("yes" if r["promoted"] else "no")
        taught_by = "-" if r["round"] == 0 else r["taught_by"]
        lines.append(
            f"| {r['model']} | {r['architecture']} | {taught_by} | {kept} | {correct} "
            f"| {100 * r['val_accuracy']:.1f}% | {promoted} | {100 * r['test_accuracy']:.1f}% "
            f"| {delta} |"
        )
    lines += ["", f"Champion (best on validation): **{final.best}**. {final.reason}."]
    return "\n".join(lines) + "\n"

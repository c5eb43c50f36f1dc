"""Which pool images a student learns from, and how often: the confidence floor and Noisy
Student's class balancing (the most confident ``per_class`` of a frequent class, rare classes
repeated up to it); the summary of what was kept."""

from __future__ import annotations

import numpy as np
import pandas as pd

from noisy_student.core.settings import PseudoLabelSettings
from noisy_student.data.splits import UNKNOWN, Split


def balance_copies(
    pred: np.ndarray, confidence: np.ndarray, passed: np.ndarray, num_classes: int, per_class: int
) -> np.ndarray:
    """Copies per row so that every class with a row that ``passed`` gets exactly ``per_class``.

    Too many rows: the ``per_class`` most confident, once each. Too few: every row
    ``per_class // n`` times, the ``per_class % n`` most confident once more."""
    copies = np.zeros(len(pred), dtype=np.int64)
    for c in range(num_classes):
        rows = np.flatnonzero(passed & (pred == c))
        if len(rows) == 0:
            continue
        ranked = rows[np.argsort(-confidence[rows], kind="stable")]
        if len(ranked) >= per_class:
            copies[ranked[:per_class]] = 1
        else:
            copies[ranked] = per_class // len(ranked)
            copies[ranked[: per_class % len(ranked)]] += 1
    return copies


def select(
    pred: np.ndarray,
    confidence: np.ndarray,
    cfg: PseudoLabelSettings,
    num_classes: int,
    foreign: np.ndarray | None = None,
) -> np.ndarray:
    """Copies per row: 0/1 by the threshold (``foreign`` rows, the out-of-class filter's, never
    pass), then balanced if ``cfg.balance``."""
    passed = confidence >= cfg.threshold
    if foreign is not None:
        passed &= ~foreign
    if not cfg.balance:
        return passed.astype(np.int64)
    per_class = cfg.per_class or max(1, round(int(passed.sum()) / num_classes))
    return balance_copies(pred, confidence, passed, num_classes, per_class)


def summarize(
    table: pd.DataFrame, pool: Split, classes: list[str], cfg: PseudoLabelSettings
) -> dict:
    """``table`` needs the columns ``pred``, ``confidence`` and ``copies`` (and ``foreign``, the
    out-of-class filter's flag, when it ran)."""
    copies = table["copies"].to_numpy()
    kept = copies > 0
    pred = table["pred"].to_numpy()
    counts = np.bincount(pred[kept], minlength=len(classes))
    trained = np.bincount(pred, weights=copies, minlength=len(classes)).astype(int)
    passed = table["confidence"].to_numpy() >= cfg.threshold
    summary: dict = {
        "threshold": cfg.threshold,
        "balance": cfg.balance,
        "pool_images": int(len(table)),
        "above_threshold": int(passed.sum()),
        "kept": int(kept.sum()),
        "kept_fraction": float(kept.mean()),
        "trained_images": int(copies.sum()),
        "kept_per_class": {c: int(n) for c, n in zip(classes, counts, strict=True)},
        "trained_per_class": {c: int(n) for c, n in zip(classes, trained, strict=True)},
    }
    if "foreign" in table:
        foreign = table["foreign"].to_numpy(bool)
        summary["ood_filter"] = cfg.ood_filter
        summary["foreign"] = int(foreign.sum())  # flagged, whatever their confidence
        summary["foreign_above_threshold"] = int((foreign & passed).sum())  # what it held out
    if (pool.true_labels != UNKNOWN).all():
        correct = pred == pool.true_labels
        summary["pool_accuracy"] = float(correct.mean())
        summary["kept_accuracy"] = float(correct[kept].mean()) if kept.any() else None
    return summary

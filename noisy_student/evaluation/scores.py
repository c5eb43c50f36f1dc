"""Scores beyond accuracy, from a model's per-image predictions: which classes it misses
(per-class precision and recall, macro-F1) and whether its confidence can be trusted (expected
calibration error and the reliability diagram's bins).

Numbers from numpy arrays only, so the evaluate stage (from probabilities) and the report (from
evaluate's prediction tables) compute them the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CALIBRATION_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) measure ECE


def class_scores(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Per-class precision and recall (0 where a class is never predicted / never present) and
    macro-F1 (every class weighs the same, so a weak rare class shows): scikit-learn's
    ``precision_recall_fscore_support(..., zero_division=0)``, from the confusion counts. Written
    here because importing sklearn.metrics costs the evaluate and report stages about a second
    each; tests/library/evaluation/test_scores.py checks it against scikit-learn."""
    k = len(classes)
    actual, predicted = np.asarray(actual, np.int64), np.asarray(predicted, np.int64)
    hits = np.bincount(actual[actual == predicted], minlength=k)[:k].astype(np.float64)
    present = np.bincount(actual, minlength=k)[:k]
    called = np.bincount(predicted, minlength=k)[:k]
    precision = np.divide(hits, called, out=np.zeros(k), where=called > 0)
    recall = np.divide(hits, present, out=np.zeros(k), where=present > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(k), where=both > 0)
    return {
        "macro_f1": float(f1.mean()),
        "precision": {c: float(p) for c, p in zip(classes, precision, strict=True)},
        "recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
    }


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS):
    """Per confidence bin ((lo, hi], the first also holding 0): images, mean confidence and
    accuracy; empty bins are kept (NaN) so every model's diagram has the same bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    mean_confidence = np.bincount(which, confidence, bins) / safe
    accuracy = np.bincount(which, correct, bins) / safe
    empty = count == 0
    return pd.DataFrame(
        {
            "lower": np.arange(bins) / bins,
            "upper": np.arange(1, bins + 1) / bins,
            "images": count,
            "confidence": np.where(empty, np.nan, mean_confidence),
            "accuracy": np.where(empty, np.nan, accuracy),
        }
    )


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Sum over bins of (share of images) x |accuracy - mean confidence|: 0 is calibrated."""
    bins = reliability(confidence, correct)
    used = bins["images"] > 0
    weights = bins["images"][used] / bins["images"].sum()
    gaps = (bins["accuracy"][used] - bins["confidence"][used]).abs()
    return float((weights * gaps).sum())


def scores_on_test(
    actual: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, classes: list[str]
) -> dict:
    """metrics.json's scores of one model beyond its accuracy, named ``test_*``."""
    scores = class_scores(actual, predicted, classes)
    return {
        "test_macro_f1": scores["macro_f1"],
        "test_ece": expected_calibration_error(confidence, actual == predicted),
        "test_precision": scores["precision"],
        "test_recall": scores["recall"],
    }

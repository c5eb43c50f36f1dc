"""Scores beyond accuracy, checked against a hand computation on a small confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from noisy_student.evaluation.scores import (
    class_scores,
    expected_calibration_error,
    reliability,
    scores_on_test,
)

CLASSES = ["cat", "dog", "fox"]
# confusion matrix (rows: true, columns: predicted)
#        cat dog fox
#  cat    3   1   0
#  dog    0   2   2
#  fox    0   0   0  <- fox is never the truth, but is predicted twice
ACTUAL = np.array([0, 0, 0, 0, 1, 1, 1, 1])
PREDICTED = np.array([0, 0, 0, 1, 1, 1, 2, 2])


def test_precision_recall_and_macro_f1_match_a_hand_computation():
    scores = class_scores(ACTUAL, PREDICTED, CLASSES)
    # cat: precision 3/3, recall 3/4; dog: precision 2/3, recall 2/4; fox: 0/2 and no support
    assert scores["precision"] == pytest.approx({"cat": 1.0, "dog": 2 / 3, "fox": 0.0})
    assert scores["recall"] == pytest.approx({"cat": 0.75, "dog": 0.5, "fox": 0.0})
    f1_cat = 2 * 1.0 * 0.75 / 1.75
    f1_dog = 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    assert scores["macro_f1"] == pytest.approx((f1_cat + f1_dog + 0.0) / 3)


def test_calibration_error_by_hand():
    # two bins used: 0.9 confident (4 images, 3 right) and 0.6 confident (4 images, 2 right)
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6, 0.6, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    expected = 0.5 * abs(0.75 - 0.9) + 0.5 * abs(0.5 - 0.6)
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)
    bins = reliability(confidence, correct)
    assert len(bins) == 15 and bins["images"].sum() == 8
    used = bins[bins["images"] > 0]
    assert used["accuracy"].tolist() == pytest.approx([0.5, 0.75])
    assert bins["confidence"].isna().sum() == 13  # empty bins kept, as NaN


def test_a_perfectly_calibrated_model_scores_zero_and_every_score_is_named_for_metrics_json():
    confidence = np.full(8, 0.75)
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 0], dtype=bool)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0)
    scores = scores_on_test(ACTUAL, PREDICTED, np.full(8, 0.625), CLASSES)
    assert set(scores) == {"test_macro_f1", "test_ece", "test_precision", "test_recall"}
    assert scores["test_ece"] == pytest.approx(0.0)  # 5 of 8 right at confidence 0.625


def test_class_scores_are_scikit_learns_on_random_predictions():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(7)]
    for size in (1, 5, 40, 500):
        actual = rng.integers(0, 6, size)  # class c6 never present
        predicted = np.where(rng.random(size) < 0.6, actual, rng.integers(0, 7, size))
        scores = class_scores(actual, predicted, classes)
        precision, recall, f1, _ = precision_recall_fscore_support(
            actual, predicted, labels=list(range(7)), zero_division=0
        )
        assert list(scores["precision"].values()) == pytest.approx(precision.tolist())
        assert list(scores["recall"].values()) == pytest.approx(recall.tolist())
        assert scores["macro_f1"] == pytest.approx(f1.mean())

"""Pseudo-label table: one row per pool image, the threshold, the summary's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data import UNKNOWN, Split
from tasks.errors import PipelineError
from tasks.pseudo_label import label_rows, load_kept, summarize

CLASSES = ["cat", "dog", "fox"]


def pool(true_labels) -> Split:
    n = len(true_labels)
    return Split(
        images=np.zeros((n, 4, 4, 3), np.uint8),
        ids=[f"img_{i}" for i in range(n)],
        labels=np.full(n, UNKNOWN),
        true_labels=np.array(true_labels),
    )


PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],  # cat, confident
        [0.40, 0.35, 0.25],  # cat, unsure
        [0.10, 0.80, 0.10],  # dog, confident
        [0.05, 0.15, 0.80],  # fox, confident (but wrong below)
    ]
)


def test_rows_carry_prediction_confidence_kept_and_full_distribution():
    table = label_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, threshold=0.8)
    assert table["pred"].tolist() == [0, 0, 1, 2]
    assert table["pred_class"].tolist() == ["cat", "cat", "dog", "fox"]
    assert table["kept"].tolist() == [True, False, True, True]  # >= threshold is kept
    np.testing.assert_allclose(table["confidence"], [0.9, 0.4, 0.8, 0.8])
    probs = table[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, PROBS.numpy())


def test_summary_counts_and_kept_accuracy():
    table = label_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, threshold=0.8)
    summary = summarize(table, pool([0, 0, 1, 0]), CLASSES, 0.8)
    assert summary["kept"] == 3 and summary["pool_images"] == 4
    assert summary["kept_per_class"] == {"cat": 1, "dog": 1, "fox": 1}
    assert summary["kept_accuracy"] == pytest.approx(2 / 3)  # the fox is a cat
    assert summary["pool_accuracy"] == pytest.approx(3 / 4)


def test_summary_without_truth_reports_no_accuracy():
    table = label_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, threshold=0.5)
    summary = summarize(table, pool([UNKNOWN] * 4), CLASSES, 0.5)
    assert "kept_accuracy" not in summary and summary["kept"] == 3


def test_load_kept_returns_pool_indices_and_labels(tmp_path):
    table = label_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, threshold=0.8)
    table.to_csv(tmp_path / "student_1.csv", index=False)
    indices, targets = load_kept(tmp_path / "student_1.csv", pool([0, 0, 1, 0]))
    assert indices.tolist() == [0, 2, 3] and targets.tolist() == [0, 1, 2]


def test_load_kept_refuses_a_table_of_another_pool(tmp_path):
    table = label_rows(PROBS, ["a", "b", "c", "d"], CLASSES, threshold=0.8)
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(PipelineError, match="do not match the prepared unlabeled pool"):
        load_kept(tmp_path / "t.csv", pool([0, 0, 1, 0]))
    with pytest.raises(PipelineError, match="not found"):
        load_kept(tmp_path / "missing.csv", pool([0]))

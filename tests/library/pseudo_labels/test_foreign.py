"""The out-of-class filter on a real run, with either score: the cut is read off validation, the
rows it flags are the rows above it, and none of them reaches a student."""

from __future__ import annotations

import contextlib
import json

import pandas as pd
import pytest

from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.pseudo_labels.foreign import validation_scores
from noisy_student.pseudo_labels.labeling import pseudo_label


@pytest.mark.slow
@pytest.mark.parametrize(("score", "column"), [("energy", "energy"), ("knn", "knn_distance")])
def test_the_filter_holds_out_the_pool_rows_above_the_validation_cut(
    trained_project, tmp_path, score, column
):
    overrides = {"pseudo_label.ood_filter": 0.9, "pseudo_label.ood_score": score,
                 "pseudo_label.ood_neighbours": 2}  # fmt: skip
    with contextlib.chdir(trained_project):
        settings = load_settings(overrides=overrides)
        layout = Layout.at().replace(pseudo_labels=tmp_path)
        summary = pseudo_label(settings, "student_1", layout)
        val_scores = validation_scores(settings, "teacher", layout)
        unfiltered = pd.read_parquet(Layout.at().pseudo_table("student_1"))
    table = pd.read_parquet(layout.pseudo_table("student_1"))
    cut = summary["ood_cut"]
    assert summary["ood_score"] == column
    assert (val_scores <= cut).mean() >= 0.9 and cut in val_scores
    assert (table["foreign"] == (table[column] > cut)).all()
    assert table["foreign"].sum() == summary["foreign"] > 0
    assert (table.loc[table["foreign"], "copies"] == 0).all()
    assert summary == json.loads(layout.pseudo_summary("student_1").read_text())
    # the filter changes the selection, never the teacher's numbers
    same = [c for c in unfiltered.columns if c not in ("kept", "copies")]
    assert (column in unfiltered.columns) == (score == "energy")  # knn: computed when asked
    pd.testing.assert_frame_equal(table[same], unfiltered[same])
    held_out = table["foreign"] & (table["confidence"] >= settings.pseudo_label.threshold)
    assert summary["foreign_above_threshold"] == held_out.sum()

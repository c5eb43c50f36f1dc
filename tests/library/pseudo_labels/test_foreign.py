"""The out-of-class filter on a real run: the cut is read off validation, the rows it flags are
the rows above it, and none of them reaches a student."""

from __future__ import annotations

import contextlib
import json

import pandas as pd
import pytest

from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.pseudo_labels.foreign import validation_energy
from noisy_student.pseudo_labels.labeling import pseudo_label


@pytest.mark.slow
def test_the_filter_holds_out_the_pool_rows_above_the_validation_cut(trained_project, tmp_path):
    with contextlib.chdir(trained_project):
        settings = load_settings(overrides={"pseudo_label.ood_filter": 0.9})
        layout = Layout.at().replace(pseudo_labels=tmp_path)
        summary = pseudo_label(settings, "student_1", layout)
        val_energy = validation_energy(settings, "teacher", layout)
        unfiltered = pd.read_parquet(Layout.at().pseudo_table("student_1"))
    table = pd.read_parquet(layout.pseudo_table("student_1"))
    cut = summary["energy_cut"]
    assert (val_energy <= cut).mean() >= 0.9 and cut in val_energy
    assert (table["foreign"] == (table["energy"] > cut)).all()
    assert table["foreign"].sum() == summary["foreign"] > 0
    assert (table.loc[table["foreign"], "copies"] == 0).all()
    assert summary == json.loads(layout.pseudo_summary("student_1").read_text())
    # the filter changes the selection, never the teacher's numbers
    same = [c for c in unfiltered.columns if c not in ("kept", "copies")]
    pd.testing.assert_frame_equal(table[same], unfiltered[same])
    held_out = table["foreign"] & (table["confidence"] >= settings.pseudo_label.threshold)
    assert summary["foreign_above_threshold"] == held_out.sum()

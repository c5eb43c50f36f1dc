"""Picking the pool images a person should label next."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest

from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.pseudo_labels.to_label import balanced_pick, to_label, uncertainty


def test_scores_by_hand():
    probs = np.array([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.4, 0.35, 0.25]])
    assert uncertainty(probs, "least_confident") == pytest.approx([0.1, 0.5, 0.6])
    assert uncertainty(probs, "margin") == pytest.approx([1 - 0.85, 1 - 0.1, 1 - 0.05])
    votes = np.array([[0, 0, 0], [0, 1, 0], [0, 1, 2]])
    assert np.argsort(-uncertainty(probs, "disagreement", votes)).tolist() == [2, 1, 0]


def test_picks_are_balanced_over_the_guessed_classes_worst_first():
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    guess = np.array([0, 0, 0, 1, 1, 1])
    assert balanced_pick(score, guess, 4).tolist() == [0, 5, 1, 4]
    assert balanced_pick(score, guess, 10).tolist() == [0, 5, 1, 4, 2, 3]  # all there is


@pytest.mark.slow
def test_the_picked_images_are_the_least_confident_ones_the_table_holds(trained_project, tmp_path):
    with contextlib.chdir(trained_project):
        settings = load_settings()
        layout = Layout.at()
        picked = to_label(settings, layout, count=12, model="teacher", out=tmp_path / "next")
        # the teacher labeled the pool for student_1: its table holds the same confidences
        table = pd.read_parquet(layout.pseudo_table("student_1"))
    assert len(picked) == 12 and picked["rank"].tolist() == list(range(1, 13))
    mine = table.set_index("id").loc[picked["id"]]
    assert picked["confidence"].to_numpy() == pytest.approx(mine["confidence"].to_numpy(), abs=1e-5)
    for guess, rows in picked.groupby("guess"):
        others = table[(table["pred_class"].astype(str) == guess) & ~table["id"].isin(picked["id"])]
        if len(others):
            assert rows["confidence"].max() <= others["confidence"].min() + 1e-6
    per_class = table["pred_class"].astype(str).value_counts()
    counts = picked["guess"].astype(str).value_counts()
    # round robin: every guessed class gets its turn before any gets another
    assert len(counts) == min(len(per_class), 12) and counts.max() - counts.min() <= 1
    out = tmp_path / "next"
    assert len(list((out / "unsorted").iterdir())) == 12
    assert (
        pd.read_csv(out / "picked.csv", dtype={"id": str})["id"].tolist() == picked["id"].tolist()
    )
    assert (out / "contact_sheet.png").read_bytes().startswith(b"\x89PNG")
    classes = {p.name for p in out.iterdir() if p.is_dir()} - {"unsorted"}
    assert len(classes) == 10  # one empty folder per class to sort them into

"""Pseudo-label table: one row per pool image, the threshold, the summary's arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import PseudoLabelSettings
from noisy_student.data.sparse import SparseRows
from noisy_student.data.splits import UNKNOWN, Split
from noisy_student.pseudo_labels.labeling import label_rows, table_rows
from noisy_student.pseudo_labels.selection import balance_copies, select, summarize
from noisy_student.pseudo_labels.table import TableWriter, load_pseudo_labels, write_with_copies

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
    ids = [f"img_{i}" for i in range(4)]
    table = table_rows(PROBS, ids, CLASSES, settings(0.8, probs="float32")).to_pandas()
    assert table["pred"].tolist() == [0, 0, 1, 2]
    assert table["pred_class"].tolist() == ["cat", "cat", "dog", "fox"]
    assert table["kept"].tolist() == [True, False, True, True]  # >= threshold is kept
    np.testing.assert_allclose(table["confidence"], [0.9, 0.4, 0.8, 0.8])
    probs = table[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, PROBS.numpy())


def settings(
    threshold: float,
    balance: bool = False,
    per_class: int | None = None,
    probs: str = "float32",
    top_k: int | None = None,
):
    return PseudoLabelSettings(
        threshold=threshold,
        labels="hard",
        temperature=1.0,
        balance=balance,
        per_class=per_class,
        batch_size=8,
        shards=1,
        ood_filter=None,
        ood_score="energy",
        ood_neighbours=1,
        probs=probs,
        top_k=top_k,
    )


def write_rows(path, *parts) -> None:
    """Row groups, one per part, as the stage streams them batch by batch."""
    with TableWriter(path) as writer:
        for part in parts:
            writer.write(part)


def selected(threshold: float, **kwargs):
    table = label_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, threshold)
    cfg = settings(threshold, **kwargs)
    table["copies"] = select(table["pred"].to_numpy(), table["confidence"].to_numpy(), cfg, 3)
    return table, cfg


def test_summary_counts_and_kept_accuracy():
    table, cfg = selected(0.8)
    summary = summarize(table, pool([0, 0, 1, 0]), CLASSES, cfg)
    assert summary["kept"] == 3 and summary["pool_images"] == 4
    assert summary["kept_per_class"] == {"cat": 1, "dog": 1, "fox": 1}
    assert summary["kept_accuracy"] == pytest.approx(2 / 3)  # the fox is a cat
    assert summary["pool_accuracy"] == pytest.approx(3 / 4)


def test_summary_without_truth_reports_no_accuracy():
    table, cfg = selected(0.5)
    summary = summarize(table, pool([UNKNOWN] * 4), CLASSES, cfg)
    assert "kept_accuracy" not in summary and summary["kept"] == 3


def test_balancing_gives_every_class_the_promised_count():
    # class 0: 6 above the threshold, class 1: 2, class 2: 1, class 3: none
    pred = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 0])
    conf = np.array([0.9, 0.95, 0.8, 0.99, 0.85, 0.7, 0.9, 0.95, 0.9, 0.2, 0.1])
    passed = conf >= 0.5
    copies = balance_copies(pred, conf, passed, num_classes=4, per_class=4)
    per_class = np.bincount(pred, weights=copies, minlength=4)
    assert per_class.tolist() == [4, 4, 4, 0]  # class 3 has nothing to repeat
    # too many: the four most confident of class 0, once each; never a row below the threshold
    assert copies[:6].tolist() == [1, 1, 0, 1, 1, 0] and copies[10] == 0
    # too few: each repeated evenly, the more confident one first
    assert copies[6:8].tolist() == [2, 2] and copies[8] == 4


def test_balancing_without_a_target_uses_the_mean_kept_count():
    pred = np.array([0, 0, 0, 0, 0, 1])
    conf = np.full(6, 0.9)
    copies = select(pred, conf, settings(0.5, balance=True), num_classes=2)
    assert np.bincount(pred, weights=copies).tolist() == [3, 3]  # 6 kept / 2 classes
    unbalanced = select(pred, conf, settings(0.5), num_classes=2)
    assert unbalanced.tolist() == [1] * 6


def test_table_with_copies_round_trips_to_training_items(tmp_path):
    table = table_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, settings(0.8))
    rows = tmp_path / "rows.parquet"
    write_rows(rows, table.slice(0, 2), table.slice(2))
    copies = np.array([2, 0, 1, 3])
    out = tmp_path / "student_1.parquet"
    write_with_copies([rows], out, copies)
    written = pd.read_parquet(out)
    assert written["copies"].tolist() == [2, 0, 1, 3]
    assert written["kept"].tolist() == [True, False, True, True]
    labels = load_pseudo_labels(out, pool([0, 0, 1, 0]), CLASSES)
    assert labels.indices.tolist() == [0, 0, 2, 3, 3, 3]
    assert labels.hard.tolist() == [0, 0, 1, 2, 2, 2]
    np.testing.assert_allclose(labels.probs[2], PROBS[2].numpy(), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_table_keeps_class_names_as_text_and_probabilities_at_their_precision(tmp_path, dtype):
    classes = ["007", "010", "1e3"]  # folder names that read as numbers unless kept as text
    table = table_rows(PROBS, [f"img_{i}" for i in range(4)], classes, settings(0.8, probs=dtype))
    rows = tmp_path / "rows.parquet"
    write_rows(rows, table.slice(0, 3), table.slice(3))
    out = tmp_path / "student_1.parquet"
    write_with_copies([rows], out, np.array([1, 0, 1, 1]))
    written = pd.read_parquet(out)
    assert written["pred_class"].tolist() == ["007", "007", "010", "1e3"]
    probs = written[[f"p_{c}" for c in classes]].to_numpy()
    assert probs.dtype == dtype and (probs == PROBS.numpy().astype(dtype)).all()
    assert (written["confidence"].to_numpy() == PROBS.numpy().max(axis=1)).all()  # float32
    labels = load_pseudo_labels(out, pool([0, 0, 1, 0]), classes)
    assert labels.indices.tolist() == [0, 2, 3]
    np.testing.assert_allclose(labels.probs, PROBS.numpy()[[0, 2, 3]], atol=5e-4)


def test_a_top_k_table_holds_k_numbers_an_image_and_trains_on_them(tmp_path):
    """pseudo_label.top_k: the table and the student's items hold k probabilities per image,
    the targets are the dense ones over those k."""
    from noisy_student.losses.mixing import one_hot, sharpen

    cfg = settings(0.8, probs="float16", top_k=2)
    table = table_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, cfg)
    assert [c for c in table.column_names if c.startswith(("p_", "top_"))] == [
        "top_classes",
        "top_probs",
    ]
    out = tmp_path / "student_1.parquet"
    write_rows(tmp_path / "rows.parquet", table)
    write_with_copies([tmp_path / "rows.parquet"], out, np.array([2, 0, 1, 1]))
    labels = load_pseudo_labels(out, pool([0, 0, 1, 0]), CLASSES)
    assert isinstance(labels.probs, SparseRows) and labels.probs.values.shape == (4, 2)
    assert labels.probs.columns.tolist() == [[0, 1], [0, 1], [1, 0], [2, 1]]  # ties: lower first
    truncated = PROBS.numpy()[[0, 0, 2, 3]].copy()
    truncated[np.arange(4), [2, 2, 2, 0]] = 0.0  # each row's smallest
    np.testing.assert_allclose(labels.probs.dense(), truncated, atol=5e-4)
    np.testing.assert_allclose(
        labels.probs.with_values(sharpen(labels.probs.values, 0.5)).dense(),
        sharpen(labels.probs.dense(), 0.5),
        atol=1e-6,
    )
    hard = SparseRows.one_hot(labels.hard, 3, smoothing=0.1)
    np.testing.assert_allclose(hard.dense(), one_hot(labels.hard, 3, 0.1), atol=1e-7)
    assert np.array_equal(hard[2], hard.dense()[2]) and hard[2].dtype == np.float32


def test_a_table_of_another_pool_is_refused(tmp_path):
    table = table_rows(PROBS, ["a", "b", "c", "d"], CLASSES, settings(0.8))
    write_rows(tmp_path / "rows.parquet", table)
    write_with_copies([tmp_path / "rows.parquet"], tmp_path / "t.parquet", np.ones(4, np.int64))
    with pytest.raises(PipelineError, match="do not match the prepared unlabeled pool"):
        load_pseudo_labels(tmp_path / "t.parquet", pool([0, 0, 1, 0]), CLASSES)
    with pytest.raises(PipelineError, match="not found"):
        load_pseudo_labels(tmp_path / "missing.parquet", pool([0]), CLASSES)
    write_rows(tmp_path / "old.parquet", table)  # no copies column
    with pytest.raises(PipelineError, match=r"missing column\(s\) \['copies'\]"):
        load_pseudo_labels(tmp_path / "old.parquet", pool([0, 0, 1, 0]), CLASSES)


def test_shards_are_whole_batches_covering_the_pool_once():
    from noisy_student.pseudo_labels.labeling import shard_bounds

    assert shard_bounds(10, 4, 1) == [(0, 10)]
    assert shard_bounds(10, 4, 2) == [(0, 8), (8, 10)]  # 3 batches: 2 + 1
    assert shard_bounds(1049, 256, 3) == [(0, 512), (512, 1024), (1024, 1049)]
    assert shard_bounds(5, 4, 8) == [(0, 4), (4, 5)]  # never an empty shard
    for start, end in shard_bounds(1000, 32, 7)[:-1]:
        assert start % 32 == 0 and (end - start) % 32 == 0
    with pytest.raises(PipelineError, match="pool is empty"):
        shard_bounds(0, 4, 2)


def test_energy_sits_beside_the_confidence_and_the_filter_flag_beside_it(tmp_path):
    energy = torch.tensor([-9.0, -2.0, -8.0, -1.0])
    table = label_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, 0.8, energy)
    assert list(table.columns[:6]) == ["id", "pred", "pred_class", "confidence", "energy", "kept"]
    rows = tmp_path / "rows.parquet"
    write_rows(
        rows, table_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, settings(0.8), energy)
    )
    out = tmp_path / "student_1.parquet"
    write_with_copies([rows], out, np.array([1, 0, 1, 0]), np.array([False, True, False, True]))
    written = pd.read_parquet(out)
    assert list(written.columns[4:8]) == ["energy", "foreign", "kept", "copies"]
    assert written["foreign"].tolist() == [False, True, False, True]
    assert (written["energy"].to_numpy(np.float32) == energy.numpy()).all()


def test_foreign_rows_never_pass_whatever_their_confidence_and_the_summary_counts_them():
    table, cfg = selected(0.8)
    foreign = np.array([False, False, True, True])  # a confident dog and fox flagged
    table["copies"] = select(table["pred"].to_numpy(), table["confidence"].to_numpy(), cfg, 3,
                             foreign)  # fmt: skip
    assert table["copies"].tolist() == [1, 0, 0, 0]
    table["foreign"] = foreign
    summary = summarize(table, pool([0, 0, 1, 0]), CLASSES, cfg)
    assert summary["foreign"] == 2 and summary["foreign_above_threshold"] == 2
    assert summary["kept"] == 1 and summary["ood_filter"] is None  # cfg's: off in this helper
    balanced = select(table["pred"].to_numpy(), table["confidence"].to_numpy(),
                      settings(0.8, balance=True), 3, foreign)  # fmt: skip
    assert balanced[foreign].sum() == 0  # balancing repeats none of them either


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.95, 1.0])
def test_the_score_cut_passes_at_least_the_share_of_validation_asked(keep):
    from noisy_student.pseudo_labels.foreign import foreign_rows, score_cut

    val = np.random.default_rng(0).normal(size=179).astype(np.float32)
    cut = score_cut(val, keep)
    passing = (~foreign_rows(val, cut)).mean()
    assert keep <= passing < keep + 1 / 179 + 1e-9
    assert cut in val  # one of the validation energies: no interpolation between them


def test_the_table_has_the_same_bytes_however_many_shards_labeled_the_pool(tmp_path):
    table = table_rows(PROBS, [f"img_{i}" for i in range(4)], CLASSES, settings(0.8))
    write_rows(tmp_path / "a.parquet", table.slice(0, 1), table.slice(1, 2))
    write_rows(tmp_path / "b.parquet", table.slice(3))
    write_rows(tmp_path / "whole.parquet", table)
    copies = np.array([1, 0, 2, 1])
    write_with_copies(
        [tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "s.parquet", copies
    )
    write_with_copies([tmp_path / "whole.parquet"], tmp_path / "one.parquet", copies)
    assert (tmp_path / "s.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()


def test_knn_distance_is_the_distance_to_the_kth_nearest_labeled_image_averaged_over_members():
    from noisy_student.pseudo_labels.foreign import NearestLabeled

    # unit vectors at angles 0, 90 and 180 degrees; queries at 0 and 45 degrees
    labeled = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]])
    chord_45 = (2 - 2 * np.cos(np.pi / 4)) ** 0.5  # |a - b| of unit vectors 45 degrees apart
    first = NearestLabeled([labeled], 1).distance([queries])
    np.testing.assert_allclose(first.numpy(), [0.0, chord_45], atol=1e-6)
    second = NearestLabeled([labeled], 2).distance([queries])
    np.testing.assert_allclose(second.numpy(), [2**0.5, chord_45], atol=1e-6)
    # an ensemble: the members' mean, each against its own labeled features
    both = NearestLabeled([labeled, labeled[:1]], 1).distance([queries, queries])
    np.testing.assert_allclose(both.numpy(), [0.0, chord_45], atol=1e-6)
    with pytest.raises(PipelineError, match="ood_neighbours is 4 but there are 3 labeled"):
        NearestLabeled([labeled], 4)


def test_knn_distance_sits_beside_the_energy_in_the_table():
    energy, distance = torch.tensor([-9.0, -2.0, -8.0, -1.0]), torch.tensor([0.1, 0.9, 0.2, 1.3])
    table = table_rows(
        PROBS, [f"img_{i}" for i in range(4)], CLASSES, settings(0.8), energy, distance
    ).to_pandas()
    assert list(table.columns[4:7]) == ["energy", "knn_distance", "kept"]
    assert (table["knn_distance"].to_numpy(np.float32) == distance.numpy()).all()

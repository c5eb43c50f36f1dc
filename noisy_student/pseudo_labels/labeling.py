"""Pseudo-labeling: the round's teacher labels the whole unlabeled pool (the pseudo_label stage).

Writes ``pseudo_labels/<student>.csv``, one row per pool image: ``id``, ``pred`` (class index),
``pred_class``, ``confidence``, ``kept`` (in the student's training set), ``copies`` (how many
times: more than 1 where class balancing duplicates a rare class) and ``p_<class>``, the teacher's
full probability vector (an ensemble's average); plus ``pseudo_labels/<student>.json``, a summary
with the counts per class and, when the pool's truth is known (the demo), the accuracy of the kept
labels.

Selection, as in the original Noisy Student: rows below ``pseudo_label.threshold`` are dropped;
with ``balance`` every class then contributes ``per_class`` training images: the most confident
ones where a class has more, each kept image repeated where it has fewer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import torch

from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.progress import Progress
from noisy_student.core.settings import PseudoLabelSettings, Settings
from noisy_student.data.splits import UNKNOWN, Split, load_classes, load_split
from noisy_student.models.classifier import load_checkpoint, resolve_device
from noisy_student.models.inference import eval_loader, iter_probabilities, probability_table

log = logging.getLogger(__name__)
CHUNK_ROWS = 50_000  # rows per pass when the table is rewritten with its `copies` column


def label_rows(
    probs: torch.Tensor, ids: list[str], classes: list[str], threshold: float
) -> pd.DataFrame:
    table = probability_table(probs, ids, classes, "pred_class", index_column="pred")
    table.insert(table.columns.get_loc("confidence") + 1, "kept", table["confidence"] >= threshold)
    return table


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


def select(pred: np.ndarray, confidence: np.ndarray, cfg: PseudoLabelSettings, num_classes: int):
    """Copies per row: 0/1 by the threshold, then balanced if ``cfg.balance``."""
    passed = confidence >= cfg.threshold
    if not cfg.balance:
        return passed.astype(np.int64)
    per_class = cfg.per_class or max(1, round(int(passed.sum()) / num_classes))
    return balance_copies(pred, confidence, passed, num_classes, per_class)


def summarize(
    table: pd.DataFrame, pool: Split, classes: list[str], cfg: PseudoLabelSettings
) -> dict:
    """``table`` needs the columns ``pred``, ``confidence`` and ``copies``."""
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
    if (pool.true_labels != UNKNOWN).all():
        correct = pred == pool.true_labels
        summary["pool_accuracy"] = float(correct.mean())
        summary["kept_accuracy"] = float(correct[kept].mean()) if kept.any() else None
    return summary


def pseudo_label(
    settings: Settings,
    student: str,
    layout: Layout,
) -> dict:
    """Label the pool with the teacher of round ``student``; write the table and its summary.

    In ``pseudo_label.shards`` shards, one after another here; the Prefect flow labels the same
    shards in parallel on Dask workers (flows/sharded.py). Either way, the same table."""
    pool = load_split("unlabeled", layout.prepared)
    cfg = settings.pseudo_label
    with shard_folder(layout, student) as folder:
        files = [
            label_shard(settings, student, start, end, folder / f"{k}.csv", layout)
            for k, (start, end) in enumerate(shard_bounds(len(pool), cfg.batch_size, cfg.shards))
        ]
        return merge_shards(settings, student, files, layout)


def shard_bounds(rows: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Cut rows [0, rows) into at most ``shards`` runs of whole batches, so that every batch is
    the batch one process labeling the whole pool would see: the same numbers, to the bit."""
    if rows == 0:
        raise PipelineError("the unlabeled pool is empty: run the prepare stage with images in it")
    batches = -(-rows // batch_size)
    per_shard = -(-batches // shards) * batch_size
    return [(start, min(rows, start + per_shard)) for start in range(0, rows, per_shard)]


@contextlib.contextmanager
def shard_folder(layout: Layout, student: str) -> Iterator[Path]:
    """Where the shards' tables wait to be merged; gone afterwards, whatever happened."""
    folder = layout.pseudo_labels / f".{student}.shards"
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's shards: other params, maybe
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def label_shard(
    settings: Settings,
    student: str,
    start: int,
    end: int,
    out: Path,
    layout: Layout,
    threads: int | None = None,
) -> Path:
    """Rows [start, end) of the pool: the teacher's class, confidence and distribution per image,
    streamed batch by batch to ``out`` (a CSV written atomically). ``threads``: torch's share of
    the cores, when several shards are labeled on one machine at once."""
    if threads is not None:
        torch.set_num_threads(threads)
    teacher = settings.student(student).teacher
    cfg = settings.pseudo_label
    device = resolve_device(settings.runtime)
    classifier, card = load_checkpoint(layout.model(teacher), device)
    pool = load_split("unlabeled", layout.prepared)
    rows = np.arange(start, end)
    loader = eval_loader(pool.images, cfg.batch_size, settings.runtime, device, indices=rows)
    log.info("%s labels pool images %d-%d of %d for %s", teacher, start, end, len(pool), student)
    with (
        atomic_path(out) as tmp,
        Progress(end - start, f"pseudo-label ({teacher})", "images", min_interval=5) as bar,
    ):
        done = start
        for i, probs in enumerate(iter_probabilities(classifier, loader, device, settings.runtime)):
            table = label_rows(
                probs, pool.ids[done : done + len(probs)], card.classes, cfg.threshold
            )
            append_csv(table, tmp, header=i == 0)  # streamed: the pool may not fit in memory
            done += len(probs)
            bar.update(len(probs))
    return out


def merge_shards(
    settings: Settings,
    student: str,
    files: list[Path],
    layout: Layout,
) -> dict:
    """The shards' rows, in order, as one table with the selection (threshold, balancing) made
    over the whole pool; then the summary. Only the small columns are held in memory."""
    cfg = settings.pseudo_label
    pool = load_split("unlabeled", layout.prepared)
    classes = load_classes(layout.prepared)
    table = pd.concat(
        [
            chunk
            for path in files
            for chunk in pd.read_csv(path, usecols=["pred", "confidence"], chunksize=CHUNK_ROWS)
        ],
        ignore_index=True,
    )
    if len(table) != len(pool):
        raise PipelineError(
            f"{files[0].parent}: the shards hold {len(table)} rows, the pool {len(pool)}"
        )
    if not (table["confidence"] >= cfg.threshold).any():
        raise PipelineError(
            f"pseudo_label.threshold={cfg.threshold} keeps none of {len(pool)} pool images "
            f"(highest confidence {table['confidence'].max():.3f}); lower the threshold"
        )
    table["copies"] = select(
        table["pred"].to_numpy(), table["confidence"].to_numpy(), cfg, len(classes)
    )
    with atomic_path(layout.pseudo_table(student)) as tmp:
        write_with_copies(files, tmp, table["copies"].to_numpy())
    summary = summarize(table, pool, classes, cfg)
    with atomic_path(layout.pseudo_summary(student)) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    accuracy = summary.get("kept_accuracy")
    log.info(
        "kept %d/%d pseudo-labels (%.1f%%)%s; %d training images after selection",
        summary["kept"],
        summary["pool_images"],
        100 * summary["kept_fraction"],
        f", {100 * accuracy:.1f}% of them correct" if accuracy is not None else "",
        summary["trained_images"],
    )
    return summary


def write_with_copies(row_files: list[Path], out: Path, copies: np.ndarray) -> None:
    """Write the rows with ``kept``/``copies`` set from the selection, chunk by chunk (balancing
    needs every row's confidence first; the table itself may not fit in memory)."""
    start = 0
    header = True
    text = {"id": str, "pred_class": str}  # a class named "007" stays "007"
    for path in row_files:
        for chunk in pd.read_csv(path, dtype=text, chunksize=CHUNK_ROWS):
            part = copies[start : start + len(chunk)]
            chunk["kept"] = part > 0
            chunk.insert(chunk.columns.get_loc("kept") + 1, "copies", part)
            append_csv(chunk, out, header=header)
            start += len(chunk)
            header = False


def append_csv(table: pd.DataFrame, path: Path, header: bool) -> None:
    """Append rows to a CSV file with pyarrow's writer: about ten times pandas' ``to_csv``,
    whose float formatting made writing the table, not the model, the slow part of
    pseudo-labeling (bench/README.md). Floats are written in the shortest form that reads back
    as the same value."""
    options = pa_csv.WriteOptions(include_header=header)
    with open(path, "ab") as f:
        pa_csv.write_csv(pa.Table.from_pandas(table, preserve_index=False), f, options)


@dataclass(frozen=True)
class PseudoLabels:
    """The student's share of the pool: one entry per training copy."""

    indices: np.ndarray  # pool row of each copy
    hard: np.ndarray  # the teacher's class
    probs: np.ndarray  # the teacher's distribution (float32, copies x classes)


def load_pseudo_labels(path: Path, pool: Split, classes: list[str]) -> PseudoLabels:
    """The kept rows of a pseudo-label table, each repeated ``copies`` times (read in chunks:
    only the kept rows' probabilities are held)."""
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the pseudo_label stage first")
    columns = [f"p_{c}" for c in classes]
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in ("id", "pred", "copies", *columns) if c not in header]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {missing}; re-run the pseudo_label stage")
    rows, hard, probs, copies = [], [], [], []
    start = 0
    usecols = ["id", "pred", "copies", *columns]
    for chunk in pd.read_csv(path, usecols=usecols, dtype={"id": str}, chunksize=CHUNK_ROWS):
        if chunk["id"].tolist() != pool.ids[start : start + len(chunk)]:
            raise PipelineError(f"{path}: rows do not match the prepared unlabeled pool; re-run it")
        kept = chunk["copies"].to_numpy(np.int64) > 0
        rows.append(start + np.flatnonzero(kept))
        copies.append(chunk["copies"].to_numpy(np.int64)[kept])
        hard.append(chunk["pred"].to_numpy(np.int64)[kept])
        probs.append(chunk[columns].to_numpy(np.float32)[kept])
        start += len(chunk)
    if start != len(pool):
        raise PipelineError(f"{path}: rows do not match the prepared unlabeled pool; re-run it")
    repeat = np.concatenate(copies)
    return PseudoLabels(
        indices=np.repeat(np.concatenate(rows), repeat),
        hard=np.repeat(np.concatenate(hard), repeat),
        probs=np.repeat(np.concatenate(probs), repeat, axis=0),
    )

"""Pseudo-labeling: the round's teacher labels the whole unlabeled pool (the pseudo_label stage).

Writes ``pseudo_labels/<student>.parquet``, one row per pool image: ``id``, ``pred`` (class
index), ``pred_class``, ``confidence``, ``energy`` (the teacher's free energy: high on images
unlike the labeled classes), ``knn_distance`` (only with ``pseudo_label.ood_score: knn``: the
distance of the teacher's features to the labeled images'), ``foreign`` (only with
``pseudo_label.ood_filter``: held out as of none of the classes, pseudo_labels/foreign.py),
``kept`` (in the student's training set),
``copies`` (how many times: more than 1 where class balancing duplicates a rare class) and the
teacher's probabilities (an ensemble's average): ``p_<class>`` for every class, or with
``pseudo_label.top_k`` its largest entries, ``top_classes`` and ``top_probs``
(pseudo_labels/table.py); plus ``pseudo_labels/<student>.json``, a summary
with the counts per class and, when the pool's truth is known (the demo), the accuracy of the kept
labels.

The round's teacher is the best model so far on validation (models/promotion.py): its declared
teacher, or an earlier model when that one was not promoted. Once the loop has stopped, a round
writes an empty table and a summary that says why, at once.

Selection, as in the original Noisy Student: rows below ``pseudo_label.threshold`` are dropped
(and, with the out-of-class filter, the rows it flags); with ``balance`` every class then
contributes ``per_class`` training images: the most confident ones where a class has more, each
kept image repeated where it has fewer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.progress import Progress
from noisy_student.core.settings import PseudoLabelSettings, Settings
from noisy_student.data.splits import load_classes, load_split
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint, resolve_device
from noisy_student.models.inference import eval_loader, iter_outputs, probability_table
from noisy_student.pseudo_labels.foreign import (
    NearestLabeled,
    foreign_rows,
    score_column,
    score_cut,
    validation_scores,
)
from noisy_student.pseudo_labels.selection import select, summarize
from noisy_student.pseudo_labels.table import (
    TableWriter,
    arrow_table,
    probability_columns,
    read_columns,
    write_empty,
    write_with_copies,
)

log = logging.getLogger(__name__)
# rows turned into the table at once on a GPU: one host copy and one Arrow batch per chunk, not
# per batch
TABLE_CHUNK_ROWS = 16_384

# a stopped round's table: no rows
EMPTY = pa.schema([("id", pa.string()), ("pred", pa.int64()), ("pred_class", pa.string()),
                   ("confidence", pa.float32()), ("energy", pa.float32()), ("kept", pa.bool_()),
                   ("copies", pa.int64())])  # fmt: skip


def label_rows(
    probs: torch.Tensor,
    ids: list[str],
    classes: list[str],
    threshold: float,
    energy: torch.Tensor | None = None,
    knn_distance: torch.Tensor | None = None,
) -> pd.DataFrame:
    """The table's leading columns; the probabilities follow (``table_rows``)."""
    table = probability_table(
        probs, ids, classes, "pred_class", index_column="pred", with_probs=False
    )
    if energy is not None:
        table["energy"] = energy.numpy()
    if knn_distance is not None:
        table["knn_distance"] = knn_distance.numpy()
    table["kept"] = table["confidence"] >= threshold
    return table


def table_rows(
    probs: torch.Tensor,
    ids: list[str],
    classes: list[str],
    cfg: PseudoLabelSettings,
    energy: torch.Tensor | None = None,
    knn_distance: torch.Tensor | None = None,
) -> pa.Table:
    """One batch's rows of the table, as written."""
    columns = probability_columns(probs.float().numpy(), classes, cfg.top_k, cfg.probs)
    rows = label_rows(probs, ids, classes, cfg.threshold, energy, knn_distance)
    return arrow_table(rows, columns)


def pseudo_label(
    settings: Settings,
    student: str,
    layout: Layout,
) -> dict:
    """Label the pool with the teacher of round ``student``; write the table and its summary.

    In ``pseudo_label.shards`` shards, one after another here; the Prefect flow labels the same
    shards in parallel on Dask workers (flows/sharded.py). Either way, the same table."""
    if (stopped := skip_if_stopped(settings, student, layout)) is not None:
        return stopped
    pool = load_split("unlabeled", layout.prepared)
    cfg = settings.pseudo_label
    with shard_folder(layout, student) as folder:
        files = [
            label_shard(settings, student, start, end, folder / f"{k}.parquet", layout)
            for k, (start, end) in enumerate(shard_bounds(len(pool), cfg.batch_size, cfg.shards))
        ]
        return merge_shards(settings, student, files, layout)


def skip_if_stopped(settings: Settings, student: str, layout: Layout) -> dict | None:
    """After the loop stopped: an empty table and a summary saying why (None: label as usual)."""
    before = promotion.teacher_standing(settings, layout, student)
    if not before.stopped:
        return None
    summary = {"stopped": True, "teacher": None, "reason": before.reason}
    log.info("%s: no pseudo-labels, the loop has stopped: %s", student, before.reason)
    with atomic_path(layout.pseudo_table(student)) as tmp:
        write_empty(tmp, EMPTY)
    with atomic_path(layout.pseudo_summary(student)) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


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
    streamed batch by batch to ``out`` (a Parquet file written atomically). ``threads``: torch's
    share of the cores, when several shards are labeled on one machine at once."""
    if threads is not None:
        torch.set_num_threads(threads)
    teacher = promotion.round_teacher(settings, layout, student)
    cfg = settings.pseudo_label
    device = resolve_device(settings.runtime)
    classifier, card = load_checkpoint(layout.model(teacher), device)
    knn = cfg.ood_score == "knn"
    nearest = NearestLabeled.of(classifier, settings, layout, device) if knn else None
    pool = load_split("unlabeled", layout.prepared)
    rows = np.arange(start, end)
    loader = eval_loader(pool.images, cfg.batch_size, settings.runtime, device, indices=rows)
    log.info("%s labels pool images %d-%d of %d for %s", teacher, start, end, len(pool), student)
    with (
        atomic_path(out) as tmp,
        TableWriter(tmp) as writer,
        Progress(end - start, f"pseudo-label ({teacher})", "images", min_interval=5) as bar,
    ):
        done = start
        chunk = TABLE_CHUNK_ROWS if device.type == "cuda" else 0  # the CPU waits for no one
        outputs = iter_outputs(
            classifier, loader, device, settings.runtime, features=knn, rows=chunk
        )
        for batch in outputs:
            ids = pool.ids[done : done + len(batch.probs)]
            distance = nearest.distance(batch.features) if nearest is not None else None
            # streamed: the pool may not fit in memory
            writer.write(table_rows(batch.probs, ids, card.classes, cfg, batch.energy, distance))
            done += len(batch.probs)
            bar.update(len(batch.probs))
    return out


def merge_shards(
    settings: Settings,
    student: str,
    files: list[Path],
    layout: Layout,
) -> dict:
    """The shards' rows, in order, as one table with the selection (out-of-class filter,
    threshold, balancing) made over the whole pool; then the summary. Only the small columns
    are held in memory."""
    cfg = settings.pseudo_label
    pool = load_split("unlabeled", layout.prepared)
    classes = load_classes(layout.prepared)
    table = pd.concat(
        [read_columns(path, ["pred", "confidence", score_column(cfg)]) for path in files],
        ignore_index=True,
    )
    if len(table) != len(pool):
        raise PipelineError(
            f"{files[0].parent}: the shards hold {len(table)} rows, the pool {len(pool)}"
        )
    teacher = promotion.round_teacher(settings, layout, student)
    foreign, cut = None, None
    if cfg.ood_filter is not None:
        cut = score_cut(validation_scores(settings, teacher, layout), cfg.ood_filter)
        foreign = foreign_rows(table[score_column(cfg)].to_numpy(), cut)
        table["foreign"] = foreign
        log.info("out-of-class filter: %d of %d pool images above the %s cut %.3f (%s of "
                 "validation)", foreign.sum(), len(table), score_column(cfg), cut,
                 cfg.ood_filter)  # fmt: skip
    passed = table["confidence"].to_numpy() >= cfg.threshold
    if not (passed if foreign is None else passed & ~foreign).any():
        raise PipelineError(
            f"pseudo_label.threshold={cfg.threshold} keeps none of {len(pool)} pool images "
            f"(highest confidence {table['confidence'].max():.3f}"
            + ("" if foreign is None else f", {int(foreign.sum())} held out as foreign")
            + "); lower the threshold"
            + ("" if foreign is None else " or raise pseudo_label.ood_filter")
        )
    table["copies"] = select(
        table["pred"].to_numpy(), table["confidence"].to_numpy(), cfg, len(classes), foreign
    )
    with atomic_path(layout.pseudo_table(student)) as tmp:
        write_with_copies(files, tmp, table["copies"].to_numpy(), foreign)
    summary = {"teacher": teacher}
    summary |= summarize(table, pool, classes, cfg)
    if cut is not None:
        summary["ood_score"], summary["ood_cut"] = score_column(cfg), cut
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

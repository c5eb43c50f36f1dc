"""The pseudo-label table on disk: written in streamed chunks, read back as a student's items."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from noisy_student.core.errors import PipelineError
from noisy_student.data.splits import Split

CHUNK_ROWS = 50_000  # rows per pass when the table is rewritten with its `copies` column


def write_with_copies(
    row_files: list[Path], out: Path, copies: np.ndarray, foreign: np.ndarray | None = None
) -> None:
    """Write the rows with ``kept``/``copies`` set from the selection (and ``foreign``, the
    out-of-class filter's flag, where it ran), chunk by chunk (balancing needs every row's
    confidence first; the table itself may not fit in memory)."""
    start = 0
    header = True
    text = {"id": str, "pred_class": str}  # a class named "007" stays "007"
    for path in row_files:
        for chunk in pd.read_csv(path, dtype=text, chunksize=CHUNK_ROWS):
            part = copies[start : start + len(chunk)]
            chunk["kept"] = part > 0
            if foreign is not None:
                flags = foreign[start : start + len(chunk)]
                chunk.insert(chunk.columns.get_loc("kept"), "foreign", flags)
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

"""The pseudo-label table on disk, Parquet: written in streamed row groups, read back as a
student's items.

The teacher's distribution is kept whole (``p_<class>`` columns) or as its ``top_k`` entries
(``top_classes`` / ``top_probs``, fixed-size lists), as ``float32`` or ``float16``
(``pseudo_label.top_k``, ``pseudo_label.probs``): at 1,000 classes the whole distribution is 4 KB
a pool image in float32, its top 5 in float16 20 bytes, and training then holds k, not K, numbers
per image (data/sparse.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisy_student.core.errors import PipelineError
from noisy_student.data.sparse import SparseRows
from noisy_student.data.splits import Split

CHUNK_ROWS = 50_000  # rows per row group of the table, and per pass when it is read back
TOP = ("top_classes", "top_probs")


def probability_columns(
    probs: np.ndarray, classes: list[str], top_k: int | None, dtype: str
) -> dict[str, pa.Array]:
    """The teacher's distributions (float32, N x classes) as table columns: ``p_<class>`` each,
    or the ``top_k`` largest, largest first (ties: the lower class index first)."""
    if top_k is None:
        columns = np.asfortranarray(probs.astype(dtype))  # each class's column contiguous
        return {f"p_{c}": pa.array(columns[:, k]) for k, c in enumerate(classes)}
    k = min(top_k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    return {
        TOP[0]: pa.FixedSizeListArray.from_arrays(pa.array(order.astype(np.int32).ravel()), k),
        TOP[1]: pa.FixedSizeListArray.from_arrays(pa.array(top.astype(dtype).ravel()), k),
    }


def arrow_table(table: pd.DataFrame, extra: dict[str, pa.Array] | None = None) -> pa.Table:
    """``table``'s columns then ``extra``'s, without pandas' schema metadata (which would name a
    pandas version in every file, and go stale as columns are added)."""
    out = pa.Table.from_pandas(table, preserve_index=False)
    extra = extra or {}
    return pa.Table.from_arrays([*out.columns, *extra.values()], names=[*out.column_names, *extra])


def group_rows(schema: pa.Schema) -> int:
    """Rows per row group: CHUNK_ROWS, fewer for wide tables (about 16 M values a group, so a
    1,000-class table buffers ~64 MB). Fixed by the columns alone, so the same table has the
    same row groups however it was written."""
    return max(1024, min(CHUNK_ROWS, 2**24 // len(schema)))


class TableWriter:
    """Appends tables to one Parquet file (opened with the first), in row groups of
    ``group_rows`` whatever the size of the tables handed in: one row group per batch of 256
    images would cost a page header per column per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.count = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            # dictionary pages only where values repeat: a probability column's dictionary
            # would hold every value once and then index it, larger than the values themselves
            dictionary = [c for c in ("pred_class",) if c in table.column_names]
            self.writer = pq.ParquetWriter(self.path, table.schema, use_dictionary=dictionary)
            self.rows = group_rows(table.schema)
        self.pending.append(table)
        self.count += table.num_rows
        while self.count >= self.rows:
            whole = pa.concat_tables(self.pending)
            self.writer.write_table(whole.slice(0, self.rows).combine_chunks())
            self.pending, self.count = [whole.slice(self.rows)], self.count - self.rows

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(
        self, kind: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.writer is None:
            return
        if self.count and kind is None:
            self.writer.write_table(pa.concat_tables(self.pending).combine_chunks())
        self.writer.close()


def write_empty(path: Path, schema: pa.Schema) -> None:
    pq.write_table(schema.empty_table(), path)


def batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The table in passes of at most CHUNK_ROWS rows (memory stays flat for any pool)."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS, columns=columns)


def read_columns(path: Path, columns: list[str]) -> pd.DataFrame:
    """Those columns of the whole table (the small ones: the probabilities stay on disk)."""
    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[c for c in columns if c in names]).to_pandas()


def write_with_copies(
    row_files: list[Path], out: Path, copies: np.ndarray, foreign: np.ndarray | None = None
) -> None:
    """Write the rows with ``kept``/``copies`` set from the selection (and ``foreign``, the
    out-of-class filter's flag, where it ran), pass by pass (balancing needs every row's
    confidence first; the table itself may not fit in memory). TableWriter's row groups do not
    depend on the files: however many shards labeled the pool, the same bytes."""
    with TableWriter(out) as writer:
        for table in _with_copies(row_files, copies, foreign):
            writer.write(table)


def _with_copies(
    row_files: list[Path], copies: np.ndarray, foreign: np.ndarray | None
) -> Iterator[pa.Table]:
    start = 0
    for path in row_files:
        for batch in batches(path):
            table = pa.Table.from_batches([batch])
            part = copies[start : start + table.num_rows]
            at = table.schema.get_field_index("kept")
            table = table.set_column(at, "kept", pa.array(part > 0))
            if foreign is not None:
                flags = foreign[start : start + table.num_rows]
                table = table.add_column(at, "foreign", pa.array(flags, pa.bool_()))
                at += 1
            yield table.add_column(at + 1, "copies", pa.array(part.astype(np.int64)))
            start += table.num_rows


@dataclass(frozen=True)
class PseudoLabels:
    """The student's share of the pool: one entry per training copy."""

    indices: np.ndarray  # pool row of each copy
    hard: np.ndarray  # the teacher's class
    # the teacher's distribution (float32, copies x classes), or its top-k entries
    probs: np.ndarray | SparseRows


def load_pseudo_labels(path: Path, pool: Split, classes: list[str]) -> PseudoLabels:
    """The kept rows of a pseudo-label table, each repeated ``copies`` times (read pass by pass:
    only the kept rows' probabilities are held)."""
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the pseudo_label stage first")
    names = pq.read_schema(path).names
    top_k = TOP[0] in names
    columns = list(TOP) if top_k else [f"p_{c}" for c in classes]
    missing = [c for c in ("id", "pred", "copies", *columns) if c not in names]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {missing}; re-run the pseudo_label stage")
    rows, hard, probs, tops, copies = [], [], [], [], []
    start = 0
    for batch in batches(path, ["id", "pred", "copies", *columns]):
        if batch.column("id").to_pylist() != pool.ids[start : start + batch.num_rows]:
            raise PipelineError(f"{path}: rows do not match the prepared unlabeled pool; re-run it")
        count = batch.column("copies").to_numpy()
        kept = count > 0
        rows.append(start + np.flatnonzero(kept))
        copies.append(count[kept])
        hard.append(batch.column("pred").to_numpy().astype(np.int64)[kept])
        if top_k:
            tops.append([_list_values(batch.column(c))[kept] for c in TOP])
        else:
            dense = np.stack([batch.column(c).to_numpy() for c in columns], axis=1)
            probs.append(dense.astype(np.float32)[kept])
        start += batch.num_rows
    if start != len(pool):
        raise PipelineError(f"{path}: rows do not match the prepared unlabeled pool; re-run it")
    repeat = np.concatenate(copies)
    if top_k:
        top = SparseRows(
            np.concatenate([t[0] for t in tops]).astype(np.int64),
            np.concatenate([t[1] for t in tops]).astype(np.float32),
            len(classes),
        )
        distribution: np.ndarray | SparseRows = top.repeat(repeat)
    else:
        distribution = np.repeat(np.concatenate(probs), repeat, axis=0)
    return PseudoLabels(
        indices=np.repeat(np.concatenate(rows), repeat),
        hard=np.repeat(np.concatenate(hard), repeat),
        probs=distribution,
    )


def _list_values(column: pa.FixedSizeListArray) -> np.ndarray:
    """A fixed-size list column as an N x k array."""
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)

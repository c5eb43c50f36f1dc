"""Rows of an N x K matrix kept as their few large entries: a pseudo-label's top-k classes, or a
hard label (smoothed), without holding N x K floats.

Written here, not taken from torch.sparse: a DataLoader reads one row at a time, and a sparse
tensor's row selection builds a new sparse tensor per call (slower than filling a dense row);
and the stages that only read tables (report) need not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseRows:
    """Row i holds ``floor`` everywhere but at ``columns[i]``, where it holds ``floor +
    values[i]``. ``rows[i]`` is that row, dense (float32, ``width``)."""

    columns: np.ndarray  # N x k class indices (int64)
    values: np.ndarray  # N x k (float32)
    width: int
    floor: float = 0.0

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, i: int) -> np.ndarray:
        row = np.full(self.width, self.floor, dtype=np.float32)
        row[self.columns[i]] += self.values[i]
        return row

    def dense(self) -> np.ndarray:
        out = np.full((len(self), self.width), self.floor, dtype=np.float32)
        np.put_along_axis(out, self.columns, self.floor + self.values, axis=1)
        return out

    def __mul__(self, weight: float) -> SparseRows:
        """Every entry times ``weight``, as an array's ``rows * weight``."""
        return SparseRows(
            self.columns, self.values * np.float32(weight), self.width, self.floor * weight
        )

    def take(self, rows: np.ndarray, axis: int = 0) -> SparseRows:
        """Rows ``rows``, in that order, as an array's ``a.take(rows, axis=0)``."""
        if axis != 0:
            raise ValueError("SparseRows.take selects rows only (axis 0)")
        return SparseRows(self.columns[rows], self.values[rows], self.width, self.floor)

    def repeat(self, counts: np.ndarray) -> SparseRows:
        """Row i ``counts[i]`` times, as np.repeat."""
        return SparseRows(
            np.repeat(self.columns, counts, axis=0),
            np.repeat(self.values, counts, axis=0),
            self.width,
            self.floor,
        )

    @staticmethod
    def one_hot(labels: np.ndarray, width: int, smoothing: float = 0.0) -> SparseRows:
        """losses.mixing.one_hot's rows: 1 - eps + eps / K on the label, eps / K elsewhere."""
        off = smoothing / width
        values = np.full((len(labels), 1), 1.0 - smoothing, dtype=np.float32)
        return SparseRows(np.asarray(labels, np.int64)[:, None], values, width, off)

    def with_values(self, values: np.ndarray) -> SparseRows:
        """The same columns holding ``values`` (floor 0): e.g. the kept entries sharpened."""
        return SparseRows(self.columns, values, self.width)

"""Prepared image splits on disk (numpy and pandas only; data/loaders.py streams them to torch).

A split is ``<root>/<split>/images.npy`` (uint8, N x H x W x 3, memory-mapped so a pool of any
size streams from disk) beside ``index.csv`` (one row per image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.errors import PipelineError

SPLITS = ("labeled", "val", "test", "unlabeled")
UNKNOWN = -1


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # N x H x W x 3 uint8, usually a read-only memmap
    ids: list[str]
    labels: np.ndarray  # int64 class index per image, UNKNOWN where not labeled
    true_labels: np.ndarray  # the pool's hidden truth where known (demo), else UNKNOWN

    def __len__(self) -> int:
        return len(self.ids)


def load_classes(root: Path) -> list[str]:
    path = root / "classes.json"
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the prepare stage first")
    return json.loads(path.read_text())["classes"]


def load_split(name: str, root: Path) -> Split:
    folder = root / name
    if not (folder / "images.npy").exists():
        raise PipelineError(f"{folder}/images.npy: not found; run the prepare stage first")
    index = pd.read_csv(folder / "index.csv", dtype={"id": str})
    images = np.load(folder / "images.npy", mmap_mode="r")
    return Split(
        images=images,
        ids=index["id"].tolist(),
        labels=index["label"].to_numpy(np.int64),
        true_labels=index["true_label"].to_numpy(np.int64),
    )

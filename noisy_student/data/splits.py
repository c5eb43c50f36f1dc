"""Prepared image splits on disk (numpy and pandas only; data/loaders.py streams them to torch).

A split is ``<root>/<split>/index.csv`` (one row per image) beside its images, stored one of two
ways (``data.storage``): ``images.npy`` (uint8, N x H x W x 3, memory-mapped so a pool of any size
streams from disk) or ``images-<k>.arrow`` shards of each image's encoded bytes (data/shards.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.errors import PipelineError
from noisy_student.data.shards import EncodedImages, shard_files

SPLITS = ("labeled", "val", "test", "unlabeled")
UNKNOWN = -1


@dataclass(frozen=True)
class Split:
    images: np.ndarray | EncodedImages  # N x H x W x 3 uint8: a read-only memmap, or shards
    ids: list[str]
    labels: np.ndarray  # int64 class index per image, UNKNOWN where not labeled
    true_labels: np.ndarray  # the pool's hidden truth where known (demo), else UNKNOWN

    def __len__(self) -> int:
        return len(self.ids)


def prepared_summary(root: Path) -> dict:
    """``classes.json``: the classes, the source, the image size and storage, the counts."""
    path = root / "classes.json"
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the prepare stage first")
    return json.loads(path.read_text())


def load_classes(root: Path) -> list[str]:
    return prepared_summary(root)["classes"]


def image_files(folder: Path) -> list[Path]:
    """The files holding a prepared split's images, whichever the storage."""
    return [folder / "images.npy"] if (folder / "images.npy").exists() else shard_files(folder)


def load_split(name: str, root: Path) -> Split:
    folder = root / name
    files = image_files(folder)
    if not files or not (folder / "index.csv").exists():
        raise PipelineError(f"{folder}: no prepared images; run the prepare stage first")
    index = pd.read_csv(folder / "index.csv", dtype={"id": str})
    if files[0].suffix == ".npy":
        images = np.load(files[0], mmap_mode="r")
    else:
        summary = prepared_summary(root)
        images = EncodedImages(files, summary["image_size"], summary["eval_crop_pct"])
    if len(images) != len(index):
        raise PipelineError(f"{folder}: {len(images)} images but {len(index)} rows in index.csv")
    return Split(
        images=images,
        ids=index["id"].tolist(),
        labels=index["label"].to_numpy(np.int64),
        true_labels=index["true_label"].to_numpy(np.int64),
    )

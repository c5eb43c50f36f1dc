"""Synthetic inputs for the speed and scale benchmarks, in the pipeline's own on-disk layouts: a
prepared pool (noisy_student/data/splits.py: ``images.npy`` + ``index.csv``, written by
noisy_student.data.prepare's ``write_split``) and a model folder (safetensors written by
noisy_student/models/classifier.py, and the card of noisy_student/models/card.py). Pixels are
random: the benchmarks measure time and memory, which do not depend on what the images show."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.layout import Layout
from noisy_student.core.settings import ModelTraining
from noisy_student.data.prepare import write_split
from noisy_student.data.splits import UNKNOWN
from noisy_student.models import promotion
from noisy_student.models.card import Member, ModelCard
from noisy_student.models.classifier import create_model, normalization, save_checkpoint

CLASSES = [str(c) for c in range(10)]


def layout(root: Path) -> Layout:
    """The benchmarks' work folder as a project: ``prepared/`` (the synthetic splits),
    ``models/``, ``pseudo_labels/``, ``checkpoints/`` under ``root``."""
    return Layout.at(root).replace(prepared=root / "prepared")


def random_images(count: int, size: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_pool(root: Path, count: int, size: int, seed: int = 0, split: str = "unlabeled") -> Path:
    """A prepared split of ``count`` random images under ``root`` (plus classes.json), streamed
    to disk image by image as noisy_student.data.prepare writes a real one. The pool's labels are
    unknown; another split's are random."""
    ids = [f"{split}/img_{i:07d}.png" for i in range(count)]
    labels = (
        np.full(count, UNKNOWN)
        if split == "unlabeled"
        else np.random.default_rng(seed).integers(0, len(CLASSES), count)
    )
    index = pd.DataFrame({"id": ids, "label": labels, "true_label": labels, "source": "synthetic"})
    write_split(root / split, random_images(count, size, seed), count, size, index, split)
    summary = {"classes": CLASSES, "source": "synthetic", "counts": {split: count}}
    (root / "classes.json").write_text(json.dumps(summary))
    return root


def write_model(
    folder: Path, spec: ModelTraining, image_size: int, classes: list[str] = CLASSES
) -> Path:
    """An untrained model saved as a trained one is (its weights do not change its speed)."""
    net = create_model(spec, len(classes))
    mean, std = normalization(net)
    card = ModelCard(
        name=folder.name,
        classes=classes,
        image_size=image_size,
        mlflow_run_id=None,
        members=[Member(spec.model, "model.safetensors", mean, std, None)],
    )
    save_checkpoint([net], card, folder, finish=first_of_the_loop)
    return folder


def first_of_the_loop(staged: Path) -> None:
    """The standing a trained teacher has (its students' stages read it)."""
    standing = promotion.first(staged.name, "", promotion.weights_digest(staged))
    (staged / promotion.STANDING_FILE).write_text(standing.to_json())

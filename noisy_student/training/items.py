"""A model's training set: the labeled images and, for a student, its share of the pool, each with
its target distribution and distillation weight (see losses/distill.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from noisy_student.augment.policy import TrainTransform
from noisy_student.core.layout import Layout
from noisy_student.core.settings import ModelTraining, PseudoLabelSettings, Settings
from noisy_student.data.loaders import TrainingImages
from noisy_student.data.sparse import SparseRows
from noisy_student.data.splits import Split, load_split
from noisy_student.losses.mixing import one_hot, sharpen
from noisy_student.pseudo_labels.table import PseudoLabels, load_pseudo_labels


def labeled_items(
    labeled: Split,
    num_classes: int,
    spec: ModelTraining,
    ce_weight: float,
    kd_weight: float,
    teacher_probs: np.ndarray | SparseRows | None = None,
) -> TrainingImages:
    targets = one_hot(labeled.labels, num_classes, spec.label_smoothing) * ce_weight
    return TrainingImages(
        labeled.images,
        np.arange(len(labeled)),
        targets,
        np.full(len(labeled), kd_weight, dtype=np.float32),
        teacher_probs,
    )


def training_items(
    settings: Settings,
    name: str,
    spec: ModelTraining,
    classes: list[str],
    layout: Layout,
    clean_teacher: Callable[[np.ndarray, np.ndarray], np.ndarray | SparseRows] | None = None,
) -> tuple[Dataset, int]:
    """Items with their targets and distillation weights (see losses/distill.py), and how many
    come from the labeled set. ``clean_teacher(images, rows)``: the teacher's distribution at T on
    clean images, carried by the items when distillation uses it. The caller attaches the
    transform."""
    labeled = load_split("labeled", layout.prepared)
    if name == "teacher":
        return labeled_items(labeled, len(classes), spec, 1.0, 0.0), len(labeled)
    kd = settings.distill
    alpha = kd.alpha if kd.enabled else 0.0
    pool = load_split("unlabeled", layout.prepared)
    pseudo = load_pseudo_labels(layout.pseudo_table(name), pool, classes)
    pool_targets = pool_label_targets(
        pseudo, settings.pseudo_label, spec.label_smoothing, len(classes)
    )
    labeled_probs = pool_probs = None
    if clean_teacher is not None:
        labeled_probs = clean_teacher(labeled.images, np.arange(len(labeled)))
        rows, copy_of = np.unique(pseudo.indices, return_inverse=True)  # each image once
        pool_probs = clean_teacher(pool.images, rows).take(copy_of, axis=0)
    # distillation on: the pool learns from the teacher's soft output alone (KL term, weight 1)
    pool_ce, pool_kd = (0.0, 1.0) if kd.enabled else (1.0, 0.0)
    pool_items = TrainingImages(
        pool.images,
        pseudo.indices,
        pool_targets * pool_ce,
        np.full(len(pseudo.indices), pool_kd, dtype=np.float32),
        pool_probs,
    )
    labeled_part = labeled_items(labeled, len(classes), spec, 1.0 - alpha, alpha, labeled_probs)
    return ConcatDataset([labeled_part, pool_items]), len(labeled)


def pool_label_targets(
    pseudo: PseudoLabels, cfg: PseudoLabelSettings, smoothing: float, num_classes: int
) -> np.ndarray | SparseRows:
    """The pool's targets: the teacher's class (smoothed), or its distribution sharpened at
    ``cfg.temperature``; kept sparse (k numbers an image) when the table holds top-k."""
    sparse = isinstance(pseudo.probs, SparseRows)
    if cfg.labels == "hard":
        if sparse:
            return SparseRows.one_hot(pseudo.hard, num_classes, smoothing)
        return one_hot(pseudo.hard, num_classes, smoothing)
    if sparse:  # sharpened over the kept entries (the rest held nothing)
        return pseudo.probs.with_values(sharpen(pseudo.probs.values, cfg.temperature))
    return sharpen(pseudo.probs, cfg.temperature)


def attach_transform(dataset: Dataset, transform: TrainTransform | None) -> None:
    for part in getattr(dataset, "datasets", [dataset]):
        part.transform = transform

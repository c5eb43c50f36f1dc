"""The out-of-class filter: which pool images look like none of the labeled classes.

Real pools hold images of none of the classes (Oliver et al. 2018: they can hurt), and a softmax
is confident on them as often as not. Each pool row carries its free energy (``energy``,
models.classifier.Classifier.probs_and_energy); the cut is read off the validation images, never
the pool or the test set: with ``pseudo_label.ood_filter`` q, a pool image whose energy is above
that of a share q of the validation images is held out as foreign.
"""

from __future__ import annotations

import numpy as np
import torch

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.splits import load_split
from noisy_student.models.classifier import load_checkpoint, resolve_device
from noisy_student.models.inference import EVAL_BATCH_SIZE, eval_loader, iter_outputs


def validation_energy(settings: Settings, model: str, layout: Layout) -> np.ndarray:
    """``model``'s free energy on every validation image."""
    device = resolve_device(settings.runtime)
    classifier, _ = load_checkpoint(layout.model(model), device)
    val = load_split("val", layout.prepared)
    loader = eval_loader(val.images, EVAL_BATCH_SIZE, settings.runtime, device)
    outputs = iter_outputs(classifier, loader, device, settings.runtime)
    return torch.cat([energy for _, energy in outputs]).numpy()


def energy_cut(val_energy: np.ndarray, keep: float) -> float:
    """The energy at or under which a share ``keep`` of the validation images lie: one of theirs
    (the quantile's next higher value), so the share that passes is never below ``keep``."""
    return float(np.quantile(val_energy, keep, method="higher"))


def foreign_rows(pool_energy: np.ndarray, cut: float) -> np.ndarray:
    return pool_energy > cut

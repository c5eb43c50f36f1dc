"""The out-of-class filter: which pool images look like none of the labeled classes.

Real pools hold images of none of the classes (Oliver et al. 2018: they can hurt), and a softmax
is confident on them as often as not. Each pool row carries an out-of-class score, high on
foreign images: always the teacher's free energy (``energy``,
models.classifier.Classifier.outputs), and with ``pseudo_label.ood_score: knn`` the distance of
the teacher's normalized features to those of the k-th nearest labeled image (``knn_distance``;
Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"), which asks how
far an image is from what a person labeled rather than how sure a few-label teacher is. The cut
is read off the validation images, never the pool or the test set: with
``pseudo_label.ood_filter`` q, a pool image whose score is above that of a share q of the
validation images is held out as foreign.
"""

from __future__ import annotations

import numpy as np
import torch

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import PseudoLabelSettings, Settings
from noisy_student.data.splits import load_split
from noisy_student.models.classifier import Classifier, load_checkpoint, resolve_device
from noisy_student.models.inference import EVAL_BATCH_SIZE, eval_loader, iter_outputs

SCORE_COLUMNS = {"energy": "energy", "knn": "knn_distance"}


def score_column(cfg: PseudoLabelSettings) -> str:
    """The table's column that ``pseudo_label.ood_score`` names."""
    return SCORE_COLUMNS[cfg.ood_score]


def split_features(
    classifier: Classifier, split: str, settings: Settings, layout: Layout, device: torch.device
) -> list[torch.Tensor]:
    """Each member's normalized features of every image of a prepared split, unaugmented."""
    images = load_split(split, layout.prepared).images
    loader = eval_loader(images, EVAL_BATCH_SIZE, settings.runtime, device)
    batches = [out.features for out in iter_outputs(classifier, loader, device, settings.runtime,
                                                    features=True)]  # fmt: skip
    return [torch.cat(member) for member in zip(*batches, strict=True)]


class NearestLabeled:
    """The distance of an image's features to those of the k-th nearest labeled image, averaged
    over an ensemble's members. Written here: timm and torch have no such score, and it needs
    only ``torch.cdist`` over a labeled set that few labels keep small."""

    def __init__(
        self, labeled: list[torch.Tensor], k: int, device: torch.device | None = None
    ) -> None:
        if k > len(labeled[0]):
            raise PipelineError(
                f"pseudo_label.ood_neighbours is {k} but there are {len(labeled[0])} labeled "
                "images: set it to at most that"
            )
        # the distances are computed where the model runs: a GPU's, for a large labeled set
        self.device = device or labeled[0].device
        self.labeled, self.k = [ref.to(self.device) for ref in labeled], k

    def distance(self, features: list[torch.Tensor]) -> torch.Tensor:
        """One distance per row of ``features`` (each member's), on the CPU."""
        per_member = [
            torch.cdist(f.to(self.device), ref).kthvalue(self.k, dim=1).values
            for f, ref in zip(features, self.labeled, strict=True)
        ]
        return torch.stack(per_member).mean(0).cpu()

    @classmethod
    def of(
        cls, classifier: Classifier, settings: Settings, layout: Layout, device: torch.device
    ) -> NearestLabeled:
        """``classifier``'s features of the labeled split, the reference."""
        labeled = split_features(classifier, "labeled", settings, layout, device)
        return cls(labeled, settings.pseudo_label.ood_neighbours, device)


def validation_scores(settings: Settings, model: str, layout: Layout) -> np.ndarray:
    """``model``'s out-of-class score (``pseudo_label.ood_score``) on every validation image."""
    device = resolve_device(settings.runtime)
    classifier, _ = load_checkpoint(layout.model(model), device)
    if settings.pseudo_label.ood_score == "knn":
        nearest = NearestLabeled.of(classifier, settings, layout, device)
        val = split_features(classifier, "val", settings, layout, device)
        return nearest.distance(val).numpy()
    val = load_split("val", layout.prepared)
    loader = eval_loader(val.images, EVAL_BATCH_SIZE, settings.runtime, device)
    outputs = iter_outputs(classifier, loader, device, settings.runtime)
    return torch.cat([out.energy for out in outputs]).numpy()


def score_cut(val_scores: np.ndarray, keep: float) -> float:
    """The score at or under which a share ``keep`` of the validation images lie: one of theirs
    (the quantile's next higher value), so the share that passes is never below ``keep``."""
    return float(np.quantile(val_scores, keep, method="higher"))


def foreign_rows(pool_scores: np.ndarray, cut: float) -> np.ndarray:
    return pool_scores > cut

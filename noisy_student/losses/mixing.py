"""Targets for training: label smoothing, soft pseudo-labels, and MixUp/CutMix on batches.

The batch mixing itself is timm's ``Mixup`` (the images, the Beta draws, CutMix's box and its
area-corrected weight). timm mixes integer class labels only, but our targets are distributions
(soft pseudo-labels) with a distillation weight beside them, so we hand ``Mixup`` the item index
as its "label": the one-hot rows it mixes then form the mixing matrix M (M[i, i] = lam,
M[i, partner] = 1 - lam), and every per-item quantity mixes as ``M @ quantity``.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import Mixup

from noisy_student.augment.streams import OwnedRandom
from noisy_student.core.settings import ModelTraining


def one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """Hard labels as distributions, smoothed: 1 - eps + eps / K on the label, eps / K elsewhere
    (the same values as timm's ``mixup_target``)."""
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off, dtype=np.float32)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p ** (1 / T), renormalised: softmax(logits / T) from softmax(logits). T < 1 sharpens."""
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


class BatchMixer:
    """MixUp and CutMix, each with its own per-batch probability (one of them at most per batch)."""

    def __init__(self, spec: ModelTraining, owned: OwnedRandom | None = None) -> None:
        """``owned``: the training's generators, which timm's Mixup draws from."""
        self.owned = owned if owned is not None else OwnedRandom(0)
        total = spec.mixup_p + spec.cutmix_p
        self.enabled = total > 0
        if not self.enabled:
            return
        # timm's knobs: prob = P(mix at all), switch_prob = P(cutmix | a mix, both active)
        self.mixup = Mixup(
            mixup_alpha=spec.mixup_alpha if spec.mixup_p > 0 else 0.0,
            cutmix_alpha=spec.cutmix_alpha if spec.cutmix_p > 0 else 0.0,
            prob=total,
            switch_prob=spec.cutmix_p / total,
            mode="batch",
            correct_lam=True,  # CutMix's weight is the pasted area after clipping to the image
            label_smoothing=0.0,
        )

    def __call__(self, images: torch.Tensor, *per_item: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mix ``images`` (float, in place) and each per-item tensor (targets, weights) alike."""
        if not self.enabled:
            return (images, *per_item)
        # timm pairs item i with item n-1-i and insists on an even count: a lone last item of an
        # odd batch stays unmixed
        n = len(images) - len(images) % 2
        if n < 2:
            return (images, *per_item)
        self.mixup.num_classes = n
        head = images[:n]  # a view: timm mixes it in place
        with self.owned.active():
            _, matrix = self.mixup(head, torch.arange(n, device=images.device))
        mixed = []
        for values in per_item:
            top = (matrix.to(values.dtype) @ values[:n].reshape(n, -1)).reshape(values[:n].shape)
            mixed.append(torch.cat([top, values[n:]]))
        return (images, *mixed)

"""The augmentation stage's artifacts: both policies as albumentations JSON, and a preview grid.

Training loads the policies back (``policy.load_policy``), so what ran is exactly what was
versioned.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import numpy as np

from noisy_student.augment.policy import (
    POLICIES,
    TrainTransform,
    batched_augmentation,
    build_policy,
)
from noisy_student.core.atomic import atomic_path
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.splits import load_split

log = logging.getLogger(__name__)


def preview_grid(
    images: list[np.ndarray],
    sources: list[np.ndarray],
    policies: dict[str, Callable[[np.ndarray], np.ndarray]],
    samples: int,
    path: Path,
):
    """Rows: images. Columns: the original (as evaluation sees it), then ``samples`` draws of
    each policy, each taken from the image's ``source`` as training takes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + samples * len(policies)
    fig, axes = plt.subplots(
        len(images), cols, figsize=(cols * 1.1, len(images) * 1.1 + 0.4), squeeze=False
    )
    for r, (image, source) in enumerate(zip(images, sources, strict=True)):
        row = [("original", image)]
        for name, policy in policies.items():
            row += [(name, policy(source)) for _ in range(samples)]
        for c, (title, shown) in enumerate(row):
            ax = axes[r, c]
            ax.imshow(shown)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    title = "augmentation preview: original | teacher policy | student policy (noise)"
    # wrapped to the figure's width (about 9 characters an inch), or a narrow grid clips it
    fig.suptitle(textwrap.fill(title, width=max(20, int(cols * 1.1 * 9))))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def augment(settings: Settings, layout: Layout) -> Path:
    aug = settings.augment
    size = settings.data.image_size
    policies = {name: build_policy(getattr(aug, name), size, settings.seed) for name in POLICIES}
    out = layout.augment
    labeled = load_split("labeled", layout.prepared)
    rng = np.random.default_rng(settings.seed)
    pick = rng.choice(len(labeled), size=min(aug.preview_images, len(labeled)), replace=False)
    # one file at a time (each a DVC output of its own; DVC keeps a .gitignore beside them)
    for name, policy in policies.items():
        with atomic_path(out / f"{name}.json") as tmp:
            A.save(policy, tmp)
    picked = [int(i) for i in np.sort(pick)]
    # the encoded storage keeps each photo at its stored size: training crops from that
    source = getattr(labeled.images, "source", None)
    views = [np.asarray(labeled.images[i]) for i in picked]
    sources = [source(i) for i in picked] if source is not None else views
    draws = {name: preview_draw(settings, policy) for name, policy in policies.items()}
    with atomic_path(out / "preview.png") as tmp:
        preview_grid(views, sources, draws, aug.preview_samples, tmp)
    log.info("augmentation policies and preview written to %s", out)
    return out


def preview_draw(settings: Settings, policy: A.Compose) -> Callable[[np.ndarray], np.ndarray]:
    """One training draw of ``policy`` from a source image, as ``augment.backend`` runs it."""
    data = settings.data
    if settings.augment.backend == "per_image":
        return TrainTransform(
            policy, size=data.image_size, crop_pct=data.eval_crop_pct, seed=settings.seed
        )
    import torch

    crop, batch = batched_augmentation(policy, data, 0, 0, settings.seed)

    def draw(source: np.ndarray) -> np.ndarray:
        square = crop(source) if crop is not None else source
        x = torch.from_numpy(np.ascontiguousarray(square.transpose(2, 0, 1))).float()[None]
        return batch(x)[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    return draw

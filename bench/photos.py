"""Photo-like JPEGs for the storage benchmark and the tests: crops of the two photos
scikit-learn ships (427 x 640), of random sizes, positions and JPEG qualities, so no two are
alike and their sizes on disk are a camera's, not a synthetic pattern's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def save_photo(
    photos: list[np.ndarray],
    path: Path,
    rng: np.random.Generator,
    sides: tuple[int, int] = (200, 400),
    part: int = 0,
) -> None:
    """One crop of ``photos[part % 2]`` with sides in ``sides`` (scaled up past the photo's own
    427 x 640 where asked), shifted by ``part`` so each part (a class) has its own region."""
    photo = photos[part % 2]
    h, w = (int(v) for v in rng.integers(sides[0], sides[1], size=2))
    scale = max(1.0, h / photo.shape[0], w / (photo.shape[1] - 40 * part))
    if scale > 1.0:
        photo = np.asarray(
            Image.fromarray(photo).resize(
                (int(photo.shape[1] * scale) + 1, int(photo.shape[0] * scale) + 1),
                Image.Resampling.BICUBIC,
            )
        )
    top = int(rng.integers(0, photo.shape[0] - h + 1))
    left = int(rng.integers(0, photo.shape[1] - w - 40 * part + 1)) + 40 * part
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo[top : top + h, left : left + w]).save(
        path, quality=int(rng.integers(80, 95))
    )


def write_photo_folders(
    root: Path,
    per_class: int,
    pool: int,
    seed: int = 0,
    sides: tuple[int, int] = (200, 400),
    classes: int = 3,
) -> Path:
    """``labeled/``, ``test/`` (``per_class`` photos of each class) and ``pool/``, the folder
    layout users bring (data.source: folders)."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    for split in ("labeled", "test"):
        for cls in range(classes):
            for k in range(per_class):
                save_photo(photos, root / split / f"class_{cls}" / f"{split}_{cls}_{k}.jpg",
                           rng, sides, cls)  # fmt: skip
    for k in range(pool):
        save_photo(photos, root / "pool" / f"pool_{k}.jpg", rng, sides, k % classes)
    return root

"""Stage `augment`: albumentations policies from params, saved as artifacts, plus a preview grid.

Two policies: ``teacher`` (light) and ``student`` (the noise that makes Noisy Student work).
Training loads them back with ``load_policy``, so what ran is exactly what was versioned.
"""

from __future__ import annotations

import logging
import random
import textwrap
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from tasks import cli
from tasks.atomic import atomic_path
from tasks.data import PREPARED_DIR, load_split
from tasks.settings import PolicySettings, Settings

log = logging.getLogger(__name__)
AUGMENT_DIR = Path("artifacts/augment")
POLICIES = ("teacher", "student")


def seed_policy(policy: A.Compose, seed: int) -> A.Compose:
    """Give the whole policy one random stream.

    ``Compose(seed=...)`` and ``set_random_seed`` start every op's generator from the same seed, so
    all ops would draw the same numbers and fire together; one shared generator keeps them apart.
    """
    policy.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return policy


def build_policy(policy: PolicySettings, image_size: int, seed: int) -> A.Compose:
    """The notes' per-image ops: crop, flip, rotate, brightness/contrast, affine, erasing."""
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    compose = A.Compose(
        [
            A.RandomResizedCrop(
                size=(image_size, image_size),
                scale=(policy.crop_scale_min, 1.0),
                ratio=(0.8, 1.25),
                p=policy.crop_p,
            ),
            A.HorizontalFlip(p=policy.hflip_p),
            A.Rotate(limit=policy.rotate_limit, p=policy.rotate_p, **border),
            A.Affine(
                shear=(-policy.affine_shear, policy.affine_shear),
                translate_percent=(-policy.affine_translate, policy.affine_translate),
                p=policy.affine_p,
                **border,
            ),
            A.RandomBrightnessContrast(
                brightness_limit=policy.brightness,
                contrast_limit=policy.contrast,
                p=policy.brightness_contrast_p,
            ),
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(0.2, 0.4),
                hole_width_range=(0.2, 0.4),
                fill=0,
                p=policy.erase_p,
            ),
        ]
    )
    return seed_policy(compose, seed)


def load_policy(name: str, seed: int, folder: Path = AUGMENT_DIR) -> A.Compose:
    return seed_policy(A.load(folder / f"{name}.json"), seed)


def randaugment(num_ops: int, magnitude: int, image_size: int):
    """timm's RandAugment: ``num_ops`` ops drawn at random per image, each at ``magnitude`` (0-10).

    Every drawn op is applied (``p1.0``) at exactly that magnitude (``mstd0``): the notes' two
    knobs, nothing searched. Albumentations 2 has no RandAugment, so this one is timm's."""
    from timm.data import rand_augment_transform

    hparams = {"translate_const": int(image_size * 0.45), "img_mean": (0, 0, 0)}
    return rand_augment_transform(f"rand-m{magnitude}-n{num_ops}-mstd0-p1.0", hparams)


class TrainTransform:
    """RandAugment (timm, on PIL images) then the albumentations policy, numpy in and out.

    RandAugment comes first so that the policy's erasing stays the last op (as in timm's
    training transforms). RandAugment draws from Python's and NumPy's global generators, which
    PyTorch seeds per DataLoader worker; the policy keeps its own (``seed_policy``)."""

    def __init__(self, policy: A.Compose, randaugment=None) -> None:
        self.policy = policy
        self.randaugment = randaugment

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.randaugment is not None:
            from PIL import Image

            image = np.asarray(self.randaugment(Image.fromarray(image)))
        return self.policy(image=image)["image"]


def preview_grid(images: np.ndarray, policies: dict[str, A.Compose], samples: int, path: Path):
    """Rows: images. Columns: the original, then ``samples`` draws of each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + samples * len(policies)
    fig, axes = plt.subplots(
        len(images), cols, figsize=(cols * 1.1, len(images) * 1.1 + 0.4), squeeze=False
    )
    for r, image in enumerate(images):
        row = [("original", image)]
        for name, policy in policies.items():
            row += [(name, policy(image=image)["image"]) for _ in range(samples)]
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


def augment(settings: Settings, out: Path = AUGMENT_DIR, data_dir: Path = PREPARED_DIR) -> Path:
    aug = settings.augment
    size = settings.data.image_size
    policies = {name: build_policy(getattr(aug, name), size, settings.seed) for name in POLICIES}
    labeled = load_split("labeled", data_dir)
    rng = np.random.default_rng(settings.seed)
    pick = rng.choice(len(labeled), size=min(aug.preview_images, len(labeled)), replace=False)
    # one file at a time (each a DVC output of its own; DVC keeps a .gitignore beside them)
    for name, policy in policies.items():
        with atomic_path(out / f"{name}.json") as tmp:
            A.save(policy, tmp)
    with atomic_path(out / "preview.png") as tmp:
        preview_grid(np.asarray(labeled.images[np.sort(pick)]), policies, aug.preview_samples, tmp)
    log.info("augmentation policies and preview written to %s", out)
    return out


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default=str(AUGMENT_DIR))
    cli.run(lambda args, settings: augment(settings, Path(args.out)), p.parse_args())


if __name__ == "__main__":
    main()

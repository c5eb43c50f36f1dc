"""Augmentation policies: albumentations per image, timm's RandAugment, and their seeding.

Two policies: ``teacher`` (light) and ``student`` (the noise that makes Noisy Student work).
"""

from __future__ import annotations

import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from noisy_student.augment.streams import OwnedRandom
from noisy_student.core.settings import PolicySettings

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


def load_policy(name: str, seed: int, folder: Path) -> A.Compose:
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
    training transforms). RandAugment draws from ``owned`` (the training's, augment/streams.py),
    the policy from its own generators (``seed_policy``); each DataLoader worker reseeds both."""

    def __init__(
        self, policy: A.Compose, randaugment=None, owned: OwnedRandom | None = None
    ) -> None:
        self.policy = policy
        self.randaugment = randaugment
        self.owned = owned if owned is not None else OwnedRandom(0)

    def reseed(self, seed: int) -> None:
        seed_policy(self.policy, seed)
        self.owned.seed(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.randaugment is not None:
            from PIL import Image

            with self.owned.active():
                image = np.asarray(self.randaugment(Image.fromarray(image)))
        return self.policy(image=image)["image"]

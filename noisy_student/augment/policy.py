"""Augmentation policies: albumentations per image, timm's RandAugment, and their seeding.

Two policies: ``teacher`` (light) and ``student`` (the noise that makes Noisy Student work).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from noisy_student.augment.batched import BatchAugment, BatchPolicy
from noisy_student.augment.streams import OwnedRandom
from noisy_student.core.settings import DataSettings, ModelTraining, PolicySettings, Settings
from noisy_student.data.images import center_view

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
    the policy from its own generators (``seed_policy``); each DataLoader worker reseeds both.

    An image that is not ``size`` x ``size`` is a source image (the encoded storage hands them
    over at their stored size): the policy's RandomResizedCrop is taken from it first, as timm's
    and torchvision's training transforms crop from the source resolution; where the crop does
    not fire, the evaluation view (``center_view`` at ``crop_pct``) stands in. RandAugment and
    the rest of the policy then run on the square, at the cost of a square."""

    def __init__(
        self,
        policy: A.Compose,
        randaugment=None,
        owned: OwnedRandom | None = None,
        *,
        size: int | None = None,
        crop_pct: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.randaugment = randaugment
        self.owned = owned if owned is not None else OwnedRandom(0)
        self.size, self.crop_pct = size, crop_pct
        crop, *rest = policy.transforms
        if not isinstance(crop, A.RandomResizedCrop):
            raise ValueError(f"the policy's first op must be RandomResizedCrop, not {crop}")
        self.crop = crop
        # the ops after the crop, for source images: copies with a stream of their own, so that
        # the arrays' storage (self.policy alone) draws exactly what it drew before
        self.rest = seed_policy(A.Compose([copy.deepcopy(op) for op in rest]), seed + 1)

    def reseed(self, seed: int) -> None:
        seed_policy(self.policy, seed)
        seed_policy(self.rest, seed + 1)
        self.owned.seed(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        policy = self.policy
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            image, policy = self.crop_source(image), self.rest
        if self.randaugment is not None:
            from PIL import Image

            with self.owned.active():
                image = np.asarray(self.randaugment(Image.fromarray(image)))
        return policy(image=image)["image"]

    def crop_source(self, image: np.ndarray) -> np.ndarray:
        square = self.crop(image=image)["image"]
        if square.shape[:2] != (self.size, self.size):
            square = center_view(square, self.size, self.crop_pct)
        return square


def batched_augmentation(
    policy: A.Compose,
    data: DataSettings,
    num_ops: int,
    magnitude: int,
    seed: int,
    owned: OwnedRandom | None = None,
) -> tuple[TrainTransform | None, BatchAugment]:
    """``augment.backend: batched``: what the loader applies per image, and the batch's
    augmentation. The encoded storage keeps source images: the loader takes the policy's
    RandomResizedCrop from them (nothing else), the rest runs on the batch; with arrays the
    loader applies nothing. ``owned``: the training's generators (Mixup draws from them)."""
    encoded = data.storage == "encoded"
    batch_policy = BatchPolicy.from_compose(policy, crop=not encoded)
    batched = BatchAugment(batch_policy, num_ops, magnitude, seed)
    if not encoded:
        return None, batched
    crop = seed_policy(A.Compose([copy.deepcopy(policy.transforms[0])]), seed)
    size, crop_pct = data.image_size, data.eval_crop_pct
    return TrainTransform(crop, owned=owned, size=size, crop_pct=crop_pct, seed=seed), batched


def member_augmentation(
    settings: Settings, spec: ModelTraining, policy: A.Compose, owned: OwnedRandom, seed: int
) -> tuple[TrainTransform | None, BatchAugment | None]:
    """The per-image transform the loader applies and the batched one the loop applies
    (``augment.backend``). Batched, the loader only crops where the storage keeps source images
    (encoded: the crop is taken from the source resolution), and the rest runs on the batch."""
    data = settings.data
    if settings.augment.backend == "per_image":
        noise = randaugment(spec.randaugment_n, spec.randaugment_m, data.image_size)
        transform = TrainTransform(
            policy,
            noise if spec.randaugment_n > 0 else None,
            owned,
            size=data.image_size,
            crop_pct=data.eval_crop_pct,
            seed=seed,
        )
        return transform, None
    return batched_augmentation(policy, data, spec.randaugment_n, spec.randaugment_m, seed, owned)

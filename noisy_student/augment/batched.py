"""A whole batch augmented at once on the training device (``augment.backend: batched``): the
albumentations policy and timm's RandAugment as tensor ops, each image with its own draws.

Why by hand: per image, on the CPU, the policy and RandAugment cost about 0.6 ms an image at
32 px (parameter sampling and PIL/OpenCV calls in Python), a third of a ResNet-18 step there
(bench/README.md "Speed"); kornia's batched versions measured 0.21 ms an image on this CPU. Here
the draws are a few vectors per batch and the pixels move once per warp (``grid_sample``), so the
cost is that of a few tensor ops over the batch, on the GPU when there is one.

The distributions are those of the per-image path: every op's range and probability is read off
the versioned albumentations policy (``from_compose``; what DVC versions is what runs), and the
RandAugment ops, their magnitudes and signs follow timm's ``rand-m{M}-n{N}-mstd0-p1.0`` (the
fifteen ``_RAND_TRANSFORMS``, drawn with replacement). The pixels are not the per-image path's:
warps sample bilinearly from float images, with no rounding to uint8 between ops, and
RandomResizedCrop draws once per image (a crop wider than the image is clamped to it) instead of
retrying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from noisy_student.core.errors import PipelineError

RA_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
POLICY_OPS = (
    "RandomResizedCrop", "HorizontalFlip", "Rotate", "Affine", "RandomBrightnessContrast",
    "CoarseDropout",
)  # fmt: skip  # policy.build_policy's, in its order
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
LEVEL_DENOM = 10.0  # timm's magnitude scale
GRAY = (0.299, 0.587, 0.114)  # PIL's RGB -> L


@dataclass(frozen=True)
class BatchPolicy:
    """One policy's ranges and probabilities, as the albumentations Compose holds them."""

    crop_p: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_p: float
    rotate_p: float
    rotate_limit: tuple[float, float]  # degrees
    affine_p: float
    shear: tuple[float, float, float, float]  # degrees: x low, x high, y low, y high
    translate: tuple[float, float, float, float]  # fractions of the side: x low, high, y ...
    brightness_contrast_p: float
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    erase_p: float
    hole_height: tuple[float, float]  # fractions of the side
    hole_width: tuple[float, float]

    @classmethod
    def from_compose(cls, compose: Any, *, crop: bool = True) -> BatchPolicy:
        """``compose``: policy.build_policy's op list (crop, flip, rotate, affine, brightness
        and contrast, erasing). ``crop=False``: the crop was taken per image already (the
        encoded storage crops from the source image)."""
        names = [type(op).__name__ for op in compose.transforms]
        if names != list(POLICY_OPS):
            raise PipelineError(
                f"augment.backend batched: expected the policy's ops {list(POLICY_OPS)}, got "
                f"{names} (run the augment stage again: dvc repro augment)"
            )
        rrc, flip, rotate, affine, bc, erase = compose.transforms
        return cls(
            crop_p=rrc.p if crop else 0.0,
            crop_scale=tuple(rrc.scale),
            crop_ratio=tuple(rrc.ratio),
            hflip_p=flip.p,
            rotate_p=rotate.p,
            rotate_limit=tuple(rotate.limit),
            affine_p=affine.p,
            shear=(*affine.shear["x"], *affine.shear["y"]),
            translate=(*affine.translate_percent["x"], *affine.translate_percent["y"]),
            brightness_contrast_p=bc.p,
            brightness=tuple(bc.brightness_limit),
            contrast=tuple(bc.contrast_limit),
            erase_p=erase.p,
            hole_height=tuple(erase.hole_height_range),
            hole_width=tuple(erase.hole_width_range),
        )


class BatchAugment:
    """``augment(x)``: x float B x 3 x H x W, pixels 0..255, on any device; RandAugment's
    ``num_ops`` ops first, then the policy, as the per-image path orders them. Every draw comes
    from one NumPy generator on the host (a few vectors per batch; NumPy's small-array ops cost
    a fraction of torch's), which the training checkpoints."""

    def __init__(self, policy: BatchPolicy, num_ops: int, magnitude: int, seed: int) -> None:
        self.policy = policy
        self.num_ops, self.magnitude = num_ops, magnitude
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_ops):
            x = self.randaugment_op(x)
        return self.apply_policy(x)

    def fires(self, n: int, p: float) -> np.ndarray:
        return self.rng.random(n) < p

    def uniform(self, n: int, bounds: tuple[float, float]) -> np.ndarray:
        return self.rng.uniform(bounds[0], bounds[1], n)

    # --- the policy --------------------------------------------------------------------------

    def apply_policy(self, x: torch.Tensor) -> torch.Tensor:
        p, (n, _, h, w) = self.policy, x.shape
        matrices = self.policy_matrices(n, h, w)
        moved = np.flatnonzero(np.abs(matrices - np.eye(3)).max(axis=(1, 2)) > 0)
        if len(moved):  # only the images a geometric op moved: the others stay exact
            x = x.clone()
            idx = torch.from_numpy(moved).to(x.device)
            x[idx] = warp(x[idx], matrices[moved])
        on = self.fires(n, p.brightness_contrast_p)
        alpha = np.where(on, 1.0 + self.uniform(n, p.contrast), 1.0)
        beta = np.where(on, self.uniform(n, p.brightness), 0.0) * 255.0
        x = x * per_image(alpha, x) + per_image(beta, x)
        return self.erase(x.clamp(0.0, 255.0))

    def policy_matrices(self, n: int, h: int, w: int) -> np.ndarray:
        """Per image, the 3 x 3 map from output to input coordinates (normalized, -1..1):
        crop, then flip, rotation and the affine op, each where it fires."""
        p = self.policy
        # RandomResizedCrop: area fraction and log-uniform aspect ratio, then a position
        crop = self.fires(n, p.crop_p)
        area = self.uniform(n, p.crop_scale)
        ratio = np.exp(self.uniform(n, (math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1]))))
        cw = np.minimum(np.sqrt(area * ratio), 1.0)  # fractions of the width and height
        ch = np.minimum(np.sqrt(area / ratio), 1.0)
        cx = (self.rng.random(n) * (1 - cw) + cw / 2) * 2 - 1
        cy = (self.rng.random(n) * (1 - ch) + ch / 2) * 2 - 1
        c = identities(n)
        c[:, 0, 0], c[:, 1, 1] = np.where(crop, cw, 1.0), np.where(crop, ch, 1.0)
        c[:, 0, 2], c[:, 1, 2] = np.where(crop, cx, 0.0), np.where(crop, cy, 0.0)
        flip = identities(n)
        flip[:, 0, 0] = np.where(self.fires(n, p.hflip_p), -1.0, 1.0)
        angle = np.where(self.fires(n, p.rotate_p), self.uniform(n, p.rotate_limit), 0.0)
        on = self.fires(n, p.affine_p)
        shear_x = np.where(on, self.uniform(n, p.shear[:2]), 0.0)
        shear_y = np.where(on, self.uniform(n, p.shear[2:]), 0.0)
        tx = np.where(on, self.uniform(n, p.translate[:2]), 0.0)
        ty = np.where(on, self.uniform(n, p.translate[2:]), 0.0)
        shear = identities(n)  # about the centre, then the translation: inverted below
        shear[:, 0, 1] = np.tan(np.deg2rad(shear_x)) * h / w
        shear[:, 1, 0] = np.tan(np.deg2rad(shear_y)) * w / h
        shift = identities(n)
        shift[:, 0, 2], shift[:, 1, 2] = -2 * tx, -2 * ty
        affine = np.linalg.inv(shear) @ shift
        return c @ flip @ rotation_matrices(angle, h, w) @ affine

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """CoarseDropout: one hole per image where it fires, filled with 0."""
        p, (n, _, h, w) = self.policy, x.shape
        on = self.fires(n, p.erase_p)
        hh = np.clip((self.uniform(n, p.hole_height) * h).astype(int), 1, h)
        hw = np.clip((self.uniform(n, p.hole_width) * w).astype(int), 1, w)
        y0 = (self.rng.random(n) * (h - hh + 1)).astype(int)
        x0 = (self.rng.random(n) * (w - hw + 1)).astype(int)
        rows, cols = np.arange(h), np.arange(w)
        inside_y = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + hh)[:, None])
        inside_x = (cols[None] >= x0[:, None]) & (cols[None] < (x0 + hw)[:, None])
        hole = inside_y[:, :, None] & inside_x[:, None, :] & on[:, None, None]
        return x.masked_fill(torch.from_numpy(hole[:, None]).to(x.device), 0.0)

    # --- RandAugment ----------------------------------------------------------------------------

    def randaugment_op(self, x: torch.Tensor) -> torch.Tensor:
        """One of the fifteen ops per image, at the magnitude (timm's level_to_arg)."""
        n, _, h, w = x.shape
        ops = self.rng.integers(len(RA_OPS), size=n)
        sign = np.where(self.fires(n, 0.5), -1.0, 1.0)
        level = self.magnitude / LEVEL_DENOM
        out = x.clone()
        matrix = identities(n)
        geometric = np.zeros(n, dtype=bool)
        for k in np.unique(ops):
            chosen = ops == k
            name = RA_OPS[k]
            if name in GEOMETRIC:
                geometric |= chosen
                matrix[chosen] = ra_matrices(name, level * sign[chosen], h, w)
                continue
            idx = torch.from_numpy(np.flatnonzero(chosen)).to(x.device)
            out[idx] = color_op(name, x[idx], level).clamp(0.0, 255.0)
        if geometric.any():
            idx = torch.from_numpy(np.flatnonzero(geometric)).to(x.device)
            out[idx] = warp(x[idx], matrix[geometric])
        return out

    # --- checkpoints ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-able."""
        return self.rng.bit_generator.state

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def identities(n: int) -> np.ndarray:
    return np.tile(np.eye(3), (n, 1, 1))


def per_image(values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(values).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def warp(x: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
    """Sample ``x`` where ``matrices`` (N x 3 x 3, output -> input, normalized coordinates) send
    each output pixel; outside the image is 0 (the policies' and RandAugment's fill)."""
    theta = torch.from_numpy(matrices[:, :2]).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation_matrices(degrees: np.ndarray, h: int, w: int) -> np.ndarray:
    """Rotations about the centre in pixel space, written in normalized coordinates."""
    rad = np.deg2rad(degrees)
    cos, sin = np.cos(rad), np.sin(rad)
    m = identities(len(degrees))
    m[:, 0, 0], m[:, 0, 1] = cos, -sin * h / w
    m[:, 1, 0], m[:, 1, 1] = sin * w / h, cos
    return m


def ra_matrices(name: str, level: np.ndarray, h: int, w: int) -> np.ndarray:
    """timm's geometric ops, signed levels in: Rotate (30 degrees at level 1, about the centre),
    ShearX/Y (0.3, PIL's affine from the top-left corner), TranslateX/YRel (0.45 of the side)."""
    if name == "Rotate":
        return rotation_matrices(level * 30.0, h, w)
    m = identities(len(level))
    if name == "ShearX":  # input x = x + s y in pixels, y from the top edge
        m[:, 0, 1] = m[:, 0, 2] = level * 0.3 * h / w
    elif name == "ShearY":
        m[:, 1, 0] = m[:, 1, 2] = level * 0.3 * w / h
    elif name == "TranslateXRel":
        m[:, 0, 2] = 2 * level * 0.45
    else:  # TranslateYRel
        m[:, 1, 2] = 2 * level * 0.45
    return m


def gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def color_op(name: str, x: torch.Tensor, level: float) -> torch.Tensor:
    """timm's pixel ops on float images (PIL's definitions), at ``level`` = magnitude / 10."""
    factor = level * 1.8 + 0.1  # Color, Contrast, Brightness, Sharpness (not "increasing")
    if name == "AutoContrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (x - lo) * 255.0 / span.clamp(min=1e-6), x)
    if name == "Equalize":
        return equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name == "Posterize":
        bits = int(level * 4)
        if bits >= 8:
            return x
        mask = 256 - 2 ** (8 - bits)
        return (x.round().clamp(0, 255).to(torch.int32) & mask).to(x.dtype)
    if name == "Solarize":
        threshold = min(256, int(level * 256))
        return torch.where(x >= threshold, 255.0 - x, x)
    if name == "SolarizeAdd":
        add = min(128, int(level * 110))
        return torch.where(x < 128, (x + add).clamp(max=255.0), x)
    if name == "Color":
        g = gray(x)
        return g + factor * (x - g)
    if name == "Contrast":
        mean = gray(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
        return mean + factor * (x - mean)
    if name == "Brightness":
        return x * factor
    if name == "Sharpness":
        kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
        kernel = kernel.to(device=x.device, dtype=x.dtype).expand(3, 1, 3, 3)
        smooth = x.clone()  # PIL keeps the border pixels as they are
        smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=3)
        return smooth + factor * (x - smooth)
    raise ValueError(f"not a RandAugment op: {name}")


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel: the histogram's cumulative counts as a
    lookup table; a channel of one value stays as it is."""
    n, c, h, w = x.shape
    values = x.round().clamp(0, 255).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long)
    hist.scatter_add_(1, values, torch.ones_like(values))
    last = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)  # the highest value present
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    before = hist.cumsum(1) - hist
    lut = ((step[:, None] // 2 + before) // step.clamp(min=1)[:, None]).clamp(max=255)
    lut = torch.where(step[:, None] > 0, lut, torch.arange(256, device=x.device)[None])
    return lut.gather(1, values).view(n, c, h, w).to(x.dtype)

"""Reading the user's image files: any format Pillow opens, as 8-bit RGB, and the square views
the models take of them."""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from noisy_student.core.errors import PipelineError

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def resize_rgb(image: np.ndarray, size: int, height: int | None = None) -> np.ndarray:
    """uint8 H x W (x C) -> uint8 height x size x 3 (height defaults to size: a square, aspect
    ratio not kept)."""
    height = size if height is None else height
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[:2] != (height, size):
        shrinking = image.shape[0] > height or image.shape[1] > size
        image = cv2.resize(
            image, (size, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        )
    return np.ascontiguousarray(image, dtype=np.uint8)


def center_view(
    image: np.ndarray, size: int, crop_pct: float, full_size: tuple[int, int] | None = None
) -> np.ndarray:
    """timm's evaluation view (``transforms_imagenet_eval``), aspect ratio kept: the short side
    resized to ``floor(size / crop_pct)``, then the central ``size`` x ``size``. Written here with
    cv2 on uint8 arrays, as resize_rgb resizes, so that at crop_pct 1.0 a square image gives
    resize_rgb's pixels exactly. ``full_size`` (width, height): the image's size before a scaled
    decode (``decode_scaled``), whose rounding would otherwise shift the crop."""
    h, w = image.shape[:2] if full_size is None else full_size[::-1]
    short = math.floor(size / crop_pct)
    # torchvision's Resize(short): the long side int(short * long / short_side)
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    resized = resize_rgb(image, new_w, new_h)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # torchvision CenterCrop
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def view_side(size: int, crop_pct: float | None) -> int:
    """The short side ``square_view`` resizes an image to (or past): what decoding must keep."""
    return size if crop_pct is None else math.floor(size / crop_pct)


def square_view(
    image: np.ndarray,
    size: int,
    crop_pct: float | None,
    full_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """What a model sees of an image: ``center_view`` at ``crop_pct``, or the whole image squeezed
    into the square when crop_pct is None (the arrays' storage)."""
    if crop_pct is None:
        return resize_rgb(image, size)
    return center_view(image, size, crop_pct, full_size)


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 H x W x 3. 16-bit and 32-bit gray are scaled down by their
    range (Pillow's own conversion would clip every value above 255 to white)."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img).astype(np.float64)
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # floats in 0..1
        elif img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        return np.clip(values, 0, 255).round().astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def read_rgb(source: Path | bytes, name: str | None = None) -> np.ndarray:
    """A file, or an encoded image's bytes, as uint8 H x W x 3 at its own size (``name`` says
    which image in errors)."""
    return decode_scaled(source, name, None)[0]


# a scaled JPEG decode keeps at least twice the side the view resizes to
DRAFT_MARGIN = 2


def read_image(
    source: Path | bytes, size: int, name: str | None = None, crop_pct: float | None = None
) -> np.ndarray:
    """The ``square_view`` of a file or an encoded image. A large JPEG is decoded at 1/2, 1/4
    or 1/8 of its size by libjpeg's DCT scaling (Pillow's ``draft``) while its short side stays
    at least twice what the view resizes it to: a camera's 4,000-px photo then decodes in a
    fraction of the time and memory, and the view's own resize still averages over 2 x 2 or more
    decoded pixels (measured: bench/README.md "Decoding large JPEGs scaled")."""
    rgb, full_size = decode_scaled(source, name, DRAFT_MARGIN * view_side(size, crop_pct))
    return square_view(rgb, size, crop_pct, full_size)


def decode_scaled(
    source: Path | bytes, name: str | None, min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels, no smaller than ``min_side`` on the short side where a JPEG can be decoded
    smaller, and the image's full (width, height)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                full_size = img.size
                # only where libjpeg can halve it at least: otherwise the whole decode as is
                if min_side is not None and img.format == "JPEG" and min(img.size) >= 2 * min_side:
                    w, h = img.size
                    scale = min_side / min(w, h)
                    # draft keeps both sides at least those asked: the short side >= min_side
                    img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
                img.load()
                rgb = to_rgb8(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{name or source}: cannot read as an image ({exc})") from None
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return rgb, full_size


def list_images(folder: Path) -> list[Path]:
    """Image files at any depth under ``folder``, sorted; other files are skipped with a warning."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        log.warning("%s: skipped %d non-image file(s), e.g. %s", folder, len(others), others[0])
    return images

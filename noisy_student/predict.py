"""Classify a folder of images with a trained model; one CSV row per image.

    python -m noisy_student.predict my_photos/                   # the champion (best on validation)
    python -m noisy_student.predict my_photos/ --model student_1 --out student_1.csv

Images are found at any depth and read exactly as the prepare stage reads the user's folders
(data.images.list_images / read_image: any format Pillow opens, gray/RGBA/16-bit to 8-bit
RGB, viewed as the model was evaluated: squeezed to its image_size, or with the encoded storage
the centre crop at its eval_crop_pct, aspect kept). The CSV (default ``predictions.csv``) has
``id`` (the path under the folder), ``class``, ``confidence`` (the top probability) and
``p_<class>`` for every class; it is written under a temporary name and renamed, so it is whole
or absent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from noisy_student.core import cli
from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.progress import Progress
from noisy_student.core.settings import Settings
from noisy_student.data.images import list_images, read_image
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint, resolve_device
from noisy_student.models.inference import (
    EVAL_BATCH_SIZE,
    autocast,
    device_memory_format,
    probability_table,
)

log = logging.getLogger(__name__)
PREDICTIONS_FILE = Path("predictions.csv")


def model_folder(model: str | None, settings: Settings, layout: Layout) -> Path:
    """``model``: a name from params.yaml (``student_1``), a model folder, or None for the
    champion (the loop's best on validation)."""
    if model is None:
        model = promotion.champion(settings, layout)
    folder = Path(model)
    if not (folder / "card.json").exists():
        folder = layout.model(model)
    if not (folder / "card.json").exists():
        known = ", ".join(settings.model_names())
        raise PipelineError(
            f"{folder}: no trained model there (names in params.yaml: {known}; "
            "or a folder holding card.json); run `dvc repro` first"
        )
    return folder


def batches(
    paths: list[Path], size: int, batch_size: int, crop_pct: float | None = None
) -> Iterator[np.ndarray]:
    """The images of ``paths`` as a model sees them (``square_view`` at ``crop_pct``),
    ``batch_size`` at a time (uint8 N x H x W x 3): a folder of any size streams."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield np.stack([read_image(p, size, crop_pct=crop_pct) for p in chunk])


def predict(
    settings: Settings,
    folder: Path,
    *,
    model: str | None = None,
    out: Path = PREDICTIONS_FILE,
    layout: Layout | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, int]:
    """Classify every image under ``folder`` with ``model`` into the CSV ``out``, batch by batch.
    Returns the number of images per predicted class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: not a folder of images")
    paths = list_images(folder)
    if not paths:
        raise PipelineError(f"{folder}: holds no images (looked at any depth)")
    device = resolve_device(settings.runtime)
    classifier, card = load_checkpoint(model_folder(model, settings, layout or Layout.at()), device)
    memory_format = device_memory_format(device, settings.runtime, card.image_size)
    classifier.to(memory_format=memory_format)
    ids = [p.relative_to(folder).as_posix() for p in paths]
    counts = dict.fromkeys(card.classes, 0)
    with (
        atomic_path(out) as tmp,
        Progress(len(paths), f"predict ({card.name})", "images", min_interval=5) as bar,
        torch.inference_mode(),
    ):
        start = 0
        for images in batches(paths, card.image_size, batch_size, card.eval_crop_pct):
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
            with autocast(device, settings.runtime):
                probs = classifier.probs(x.contiguous(memory_format=memory_format)).float().cpu()
            table = probability_table(
                probs, ids[start : start + len(images)], card.classes, "class"
            )
            # streamed: only one batch's rows are ever in memory
            table.to_csv(tmp, mode="a", header=start == 0, index=False, float_format="%.6g")
            for name, n in table["class"].value_counts().items():
                counts[name] += int(n)
            start += len(images)
            bar.update(len(images))
    log.info(
        "%s classified %d images into %s: %s",
        card.name,
        len(paths),
        out,
        ", ".join(f"{c} {n}" for c, n in counts.items() if n),
    )
    return counts


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder of images (searched at any depth)")
    p.add_argument(
        "--model",
        default=None,
        help="teacher, student_1, ... or a model folder (default: the champion)",
    )
    p.add_argument("--out", default=str(PREDICTIONS_FILE), help="the CSV to write")

    def run(args, settings: Settings) -> None:
        predict(settings, Path(args.folder), model=args.model, out=Path(args.out))

    cli.run(run, p.parse_args())


if __name__ == "__main__":
    cli.main_process(main)

"""Prepared splits from the demo digits or the user's images (folders, a manifest, a Hugging Face
dataset) -> resized RGB splits on disk.

Splits: labeled (few labels), val (monitoring only), test, unlabeled (the pool to pseudo-label).
``data.storage``: ``arrays`` stores every image resized to ``data.image_size`` squared (aspect
ratio not kept) as uint8 pixels; ``encoded`` stores each image's own bytes in shards
(data/shards.py): training crops from them at their own size, evaluation takes timm's view
(short side resized, centre cropped at ``data.eval_crop_pct``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.progress import track
from noisy_student.core.settings import DataSettings, Settings
from noisy_student.data.hf import hf_items
from noisy_student.data.images import list_images, resize_rgb
from noisy_student.data.items import Item, decoded, encoded
from noisy_student.data.manifest import MANIFEST_SPLITS, read_manifest
from noisy_student.data.shards import encode_png, write_shards
from noisy_student.data.splits import SPLITS, UNKNOWN

log = logging.getLogger(__name__)


def write_split(
    folder: Path,
    images: Iterable[np.ndarray],
    count: int,
    size: int,
    index: pd.DataFrame,
    desc: str,
) -> None:
    """Stream ``count`` images into a memory-mapped .npy so memory never holds the whole split."""
    folder.mkdir(parents=True)
    out = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
    )
    for i, image in enumerate(track(images, count, f"prepare {desc}", "images", min_interval=5)):
        out[i] = image
    out.flush()
    del out
    index.to_csv(folder / "index.csv", index=False)


def write_encoded_split(
    folder: Path, blobs: Iterable[bytes], index: pd.DataFrame, data: DataSettings, desc: str
) -> None:
    """Stream the images' encoded bytes into shards of ``data.shard_images``."""
    folder.mkdir(parents=True)
    progress = track(blobs, len(index), f"prepare {desc}", "images", min_interval=5)
    write_shards(folder, index["id"].tolist(), progress, data.shard_images)
    index.to_csv(folder / "index.csv", index=False)


def _index(ids: Sequence[str], labels: Sequence[int], true_labels: Sequence[int], sources):
    return pd.DataFrame(
        {"id": list(ids), "label": list(labels), "true_label": list(true_labels), "source": sources}
    )


def split_digits(labels: np.ndarray, data: DataSettings, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded split of indices into labeled / val / test / unlabeled."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(members) * data.test_fraction)
        n_val = round(len(members) * data.val_fraction)
        rest = members[n_test + n_val :]
        if len(rest) <= data.labels_per_class:
            raise PipelineError(
                f"data.labels_per_class={data.labels_per_class} leaves no unlabeled image "
                f"of class {cls} (only {len(rest)} remain after test and val)"
            )
        splits["test"] += members[:n_test].tolist()
        splits["val"] += members[n_test : n_test + n_val].tolist()
        splits["labeled"] += rest[: data.labels_per_class].tolist()
        splits["unlabeled"] += rest[data.labels_per_class :].tolist()
    return {name: np.sort(np.array(idx, dtype=np.int64)) for name, idx in splits.items()}


def digit_pixels(images: np.ndarray) -> np.ndarray:
    """scikit-learn's digits (0..16) as 8-bit grey pixels."""
    return np.clip(images * (255.0 / 16.0), 0, 255).astype(np.uint8)


def prepare_digits(data: DataSettings, seed: int, out: Path) -> list[str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities -> 0..255
    pixels = digit_pixels(digits.images)
    classes = [str(c) for c in digits.target_names]
    for name, idx in split_digits(digits.target, data, seed).items():
        truth = digits.target[idx]
        hidden = name == "unlabeled"
        index = _index(
            ids=[f"digit_{i:04d}" for i in idx],
            labels=[UNKNOWN] * len(idx) if hidden else truth.tolist(),
            true_labels=truth.tolist(),
            sources=[f"sklearn.datasets.load_digits[{i}]" for i in idx],
        )
        images = (resize_rgb(pixels[i], data.image_size) for i in idx)
        if data.storage == "encoded":
            blobs = (encode_png(image) for image in images)
            write_encoded_split(out / name, blobs, index, data, desc=name)
        else:
            write_split(out / name, images, len(idx), data.image_size, index, desc=name)
    return classes


def decode_workers(data: DataSettings) -> int:
    return data.decode_workers or os.cpu_count() or 1


def write_items(out: Path, name: str, items: Sequence[Item], data: DataSettings) -> None:
    labels = [i.label for i in items]
    truth = [i.label if i.truth is None else i.truth for i in items]
    origins = [i.origin or str(i.file) for i in items]
    index = _index([i.id for i in items], labels, truth, origins)
    if data.storage == "encoded":
        blobs = encoded(items, data.max_side, decode_workers(data))
        write_encoded_split(out / name, blobs, index, data, desc=name)
        return
    images = decoded(items, data.image_size, decode_workers(data))
    write_split(out / name, images, len(items), data.image_size, index, desc=name)


def hold_out_val(test: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """No val split given: a seeded share of the test images becomes validation."""
    order = np.random.default_rng(seed).permutation(len(test))
    held = set(order[: max(1, round(len(test) * fraction))].tolist())
    return [x for i, x in enumerate(test) if i not in held], [
        x for i, x in enumerate(test) if i in held
    ]


def write_user_splits(
    out: Path, data: DataSettings, seed: int, splits: dict[str, list[Item]]
) -> None:
    """The user's labeled, test, (val) and unlabeled items -> prepared splits."""
    test, val = splits["test"], splits.get("val")
    if not val:
        test, val = hold_out_val(test, data.val_fraction, seed)
    for name, items in (("labeled", splits["labeled"]), ("test", test), ("val", val),
                        ("unlabeled", splits["unlabeled"])):  # fmt: skip
        write_items(out, name, items, data)


def class_folders(root: Path, key: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise PipelineError(f"data.{key}: '{root}' is not a folder")
    per_class: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(sub)
        if not images:
            raise PipelineError(f"data.{key}: class folder '{sub}' holds no images")
        per_class[sub.name] = images
    if not per_class:
        raise PipelineError(
            f"data.{key}: '{root}' has no class subfolders (expected one per class)"
        )
    return per_class


def folder_items(root: Path, classes: list[str], key: str) -> list[Item]:
    """A class-folder split's images, class by class (ids: paths under ``root``)."""
    per_class = class_folders(root, key)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise PipelineError(
            f"data.{key}: class folder(s) {unknown} do not exist in data.labeled_dir"
        )
    return [
        Item(p.relative_to(root).as_posix(), p, k)
        for k, c in enumerate(classes)
        for p in per_class.get(c, [])
    ]


def prepare_folders(data: DataSettings, seed: int, out: Path) -> list[str]:
    labeled_root = Path(data.labeled_dir)  # type: ignore[arg-type]
    classes = sorted(class_folders(labeled_root, "labeled_dir"))
    if len(classes) < 2:
        raise PipelineError(f"data.labeled_dir: '{labeled_root}' needs at least 2 class folders")
    splits = {
        "labeled": folder_items(labeled_root, classes, "labeled_dir"),
        "test": folder_items(Path(data.test_dir), classes, "test_dir"),  # type: ignore[arg-type]
    }
    if data.val_dir:
        splits["val"] = folder_items(Path(data.val_dir), classes, "val_dir")
    pool_root = Path(data.unlabeled_dir)  # type: ignore[arg-type]
    if not pool_root.is_dir():
        raise PipelineError(f"data.unlabeled_dir: '{pool_root}' is not a folder")
    pool = list_images(pool_root)
    if not pool:
        raise PipelineError(f"data.unlabeled_dir: '{pool_root}' holds no images")
    splits["unlabeled"] = [Item(p.relative_to(pool_root).as_posix(), p, UNKNOWN) for p in pool]
    write_user_splits(out, data, seed, splits)
    return classes


def prepare_manifest(data: DataSettings, seed: int, out: Path) -> list[str]:
    manifest = read_manifest(Path(data.manifest))  # type: ignore[arg-type]
    classes = manifest.classes()
    index = {c: k for k, c in enumerate(classes)}
    splits = {
        name: [
            Item(row.path, row.file, index.get(row.label, UNKNOWN))
            for row in manifest.split(name).itertuples()
        ]
        for name in MANIFEST_SPLITS
    }
    write_user_splits(out, data, seed, splits)
    return classes


def prepare(settings: Settings, layout: Layout) -> dict[str, int]:
    """Write every split under ``layout.prepared`` (atomically); return the images per split."""
    data = settings.data
    with atomic_path(layout.prepared) as staged:
        staged.mkdir()
        if data.source == "digits":
            classes = prepare_digits(data, settings.seed, staged)
        elif data.source == "manifest":
            classes = prepare_manifest(data, settings.seed, staged)
        elif data.source == "hf_dataset":
            classes, splits = hf_items(data)
            write_user_splits(staged, data, settings.seed, splits)
        else:
            classes = prepare_folders(data, settings.seed, staged)
        counts = {name: len(pd.read_csv(staged / name / "index.csv")) for name in SPLITS}
        summary = {
            "classes": classes,
            "source": data.source,
            "image_size": data.image_size,
            "storage": data.storage,
            # how evaluation views an image (images.square_view): None squeezes the whole image
            # into the square, as the arrays' storage stored it
            "eval_crop_pct": data.eval_crop_pct if data.storage == "encoded" else None,
            "counts": counts,
        }
        (staged / "classes.json").write_text(json.dumps(summary, indent=2))
    log.info("prepared %s: %s, %d classes", data.source, counts, len(classes))
    return counts

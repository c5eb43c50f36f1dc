"""Prepared splits from the demo digits or the user's folders -> resized RGB splits on disk.

Splits: labeled (few labels), val (monitoring only), test, unlabeled (the pool to pseudo-label).
Every image is resized to ``data.image_size`` squared (aspect ratio not kept) and stored as uint8.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.progress import track
from noisy_student.core.settings import DataSettings, Settings
from noisy_student.data.images import list_images, read_image, resize_rgb
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


def prepare_digits(data: DataSettings, seed: int, out: Path) -> list[str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities -> 0..255
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
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
        write_split(out / name, images, len(idx), data.image_size, index, desc=name)
    return classes


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


def _labeled_split(
    per_class: dict[str, list[Path]], classes: list[str], key: str
) -> tuple[list[Path], list[int]]:
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise PipelineError(
            f"data.{key}: class folder(s) {unknown} do not exist in data.labeled_dir"
        )
    paths = [p for c in classes for p in per_class.get(c, [])]
    labels = [classes.index(c) for c in classes for _ in per_class.get(c, [])]
    return paths, labels


def _write_paths(out: Path, name: str, paths, labels, truth, root: Path, size: int) -> None:
    ids = [p.relative_to(root).as_posix() for p in paths]
    index = _index(ids, labels, truth, [str(p) for p in paths])
    write_split(out / name, (read_image(p, size) for p in paths), len(paths), size, index, name)


def prepare_folders(data: DataSettings, seed: int, out: Path) -> list[str]:
    labeled_root = Path(data.labeled_dir)  # type: ignore[arg-type]
    labeled = class_folders(labeled_root, "labeled_dir")
    classes = sorted(labeled)
    if len(classes) < 2:
        raise PipelineError(f"data.labeled_dir: '{labeled_root}' needs at least 2 class folders")
    size = data.image_size

    paths, labels = _labeled_split(labeled, classes, "labeled_dir")
    _write_paths(out, "labeled", paths, labels, labels, labeled_root, size)

    test_root = Path(data.test_dir)  # type: ignore[arg-type]
    test_paths, test_labels = _labeled_split(
        class_folders(test_root, "test_dir"), classes, "test_dir"
    )
    if data.val_dir:
        val_root = Path(data.val_dir)
        val_paths, val_labels = _labeled_split(
            class_folders(val_root, "val_dir"), classes, "val_dir"
        )
    else:
        # no val_dir: hold out a seeded share of the test folder for per-epoch monitoring
        order = np.random.default_rng(seed).permutation(len(test_paths))
        n_val = max(1, round(len(test_paths) * data.val_fraction))
        val_set = set(order[:n_val].tolist())
        val_paths = [p for i, p in enumerate(test_paths) if i in val_set]
        val_labels = [y for i, y in enumerate(test_labels) if i in val_set]
        test_paths = [p for i, p in enumerate(test_paths) if i not in val_set]
        test_labels = [y for i, y in enumerate(test_labels) if i not in val_set]
        val_root = test_root
    _write_paths(out, "test", test_paths, test_labels, test_labels, test_root, size)
    _write_paths(out, "val", val_paths, val_labels, val_labels, val_root, size)

    pool_root = Path(data.unlabeled_dir)  # type: ignore[arg-type]
    if not pool_root.is_dir():
        raise PipelineError(f"data.unlabeled_dir: '{pool_root}' is not a folder")
    pool = list_images(pool_root)
    if not pool:
        raise PipelineError(f"data.unlabeled_dir: '{pool_root}' holds no images")
    hidden = [UNKNOWN] * len(pool)
    _write_paths(out, "unlabeled", pool, hidden, hidden, pool_root, size)
    return classes


def prepare(settings: Settings, layout: Layout) -> dict[str, int]:
    """Write every split under ``layout.prepared`` (atomically); return the images per split."""
    data = settings.data
    with atomic_path(layout.prepared) as staged:
        staged.mkdir()
        if data.source == "digits":
            classes = prepare_digits(data, settings.seed, staged)
        else:
            classes = prepare_folders(data, settings.seed, staged)
        counts = {
            name: int(np.load(staged / name / "images.npy", mmap_mode="r").shape[0])
            for name in SPLITS
        }
        summary = {"classes": classes, "source": data.source, "counts": counts}
        (staged / "classes.json").write_text(json.dumps(summary, indent=2))
    log.info("prepared %s: %s, %d classes", data.source, counts, len(classes))
    return counts

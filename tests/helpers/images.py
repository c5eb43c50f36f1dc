"""Image folders laid out as users bring them (the `folders` data source), from real digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_image_folders(root: Path, images_per_class: int = 4, pool: int = 10) -> Path:
    """Real digits saved as PNG/JPEG files in the folder layout users bring."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    for split, count in (("labeled", images_per_class), ("test", images_per_class)):
        for cls in (0, 1, 2):
            folder = root / split / f"class_{cls}"
            folder.mkdir(parents=True)
            for k, i in enumerate(
                rng.choice(np.flatnonzero(digits.target == cls), count, replace=False)
            ):
                pixels = (digits.images[i] * 15).astype(np.uint8)
                suffix = ".png" if k % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{split}_{cls}_{k}{suffix}")
    nested = root / "pool" / "batch one" / "ünïcode"
    nested.mkdir(parents=True)
    for k, i in enumerate(rng.choice(len(digits.target), pool, replace=False)):
        rgba = np.dstack(
            [(digits.images[i] * 15).astype(np.uint8)] * 3 + [np.full((8, 8), 255, np.uint8)]
        )
        Image.fromarray(rgba).save(nested / f"pool_{k}.png")
    (nested / "notes.txt").write_text("not an image")
    return root


def folder_params(params: dict[str, Any], root: Path) -> dict[str, Any]:
    params["data"].update(
        source="folders",
        labeled_dir=str(root / "labeled"),
        unlabeled_dir=str(root / "pool"),
        test_dir=str(root / "test"),
        val_dir=None,
        val_fraction=0.25,
    )
    return params


def write_manifest(root: Path, path: Path) -> Path:
    """A manifest (CSV or Parquet, by ``path``'s suffix) of the images ``write_image_folders``
    wrote, paths relative to the manifest's folder, rows shuffled as an export would give them."""
    import pandas as pd

    rows = []
    for split, folder in (("labeled", "labeled"), ("test", "test"), ("unlabeled", "pool")):
        for file in sorted((root / folder).rglob("*")):
            if file.is_file() and file.suffix in (".png", ".jpg"):
                label = file.parent.name if split != "unlabeled" else ""
                rows.append({"path": file.relative_to(path.parent).as_posix(), "split": split,
                             "label": label})  # fmt: skip
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path, index=False)
    return path


def write_hf_dataset(root: Path, out: Path) -> Path:
    """The images ``write_image_folders`` wrote as a Hugging Face DatasetDict saved to disk (the
    image bytes embedded in Arrow files): splits train (labeled), test and unlabeled."""
    import datasets

    classes = sorted(p.name for p in (root / "labeled").iterdir())
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}
    )
    splits = {}
    for name, folder in (("train", "labeled"), ("test", "test")):
        files = [
            (f, k) for k, c in enumerate(classes) for f in sorted((root / folder / c).glob("*"))
        ]
        splits[name] = datasets.Dataset.from_dict(
            {"image": [str(f) for f, _ in files], "label": [k for _, k in files]}, features=features
        )
    pool = sorted(p for p in (root / "pool").rglob("*") if p.suffix in (".png", ".jpg"))
    splits["unlabeled"] = datasets.Dataset.from_dict(
        {"image": [str(p) for p in pool]}, features=datasets.Features({"image": datasets.Image()})
    )
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out

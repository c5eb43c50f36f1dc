"""A Hugging Face ``datasets`` dataset as the image source: a DatasetDict saved with
``save_to_disk`` (Arrow files), or an image folder ``datasets`` reads with its ``imagefolder``
builder. ``data.hf_splits`` names which of its splits is our labeled set, pool, test and
(optionally) validation.

The image column is the first ``Image`` feature, the label column the first ``ClassLabel``;
classes are the label names the labeled split uses. A pool split that has labels keeps them
as hidden truth (like the demo's), so pseudo-labels can be scored; training never sees them.
Rows are read in the dataset's order, one at a time while they are decoded, so memory holds no
split at once. Ids are ``<split>/<row>``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import DataSettings
from noisy_student.data.items import Item
from noisy_student.data.splits import UNKNOWN


def load_dataset_dict(path: Path):
    import datasets  # imported here: only this source needs it

    if not path.exists():
        raise PipelineError(f"data.hf_dataset: '{path}' does not exist")
    saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    try:
        if saved:
            found = datasets.load_from_disk(str(path))
        else:
            found = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as exc:  # datasets raises many kinds; the user needs the first line
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PipelineError(
            f"data.hf_dataset: '{path}' cannot be read by datasets ({detail})"
        ) from None
    if not isinstance(found, datasets.DatasetDict):
        raise PipelineError(
            f"data.hf_dataset: '{path}' holds one split; save a DatasetDict whose splits "
            "data.hf_splits names (labeled, unlabeled, test)"
        )
    return found


def columns(split, name: str, need_label: bool) -> tuple[str, str | None]:
    """The split's image column and label column (None where it has none and needs none)."""
    import datasets

    features = split.features
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not images:
        raise PipelineError(f"data.hf_dataset: split '{name}' has no Image column ({features})")
    if need_label and not labels:
        raise PipelineError(
            f"data.hf_dataset: split '{name}' has no ClassLabel column: its labels are needed "
            f"(columns: {list(features)})"
        )
    return images[0], labels[0] if labels else None


def read_row(split, column: str, row: int) -> Path | bytes:
    image = split[row][column]
    if image.get("bytes") is not None:
        return image["bytes"]
    return Path(image["path"])


def hf_items(data: DataSettings) -> tuple[list[str], dict[str, list[Item]]]:
    """The classes and, per split of ours, its images as items."""
    import datasets

    found = load_dataset_dict(Path(data.hf_dataset))  # type: ignore[arg-type]
    wanted = {ours: theirs for ours, theirs in data.hf_splits.model_dump().items() if theirs}
    absent = sorted({t for t in wanted.values() if t not in found})
    if absent:
        raise PipelineError(
            f"data.hf_splits: split(s) {absent} not in '{data.hf_dataset}' (it has {sorted(found)})"
        )
    labeled = found[wanted["labeled"]]
    _, label_column = columns(labeled, wanted["labeled"], need_label=True)
    names = labeled.features[label_column].names
    classes = sorted({names[k] for k in labeled[label_column]})
    if len(classes) < 2:
        raise PipelineError(f"data.hf_dataset: split '{wanted['labeled']}' needs 2 classes or more")
    index = {c: k for k, c in enumerate(classes)}
    splits: dict[str, list[Item]] = {}
    for ours, theirs in wanted.items():
        split = found[theirs]
        image_column, label_column = columns(split, theirs, need_label=ours != "unlabeled")
        raw = split.cast_column(image_column, datasets.Image(decode=False))
        names = split.features[label_column].names if label_column else []
        given = [names[k] if k >= 0 else None for k in split[label_column]] if names else []
        if ours != "unlabeled":
            stray = sorted({g for g in given if g not in index}, key=str)
            if stray:
                raise PipelineError(
                    f"data.hf_dataset: split '{theirs}' has label(s) {stray[:5]} that the "
                    f"labeled split '{wanted['labeled']}' lacks"
                )
        items = []
        for row in range(len(split)):
            known = index.get(given[row], UNKNOWN) if given else UNKNOWN
            label = UNKNOWN if ours == "unlabeled" else known
            origin = f"{data.hf_dataset}[{theirs}][{row}]"
            reader = partial(read_row, raw, image_column, row)
            items.append(Item(f"{theirs}/{row:06d}", reader, label, known, origin))
        splits[ours] = items
    return classes, splits

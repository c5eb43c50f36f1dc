"""Prepare stage: the digits split and the user's folders, read into resized RGB splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.images import resize_rgb
from noisy_student.data.prepare import prepare, split_digits
from noisy_student.data.splits import UNKNOWN, load_classes, load_split
from tests.helpers.images import (
    folder_params,
    write_hf_dataset,
    write_image_folders,
    write_manifest,
)


def settings_from(params) -> Settings:
    return Settings.model_validate(params)


def into(folder) -> Layout:
    """A layout whose prepared data goes to ``folder``."""
    return Layout.at(folder.parent).replace(prepared=folder)


def test_digit_splits_are_disjoint_stratified_and_seeded(params):
    data = settings_from(params).data
    labels = load_digits().target
    splits = split_digits(labels, data, seed=0)
    all_idx = np.concatenate(list(splits.values()))
    assert len(all_idx) == len(labels) == len(set(all_idx.tolist()))
    assert np.bincount(labels[splits["labeled"]]).tolist() == [data.labels_per_class] * 10
    test_share = len(splits["test"]) / len(labels)
    assert abs(test_share - data.test_fraction) < 0.01
    again = split_digits(labels, data, seed=0)
    other = split_digits(labels, data, seed=1)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["labeled"], other["labeled"])


def test_too_many_labels_per_class_is_an_error(params):
    params["data"]["labels_per_class"] = 500
    with pytest.raises(PipelineError, match="leaves no unlabeled image"):
        split_digits(load_digits().target, settings_from(params).data, seed=0)


def test_prepare_digits_writes_every_split(tmp_path, tiny_params):
    settings = settings_from(tiny_params)
    counts = prepare(settings, into(tmp_path / "prepared"))
    root = tmp_path / "prepared"
    assert load_classes(root) == [str(i) for i in range(10)]
    assert sum(counts.values()) == 1797
    labeled, pool = load_split("labeled", root), load_split("unlabeled", root)
    assert labeled.images.shape == (counts["labeled"], 16, 16, 3)
    assert labeled.images.dtype == np.uint8 and labeled.images.max() > 200
    assert (pool.labels == UNKNOWN).all()  # the pool's labels are hidden from training...
    assert (pool.true_labels >= 0).all()  # ...but kept to score pseudo-labels in the demo
    assert json.loads((root / "classes.json").read_text())["counts"] == counts
    assert not list(tmp_path.glob(".prepared*"))  # no temporary leftovers


def test_resize_rgb_handles_gray_and_any_size():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert resize_rgb(gray, 32).shape == (32, 32, 3)
    big = np.zeros((100, 60, 3), dtype=np.uint8)
    assert resize_rgb(big, 24).shape == (24, 24, 3)


def test_prepare_folders_reads_png_jpeg_gray_rgba_nested(tmp_path, tiny_params):
    root = write_image_folders(tmp_path / "images")
    settings = settings_from(folder_params(tiny_params, root))
    counts = prepare(settings, into(tmp_path / "prepared"))
    assert load_classes(tmp_path / "prepared") == ["class_0", "class_1", "class_2"]
    assert counts["labeled"] == 12 and counts["unlabeled"] == 10
    assert counts["val"] == 3 and counts["test"] == 9  # val carved out of test_dir
    pool = load_split("unlabeled", tmp_path / "prepared")
    assert pool.ids[0].startswith("batch one/ünïcode/pool_")
    assert pool.images.shape[1:] == (16, 16, 3)


def test_test_class_missing_from_labeled_is_an_error(tmp_path, tiny_params):
    root = write_image_folders(tmp_path / "images")
    (root / "test" / "class_9").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "test" / "class_9" / "x.png")
    with pytest.raises(PipelineError, match=r"\['class_9'\] do not exist in data.labeled_dir"):
        prepare(settings_from(folder_params(tiny_params, root)), into(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("storage", ["arrays", "encoded"])
def test_corrupt_image_names_the_file(tmp_path, tiny_params, storage):
    root = write_image_folders(tmp_path / "images")
    bad = root / "labeled" / "class_1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    params = folder_params(tiny_params, root)
    params["data"]["storage"] = storage
    with pytest.raises(PipelineError, match="broken.png: cannot read as an image"):
        prepare(settings_from(params), into(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_manifest_of_the_same_images_prepares_the_same_data_as_folders(
    tmp_path, tiny_params, suffix
):
    root = write_image_folders(tmp_path / "images")
    folders = settings_from(folder_params(dict(tiny_params), root))
    prepare(folders, into(tmp_path / "from_folders"))
    manifest = write_manifest(root, root / f"manifest{suffix}")
    params = folder_params(dict(tiny_params), root)
    params["data"].update(source="manifest", manifest=str(manifest), decode_workers=2)
    counts = prepare(settings_from(params), into(tmp_path / "from_manifest"))
    assert counts == {"labeled": 12, "val": 3, "test": 9, "unlabeled": 10}
    assert load_classes(tmp_path / "from_manifest") == load_classes(tmp_path / "from_folders")
    for name in counts:  # the same pixels, labels and order; ids are the manifest's paths
        a, b = (
            load_split(name, tmp_path / "from_folders"),
            load_split(name, tmp_path / "from_manifest"),
        )
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
        assert all(m.endswith(f) for f, m in zip(a.ids, b.ids, strict=True))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.drop(columns="split"), r"no column\(s\) \['split'\]"),
        (lambda t: t.assign(split=t["split"].where(t.index != 3, "train")), "split must be one of"),
        (lambda t: t.assign(path=t["path"].where(t.index != 0, "gone.png")), "no such file"),
        (lambda t: t.assign(label=t["label"].where(t["split"] != "test", "zebra")), "'zebra'"),
        (lambda t: t[t["split"] != "unlabeled"], "no unlabeled rows"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "the same path listed twice"),
    ],
)
def test_a_bad_manifest_names_the_file_the_rows_and_the_fix(tmp_path, tiny_params, edit, expected):
    root = write_image_folders(tmp_path / "images")
    path = write_manifest(root, root / "manifest.csv")
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)
    params = folder_params(dict(tiny_params), root)
    params["data"].update(source="manifest", manifest=str(path))
    with pytest.raises(PipelineError, match=expected):
        prepare(settings_from(params), into(tmp_path / "prepared"))
    assert not (tmp_path / "prepared").exists()


def test_a_hugging_face_dataset_of_the_same_images_prepares_the_same_data_as_folders(
    tmp_path, tiny_params
):
    root = write_image_folders(tmp_path / "images")
    prepare(settings_from(folder_params(dict(tiny_params), root)), into(tmp_path / "from_folders"))
    saved = write_hf_dataset(root, tmp_path / "hf")
    params = folder_params(dict(tiny_params), root)
    params["data"].update(source="hf_dataset", hf_dataset=str(saved))
    counts = prepare(settings_from(params), into(tmp_path / "from_hf"))
    assert counts == {"labeled": 12, "val": 3, "test": 9, "unlabeled": 10}
    assert load_classes(tmp_path / "from_hf") == ["class_0", "class_1", "class_2"]
    for name in counts:
        a, b = load_split(name, tmp_path / "from_folders"), load_split(name, tmp_path / "from_hf")
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert load_split("labeled", tmp_path / "from_hf").ids[0] == "train/000000"

    params["data"]["hf_splits"].update(unlabeled="pool")
    with pytest.raises(PipelineError, match=r"split\(s\) \['pool'\] not in"):
        prepare(settings_from(params), into(tmp_path / "again"))

"""Encoded storage (data.storage: encoded): each image's own bytes in shards, read back as the
same pixels as the arrays' storage, at about the source files' size, versioned shard by shard."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.photos import write_photo_folders
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.loaders import ImageDataset, make_loader
from noisy_student.data.prepare import prepare
from noisy_student.data.shards import shard_files
from noisy_student.data.splits import SPLITS, load_split
from tests.helpers.images import folder_params, write_image_folders


def prepared(params: dict, root, storage: str, **data) -> Layout:
    params = {**params, "data": {**params["data"], "storage": storage, **data}}
    layout = Layout.at(root)
    prepare(Settings.model_validate(params), layout)
    return layout


@pytest.mark.parametrize("source", ["folders", "digits"])
def test_encoded_storage_reads_the_same_pixels_as_the_arrays(tmp_path, tiny_params, source):
    params = tiny_params
    if source == "folders":  # PNG, JPEG, gray, RGBA, nested folders
        params = folder_params(tiny_params, write_image_folders(tmp_path / "images", pool=10))
    arrays = prepared(params, tmp_path / "a", "arrays")
    encoded = prepared(params, tmp_path / "e", "encoded", shard_images=4)
    assert len(shard_files(encoded.prepared / "unlabeled")) > 1
    for name in SPLITS:
        a, e = load_split(name, arrays.prepared), load_split(name, encoded.prepared)
        assert e.ids == a.ids and np.array_equal(e.labels, a.labels)
        assert e.images.shape == a.images.shape
        assert np.array_equal(e.images[:], np.asarray(a.images)), name
        assert np.array_equal(e.images[np.array([2, 0])], a.images[[2, 0]])
        assert np.array_equal(e.images[-1], a.images[-1])


def test_encoded_images_stream_through_loader_workers(tmp_path, tiny_params):
    """Each DataLoader worker opens the shards itself (memory maps do not cross processes)."""
    layout = prepared(tiny_params, tmp_path, "encoded", shard_images=50)
    pool = load_split("unlabeled", layout.prepared)
    loader = make_loader(
        ImageDataset(pool.images), 64, shuffle=False, num_workers=2, pin_memory=False, seed=0
    )
    streamed = torch.cat(list(loader))
    assert streamed.shape == (len(pool), 3, 16, 16)
    assert np.array_equal(streamed.permute(0, 2, 3, 1).numpy(), pool.images[:])


def digests(folder) -> dict[str, str]:
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in shard_files(folder)}


def test_photos_cost_their_own_bytes_and_a_changed_photo_changes_one_shard(tmp_path, tiny_params):
    images = write_photo_folders(tmp_path / "photos", per_class=2, pool=24)
    params = folder_params(tiny_params, images)
    params["data"]["image_size"] = 224
    layout = prepared(params, tmp_path / "p1", "encoded", shard_images=8)
    sources = sum(f.stat().st_size for f in images.rglob("*.jpg"))
    stored = sum(f.stat().st_size for f in layout.prepared.rglob("images-*.arrow"))
    assert sources < stored < 1.05 * sources + 2048 * len(list(layout.prepared.rglob("*.arrow")))
    # the arrays' storage holds 224 x 224 x 3 bytes per photo, several times the JPEGs
    arrays = prepared(params, tmp_path / "a", "arrays")
    assert sum(f.stat().st_size for f in arrays.prepared.rglob("images.npy")) > 3 * sources
    before = digests(layout.prepared / "unlabeled")
    photo = images / "pool" / "pool_9.jpg"
    shard = load_split("unlabeled", layout.prepared).ids.index("pool_9.jpg") // 8
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo, quality=90)
    again = prepared(params, tmp_path / "p2", "encoded", shard_images=8)
    after = digests(again.prepared / "unlabeled")
    assert len(before) == 3 and sorted(before) == sorted(after)
    assert [name for name in before if before[name] != after[name]] == [f"images-{shard:05d}.arrow"]


def test_photos_above_max_side_are_stored_as_jpeg_at_that_side(tmp_path, tiny_params):
    images = write_photo_folders(tmp_path / "photos", per_class=1, pool=3)
    params = folder_params(tiny_params, images)
    layout = prepared(params, tmp_path, "encoded", max_side=256)
    pool = load_split("unlabeled", layout.prepared)
    for i, image_id in enumerate(pool.ids):
        source = (images / "pool" / image_id).read_bytes()
        stored = pool.images.encoded(i)
        with Image.open(io.BytesIO(source)) as img:
            big = max(img.size) > 256
        if big:
            with Image.open(io.BytesIO(stored)) as img:
                assert max(img.size) == 256 and img.format == "JPEG"
        else:
            assert stored == source
    assert any(max(Image.open(images / "pool" / i).size) > 256 for i in pool.ids)

"""Encoded storage (data.storage: encoded): each image's own bytes in shards, at about the
source files' size, versioned shard by shard; evaluation sees timm's centre crop (aspect kept),
which for square images at eval_crop_pct 1.0 is the arrays' storage pixel for pixel; training
crops from the stored resolution."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.photos import write_photo_folders
from noisy_student.augment.policy import TrainTransform, build_policy
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.images import center_view
from noisy_student.data.loaders import ImageDataset, make_loader
from noisy_student.data.prepare import prepare
from noisy_student.data.shards import EncodedImages, encode_png, shard_files, write_shards
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
    encoded = prepared(params, tmp_path / "e", "encoded", shard_images=4, eval_crop_pct=1.0)
    assert len(shard_files(encoded.prepared / "unlabeled")) > 1
    for name in SPLITS:
        a, e = load_split(name, arrays.prepared), load_split(name, encoded.prepared)
        assert e.ids == a.ids and np.array_equal(e.labels, a.labels)
        assert e.images.shape == a.images.shape
        assert np.array_equal(e.images[:], np.asarray(a.images)), name
        assert np.array_equal(e.images[np.array([2, 0])], a.images[[2, 0]])
        assert np.array_equal(e.images[-1], a.images[-1])


def test_photos_are_evaluated_through_timms_centre_crop_with_their_aspect_kept(
    tmp_path, tiny_params
):
    from timm.data.transforms_factory import transforms_imagenet_eval

    images = write_photo_folders(tmp_path / "photos", per_class=1, pool=4)
    params = folder_params(tiny_params, images)
    params["data"]["image_size"] = 64
    layout = prepared(params, tmp_path / "p", "encoded", eval_crop_pct=0.875)
    pool = load_split("unlabeled", layout.prepared)
    timm_eval = transforms_imagenet_eval(64, crop_pct=0.875, use_prefetcher=True)  # uint8 C x H x W
    for i, image_id in enumerate(pool.ids):
        with Image.open(images / "pool" / image_id) as photo:
            assert photo.size[0] != photo.size[1]
            theirs = np.asarray(timm_eval(photo.convert("RGB"))).transpose(1, 2, 0).astype(int)
            squeezed = np.asarray(photo.convert("RGB").resize((64, 64), Image.BILINEAR))
        ours = pool.images[i].astype(int)
        assert ours.shape == theirs.shape == (64, 64, 3)
        # the same crop of the same photo, resampled by cv2 here and by Pillow in timm
        assert np.abs(ours - theirs).mean() < 4 < np.abs(squeezed - theirs).mean(), image_id


def test_a_large_jpeg_is_decoded_no_larger_than_its_view_needs(tmp_path):
    from bench.photos import sample_photos, save_photo
    from noisy_student.data.images import (
        DRAFT_MARGIN,
        decode_scaled,
        read_image,
        read_rgb,
        square_view,
        view_side,
    )

    path = tmp_path / "big.jpg"
    save_photo(sample_photos(), path, np.random.default_rng(0), sides=(1100, 1300))
    full = read_rgb(path)
    side = DRAFT_MARGIN * view_side(128, 0.875)  # 292
    small, full_size = decode_scaled(path, None, side)
    assert full_size == (full.shape[1], full.shape[0])
    assert side <= min(small.shape[:2]) < 2 * side < min(full.shape[:2])  # a quarter of it
    # the view from the DCT-scaled decode is the full decode's, up to resampling
    ours, whole = read_image(path, 128, crop_pct=0.875), square_view(full, 128, 0.875)
    assert ours.shape == whole.shape == (128, 128, 3)
    assert np.abs(ours.astype(int) - whole.astype(int)).mean() < 3
    png = tmp_path / "big.png"
    Image.fromarray(full).save(png)
    assert decode_scaled(png, None, side)[0].shape == full.shape  # only JPEGs scale


def test_training_crops_from_the_stored_resolution(tmp_path, tiny_params):
    """A 1-pixel checkerboard survives a small RandomResizedCrop taken from the 256-px source;
    from a 16-px copy it would be flat grey. Where the crop does not fire: the evaluation view."""
    board = ((np.indices((256, 320)).sum(axis=0) % 2) * 255).astype(np.uint8)
    board = np.repeat(board[:, :, None], 3, axis=2)
    (tmp_path / "s").mkdir()
    write_shards(tmp_path / "s", ["board"], [encode_png(board)], per_shard=1)
    images = EncodedImages(shard_files(tmp_path / "s"), 16, 0.875)
    assert images[0].std() < 40  # evaluation: the whole board, averaged to grey
    settings = Settings.model_validate(tiny_params)

    def train_view(crop_p: float) -> np.ndarray:
        policy = build_policy(settings.augment.student, 16, seed=0)
        crop, *rest = policy.transforms
        # 16 x 16 source pixels: 256 / (256 * 320) of the area, square
        crop.p, crop.scale, crop.ratio = crop_p, (1 / 320, 1 / 320), (1.0, 1.0)
        for op in rest:
            op.p = 0.0
        transform = TrainTransform(policy, size=16, crop_pct=0.875, seed=0)
        return ImageDataset(images, transform)[0].permute(1, 2, 0).numpy()

    cropped = train_view(1.0)
    assert cropped.shape == (16, 16, 3) and cropped.std() > 100
    assert np.array_equal(train_view(0.0), center_view(board, 16, 0.875))


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

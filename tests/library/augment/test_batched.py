"""augment.backend batched: the policy and RandAugment on a whole batch, checked against PIL's
definitions of each op, against the per-image path's ranges, and through a real training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from noisy_student.augment.artifacts import augment
from noisy_student.augment.batched import (
    RA_OPS,
    BatchAugment,
    BatchPolicy,
    color_op,
    equalize,
)
from noisy_student.augment.policy import build_policy
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.prepare import prepare
from noisy_student.models.classifier import load_checkpoint
from noisy_student.training.train import train
from tests.helpers.images import folder_params, write_image_folders

SIZE = 16


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    """uint8 N x H x W x 3, with flat and busy regions (a histogram with gaps and peaks)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(20, 200, (n, SIZE, SIZE, 3), dtype=np.uint8)
    x[:, 4:9, 3:12] = rng.integers(0, 255, (n, 1, 1, 3), dtype=np.uint8)
    return x


def as_batch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()


def as_images(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pil_each(x: np.ndarray, op) -> np.ndarray:
    return np.stack([np.asarray(op(Image.fromarray(image))) for image in x])


@pytest.fixture
def student_policy(tiny_params) -> BatchPolicy:
    settings = Settings.model_validate(tiny_params)
    return BatchPolicy.from_compose(build_policy(settings.augment.student, SIZE, seed=0))


def quiet(policy: BatchPolicy, **on) -> BatchPolicy:
    """Every op off but those given."""
    off = dict(crop_p=0.0, hflip_p=0.0, rotate_p=0.0, affine_p=0.0, brightness_contrast_p=0.0)
    return dataclasses.replace(policy, **(off | {"erase_p": 0.0} | on))


def test_the_policy_is_read_off_the_albumentations_compose(tiny_params, student_policy):
    s = Settings.model_validate(tiny_params).augment.student
    assert student_policy.crop_p == s.crop_p and student_policy.crop_scale == (s.crop_scale_min, 1)
    assert student_policy.rotate_limit == (-s.rotate_limit, s.rotate_limit)
    assert student_policy.shear == (-s.affine_shear, s.affine_shear) * 2
    assert student_policy.translate == (-s.affine_translate, s.affine_translate) * 2
    assert student_policy.brightness == (-s.brightness, s.brightness)
    assert student_policy.erase_p == s.erase_p and student_policy.hole_height == (0.2, 0.4)


@pytest.mark.parametrize("name", ["Invert", "Solarize", "SolarizeAdd", "Posterize", "Equalize"])
def test_pixel_ops_equal_pils(name):
    """Exactly PIL's (timm's ops are PIL's), at magnitude 7 as the student's recipe has it."""
    x = images()
    level = 0.7
    pil = {
        "Invert": ImageOps.invert,
        "Solarize": lambda im: ImageOps.solarize(im, int(level * 256)),
        "SolarizeAdd": lambda im: im.point(
            [min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3
        ),
        "Posterize": lambda im: ImageOps.posterize(im, int(level * 4)),
        "Equalize": ImageOps.equalize,
    }[name]
    got = as_images(color_op(name, as_batch(x), level))
    assert np.array_equal(got, pil_each(x, pil))


def test_equalize_of_a_flat_channel_leaves_it():
    x = np.full((1, SIZE, SIZE, 3), 90, np.uint8)
    assert np.array_equal(as_images(equalize(as_batch(x))), x)


@pytest.mark.parametrize(
    ("name", "enhance"),
    [
        ("Color", ImageEnhance.Color),
        ("Contrast", ImageEnhance.Contrast),
        ("Brightness", ImageEnhance.Brightness),
        ("Sharpness", ImageEnhance.Sharpness),
    ],
)
def test_enhance_ops_match_pil_to_rounding(name, enhance):
    """PIL works in uint8 inside (its grey image, its blur, its blend truncates); ours stays
    float: at most two levels of 255 apart, under one on average."""
    x = images()
    level = 0.7
    factor = level * 1.8 + 0.1
    got = as_images(color_op(name, as_batch(x), level)).astype(int)
    want = pil_each(x, lambda im: enhance(im).enhance(factor)).astype(int)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - want).mean() < 1


def test_autocontrast_stretches_each_channel_to_the_full_range():
    x = images()
    got = as_images(color_op("AutoContrast", as_batch(x), 0.7))
    assert (got.min(axis=(1, 2)) == 0).all() and (got.max(axis=(1, 2)) == 255).all()
    assert np.abs(got.astype(int) - pil_each(x, ImageOps.autocontrast)).max() <= 1


def test_nothing_fires_nothing_changes(student_policy):
    x = as_batch(images())
    assert torch.equal(BatchAugment(quiet(student_policy), 0, 0, seed=0)(x), x)


def test_a_flip_and_a_quarter_turn_move_pixels_exactly(student_policy):
    x = as_batch(images())
    flipped = BatchAugment(quiet(student_policy, hflip_p=1.0), 0, 0, seed=0)(x)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-3)
    turn = quiet(student_policy, rotate_p=1.0, rotate_limit=(90.0, 90.0))
    turned = BatchAugment(turn, 0, 0, seed=0)(x)
    assert any(torch.allclose(turned, x.rot90(k, (2, 3)), atol=1e-3) for k in (1, 3))


def test_erasing_cuts_one_hole_of_the_policys_size(student_policy):
    x = as_batch(images(32)) + 1  # no pixel is 0 before
    erased = BatchAugment(quiet(student_policy, erase_p=1.0), 0, 0, seed=0)(x)
    holes = (erased == 0).all(dim=1).float().mean(dim=(1, 2))  # each image's share
    side = SIZE * np.array(student_policy.hole_height)
    assert ((holes >= (side[0] // 1) ** 2 / SIZE**2 - 1e-6) & (holes <= 0.4**2 + 1e-6)).all()


def test_draws_are_per_image_seeded_and_resumable(student_policy):
    x = as_batch(np.repeat(images(1), 16, axis=0))  # one image, sixteen times
    a = BatchAugment(student_policy, 2, 7, seed=3)
    first = a(x)
    assert len({tuple(image.flatten().tolist()) for image in first}) == 16  # each its own draw
    state = a.state()
    second = a(x)
    b = BatchAugment(student_policy, 2, 7, seed=3)
    assert torch.equal(b(x), first)
    b.restore(state)
    assert torch.equal(b(x), second)
    assert not torch.equal(BatchAugment(student_policy, 2, 7, seed=4)(x), first)


def test_every_randaugment_op_is_drawn(student_policy):
    """Fifteen ops, drawn uniformly per image: over 600 images each turns up."""
    a = BatchAugment(student_policy, 1, 7, seed=0)
    ops = a.rng.integers(len(RA_OPS), size=600)
    assert set(ops.tolist()) == set(range(len(RA_OPS)))
    out = BatchAugment(quiet(student_policy), 1, 9, seed=0)(as_batch(images(64)))
    assert out.shape == (64, 3, SIZE, SIZE) and out.min() >= 0 and out.max() <= 255


def prepared_project(root, params: dict) -> tuple[Settings, Layout]:
    """``params`` prepared and augmented in ``root``, with an MLflow store of its own."""
    params = params | {
        "mlflow": {**params["mlflow"], "tracking_uri": f"sqlite:///{root}/mlflow.db"}
    }
    settings = Settings.model_validate(params)
    layout = Layout.at(root)
    prepare(settings, layout)
    augment(settings, layout)
    return settings, layout


@pytest.mark.slow
def test_a_training_with_the_batched_backend_learns_and_repeats_itself(tmp_path, tiny_params):
    """The real teacher training (tiny), twice from the same params: the same weights to the
    byte, and better than chance on validation."""
    tiny_params["augment"]["backend"] = "batched"
    tiny_params["teacher"].update(epochs=12, randaugment_n=2, randaugment_m=7)
    weights = []
    for run in ("a", "b"):
        settings, layout = prepared_project(tmp_path / run, tiny_params)
        history = train(settings, "teacher", layout)
        assert max(r.val_accuracy for r in history) > 0.3  # ten classes: chance is 0.1
        classifier, _ = load_checkpoint(layout.model("teacher"), "cpu")
        weights.append(classifier.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_encoded_photos_are_cropped_from_the_source_then_batched(tmp_path, tiny_params):
    """The encoded storage keeps each photo at its own size: the loader takes the crop from the
    source (as timm's training transforms do), the batch gets the rest; the preview shows it."""
    folders = write_image_folders(tmp_path / "images", images_per_class=4, pool=6)
    params = folder_params(tiny_params, folders)
    params["data"].update(storage="encoded", shard_images=8)
    params["augment"]["backend"] = "batched"
    params["teacher"]["epochs"] = 2
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    settings = Settings.model_validate(params)
    layout = Layout.at(tmp_path / "project")
    prepare(settings, layout)
    augment(settings, layout)
    assert Image.open(layout.augment / "preview.png").size[0] > 100
    history = train(settings, "teacher", layout)
    assert len(history) == 2 and all(np.isfinite(r.train_loss) for r in history)


@pytest.mark.slow
def test_a_batched_training_stopped_after_a_checkpoint_resumes_to_the_same_weights(
    tmp_path, tiny_params, monkeypatch
):
    """The batch's draws are part of the checkpoint: stopped in epoch 3 (after checkpoint 2) and
    run again, the training ends with the weights of one that never stopped."""
    import noisy_student.training.loop as loop

    tiny_params["augment"]["backend"] = "batched"
    tiny_params["teacher"].update(epochs=4, randaugment_n=2, randaugment_m=7)
    tiny_params["selection"]["epoch"] = "last"  # the weights of epoch 4, drawn after the stop

    def trained(root, stop_at: int | None) -> dict:
        settings, layout = prepared_project(root, tiny_params)
        if stop_at is not None:
            real = loop._train_epoch

            def stopping(state, config, epoch):
                if epoch == stop_at:
                    raise RuntimeError("stopped")
                return real(state, config, epoch)

            with monkeypatch.context() as patch:
                patch.setattr(loop, "_train_epoch", stopping)
                with pytest.raises(RuntimeError, match="stopped"):
                    train(settings, "teacher", layout)
            assert not layout.model("teacher").exists()
        train(settings, "teacher", layout)
        return load_checkpoint(layout.model("teacher"), "cpu")[0].state_dict()

    straight, resumed = trained(tmp_path / "a", None), trained(tmp_path / "b", 3)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_policy_of_other_ops_is_refused_with_its_names():
    import albumentations as A

    from noisy_student.core.errors import PipelineError

    with pytest.raises(PipelineError, match=r"got \['HorizontalFlip'\]"):
        BatchPolicy.from_compose(A.Compose([A.HorizontalFlip(p=0.5)]))

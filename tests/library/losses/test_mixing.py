"""Targets and batch mixing: label smoothing, sharpening, MixUp and CutMix label weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisy_student.core.settings import ModelTraining
from noisy_student.losses.mixing import BatchMixer, one_hot, sharpen
from tests.helpers.project import load_params


def spec(**mix) -> ModelTraining:
    teacher = {k: v for k, v in load_params()["teacher"].items() if k != "ensemble"}
    fields = {"mixup_alpha": 0.4, "mixup_p": 0.0, "cutmix_alpha": 1.0, "cutmix_p": 0.0, **mix}
    return ModelTraining.model_validate({**teacher, **fields})


def batch(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image i is the constant 10 * (i + 1): every pixel tells which image it came from."""
    images = torch.arange(1, n + 1, dtype=torch.float32).mul(10).view(n, 1, 1, 1)
    images = images.expand(n, 3, size, size).clone()
    targets = torch.from_numpy(one_hot(np.arange(n) % 3, 3))
    kd = torch.linspace(0.0, 1.0, n)
    return images, targets, kd


def test_one_hot_smoothing_matches_the_formula():
    t = one_hot(np.array([2, 0]), 4, smoothing=0.2)
    np.testing.assert_allclose(t[0], [0.05, 0.05, 0.85, 0.05])
    np.testing.assert_allclose(t.sum(1), 1.0)
    np.testing.assert_array_equal(one_hot(np.array([1]), 3), [[0, 1, 0]])


def test_sharpen_is_softmax_at_temperature_t():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    for t in (0.5, 1.0, 3.0):
        expected = torch.softmax(torch.tensor(logits) / t, 1).numpy()
        np.testing.assert_allclose(sharpen(probs, t), expected, rtol=1e-5)
    assert sharpen(probs, 0.5)[0].max() > probs[0].max() > sharpen(probs, 3.0)[0].max()


def test_cutmix_label_weight_is_the_pasted_area():
    np.random.seed(0)
    mixer = BatchMixer(spec(cutmix_p=1.0))
    for _ in range(20):
        images, targets, kd = batch()
        mixed, y, k = mixer(images, targets, kd)
        n = len(images)
        for i in range(n):
            partner = n - 1 - i  # timm pairs i with the flipped batch
            own = (mixed[i] == 10 * (i + 1)).float().mean().item()
            pasted = (mixed[i] == 10 * (partner + 1)).float().mean().item()
            assert own + pasted == pytest.approx(1.0)
            expected = own * targets[i] + pasted * targets[partner]
            torch.testing.assert_close(y[i], expected)
            assert k[i].item() == pytest.approx(own * kd[i].item() + pasted * kd[partner].item())


def test_mixup_mixes_pixels_targets_and_weights_with_one_lambda():
    np.random.seed(4)
    mixer = BatchMixer(spec(mixup_p=1.0, mixup_alpha=1.0))
    lams = []
    for _ in range(5):
        images, targets, kd = batch()
        mixed, y, k = mixer(images.clone(), targets, kd)
        lam = (mixed[0, 0, 0, 0].item() - 60) / (10 - 60)  # image 0 = lam * 10 + (1 - lam) * 60
        lams.append(lam)
        for i in range(6):
            j = 5 - i
            expected = lam * images[i, 0, 0, 0] + (1 - lam) * images[j, 0, 0, 0]
            assert mixed[i].unique().tolist() == pytest.approx([expected.item()], rel=1e-4)
            torch.testing.assert_close(y[i], lam * targets[i] + (1 - lam) * targets[j])
            torch.testing.assert_close(k[i], lam * kd[i] + (1 - lam) * kd[j])
    assert any(0.1 < lam < 0.9 for lam in lams)


def test_odd_batch_leaves_the_last_item_unmixed():
    np.random.seed(2)
    images, targets, kd = batch(n=5)
    mixed, y, k = BatchMixer(spec(mixup_p=1.0))(images.clone(), targets, kd)
    torch.testing.assert_close(mixed[4], images[4])
    torch.testing.assert_close(y[4], targets[4])
    assert not torch.equal(mixed[0], images[0])


def test_each_mix_fires_with_its_own_probability():
    np.random.seed(3)
    mixer = BatchMixer(spec(mixup_p=0.2, cutmix_p=0.5))
    counts = {"none": 0, "mixup": 0, "cutmix": 0}
    for _ in range(2000):
        images, targets, kd = batch(n=2, size=8)
        mixed, _, _ = mixer(images, targets, kd)
        values = mixed[0].unique()
        if torch.equal(values, torch.tensor([10.0])):
            counts["none"] += 1
        elif set(values.tolist()) <= {10.0, 20.0}:
            counts["cutmix"] += 1
        else:
            counts["mixup"] += 1
    # a CutMix box can be empty (lam 1), which reads as "none": allow a few
    assert counts["mixup"] / 2000 == pytest.approx(0.2, abs=0.03)
    assert counts["cutmix"] / 2000 == pytest.approx(0.5, abs=0.04)
    assert not BatchMixer(spec()).enabled

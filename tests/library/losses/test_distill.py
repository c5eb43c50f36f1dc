"""Knowledge distillation: the loss against a hand computation, its T^2 gradient scale, and a
frozen teacher that never receives a gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from noisy_student.losses.distill import FrozenTeacher, kd_term, soft_cross_entropy, student_loss
from noisy_student.losses.mixing import one_hot
from noisy_student.models.classifier import Classifier


def softmax(values: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_term_equals_a_hand_computation():
    s, z, t = [2.0, 1.0, 0.0], [0.5, 1.5, -1.0], 2.0
    p, q = softmax(z, t), softmax(s, t)
    expected = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    got = kd_term(torch.tensor([s]), torch.tensor([p]), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kd_term(torch.tensor([z]), torch.tensor([p]), t).item() == pytest.approx(0, abs=1e-6)


def test_student_loss_is_hintons_weighted_sum_on_labels_and_kl_alone_on_the_pool():
    alpha, t = 0.3, 4.0
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    teacher = torch.softmax(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]) / t, 1)
    # item 0 labeled (class 1), item 1 from the pool: the targets training builds for them
    targets = torch.tensor([list((1 - alpha) * one_hot(np.array([1]), 3)[0]), [0.0, 0.0, 0.0]])
    kd_weights = torch.tensor([alpha, 1.0])
    loss = student_loss(s, targets, kd_weights, teacher, t)

    q0, q1 = softmax(s[0].tolist(), t), softmax(s[1].tolist(), t)
    kl0 = sum(p * math.log(p / q) for p, q in zip(teacher[0].tolist(), q0, strict=True))
    kl1 = sum(p * math.log(p / q) for p, q in zip(teacher[1].tolist(), q1, strict=True))
    ce0 = -math.log(softmax(s[0].tolist())[1])
    labeled = alpha * t * t * kl0 + (1 - alpha) * ce0
    pool = t * t * kl1
    assert loss.item() == pytest.approx((labeled + pool) / 2, rel=1e-5)
    # no teacher: plain cross-entropy on the targets
    plain = student_loss(s, torch.eye(3)[[1, 2]], kd_weights, None, t)
    assert plain.item() == pytest.approx(soft_cross_entropy(s, torch.eye(3)[[1, 2]]).mean().item())


def test_gradient_scale_follows_t_squared():
    torch.manual_seed(0)
    student = torch.randn(8, 10)
    teacher_logits = torch.randn(8, 10)
    norms = {}
    for t in (1.0, 2.0, 10.0, 20.0):
        s = (student - student.mean(1, keepdim=True)).requires_grad_()
        probs = torch.softmax(teacher_logits / t, 1)
        kd_term(s, probs, t).sum().backward()
        scaled = s.grad.clone()
        s.grad = None
        (kd_term(s, probs, t) / (t * t)).sum().backward()  # the bare KL at T
        torch.testing.assert_close(scaled, t * t * s.grad)
        norms[t] = (scaled.norm().item(), s.grad.norm().item())
    # Hinton et al.: at high T the bare KL's gradients shrink as 1 / T^2; times T^2 they hold
    assert norms[20.0][1] / norms[10.0][1] == pytest.approx(0.25, rel=0.05)
    assert norms[20.0][0] / norms[10.0][0] == pytest.approx(1.0, rel=0.05)


def tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=3)


def test_only_the_student_receives_gradients():
    teacher = FrozenTeacher(
        Classifier([tiny_net(0), tiny_net(1)], [[0.5] * 3] * 2, [[0.25] * 3] * 2)
    )
    before = {k: v.clone() for k, v in teacher.classifier.state_dict().items()}
    student = Classifier([tiny_net(2)], [[0.5] * 3], [[0.25] * 3]).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    images = torch.rand(4, 3, 16, 16) * 255
    soft = teacher(images, 4.0)
    assert not soft.requires_grad
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    loss = student_loss(student(images), torch.zeros(4, 3), torch.ones(4), soft, 4.0)
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.classifier.parameters())
    assert all(not p.requires_grad for p in teacher.classifier.parameters())
    assert all(p.grad is not None for p in student.parameters())
    after = teacher.classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.classifier.training


def two_net_ensemble() -> tuple[list[torch.nn.Module], tuple, Classifier, torch.Tensor]:
    """Two tiny nets, their normalisation, their ensemble and a batch of pixels 0..255."""
    nets = [tiny_net(0).eval(), tiny_net(1).eval()]
    norm = ([[0.5] * 3], [[0.25] * 3])
    ensemble = Classifier(nets, norm[0] * 2, norm[1] * 2).eval()
    return nets, norm, ensemble, torch.rand(5, 3, 16, 16) * 255


def test_ensemble_averages_member_probabilities():
    nets, norm, ensemble, images = two_net_ensemble()
    with torch.no_grad():
        members = [torch.softmax(Classifier([n], *norm)(images) / 3.0, 1) for n in nets]
        torch.testing.assert_close(ensemble.probs(images, 3.0), (members[0] + members[1]) / 2)
        averaged = ensemble.probs(images)
        torch.testing.assert_close(torch.softmax(ensemble(images), 1), averaged)


def test_energy_is_minus_logsumexp_of_the_logits_averaged_over_members():
    nets, norm, ensemble, images = two_net_ensemble()
    with torch.no_grad():
        logits = [Classifier([n], *norm)(images) for n in nets]
        by_hand = [-torch.log(torch.exp(z.double()).sum(1)).float() for z in logits]
        probs, energy = ensemble.probs_and_energy(images, 3.0)
        torch.testing.assert_close(energy, (by_hand[0] + by_hand[1]) / 2)
        assert torch.equal(probs, ensemble.probs(images, 3.0))  # the same numbers, to the bit


def test_clean_and_online_teachers_agree_when_nothing_is_noised():
    """Without augmentation or mixing the student's view is the clean image, so the teacher's
    outputs computed once ahead must train the student exactly like the teacher run per batch."""
    from noisy_student.core.settings import ModelTraining, RuntimeSettings
    from noisy_student.data.loaders import TrainingImages
    from noisy_student.data.splits import UNKNOWN, Split
    from noisy_student.losses.distill import Distillation, precompute
    from noisy_student.training.loop import FitConfig, fit
    from tests.helpers.project import load_params

    cpu = RuntimeSettings.model_validate(
        {**load_params()["runtime"], "device": "cpu", "num_workers": 0}
    )
    recipe = {k: v for k, v in load_params()["students"][0].items() if k not in ("name", "teacher")}
    recipe.update(model="test_resnet", epochs=1, warmup_epochs=0, batch_size=4, drop_rate=0.0)
    recipe.update(drop_path_rate=0.0, randaugment_n=0)
    spec = ModelTraining.model_validate(recipe)
    teacher = FrozenTeacher(
        Classifier([tiny_net(0), tiny_net(1)], [[0.5] * 3] * 2, [[0.2] * 3] * 2)
    )
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    rows = np.arange(8)
    carried = precompute(teacher, images, rows, 2.0, cpu, torch.device("cpu"), batch_size=3)
    with torch.no_grad():
        direct = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 2.0)
    np.testing.assert_allclose(carried, direct.numpy(), rtol=1e-5, atol=1e-6)
    val = Split(images[:2], ["a", "b"], np.array([0, 1]), np.full(2, UNKNOWN))
    weights = []
    for distill, probs in ((Distillation(2.0), carried), (Distillation(2.0, teacher), None)):
        items = TrainingImages(images, rows, np.zeros((8, 3)), np.ones(8), probs)
        torch.manual_seed(5)
        student = tiny_net(5)
        config = FitConfig(spec, cpu, torch.device("cpu"), 0, "s", 16, distill, lambda r: None)
        fit(student, items, val, config)
        weights.append(student.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=1e-4, atol=1e-5)


def test_clean_teacher_top_k_keeps_k_renormalized_entries_a_row_and_densifies_per_item():
    from noisy_student.core.settings import RuntimeSettings
    from noisy_student.data.loaders import TrainingImages
    from noisy_student.data.sparse import SparseRows
    from noisy_student.losses.distill import precompute
    from tests.helpers.project import load_params

    cpu = RuntimeSettings.model_validate({**load_params()["runtime"], "device": "cpu"})
    teacher = FrozenTeacher(Classifier([tiny_net(0)], [[0.5] * 3], [[0.2] * 3]))
    images = np.random.default_rng(1).integers(0, 255, (7, 16, 16, 3), dtype=np.uint8)
    rows = np.array([6, 0, 3, 3])
    dense = precompute(teacher, images, rows, 2.0, cpu, torch.device("cpu"), batch_size=3)
    top = precompute(teacher, images, rows, 2.0, cpu, torch.device("cpu"), 3, top_k=2)
    assert isinstance(top, SparseRows) and top.values.shape == (4, 2) and top.width == 3
    for i in range(4):  # the two largest entries of the dense row, renormalized; 0 elsewhere
        largest = np.argsort(-dense[i])[:2]
        expected = np.zeros(3, np.float32)
        expected[largest] = dense[i][largest] / dense[i][largest].sum()
        np.testing.assert_allclose(top[i], expected, rtol=1e-5)
    items = TrainingImages(images, rows, np.zeros((4, 3)), np.ones(4), top.take(np.arange(4)))
    torch.testing.assert_close(items[2][3], torch.from_numpy(top[2]))  # a dense row per item

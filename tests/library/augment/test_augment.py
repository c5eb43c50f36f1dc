"""Augmentation policies: built from params, saved, loaded back identical, previewed."""

from __future__ import annotations

import numpy as np
from PIL import Image

from noisy_student.augment.artifacts import augment
from noisy_student.augment.policy import TrainTransform, build_policy, load_policy, randaugment
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.loaders import ImageDataset, make_loader
from noisy_student.data.prepare import prepare


def test_saved_policy_replays_the_same_augmentations(tmp_path, tiny_params):
    settings = Settings.model_validate(tiny_params)
    layout = Layout.at(tmp_path)
    prepare(settings, layout)
    out = augment(settings, layout)
    assert out == layout.augment
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    built = build_policy(settings.augment.student, 16, seed=7)
    loaded = load_policy("student", seed=7, folder=out)
    for _ in range(5):
        a, b = built(image=image)["image"], loaded(image=image)["image"]
        assert a.shape == (16, 16, 3) and np.array_equal(a, b)
    preview = Image.open(out / "preview.png")
    assert preview.size[0] > 100 and preview.size[1] > 100


def test_student_noise_changes_images_more_than_teacher(tiny_params):
    settings = Settings.model_validate(tiny_params)
    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 6:10] = 255
    teacher = build_policy(settings.augment.teacher, 16, seed=0)
    student = build_policy(settings.augment.student, 16, seed=0)

    def mean_change(policy):
        return np.mean(
            [np.abs(policy(image=image)["image"].astype(int) - image).mean() for _ in range(50)]
        )

    assert mean_change(student) > mean_change(teacher) > 0


def test_ops_draw_from_one_stream_so_they_fire_independently(tiny_params):
    # each op seeded alike would draw the same numbers, so all ops would fire together
    settings = Settings.model_validate(tiny_params)
    policy = build_policy(settings.augment.student, 16, seed=0)
    assert all(op.random_generator is policy.random_generator for op in policy.transforms)


def test_loader_workers_augment_differently_and_reproducibly(tiny_params):
    settings = Settings.model_validate(tiny_params)
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[0, 4:12, 6:10] = 200
    images = np.repeat(image, 8, axis=0)

    def draws():
        policy = build_policy(settings.augment.student, 16, seed=0)
        dataset = ImageDataset(images, TrainTransform(policy, randaugment(2, 9, 16)))
        loader = make_loader(dataset, 1, shuffle=False, num_workers=2, pin_memory=False, seed=3)
        return [x.numpy() for x in loader]

    first, second = draws(), draws()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    # batches 0 and 1 come from different workers: their streams must differ
    assert not np.array_equal(first[0], first[1])


def test_randaugment_applies_n_ops_at_magnitude_m():
    """Each image goes through exactly N ops drawn from timm's list, each at magnitude M."""
    import random

    from PIL import Image

    policy = randaugment(num_ops=3, magnitude=7, image_size=16)
    assert policy.num_layers == 3 and len(policy.ops) >= 14
    assert {op.magnitude for op in policy.ops} == {7} and {op.prob for op in policy.ops} == {1.0}
    calls: list[str] = []

    class Counted:  # the real op, its calls recorded
        def __init__(self, op):
            self.op = op

        def __call__(self, img):
            calls.append(self.op.name)
            return self.op(img)

    policy.ops = [Counted(op) for op in policy.ops]
    random.seed(0)
    np.random.seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    names = []
    for _ in range(20):
        calls.clear()
        policy(image)
        assert len(calls) == 3
        names += calls
    assert len(set(names)) > 5  # drawn at random, not a fixed sequence

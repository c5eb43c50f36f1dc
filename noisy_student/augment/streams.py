"""Random streams that a training owns, for timm's augmentations that draw from global ones.

timm's RandAugment draws from Python's ``random`` and ``np.random`` (the module-level
generators), and its Mixup/CutMix from ``np.random``. In a long-lived process (the Prefect flow,
the served deployment) other code draws from those generators too, between and during the
trainings, so the same params gave different models under `dvc repro` and under the flow. timm
has no way to pass a generator in, so while they run, these modules' ``random`` and ``np`` names
point at generators the training owns (written here because no library offers it).

Seeded with the seed that seeded the global generators before, they draw the very numbers those
did in a process where nothing else drew: a `dvc repro` stage gives the models it gave before.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np


class _NumpyWithOwnRandom:
    """``numpy`` as a module sees it, but for ``np.random``: the owned generator."""

    def __init__(self, state: np.random.RandomState) -> None:
        self.random = state

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class OwnedRandom:
    """Python's and NumPy's generators for timm's augmentations, owned by one training."""

    def __init__(self, seed: int) -> None:
        self.python = random.Random(seed)
        self.numpy = np.random.RandomState(seed)

    def seed(self, seed: int) -> None:
        self.python.seed(seed)
        self.numpy.seed(seed)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """timm's augmentation modules draw from these generators inside the block."""
        from timm.data import auto_augment, mixup

        modules: list[tuple[ModuleType, str, Any]] = [
            (auto_augment, "random", self.python),
            (auto_augment, "np", _NumpyWithOwnRandom(self.numpy)),
            (mixup, "np", _NumpyWithOwnRandom(self.numpy)),
        ]
        saved = [(module, name, getattr(module, name)) for module, name, _ in modules]
        for module, name, value in modules:
            setattr(module, name, value)
        try:
            yield
        finally:
            for module, name, value in saved:
                setattr(module, name, value)

    def state(self) -> dict[str, Any]:
        """JSON-able: Python's state as lists, NumPy's MT19937 keys as a list of ints."""
        kind, keys, pos, has_gauss, gauss = self.numpy.get_state()
        return {
            "python": jsonable(self.python.getstate()),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.python.setstate(tupled(state["python"]))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        self.numpy.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def jsonable(value: Any) -> Any:
    """Tuples (Python's generator state) as JSON lists."""
    return [jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def tupled(value: Any) -> Any:
    """JSON lists back into the tuples ``random.setstate`` takes."""
    return tuple(tupled(v) for v in value) if isinstance(value, list) else value

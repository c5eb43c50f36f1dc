"""The prepared splits as torch datasets and loaders: what training and inference stream."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from noisy_student.data.sparse import SparseRows


class ImageDataset(Dataset):
    """Images ``images[indices]`` as uint8 CHW tensors, optionally augmented (``TrainTransform``).

    With a transform, images that keep a source (the encoded storage, data/shards.py) are handed
    to it at their stored size, for training to crop from. uint8 crosses the loader (a quarter of
    float32's bytes); normalization happens on the device."""

    def __init__(
        self, images: np.ndarray, transform: Any | None = None, indices: np.ndarray | None = None
    ) -> None:
        self.images = images
        self.transform = transform
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> torch.Tensor:
        row = int(self.indices[i])
        if self.transform is None:
            image = np.asarray(self.images[row])
        else:
            source = getattr(self.images, "source", None)
            image = self.transform(source(row) if source else np.asarray(self.images[row]))
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image(i)


class TrainingImages(ImageDataset):
    """Training items: (image, target distribution, distillation weight, teacher distribution).

    ``targets[i]`` (float32, one row per item) is what the cross-entropy term pulls the model
    towards, already scaled by that term's weight; ``kd_weights[i]`` is the weight of the
    distillation term (0 without a teacher); ``teacher_probs[i]`` is the teacher's distribution at
    temperature T on the clean image when it was computed ahead (an empty row otherwise). All mix
    linearly under MixUp/CutMix (noisy_student/losses/mixing.py), so the trainer needs to know
    nothing about where an item came from."""

    def __init__(
        self,
        images: np.ndarray,
        indices: np.ndarray,
        targets: np.ndarray | SparseRows,
        kd_weights: np.ndarray,
        teacher_probs: np.ndarray | SparseRows | None = None,
        transform: Any | None = None,
    ) -> None:
        super().__init__(images, transform, indices)
        if teacher_probs is None:
            teacher_probs = np.zeros((len(self.indices), 0), dtype=np.float32)
        if not len(targets) == len(kd_weights) == len(teacher_probs) == len(self.indices):
            raise ValueError("one target row, distillation weight and teacher row per item")
        # SparseRows (top-k pseudo-labels and teacher outputs) stay sparse: a dense row is made
        # per item
        self.targets = rows_of(targets)
        self.kd_weights = torch.from_numpy(np.asarray(kd_weights, dtype=np.float32))
        self.teacher_probs = rows_of(teacher_probs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.image(i), row(self.targets, i), self.kd_weights[i], row(self.teacher_probs, i)


def rows_of(matrix: np.ndarray | SparseRows) -> torch.Tensor | SparseRows:
    """A float32 tensor of an array's rows; SparseRows as they are."""
    if isinstance(matrix, SparseRows):
        return matrix
    return torch.from_numpy(np.asarray(matrix, dtype=np.float32))


def row(matrix: torch.Tensor | SparseRows, i: int) -> torch.Tensor:
    """Row ``i`` as a dense tensor."""
    return torch.from_numpy(matrix[i]) if isinstance(matrix, SparseRows) else matrix[i]


def _reseed_worker(worker_id: int) -> None:
    # albumentations' Compose keeps its own RNG, which every worker would otherwise copy as is.
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**32
    for dataset in parts(info.dataset):
        if dataset.transform is not None:
            dataset.transform.reseed(seed)


def parts(dataset: Dataset) -> list[ImageDataset]:
    """The ImageDatasets inside ``dataset`` (itself, or the parts of a ConcatDataset)."""
    if isinstance(dataset, ImageDataset):
        return [dataset]
    return [d for sub in getattr(dataset, "datasets", []) for d in parts(sub)]


MAX_AUTO_WORKERS = 8


def loader_workers(num_workers: int | str, device: torch.device, processes: int = 1) -> int:
    """``runtime.num_workers`` as a count. ``auto``: none when the model runs on the CPU (it
    uses every core; a worker measured slower, bench/README.md "Speed"); beside an accelerator,
    this process's share of the cores (``processes`` per machine) less one for the training
    loop, at least 1 and at most 8."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type == "cpu":
        return 0
    share = (os.cpu_count() or 1) // max(processes, 1)
    return min(MAX_AUTO_WORKERS, max(1, share - 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """``sampler``: the training order (``training_sampler``); the loader's own generator then
    only seeds the workers."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # training workers start afresh each epoch, seeded from the loader's generator, so that a
        # resumed training draws what an uninterrupted one would (noisy_student/training/resume.py)
        persistent_workers=num_workers > 0 and not shuffle and sampler is None,
        worker_init_fn=_reseed_worker if num_workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
    )


def training_sampler(dataset: Dataset, seed: int, rank: int, world_size: int) -> DistributedSampler:
    """This process's share of a fresh permutation every epoch (``set_epoch``), drawn from
    ``seed + epoch``. One process takes the whole permutation; with several, the union of their
    k-th batches is the k-th batch of that same permutation, so a DDP run sees the global batches
    a single process would (PyTorch's DistributedSampler)."""
    return DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )

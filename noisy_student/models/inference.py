"""Batched inference shared by validation, pseudo-labeling and evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from noisy_student.core.settings import RuntimeSettings
from noisy_student.data.loaders import ImageDataset, loader_workers, make_loader
from noisy_student.models.classifier import Classifier, Outputs

# validation and test batches: affects memory and speed only, never a result
EVAL_BATCH_SIZE = 256


def autocast(device: torch.device, runtime: RuntimeSettings):
    # bf16 needs no loss scaling; on the CPU autocast would slow small models down, so GPU only
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=runtime.amp and device.type == "cuda"
    )


def eval_loader(
    images: np.ndarray,
    batch_size: int,
    runtime: RuntimeSettings,
    device,
    indices: np.ndarray | None = None,
) -> DataLoader:
    """``images[indices]`` (all of them by default) in order, unaugmented."""
    dataset = ImageDataset(images, indices=indices)
    return make_loader(
        dataset,
        batch_size,
        shuffle=False,
        num_workers=loader_workers(runtime.num_workers, device, runtime.devices),
        pin_memory=device.type == "cuda",
        seed=0,
    )


def iter_probabilities(
    classifier: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    runtime: RuntimeSettings,
    temperature: float = 1.0,
) -> Iterator[torch.Tensor]:
    """Softmax probabilities at ``temperature`` (float32, on the CPU) batch by batch, as
    ``iter_outputs`` gives them."""
    for out in iter_outputs(classifier, loader, device, runtime, temperature):
        yield out.probs


@torch.inference_mode()
def iter_outputs(
    classifier: Classifier,
    loader: DataLoader,
    device: torch.device,
    runtime: RuntimeSettings,
    temperature: float = 1.0,
    features: bool = False,
    rows: int = 0,
) -> Iterator[Outputs]:
    """``classifier.outputs`` (probabilities at ``temperature``, the free energy and, with
    ``features``, the members' normalized features; float32, on the CPU) batch by batch, so a
    pool of any size streams. ``rows``: batches are gathered on the device until they hold that
    many rows and then copied at once: on a GPU, a copy per batch waits for the model each time
    and leaves it idle while the host turns the batch into table rows (bench/README.md "GPU").

    ``classifier`` takes pixels 0..255 (models.classifier.Classifier); an ensemble's
    probabilities and energies are its members' averages; its weights take the memory format
    of the batches (``device_memory_format`` at their size) in place."""
    classifier.eval()
    pending: list[Outputs] = []
    held = 0
    for index, images in enumerate(loader):
        memory_format = device_memory_format(device, runtime, min(images.shape[-2:]))
        if index == 0:  # the weights in the batches' format
            classifier.to(memory_format=memory_format)
        x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device, runtime):
            pending.append(classifier.outputs(x, temperature, features))
        held += len(x)
        if held >= rows:
            yield to_host(pending)
            pending, held = [], 0
    if pending:
        yield to_host(pending)


def to_host(outputs: list[Outputs]) -> Outputs:
    """Batches' outputs as one, on the CPU."""
    first = outputs[0]
    features = None
    if first.features is not None:
        features = [
            torch.cat([o.features[m] for o in outputs]).cpu() for m in range(len(first.features))
        ]
    return Outputs(
        torch.cat([o.probs for o in outputs]).cpu(),
        torch.cat([o.energy for o in outputs]).cpu(),
        features,
    )


def correct(
    classifier: torch.nn.Module,
    loader: DataLoader,
    labels: np.ndarray,
    device: torch.device,
    runtime: RuntimeSettings,
) -> np.ndarray:
    """Whether each image's most probable class is its label."""
    predictions = torch.cat(
        [p.argmax(1) for p in iter_probabilities(classifier, loader, device, runtime)]
    )
    return predictions.numpy() == labels


def accuracy(
    classifier: torch.nn.Module,
    loader: DataLoader,
    labels: np.ndarray,
    device: torch.device,
    runtime: RuntimeSettings,
) -> float:
    return float(correct(classifier, loader, labels, device, runtime).mean())


def device_memory_format(
    device: torch.device, runtime: RuntimeSettings, image_size: int
) -> torch.memory_format:
    """channels_last on CUDA, and on the CPU for images of at least
    ``runtime.cpu_channels_last_from`` pixels (oneDNN's NHWC convolutions pay there, not on small
    images: bench/README.md "channels_last on the CPU"); contiguous otherwise."""
    if not runtime.channels_last:
        return torch.contiguous_format
    on_cpu = device.type == "cpu" and runtime.cpu_channels_last_from is not None
    if device.type == "cuda" or (on_cpu and image_size >= runtime.cpu_channels_last_from):
        return torch.channels_last
    return torch.contiguous_format


def probability_table(
    probs: torch.Tensor,
    ids: list[str],
    classes: list[str],
    class_column: str,
    *,
    index_column: str | None = None,
    with_probs: bool = True,
) -> pd.DataFrame:
    """One row per image: ``id``, the predicted class's index (``index_column``, if named) and
    name (``class_column``), ``confidence``, and ``p_<class>`` for every class (``with_probs``).
    The one place model outputs become a table: pseudo-labels, test predictions, predict."""
    confidence, pred = probs.max(dim=1)
    columns: dict = {"id": ids}
    if index_column is not None:
        columns[index_column] = pred.numpy()
    columns[class_column] = [classes[i] for i in pred.tolist()]
    columns["confidence"] = confidence.numpy()
    table = pd.DataFrame(columns)
    if not with_probs:
        return table
    spread = pd.DataFrame(probs.numpy(), columns=[f"p_{c}" for c in classes])
    return pd.concat([table, spread], axis=1)

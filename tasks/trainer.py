"""The training loop shared by the teacher and every student."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import Dataset
from tqdm import tqdm

from tasks.data import Split, make_loader
from tasks.inference import EVAL_BATCH_SIZE, accuracy, autocast, device_memory_format, eval_loader
from tasks.models import Normalize, normalization
from tasks.settings import ModelTraining, RuntimeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float
    seconds: float


def fit(
    model: torch.nn.Module,
    train_set: Dataset,
    val: Split,
    spec: ModelTraining,
    runtime: RuntimeSettings,
    device: torch.device,
    seed: int,
    on_epoch: Callable[[EpochResult], None],
    desc: str,
) -> list[EpochResult]:
    """Train ``model`` in place with AdamW and a warmup + cosine schedule (timm's).

    The caller seeds the global RNGs (``seed_everything``) before it builds the model."""
    memory_format = device_memory_format(device, runtime)
    model.to(device=device, memory_format=memory_format)
    normalize = Normalize(*normalization(model)).to(device)
    pin = device.type == "cuda"
    # a lone sample in the last batch would break BatchNorm: drop that one only
    loader = make_loader(
        train_set,
        spec.batch_size,
        shuffle=True,
        num_workers=runtime.num_workers,
        pin_memory=pin,
        seed=seed,
        drop_last=len(train_set) % spec.batch_size == 1,
    )
    val_loader = eval_loader(val.images, EVAL_BATCH_SIZE, runtime, device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=spec.lr, weight_decay=spec.weight_decay)
    steps = len(loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=spec.epochs * steps,
        warmup_t=spec.warmup_epochs * steps,
        warmup_lr_init=spec.lr * 0.01,
        lr_min=spec.lr * 0.01,
        t_in_epochs=False,
    )
    criterion = torch.nn.CrossEntropyLoss()
    interactive = sys.stderr.isatty()
    history: list[EpochResult] = []
    bar = tqdm(range(1, spec.epochs + 1), desc=desc, unit="epoch", disable=not interactive)
    update = 0
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for images, targets in tqdm(loader, leave=False, unit="batch", disable=not interactive):
            x = normalize(images.to(device, non_blocking=True)).contiguous(
                memory_format=memory_format
            )
            y = targets.to(device, non_blocking=True)
            with autocast(device, runtime):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update += 1
            scheduler.step_update(update)
            loss_sum += loss.detach() * len(y)  # stays on the device: no host sync per batch
            seen += len(y)
        train_loss = float(loss_sum.item() / max(seen, 1))
        val_acc = accuracy(model, normalize, val_loader, val.labels, device, runtime)
        result = EpochResult(epoch, train_loss, val_acc, time.perf_counter() - start)
        history.append(result)
        on_epoch(result)
        bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.3f}")
        if not interactive and (epoch % max(1, spec.epochs // 5) == 0 or epoch == spec.epochs):
            log.info(
                "%s epoch %d/%d  train_loss %.4f  val_accuracy %.4f",
                desc,
                epoch,
                spec.epochs,
                train_loss,
                val_acc,
            )
    return history


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

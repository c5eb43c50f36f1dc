"""The training loop shared by the teacher and every student."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, random_seed
from torch.nn.parallel import DistributedDataParallel

from noisy_student.augment.batched import BatchAugment
from noisy_student.augment.streams import OwnedRandom
from noisy_student.core.errors import PipelineError
from noisy_student.core.progress import Progress, track
from noisy_student.core.settings import ModelTraining, RuntimeSettings
from noisy_student.data.loaders import (
    TrainingImages,
    loader_workers,
    make_loader,
    parts,
    training_sampler,
)
from noisy_student.data.splits import Split
from noisy_student.losses.distill import Distillation, student_loss
from noisy_student.losses.mixing import BatchMixer
from noisy_student.models.classifier import Classifier, normalization
from noisy_student.models.inference import (
    EVAL_BATCH_SIZE,
    accuracy,
    autocast,
    device_memory_format,
    eval_loader,
)
from noisy_student.models.transfer import create_optimizer, freeze_backbone, unfreeze_backbone
from noisy_student.training import distributed
from noisy_student.training.resume import MemberCheckpoint, RandomStreams

log = logging.getLogger(__name__)
WORKER_SEED_STRIDE = 7919  # rank r's DataLoader workers draw from seed + 7919 r


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float
    lr: float  # the head's learning rate at the end of the epoch
    lr_backbone: float  # the backbone's (its first layer's, under layer decay)
    seconds: float  # the epoch's training and validation
    val_seconds: float = 0.0  # its validation pass (0 in checkpoints written before it was kept)


@dataclass
class FitConfig:
    """How one network trains: its recipe, where, from which seed, and what to call on the way.

    ``on_epoch`` gets every epoch's result (rank 0 only); ``on_first_batch`` the first training
    batch as the model sees it (augmented, mixed; pixels 0..255), for a picture; ``checkpoint``
    is where the state is saved every few epochs and resumed from, if it holds one. ``keep``:
    which weights the model ends with, the last epoch's or those of its best validation epoch
    (``selection.epoch``); with ``spec.ema_decay`` they are the moving average's, which is also
    what every epoch validates. ``spec.epoch_patience``: the training stops once that many epochs
    in a row have not matched the best one (early stopping); ``keep`` still picks the weights."""

    spec: ModelTraining
    runtime: RuntimeSettings
    device: torch.device
    seed: int
    desc: str
    image_size: int  # the training crops' side: whether the CPU trains channels_last
    distill: Distillation | None = None
    on_epoch: Callable[[EpochResult], None] | None = None
    on_first_batch: Callable[[torch.Tensor], None] | None = None
    checkpoint: MemberCheckpoint | None = None
    keep: Literal["best", "last"] = "last"
    augment: BatchAugment | None = None  # augment.backend batched: the batch's augmentation


@dataclass
class BestEpoch:
    """The epoch of highest validation accuracy so far and a CPU copy of its weights; a later
    epoch that ties it replaces it (more training, same score)."""

    epoch: int = 0
    val_accuracy: float = -1.0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def offer(
        self, epoch: int, val_accuracy: float, model: torch.nn.Module, copy: bool = True
    ) -> None:
        """``copy``: keep the weights too (``keep`` best); the epoch alone serves the patience."""
        if val_accuracy >= self.val_accuracy:
            self.epoch, self.val_accuracy = epoch, val_accuracy
            if copy:
                state = model.state_dict()
                self.weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@dataclass
class _Loop:
    """The state one epoch hands the next."""

    model: torch.nn.Module
    validated: Classifier  # what rank 0 validates: the plain model, or its moving average
    trained: Classifier  # what the optimizer steps through (DDP-wrapped with several processes)
    loader: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    streams: RandomStreams
    mixer: BatchMixer
    memory_format: torch.memory_format
    ema: ModelEmaV3 | None = None  # rank 0's moving average of the weights (spec.ema_decay)
    update: int = 0
    best: BestEpoch = field(default_factory=BestEpoch)


def fit(
    model: torch.nn.Module, train_set: TrainingImages, val: Split, config: FitConfig
) -> list[EpochResult]:
    """Train ``model`` in place: AdamW over the transfer-learning parameter groups, timm's warmup
    + cosine schedule, MixUp/CutMix, and distillation when ``config.distill`` is given.

    The caller seeds the global RNGs (``seed_everything``) before it builds the model."""
    spec, here = config.spec, distributed.world()
    frozen = freeze_backbone(model) if spec.transfer == "linear_probe" else []
    loop = _set_up(model, train_set, config)
    history, done = _resume(loop, config)
    val_loader = eval_loader(val.images, EVAL_BATCH_SIZE, config.runtime, config.device)
    epochs = Progress(spec.epochs, config.desc, "epochs", initial=done, enabled=here.main)
    for epoch in range(done + 1, spec.epochs + 1):
        if _out_of_patience(loop, config, epoch - 1):
            break
        start = time.perf_counter()
        train_loss = _train_epoch(loop, config, epoch)
        if not here.main:  # rank 0 evaluates, logs and saves; the others only train
            _save(loop, config, epoch, [])
            continue
        validating = time.perf_counter()
        val_acc = accuracy(loop.validated, val_loader, val.labels, config.device, config.runtime)
        lr_head, lr_backbone = group_lrs(loop.optimizer)
        end = time.perf_counter()
        result = EpochResult(
            epoch, train_loss, val_acc, lr_head, lr_backbone, end - start, end - validating
        )
        history.append(result)
        loop.best.offer(epoch, val_acc, loop.validated.nets[0], copy=config.keep == "best")
        if config.on_epoch is not None:
            config.on_epoch(result)
        _save(loop, config, epoch, [asdict(r) for r in history])
        epochs.update(1, train_loss=f"{train_loss:.4f}", val_accuracy=f"{val_acc:.4f}")
    epochs.close()
    if config.keep == "best" and here.main and loop.best.weights:
        model.load_state_dict(loop.best.weights)
        log.info(
            "%s: kept epoch %d of %d (best validation accuracy %.4f%s)",
            config.desc, loop.best.epoch, spec.epochs, loop.best.val_accuracy,
            "" if loop.ema is None else ", weights averaged",
        )  # fmt: skip
    elif loop.ema is not None:
        model.load_state_dict(loop.ema.module.state_dict())
    if frozen:
        unfreeze_backbone(model, frozen)
    return history


def _out_of_patience(loop: _Loop, config: FitConfig, done: int) -> bool:
    """Whether the training stops after epoch ``done``: rank 0 decides (it alone validates), every
    process learns it. Checked before an epoch, not after one, so that a training resumed from a
    checkpoint stops exactly where one never interrupted stops."""
    patience = config.spec.epoch_patience
    if patience is None:
        return False
    here, best = distributed.world(), loop.best
    stop = here.main and best.epoch > 0 and done - best.epoch >= patience
    stop = not distributed.least(int(not stop))  # a collective: every process stops together
    if stop and here.main:
        log.info(
            "%s: stopped after epoch %d of %d: %d epochs without matching epoch %d's "
            "validation accuracy %.4f (epoch_patience %d)",
            config.desc, done, config.spec.epochs, done - best.epoch, best.epoch,
            best.val_accuracy, patience,
        )  # fmt: skip
    return stop


def _set_up(model: torch.nn.Module, train_set: TrainingImages, config: FitConfig) -> _Loop:
    """The model on its device, the data order, the optimizer and the schedule."""
    spec, runtime, device, here = config.spec, config.runtime, config.device, distributed.world()
    if spec.batch_size % here.size:
        raise PipelineError(
            f"batch_size {spec.batch_size} is the global batch: it must divide evenly among the "
            f"{here.size} training processes (runtime.devices x runtime.nodes)"
        )
    batch_size = spec.batch_size // here.size  # this process's share of the global batch
    memory_format = device_memory_format(device, runtime, config.image_size)
    model.to(device=device, memory_format=memory_format)
    mean, std = normalization(model)
    # evaluation runs on rank 0 alone, on the plain model (or its average): DDP's forward is a
    # collective call
    classifier = Classifier([model], [mean], [std]).to(device)  # shares the model's weights
    trained = validated = classifier
    if here.size > 1:  # gradients averaged across processes at every backward
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.index else None)
        trained = Classifier([ddp], [mean], [std]).to(device)
    if config.distill is not None and config.distill.online is not None:
        config.distill.online.classifier.to(device=device, memory_format=memory_format)
    sampler = training_sampler(train_set, config.seed, here.rank, here.size)
    # a lone sample in the last batch would break BatchNorm: drop that one only
    loader = make_loader(
        train_set,
        batch_size,
        shuffle=False,
        num_workers=loader_workers(runtime.num_workers, device, runtime.devices),
        pin_memory=device.type == "cuda",
        seed=config.seed + WORKER_SEED_STRIDE * here.rank,
        drop_last=len(sampler) % batch_size == 1,
        sampler=sampler,
    )
    optimizer = create_optimizer(model, spec)
    steps = len(loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=spec.epochs * steps,
        warmup_t=spec.warmup_epochs * steps,
        warmup_lr_init=spec.lr * 0.01,
        lr_min=spec.lr * 0.01,
        t_in_epochs=False,
    )
    scheduler.step_update(0)  # applies each group's lr_scale from the very first batch
    transforms = [d.transform for d in parts(train_set) if d.transform is not None]
    # the generators timm's RandAugment and Mixup draw from: one pair, as the global ones were
    # (augment.backend batched with arrays: no per-image transform; Mixup's own pair, per process)
    owned = (
        transforms[0].owned
        if transforms
        else OwnedRandom(config.seed + WORKER_SEED_STRIDE * here.rank)
    )
    policy = transforms[0].policy if transforms else None
    streams = RandomStreams(policy, owned, loader.generator, config.augment)
    # timm's warmup: a few hundred updates (a few-label training) average over about
    # update^(2/3) of them instead of waiting 1 / (1 - decay) updates for the start to fade
    ema = (
        ModelEmaV3(model, decay=spec.ema_decay, use_warmup=True)
        if spec.ema_decay is not None and here.main
        else None
    )
    if ema is not None:
        validated = Classifier([ema.module], [mean], [std]).to(device)
    return _Loop(
        model,
        validated,
        trained,
        loader,
        sampler,
        optimizer,
        scheduler,
        streams,
        BatchMixer(spec, owned),
        memory_format,
        ema,
    )


def _resume(loop: _Loop, config: FitConfig) -> tuple[list[EpochResult], int]:
    """The history and the last epoch done of the newest checkpoint every process has (they may
    be one apart after a kill); nothing and 0 without one."""
    if config.checkpoint is None:
        return [], 0
    saved = config.checkpoint.epochs()
    common = distributed.least(max(saved, default=0))
    if not (common and distributed.least(int(common in saved))):
        return [], 0
    state = config.checkpoint.load(loop.model, loop.optimizer, loop.streams, common)
    loop.update = state["update"]
    if "best_epoch" in state:
        best_weights = config.checkpoint.load_weights(common, "best")  # empty under keep last
        loop.best = BestEpoch(state["best_epoch"], state["best_val_accuracy"], best_weights)
    if loop.ema is not None:
        loop.ema.module.load_state_dict(config.checkpoint.load_weights(common, "ema"))
    loop.scheduler.step_update(loop.update)
    if distributed.world().main:
        log.info(
            "%s: resumed after epoch %d of %d", config.desc, state["epoch"], config.spec.epochs
        )
    return [EpochResult(**row) for row in state["history"]], state["epoch"]


def _train_epoch(loop: _Loop, config: FitConfig, epoch: int) -> float:
    """One pass over the training set; the mean loss over the global batch."""
    device, here = config.device, distributed.world()
    distill = config.distill
    temperature = distill.temperature if distill is not None else 1.0
    loop.sampler.set_epoch(epoch)
    loop.trained.train()
    loss_sum = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    # batches show on a terminal, and in logs only when an epoch takes minutes
    batches = f"{config.desc} epoch {epoch}"
    for images, targets, kd_weights, teacher_probs in track(
        loop.loader, len(loop.loader), batches, "batches", leave=False, min_interval=60,
        enabled=here.main,
    ):  # fmt: skip
        x = images.to(device, non_blocking=True).float()
        if config.augment is not None:
            x = config.augment(x)
        y = targets.to(device, non_blocking=True)
        k = kd_weights.to(device, non_blocking=True)
        q = teacher_probs.to(device, non_blocking=True)
        x, y, k, q = loop.mixer(x, y, k, q)
        x = x.contiguous(memory_format=loop.memory_format)
        if config.on_first_batch is not None and loop.update == 0 and here.main:
            config.on_first_batch(x.detach().clamp(0, 255).to(torch.uint8).cpu())
        with autocast(device, config.runtime):
            logits = loop.trained(x)
            soft = distill.targets(x, q) if distill is not None else None
        loss = student_loss(logits, y, k, soft, temperature)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.optimizer.step()
        loop.update += 1
        if loop.ema is not None:
            loop.ema.update(loop.model, step=loop.update)
        loop.scheduler.step_update(loop.update)
        loss_sum += loss.detach() * len(y)  # stays on the device: no host sync per batch
        seen += len(y)
    if here.size > 1:  # the loss over the global batch, as one process would report it
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(seen)
    return float(loss_sum.item() / max(seen.item(), 1))


def _save(loop: _Loop, config: FitConfig, epoch: int, history: list[dict]) -> None:
    if config.checkpoint is not None and config.checkpoint.due(epoch, config.spec.epochs):
        counters = {"epoch": epoch, "update": loop.update, "history": history}
        kept = {}  # saved too: a resumed run must still end with the best epoch's, the average's
        if loop.best.epoch:  # the patience counts from it, whichever weights are kept
            counters |= {"best_epoch": loop.best.epoch, "best_val_accuracy": loop.best.val_accuracy}
        if loop.best.weights:
            kept["best"] = loop.best.weights
        if loop.ema is not None:
            kept["ema"] = loop.ema.module.state_dict()
        config.checkpoint.save(loop.model, loop.optimizer, loop.streams, counters, kept)


def group_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """The head's learning rate and the lowest one of the backbone (nan if it is frozen)."""
    head = [g["lr"] for g in optimizer.param_groups if g["head"]]
    backbone = [g["lr"] for g in optimizer.param_groups if not g["head"]]
    return max(head), min(backbone) if backbone else float("nan")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (timm's helper)."""
    random_seed(seed)

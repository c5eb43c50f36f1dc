"""Speed benchmark: how close the pipeline's own loops run to the bare model on this hardware.

    python -m bench.speed                          # CPU here; CUDA where there is one
    python -m bench.speed --device cuda --compile  # GPU: bf16 autocast, channels_last, compiled
    python -m bench.speed --sizes 32 64 128 --seconds 10

Two ratios, each measured in one process, same model, batch and precision on both sides:

- **training**: ``noisy_student.training.loop.fit`` itself (its DataLoader over a memory-mapped
  prepared split, albumentations + RandAugment per image, CutMix/MixUp, the normalizing
  Classifier, the soft cross-entropy, the LR schedule) in images/s, divided by the bare forward +
  backward + optimizer step of the same network on a synthetic batch already on the device (as
  timm's benchmark.py measures: no data loading, no augmentation);
- **pseudo-labeling**: the pseudo_label stage's function
  (``noisy_student.pseudo_labels.labeling.pseudo_label``: model loading, the pool streamed from
  disk, the probabilities, the CSV table and its summary) in images/s, divided by bare inference
  of the same network on a synthetic on-device batch.

The bare model is measured right before and after each timed pass of the pipeline (between
``fit``'s epochs through its ``FitConfig.on_epoch`` hook, whose work is outside the epoch's
clock), the first epoch and a first pseudo-labeling pass warm up and are left out, and the ratio
is best over best (timeit's rule on a shared machine: other processes only ever slow a run
down), with the median ratio of neighbouring passes beside it. ``--compile`` compiles the network
in place (``nn.Module.compile``) on both sides of the training ratio; pseudo-labeling loads its
model from disk, so its ratio is always eager on both sides. Results go to
``<out>/speed_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.cli import save_results
from bench.synthetic import CLASSES, layout, write_model, write_pool
from noisy_student.augment.batched import BatchAugment
from noisy_student.augment.policy import build_policy, member_augmentation
from noisy_student.augment.streams import OwnedRandom
from noisy_student.core.settings import (
    PARAMS_FILE,
    ModelTraining,
    Settings,
    known_timm_model,
    load_settings,
)
from noisy_student.data.loaders import TrainingImages, loader_workers, make_loader
from noisy_student.data.splits import Split, load_split
from noisy_student.losses.mixing import one_hot
from noisy_student.models.classifier import create_model, resolve_device
from noisy_student.models.inference import autocast, device_memory_format
from noisy_student.models.transfer import create_optimizer
from noisy_student.pseudo_labels.labeling import pseudo_label
from noisy_student.training.loop import FitConfig, fit, seed_everything
from noisy_student.training.resume import Checkpoints

log = logging.getLogger("bench.speed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settings_for(
    params_file: Path, size: int, device: str, workers: int | None, backend: str | None = None
) -> Settings:
    overrides: dict[str, Any] = {
        "data.image_size": size,
        "runtime.device": device,
        "pseudo_label.threshold": 0.0,  # an untrained model's confidences: keep every row
    }
    if backend is not None:
        overrides["augment.backend"] = backend
    if workers is not None:
        overrides["runtime.num_workers"] = workers
    return load_settings(params_file, overrides)


def train_spec(settings: Settings, model: str, epochs: int) -> ModelTraining:
    """The final student's recipe (its noise: dropout, drop-path, RandAugment) with CutMix and
    MixUp on, so that every per-batch step of the loop is exercised, for network ``model``."""
    update = {"epochs": epochs, "warmup_epochs": 0, "cutmix_p": 0.5, "mixup_p": 0.2}
    return settings.students[-1].model_copy(update={**update, "model": known_timm_model(model)})


def new_model(spec: ModelTraining, device: torch.device, settings: Settings, compile_: bool):
    seed_everything(0)
    net = create_model(spec, len(CLASSES))
    fmt = device_memory_format(device, settings.runtime, settings.data.image_size)
    net.to(device=device, memory_format=fmt)
    if compile_:
        net.compile()  # in place: names and attributes stay those of the timm model
    return net


class BareTraining:
    """Forward + backward + optimizer step of the network on one synthetic batch already on the
    device, as timm's benchmark.py times a model: no data loading, no augmentation."""

    def __init__(
        self,
        spec: ModelTraining,
        settings: Settings,
        device: torch.device,
        size: int,
        compile_: bool,
        warmup: int = 3,
    ) -> None:
        self.device, self.runtime, self.batch = device, settings.runtime, spec.batch_size
        self.net = new_model(spec, device, settings, compile_).train()
        self.optimizer = create_optimizer(self.net, spec)
        fmt = device_memory_format(device, self.runtime, size)
        self.x = torch.randn(self.batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, len(CLASSES), (self.batch,), device=device)
        for _ in range(warmup):
            self.step()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.runtime):
            loss = F.cross_entropy(self.net(self.x).float(), self.y)
        loss.backward()
        self.optimizer.step()

    def __call__(self, steps: int) -> float:
        """Images/s over ``steps`` steps."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return self.batch * steps / (time.perf_counter() - start)


class BareInference:
    """The network's forward pass on one synthetic on-device batch, in inference mode."""

    def __init__(
        self,
        spec: ModelTraining,
        settings: Settings,
        device: torch.device,
        size: int,
        batch: int,
        warmup: int = 3,
    ) -> None:
        self.device, self.runtime, self.batch = device, settings.runtime, batch
        self.net = new_model(spec, device, settings, False).eval()
        fmt = device_memory_format(device, self.runtime, size)
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        self(warmup)

    @torch.inference_mode()
    def __call__(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            with autocast(self.device, self.runtime):
                self.net(self.x)
        sync(self.device)
        return self.batch * steps / (time.perf_counter() - start)


def training_set(
    settings: Settings, spec: ModelTraining, data_dir: Path
) -> tuple[TrainingImages, BatchAugment | None]:
    """A prepared split on disk as the students read theirs, with the students' augmentation:
    per image in the loader, or (``augment.backend: batched``) the batch's, which fit applies."""
    split = load_split("labeled", data_dir)
    targets = one_hot(split.labels, len(CLASSES), spec.label_smoothing)
    size = settings.data.image_size
    items = TrainingImages(
        split.images, np.arange(len(split)), targets, np.zeros(len(split), np.float32)
    )
    policy = build_policy(settings.augment.student, size, seed=0)
    items.transform, batched = member_augmentation(settings, spec, policy, OwnedRandom(0), 0)
    return items, batched


def interleaved_training(
    spec: ModelTraining,
    settings: Settings,
    device: torch.device,
    items: TrainingImages,
    val: Split,
    bare: BareTraining,
    steps: int,
    compile_: bool,
    work: Path,
    batched: BatchAugment | None = None,
) -> dict[str, list[float]]:
    """noisy_student.training.loop.fit itself, as a training runs it (checkpoints every
    ``runtime.checkpoint_epochs``), with a bare measurement before it and inside its
    ``on_epoch`` hook after every epoch, so that each epoch is compared with the bare speed
    measured right around it.

    fit's own epoch clock stops before the hook and the checkpoint, so an epoch's wall time is
    taken from the end of the previous hook to this hook: the previous epoch's checkpoint plus
    this epoch. Returns images/s per epoch from the second on (the first has no such start, and
    warms up), both ways, and the bare speeds around them."""
    net = new_model(spec, device, settings, compile_)
    every = settings.runtime.checkpoint_epochs
    checkpoint = Checkpoints(layout(work).checkpoints, "speed", every)
    around, ends, resumes = [bare(steps)], [], []

    def on_epoch(result) -> None:
        ends.append(time.perf_counter())
        around.append(bare(steps))
        resumes.append(time.perf_counter())

    config = FitConfig(
        spec, settings.runtime, device, 0, "speed", settings.data.image_size, on_epoch=on_epoch,
        checkpoint=checkpoint.member("speed"), augment=batched,
    )  # fmt: skip
    history = fit(net, items, val, config)
    walls = [end - resume for end, resume in zip(ends[1:], resumes, strict=False)]
    return {
        "fit_ips": [len(items) / w for w in walls],
        "fit_ips_no_checkpoint": [len(items) / r.seconds for r in history[1:]],
        "fit_ips_steps": [len(items) / (r.seconds - r.val_seconds) for r in history[1:]],
        "bare_train_ips": around[1:],
    }


def loader_alone(settings: Settings, spec: ModelTraining, items, device: torch.device) -> float:
    """Images/s of the training DataLoader by itself (read, augment, collate, copy to the
    device): the most the loop could do if the model took no time."""
    loader = make_loader(
        items,
        spec.batch_size,
        shuffle=True,
        num_workers=loader_workers(settings.runtime.num_workers, device),
        pin_memory=device.type == "cuda",
        seed=0,
    )
    start = time.perf_counter()
    for images, *_ in loader:
        images.to(device, non_blocking=True)
    sync(device)
    return len(items) / (time.perf_counter() - start)


def pipeline_pseudo_label(settings: Settings, root: Path, count: int) -> float:
    """Images/s of the whole pseudo_label stage on a prepared pool of ``count`` images."""
    start = time.perf_counter()
    pseudo_label(settings, "student_1", layout(root))
    return count / (time.perf_counter() - start)


def round_to(n: float, multiple: int, low: int, high: int) -> int:
    return int(min(max(round(n / multiple) * multiple, low), high))


def ratios(pipeline: list[float], around: list[float]) -> list[float]:
    """Each pipeline measurement over the mean of the bare ones just before and after it."""
    return [p / ((a + b) / 2) for p, a, b in zip(pipeline, around, around[1:], strict=False)]


# On a shared machine other processes only ever slow a measurement down, so the headline ratio
# is best over best (timeit's rule: the fastest run is the one least disturbed); the median of
# the ratios of neighbouring runs is reported beside it.


def measure_size(
    settings: Settings,
    model: str,
    size: int,
    seconds: float,
    epochs: int,
    compile_: bool,
    work: Path,
    repeats: int = 5,
) -> dict[str, Any]:
    device = resolve_device(settings.runtime)
    spec = train_spec(settings, model, epochs)
    batch = spec.batch_size
    log.info("size %d: calibrating", size)
    bare = BareTraining(spec, settings, device, size, compile_)
    # size the synthetic data so that each timed pass lasts about `seconds`
    probe = bare(3)
    train_images = round_to(probe * seconds, batch, 4 * batch, 200_000)
    steps = max(3, train_images // batch)
    write_pool(work / "train", train_images, size, split="labeled")
    items, batched = training_set(settings, spec, work / "train")
    val = load_split("labeled", work / "train")
    val = Split(val.images[:batch], val.ids[:batch], val.labels[:batch], val.true_labels[:batch])

    log.info("size %d: training, %d images per epoch, %d epochs", size, train_images, epochs)
    timed = interleaved_training(
        spec, settings, device, items, val, bare, steps, compile_, work, batched
    )
    fit_ips, bare_ips = timed["fit_ips"], timed["bare_train_ips"]
    del bare
    loader = loader_alone(settings, spec, items, device)

    infer_batch = settings.pseudo_label.batch_size
    teacher = spec.model_copy(update={"drop_rate": 0.0, "drop_path_rate": 0.0})
    infer = BareInference(teacher, settings, device, size, infer_batch)
    pool = round_to(infer(3) * seconds, infer_batch, 4 * infer_batch, 1_000_000)
    infer_steps = max(3, pool // infer_batch)
    log.info("size %d: pseudo-labeling, a pool of %d images, %d times", size, pool, repeats)
    write_pool(layout(work).prepared, pool, size)
    write_model(layout(work).model("teacher"), teacher, size)
    pipeline_pseudo_label(settings, work, pool)  # warm-up: the model, the pool's pages
    infer_ips = [infer(infer_steps)]
    label_ips = []
    for _ in range(repeats):
        label_ips.append(pipeline_pseudo_label(settings, work, pool))
        infer_ips.append(infer(infer_steps))
    return {
        "image_size": size,
        "model": spec.model,
        "train_batch": batch,
        "train_images_per_epoch": train_images,
        "bare_train_ips": bare_ips,
        "fit_ips": fit_ips,
        "fit_ips_no_checkpoint": timed["fit_ips_no_checkpoint"],
        "fit_ips_steps": timed["fit_ips_steps"],
        "checkpoint_epochs": settings.runtime.checkpoint_epochs,
        "train_ratio": max(fit_ips) / max(bare_ips),
        "train_ratio_median": statistics.median(ratios(fit_ips, bare_ips)),
        # fit's training steps alone (the loader, augmentation, mixing, step, schedule): what is
        # left of the training ratio once the validation pass and the checkpoints are taken out
        "train_steps_ratio": max(timed["fit_ips_steps"]) / max(bare_ips),
        "loader_alone_ips": loader,
        "infer_batch": infer_batch,
        "pool_images": pool,
        "bare_infer_ips": infer_ips,
        "pseudo_label_ips": label_ips,
        "pseudo_label_ratio": max(label_ips) / max(infer_ips),
        "pseudo_label_ratio_median": statistics.median(ratios(label_ips, infer_ips)),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def precision(settings: Settings, device: torch.device) -> str:
    runtime = settings.runtime
    if device.type != "cuda":
        cpu_from = runtime.cpu_channels_last_from if runtime.channels_last else None
        return "fp32" + (f", channels_last from {cpu_from} px" if cpu_from else "")
    amp = "bf16 autocast" if runtime.amp else "fp32"
    return amp + (", channels_last" if runtime.channels_last else "")


def render(result: dict[str, Any]) -> str:
    head = (
        f"Device: {result['device']}; torch {result['torch']}; {result['precision']}; "
        f"DataLoader workers {result['workers']}; augmentation "
        f"{result.get('augment_backend', 'per_image').replace('_', ' ')}; torch.compile "
        f"{'on' if result['compile'] else 'off'}; {result['date']}; "
        f"load average at the start {result['load_average']}.\n"
        f"Command: `{result['command']}`\n\n"
    )
    lines = [
        "| model | image size | batch (train / label) | bare fwd+bwd+step img/s | `fit` img/s "
        "| **training ratio** (median) | `fit` img/s without its checkpoints "
        "| training ratio of the steps alone (no validation, no checkpoints) | loader alone img/s "
        "| bare inference img/s | `pseudo_label` img/s | **pseudo-labeling ratio** (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['train_batch']} / {r['infer_batch']} | "
            f"{max(r['bare_train_ips']):.0f} | {max(r['fit_ips']):.0f} | "
            f"**{r['train_ratio']:.2f}** ({r['train_ratio_median']:.2f}) | "
            f"{max(r['fit_ips_no_checkpoint']):.0f} | {r['train_steps_ratio']:.2f} | "
            f"{r['loader_alone_ips']:.0f} | "
            f"{max(r['bare_infer_ips']):.0f} | "
            f"{max(r['pseudo_label_ips']):.0f} | "
            f"**{r['pseudo_label_ratio']:.2f}** ({r['pseudo_label_ratio_median']:.2f}) |"
        )
    return head + "\n".join(lines) + "\n"


def run(
    *,
    params_file: Path = PARAMS_FILE,
    device: str = "auto",
    sizes: tuple[int, ...] = (32, 128),
    model: str = "resnet18",
    workers: int | None = None,
    backend: str | None = None,
    compile_: bool = False,
    seconds: float = 3.0,
    epochs: int = 7,
    out_dir: Path | None = Path("bench/results"),
    command: str = "",
) -> dict[str, Any]:
    base = settings_for(params_file, sizes[0], device, workers, backend)
    torch_device = resolve_device(base.runtime)
    results = []
    for size in sizes:
        settings = settings_for(params_file, size, device, workers, backend)
        with tempfile.TemporaryDirectory(prefix=f"bench-speed-{size}-") as tmp:
            results.append(
                measure_size(settings, model, size, seconds, epochs, compile_, Path(tmp))
            )
        log.info("size %d: %s", size, json.dumps(results[-1]))
    result = {
        "device": device_name(torch_device),
        "device_type": torch_device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision(base, torch_device),
        "workers": loader_workers(
            base.runtime.num_workers if workers is None else workers, torch_device
        ),
        "compile": compile_,
        "augment_backend": base.augment.backend,
        "date": datetime.date.today().isoformat(),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": command,
        "sizes": results,
    }
    if out_dir is not None:
        suffix = "" if base.augment.backend == "per_image" else f"_{base.augment.backend}"
        stem = out_dir / f"speed_{torch_device.type}{suffix}"
        save_results(stem, result, render(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--model", default="resnet18", help="timm name, on both sides")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: params.yaml's, "
                   "auto: none on the CPU, the cores less one on a GPU)")  # fmt: skip
    p.add_argument("--backend", choices=["per_image", "batched"],
                   help="augment.backend (default: params.yaml's)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the trained network")
    p.add_argument("--seconds", type=float, default=3.0, help="about how long each timed pass")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    command = shlex.join(["python", "-m", "bench.speed", *sys.argv[1:]])
    result = run(
        params_file=Path(args.params),
        device=args.device,
        sizes=tuple(args.sizes),
        model=args.model,
        workers=args.workers,
        backend=args.backend,
        compile_=args.compile,
        seconds=args.seconds,
        out_dir=args.out,
        command=command,
    )
    print(render(result))


if __name__ == "__main__":
    main()

"""Training one model: the teacher on the labeled set, or a round's student on labeled +
pseudo-labels (the train_teacher and train_student stages).

The teacher may be an ensemble (``teacher.ensemble``): each member trains in turn, with its own
seed and MLflow run nested under the teacher's, and all of them are saved as one model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from noisy_student.augment.policy import load_policy, member_augmentation, seed_policy
from noisy_student.augment.streams import OwnedRandom
from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import ModelTraining, RuntimeSettings, Settings
from noisy_student.data.splits import Split, image_files, load_classes, load_split
from noisy_student.losses.distill import Distillation, FrozenTeacher, precompute
from noisy_student.models import promotion
from noisy_student.models.card import Member, ModelCard, load_card
from noisy_student.models.classifier import (
    Classifier,
    create_model,
    load_checkpoint,
    normalization,
    resolve_device,
    save_checkpoint,
    weights_name,
)
from noisy_student.models.inference import EVAL_BATCH_SIZE, correct, eval_loader
from noisy_student.tracking import runs as tracking
from noisy_student.tracking.logged_models import log_batch_image, log_model
from noisy_student.training import distributed
from noisy_student.training.items import attach_transform, training_items
from noisy_student.training.loop import EpochResult, FitConfig, fit, seed_everything
from noisy_student.training.resume import Checkpoints, MemberCheckpoint, fingerprint

log = logging.getLogger(__name__)
MEMBER_SEED_STRIDE = 1000  # ensemble member k trains with seed + 1000 * k
RANK_SEED_STRIDE = 100_003  # DDP process r augments with seed + 100003 * r


def round_of(settings: Settings, name: str) -> int:
    """0 for the teacher, r for student_r."""
    return settings.model_names().index(name)


@dataclass
class Job:
    """One model's training, everything settled before the first epoch."""

    name: str
    round: int
    role: str  # teacher | student
    spec: ModelTraining
    seed: int
    architectures: list[str]  # one network, or an ensemble teacher's members
    classes: list[str]
    train_set: Dataset
    val: Split
    labeled_count: int
    params: dict  # what MLflow records
    tags: dict[str, str]
    checkpoints: Checkpoints
    fit_member: Callable[..., tuple[torch.nn.Module, list[EpochResult]]]

    @property
    def labels(self) -> list[str]:
        if len(self.architectures) == 1:
            return [self.name]
        return [f"{self.name}.member_{k}" for k in range(len(self.architectures))]

    def member_seed(self, k: int) -> int:
        return self.seed + MEMBER_SEED_STRIDE * k


def train(
    settings: Settings,
    name: str,
    layout: Layout,
    *,
    parent: tracking.ParentRun | None = None,
) -> list[EpochResult]:
    """Train model ``name`` (``teacher`` or ``student_<r>``) and write ``models/<name>``.

    A training killed part-way resumes from its last checkpoint under ``layout.checkpoints``, in
    the same MLflow run. ``parent``: the orchestrator's MLflow run, under which this one is nested.
    """
    job = plan_job(settings, name, layout)
    here = distributed.world()
    if not here.main:  # the other processes of a DDP run: train alongside rank 0, write nothing
        for k, (architecture, label) in enumerate(zip(job.architectures, job.labels, strict=True)):
            checkpoint = job.checkpoints.member(f"{label}.rank{here.rank}")
            job.fit_member(architecture, job.member_seed(k), label, checkpoint)
        return []
    history = train_logged(settings, job, layout, parent)
    job.checkpoints.clear()
    return history


def skip_if_stopped(settings: Settings, name: str, layout: Layout) -> bool:
    """A round after the loop stopped finishes at once: its folder holds its standing alone."""
    if name == "teacher" or name not in settings.model_names():
        return False
    before = promotion.teacher_standing(settings, layout, name)
    if not before.stopped:
        return False
    standing = promotion.skipped(before, name)
    log.info("%s", standing.reason)
    with atomic_path(layout.model(name)) as staged:
        staged.mkdir()
        (staged / promotion.STANDING_FILE).write_text(standing.to_json())
    return True


def plan_job(settings: Settings, name: str, layout: Layout) -> Job:
    """The recipe, the training items, the MLflow params and the checkpoints of model ``name``."""
    if name not in settings.model_names():
        known = ", ".join(settings.model_names())
        raise PipelineError(f"unknown model '{name}' (params.yaml defines: {known})")
    round_ = round_of(settings, name)
    spec: ModelTraining = settings.teacher if round_ == 0 else settings.student(name)
    role = "teacher" if round_ == 0 else "student"
    seed = settings.seed + round_
    architectures = [spec.model, *(settings.teacher.ensemble if round_ == 0 else [])]
    classes = load_classes(layout.prepared)
    device = resolve_device(settings.runtime)
    distill, clean_teacher = distillation(settings, name, layout, device)
    train_set, labeled_count = training_items(settings, name, spec, classes, layout, clean_teacher)
    params = run_params(settings, spec, role, seed, len(train_set), labeled_count)
    log.info(
        "training %s (%s) on %d images on %s", name, "+".join(architectures), len(train_set), device
    )
    checkpoints = Checkpoints(
        layout.checkpoints / name,
        fingerprint([params, architectures], training_inputs(settings, name, role, layout)),
        settings.runtime.checkpoint_epochs,
    )
    val = load_split("val", layout.prepared)
    fit_member = functools.partial(
        train_member,
        settings,
        spec,
        train_set=train_set,
        val=val,
        classes=classes,
        policy=load_policy(role, seed, layout.augment),
        device=device,
        distill=distill,
    )
    tags = {"stage": role, "round": str(round_), "model_name": name}
    return Job(
        name, round_, role, spec, seed, architectures, classes, train_set, val, labeled_count,
        params, tags, checkpoints, fit_member,
    )  # fmt: skip


def distillation(
    settings: Settings, name: str, layout: Layout, device: torch.device
) -> tuple[Distillation | None, Callable[[np.ndarray, np.ndarray], Any] | None]:
    """The student's distillation from its frozen teacher (``distill.enabled``), and the
    teacher's clean-image outputs when they are computed ahead (``teacher_input: clean``)."""
    if name == "teacher" or not settings.distill.enabled:
        return None, None
    kd = settings.distill
    teacher = FrozenTeacher(
        load_checkpoint(layout.model(promotion.round_teacher(settings, layout, name)))[0]
    )
    if kd.teacher_input == "augmented":
        return Distillation(kd.temperature, online=teacher), None
    clean_teacher = functools.partial(
        precompute,
        teacher,
        temperature=kd.temperature,
        runtime=settings.runtime,
        device=device,
        batch_size=settings.pseudo_label.batch_size,
        top_k=settings.pseudo_label.top_k,
    )
    return Distillation(kd.temperature), clean_teacher


def run_params(
    settings: Settings, spec: ModelTraining, role: str, seed: int, images: int, labeled: int
) -> dict:
    """What the MLflow run records (and the checkpoints' fingerprint covers)."""
    params = {
        "seed": seed,
        "model": spec.model_dump(),
        "data": settings.data.model_dump(),
        "augment": {
            **getattr(settings.augment, role).model_dump(),
            "backend": settings.augment.backend,
        },
        "runtime": settings.runtime.model_dump(),
        "selection": settings.selection.model_dump(),  # which epoch is kept, and the promotion
        "train_images": images,
        "labeled_images": labeled,
    }
    if role == "student":
        params["pseudo_label"] = settings.pseudo_label.model_dump()
        params["distill"] = settings.distill.model_dump()
        params["pseudo_labeled_images"] = images - labeled
    return params


def training_inputs(settings: Settings, name: str, role: str, layout: Layout) -> list[Path]:
    """The files a checkpoint is only valid for: a resumed training must see the same ones."""
    data_dir = layout.prepared
    inputs = [*image_files(data_dir / "labeled"), data_dir / "labeled" / "index.csv"]
    inputs += [data_dir / "val" / "index.csv", layout.augment / f"{role}.json"]
    if role == "student":
        inputs.append(layout.pseudo_table(name))
        inputs.append(layout.model(settings.student(name).teacher) / promotion.STANDING_FILE)
        if settings.distill.enabled:
            teacher = promotion.round_teacher(settings, layout, name)
            inputs += sorted(layout.model(teacher).glob("*.safetensors"))
    return inputs


def train_logged(
    settings: Settings, job: Job, layout: Layout, parent: tracking.ParentRun | None
) -> list[EpochResult]:
    """Rank 0: every member trained under its MLflow run, then the model logged and saved."""
    resumed = job.checkpoints.run_ids()  # the MLflow runs of an interrupted attempt carry on
    tracking.fail_orphaned_runs(settings.mlflow, keep=set(resumed.values()))
    if parent is None:  # `dvc repro`: the loop's own run, the teacher's or handed down
        parent = loop_parent(settings, job, layout, resumed.get(tracking.LOOP_RUN))
        job.checkpoints.remember_run(tracking.LOOP_RUN, parent.run_id)
    here = distributed.world()
    nets, members, history, rows = [], [], [], []
    with tracking.training_run(
        settings.mlflow, job.name, job.tags, job.params, parent, run_id=resumed.get(job.name)
    ) as run:
        job.checkpoints.remember_run(job.name, run.info.run_id)
        for k, (architecture, label) in enumerate(zip(job.architectures, job.labels, strict=True)):
            # an ensemble's members get runs of their own, nested under the model's run
            member_run = (
                contextlib.nullcontext(run)
                if len(job.architectures) == 1
                else tracking.training_run(
                    settings.mlflow,
                    label,
                    {**job.tags, "member": str(k)},
                    {**job.params, "seed": job.member_seed(k), "member": k,
                     "architecture": architecture},
                    tracking.ParentRun(run.info.run_id, parent.tags if parent else {}),
                    run_id=resumed.get(label),
                )
            )  # fmt: skip
            with member_run as active:
                job.checkpoints.remember_run(label, active.info.run_id)
                rank_label = label if here.size == 1 else f"{label}.rank0"
                net, curve = job.fit_member(
                    architecture, job.member_seed(k), label, job.checkpoints.member(rank_label)
                )
            mean, std = normalization(net)
            members.append(Member(architecture, weights_name(k), mean, std, active.info.run_id))
            nets.append(net)
            history += curve
            rows += [{"member": label, **asdict(r)} for r in curve]
        card = ModelCard(
            name=job.name,
            classes=job.classes,
            image_size=settings.data.image_size,
            mlflow_run_id=run.info.run_id,
            members=members,
            loop_run_id=parent.run_id,
            eval_crop_pct=getattr(job.val.images, "crop_pct", None),
        )
        log_model(nets, card)
        curves = pd.DataFrame(rows).to_csv(index=False)
        val_correct = validation_correct(nets, members, job.val, settings)
        save_checkpoint(
            nets,
            card,
            layout.model(job.name),
            extra_files={"history.csv": curves},
            finish=functools.partial(write_standing, settings, job, layout, val_correct),
        )
    return history


def loop_parent(
    settings: Settings, job: Job, layout: Layout, resumed: str | None
) -> tracking.ParentRun:
    """The run a training nests under when no orchestrator gave one: the teacher opens the
    loop's (or carries on an interrupted attempt's); a student takes its declared teacher's."""
    if job.name == "teacher":
        run_id = resumed
    else:
        run_id = load_card(layout.model(settings.student(job.name).teacher)).loop_run_id
    return tracking.loop_run(settings.mlflow, run_id, settings.model_dump(mode="json"))


def validation_correct(
    nets: list[torch.nn.Module], members: list[Member], val: Split, settings: Settings
) -> str:
    """Which validation images the model as saved (an ensemble: its averaged probabilities)
    classifies right, as its standing keeps them."""
    device = next(nets[0].parameters()).device
    classifier = Classifier(nets, [m.mean for m in members], [m.std for m in members]).to(device)
    loader = eval_loader(val.images, EVAL_BATCH_SIZE, settings.runtime, device)
    right = correct(classifier.eval(), loader, val.labels, device, settings.runtime)
    return promotion.correctness(right)


def write_standing(
    settings: Settings, job: Job, layout: Layout, val_correct: str, staged: Path
) -> None:
    """Decide on validation whether this model is the best so far; record it in its folder and
    in its MLflow run (the active one)."""
    digest = promotion.weights_digest(staged)
    if job.round == 0:
        standing = promotion.first(job.name, val_correct, digest)
    else:
        before = promotion.teacher_standing(settings, layout, job.name)
        standing = promotion.after_round(before, job.name, val_correct, digest, settings.selection)
    (staged / promotion.STANDING_FILE).write_text(standing.to_json())
    log.info("%s", standing.reason)
    mlflow.log_metric("selected_val_accuracy", standing.val_accuracy)
    if standing.p_value is not None:
        mlflow.log_metric("promotion_p_value", standing.p_value)
    mlflow.set_tags(
        {"promoted": str(standing.promoted).lower(), "best_so_far": standing.best,
         "loop_stopped": str(standing.stopped).lower()}
    )  # fmt: skip


def train_member(
    settings: Settings,
    spec: ModelTraining,
    architecture: str,
    seed: int,
    desc: str,
    checkpoint: MemberCheckpoint,
    *,
    train_set: Dataset,
    val: Split,
    classes: list[str],
    policy,
    device: torch.device,
    distill: Distillation | None,
) -> tuple[torch.nn.Module, list[EpochResult]]:
    """One network, trained in place under the active MLflow run."""
    torch.set_num_threads(training_threads(settings.runtime))
    seed_everything(seed)
    seed_policy(policy, seed)
    owned = OwnedRandom(seed)  # RandAugment's and Mixup's: nothing else in the process draws them
    transform, batched = member_augmentation(settings, spec, policy, owned, seed)
    attach_transform(train_set, transform)
    net = create_model(spec, len(classes), architecture)
    rank = distributed.world().rank
    if rank > 0:  # the same initial weights everywhere, but each process its own noise
        seed_everything(seed + RANK_SEED_STRIDE * rank)
        if transform is not None:
            transform.reseed(seed + RANK_SEED_STRIDE * rank)
        if batched is not None:
            batched.reseed(seed + RANK_SEED_STRIDE * rank)

    def on_epoch(result: EpochResult) -> None:
        metrics = {
            "train_loss": result.train_loss,
            "val_accuracy": result.val_accuracy,
            "lr": result.lr,
            "epoch_seconds": result.seconds,
            "val_seconds": result.val_seconds,
        }
        if not np.isnan(result.lr_backbone):
            metrics["lr_backbone"] = result.lr_backbone
        mlflow.log_metrics(metrics, step=result.epoch)

    config = FitConfig(
        spec,
        settings.runtime,
        device,
        seed,
        desc,
        settings.data.image_size,
        distill=distill,
        on_epoch=on_epoch,
        on_first_batch=log_batch_image,
        checkpoint=checkpoint,
        keep=settings.selection.epoch,
        augment=batched,
    )
    history = fit(net, train_set, val, config)
    return net, history


def training_threads(runtime: RuntimeSettings) -> int:
    """torch's CPU threads for one training process: ``runtime.cpu_threads``, or this machine's
    cores shared among its training processes."""
    return runtime.cpu_threads or max(1, (os.cpu_count() or 1) // runtime.devices)


def check_round_flags(settings: Settings, name: str, flags: list[str]) -> None:
    """The ``--key value`` copies that dvc.yaml passes must match params.yaml."""
    if not flags:
        return
    entry = settings.student(name).model_dump()
    i = 0
    while i < len(flags):
        key = flags[i].removeprefix("--")
        if key not in entry:
            raise PipelineError(f"unknown option {flags[i]} for round '{name}'")
        expected = entry[key]
        if isinstance(expected, bool):
            given: object = True  # DVC unpacks true as a bare flag and drops false
            i += 1
        else:
            value = flags[i + 1] if i + 1 < len(flags) else None
            # DVC writes a null as None; a set value of an optional key arrives as a float
            if value in (None, "None"):
                given = None
            else:
                given = type(expected)(value) if expected is not None else float(value)
            i += 2
        if given != expected:
            raise PipelineError(f"{name}: --{key} {given} differs from params.yaml ({expected})")

"""Stage `train`: the teacher on the labeled set, or a round's student on labeled + pseudo-labels.

    python -m tasks.train --name teacher
    python -m tasks.train --name student_1

dvc.yaml also passes the round's other settings (``${item}`` unpacks to ``--model ... --lr ...``)
so that DVC reruns exactly the rounds whose entry changed; they are read from params.yaml, and
the command-line copies are only checked against it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from torch.utils.data import ConcatDataset, Dataset

from tasks import cli, tracking
from tasks.augment import AUGMENT_DIR, load_policy
from tasks.data import PREPARED_DIR, UNKNOWN, ImageDataset, Split, load_classes, load_split
from tasks.errors import PipelineError
from tasks.models import (
    MODELS_DIR,
    ModelCard,
    create_model,
    normalization,
    resolve_device,
    save_checkpoint,
)
from tasks.pseudo_label import PSEUDO_DIR, load_kept
from tasks.settings import ModelTraining, Settings
from tasks.trainer import EpochResult, fit, seed_everything

log = logging.getLogger(__name__)


def round_of(settings: Settings, name: str) -> int:
    """0 for the teacher, r for student_r."""
    return settings.model_names().index(name)


def student_dataset(
    settings: Settings, name: str, labeled: Split, data_dir: Path, pseudo_dir: Path, policy
) -> Dataset:
    """Labeled images plus the kept pseudo-labeled pool images, all under the student's noise."""
    pool = load_split("unlabeled", data_dir)
    indices, targets = load_kept(pseudo_dir / f"{name}.csv", pool)
    pool_targets = np.full(len(pool), UNKNOWN, dtype=np.int64)
    pool_targets[indices] = targets
    return ConcatDataset(
        [
            ImageDataset(labeled.images, labeled.labels, policy),
            ImageDataset(pool.images, pool_targets, policy, indices=indices),
        ]
    )


def train(
    settings: Settings,
    name: str,
    *,
    data_dir: Path = PREPARED_DIR,
    augment_dir: Path = AUGMENT_DIR,
    pseudo_dir: Path = PSEUDO_DIR,
    models_dir: Path = MODELS_DIR,
    parent: tracking.ParentRun | None = None,
) -> list[EpochResult]:
    """Train model ``name`` (``teacher`` or ``student_<r>``) and write ``models/<name>``.

    ``parent``: the orchestrator's MLflow run, under which this training run is nested.
    """
    if name not in settings.model_names():
        known = ", ".join(settings.model_names())
        raise PipelineError(f"unknown model '{name}' (params.yaml defines: {known})")
    round_ = round_of(settings, name)
    spec: ModelTraining = settings.teacher if round_ == 0 else settings.student(name)
    role = "teacher" if round_ == 0 else "student"
    seed = settings.seed + round_
    seed_everything(seed)

    classes = load_classes(data_dir)
    labeled = load_split("labeled", data_dir)
    val = load_split("val", data_dir)
    policy = load_policy(role, seed, augment_dir)
    if round_ == 0:
        train_set: Dataset = ImageDataset(labeled.images, labeled.labels, policy)
    else:
        train_set = student_dataset(settings, name, labeled, data_dir, pseudo_dir, policy)

    device = resolve_device(settings.runtime)
    model = create_model(spec, len(classes))
    mean, std = normalization(model)
    params = {
        "seed": seed,
        "model": spec.model_dump(),
        "data": settings.data.model_dump(),
        "augment": getattr(settings.augment, role).model_dump(),
        "runtime": settings.runtime.model_dump(),
        "train_images": len(train_set),
        "labeled_images": len(labeled),
    }
    if round_ > 0:
        params["pseudo_label"] = settings.pseudo_label.model_dump()
        params["pseudo_labeled_images"] = len(train_set) - len(labeled)
    tags = {"stage": role, "round": str(round_), "model_name": name}
    log.info("training %s (%s) on %d images on %s", name, spec.model, len(train_set), device.type)
    with tracking.training_run(settings.mlflow, name, tags, params, parent) as run:

        def on_epoch(result: EpochResult) -> None:
            mlflow.log_metrics(
                {
                    "train_loss": result.train_loss,
                    "val_accuracy": result.val_accuracy,
                    "epoch_seconds": result.seconds,
                },
                step=result.epoch,
            )

        history = fit(
            model, train_set, val, spec, settings.runtime, device, seed, on_epoch, desc=name
        )
        card = ModelCard(
            name=name,
            model=spec.model,
            classes=classes,
            image_size=settings.data.image_size,
            mean=mean,
            std=std,
            mlflow_run_id=run.info.run_id,
        )
        out = models_dir / name
        tracking.log_model(model, card)
        curves = pd.DataFrame([r.__dict__ for r in history]).to_csv(index=False)
        save_checkpoint(model, card, out, extra_files={"history.csv": curves})
    return history


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
            given = type(expected)(flags[i + 1]) if i + 1 < len(flags) else None
            i += 2
        if given != expected:
            raise PipelineError(f"{name}: --{key} {given} differs from params.yaml ({expected})")


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="teacher, student_1, student_2, ...")
    args, round_flags = p.parse_known_args()

    def run(args, settings: Settings) -> None:
        if args.name != "teacher":
            check_round_flags(settings, args.name, round_flags)
        elif round_flags:
            raise PipelineError(f"unexpected options for the teacher: {' '.join(round_flags)}")
        train(settings, args.name)

    cli.run(run, args)


if __name__ == "__main__":
    main()

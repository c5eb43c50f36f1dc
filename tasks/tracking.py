"""MLflow: one run per training, in the experiment named in params.yaml."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from tasks.models import ModelCard, Normalize
from tasks.settings import MlflowSettings

log = logging.getLogger(__name__)


def experiment_id(cfg: MlflowSettings) -> str:
    mlflow.set_tracking_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(cfg.experiment)
    except MlflowException:  # another process created it first
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are indexed (students.0.model)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@contextlib.contextmanager
def training_run(
    cfg: MlflowSettings, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FAILED if the body raises (mlflow.start_run does that)."""
    with mlflow.start_run(experiment_id=experiment_id(cfg), run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield run


def log_model(model: torch.nn.Module, card: ModelCard) -> None:
    """Log a self-contained model: float pixels in 0..255, N x 3 x H x W -> logits.

    Saved as a torch.export (pt2) program, which loads without unpickling code.
    """
    import timm

    wrapped = torch.nn.Sequential(Normalize(card.mean, card.std), model).cpu().eval()
    # two images, so torch.export keeps the batch dimension dynamic
    example = np.zeros((2, 3, card.image_size, card.image_size), dtype=np.float32)
    mlflow.pytorch.log_model(
        wrapped,
        name="model",
        input_example=example,
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
        metadata={"classes": card.classes, "image_size": card.image_size},
    )


def log_test_accuracy(cfg: MlflowSettings, run_id: str | None, value: float) -> None:
    if run_id is None:
        return
    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        mlflow.MlflowClient().log_metric(run_id, "test_accuracy", value)
    except MlflowException as exc:
        log.warning("could not log test_accuracy to MLflow run %s: %s", run_id, exc)

"""The MLflow model registry: every model of the loop as a version of one registered model, and
the alias ``champion`` on the loop's champion: the best on validation (models/promotion.py), never
chosen by test accuracy, which the versions only carry as a tag for people to read.

A version is the MLflow 3 logged model of the model's training run (tracking/logged_models.py),
registered once per run: evaluating again (a re-run, a flow run that skipped the trainings) finds
the version it made before instead of adding one. Load the champion anywhere with
``mlflow.pytorch.load_model("models:/<mlflow.registered_model>@champion")``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import mlflow
from mlflow.exceptions import MlflowException

from noisy_student.core.atomic import write_text
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import MlflowSettings, Settings
from noisy_student.models import promotion
from noisy_student.models.card import load_card
from noisy_student.tracking import runs as tracking

log = logging.getLogger(__name__)
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the name logged_models.log_model logs under


@dataclass(frozen=True)
class Entry:
    """One model of the loop: what it scored and where it sits in the registry."""

    model: str  # teacher, student_1, ...
    test_accuracy: float
    run_id: str | None  # its training run
    version: int | None  # None: not registered (no run, or its logged model is gone)


def logged_model_id(run_id: str) -> str | None:
    """The newest logged model named ``model`` of a run (a resumed training logs once more)."""
    run = mlflow.MlflowClient().get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        output_format="list",
    )
    return models[0].model_id if models else None


def register_version(
    client: mlflow.MlflowClient, name: str, run_id: str, tags: dict[str, str]
) -> int | None:
    """The version of registered model ``name`` made from run ``run_id``: the existing one, or a
    new one from the run's logged model. None when the run has no logged model."""
    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if existing:
        version = min(existing, key=lambda v: int(v.version))
    else:
        model_id = logged_model_id(run_id)
        if model_id is None:
            log.warning("registry: run %s has no logged model; not registered", run_id)
            return None
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
    for key, value in tags.items():  # test accuracy may be new since the version was made
        client.set_model_version_tag(name, version.version, key, value)
    return int(version.version)


def register(
    cfg: MlflowSettings,
    accuracies: dict[str, float],
    run_ids: dict[str, str | None],
    architectures: dict[str, str],
    champion: str,
    val_accuracies: dict[str, float],
) -> dict:
    """Register every model in ``accuracies`` (test accuracy, loop order) and point ``champion``
    at ``champion`` (chosen on validation).

    Returns what ``reports/registry.json`` holds: the registered model's name, the champion and
    one entry per model. A model without a run, or a store that fails, is logged and left out of
    the registry; the pipeline's results do not depend on it."""
    entries = []
    try:
        tracking.use_tracking_uri(tracking.tracking_uri(cfg))
        client = mlflow.MlflowClient()
        try:
            client.get_registered_model(cfg.registered_model)
        except MlflowException:
            client.create_registered_model(
                cfg.registered_model,
                description="Noisy Student self-training: one version per trained model "
                "(tags model_name, round, val_accuracy, test_accuracy); alias champion = the "
                "loop's best model on validation",
            )
        for round_, (name, accuracy) in enumerate(accuracies.items()):
            run_id = run_ids.get(name)
            version = None
            if run_id is not None:
                tags = {
                    "model_name": name,
                    "round": str(round_),
                    "architecture": architectures[name],
                    "val_accuracy": f"{val_accuracies[name]:.6f}",
                    "test_accuracy": f"{accuracy:.6f}",
                }
                version = register_version(client, cfg.registered_model, run_id, tags)
            entries.append(Entry(name, accuracy, run_id, version))
        best = next(e for e in entries if e.model == champion)
        if best.version is not None:
            client.set_registered_model_alias(cfg.registered_model, CHAMPION, str(best.version))
            log.info(
                "registry: %s version %s (%s, validation accuracy %.4f) is the %s",
                cfg.registered_model,
                best.version,
                champion,
                val_accuracies[champion],
                CHAMPION,
            )
    except MlflowException as exc:
        log.warning("registry: could not register the models in MLflow: %s", exc)
        entries = [Entry(name, acc, run_ids.get(name), None) for name, acc in accuracies.items()]
    return {
        "registered_model": cfg.registered_model,
        "alias": CHAMPION,
        "champion": champion,
        "models": [asdict(e) for e in entries],
    }


def point_champion(cfg: MlflowSettings, registry: dict) -> None:
    """Put ``champion`` back on the version ``registry`` (a reports/registry.json) names: after a
    flow run restored evaluate's outputs instead of running it."""
    version = next(
        (m["version"] for m in registry["models"] if m["model"] == registry["champion"]), None
    )
    if version is None:
        return
    try:
        tracking.use_tracking_uri(tracking.tracking_uri(cfg))
        mlflow.MlflowClient().set_registered_model_alias(
            registry["registered_model"], CHAMPION, str(version)
        )
    except MlflowException as exc:
        log.warning("registry: could not move the alias %s: %s", CHAMPION, exc)


def register_models(settings: Settings, layout: Layout) -> dict:
    """The register stage: every trained model of the loop into the registry, with the test
    accuracy evaluate measured, and the champion chosen on validation; writes what happened to
    ``layout.registry``."""
    metrics = json.loads(layout.metrics.read_text()) if layout.metrics.exists() else None
    if metrics is None:
        raise PipelineError(f"{layout.metrics}: not found; run the evaluate stage first")
    names = promotion.trained_models(settings, layout)
    missing = [n for n in names if n not in metrics]
    if missing:
        raise PipelineError(f"{layout.metrics}: no test accuracy for {missing}; run evaluate")
    cards = {name: load_card(layout.model(name)) for name in names}
    registered = register(
        settings.mlflow,
        {name: metrics[name]["test_accuracy"] for name in names},
        {name: card.mlflow_run_id for name, card in cards.items()},
        {name: card.model for name, card in cards.items()},
        promotion.champion(settings, layout),
        {name: metrics[name]["val_accuracy"] for name in names},
    )
    write_text(layout.registry, json.dumps(registered, indent=2) + "\n")
    return registered

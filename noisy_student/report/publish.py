"""The report in MLflow: artifacts of the flow's parent run, or of a run of its own."""

from __future__ import annotations

import logging

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.models.card import load_card
from noisy_student.models.promotion import final_standing
from noisy_student.report.plots import IMAGES
from noisy_student.tracking import runs as tracking

log = logging.getLogger(__name__)


def attach_to_run(settings: Settings, run_id: str, layout: Layout) -> None:
    """The page and its pictures as artifacts of run ``run_id``, under ``report/``."""
    client = mlflow.MlflowClient(tracking.tracking_uri(settings.mlflow))
    client.log_artifact(run_id, str(layout.report), "report")
    client.log_artifacts(run_id, str(layout.plots / IMAGES), "report/plots")


def log_to_mlflow(
    settings: Settings,
    layout: Layout,
    rounds: pd.DataFrame,
    champion: str,
    parent: tracking.ParentRun | None,
) -> str | None:
    """The report in MLflow: in the flow's parent run, or in a run of its own (``report``, tagged
    ``stage=report``, with each model's test accuracy) under plain ``dvc repro``, nested in the
    loop's run (the champion's card names it), which gets the champion and how the loop ended as
    tags, as a flow's parent run does."""
    cfg = settings.mlflow
    try:
        if parent is not None:
            attach_to_run(settings, parent.run_id, layout)
            return parent.run_id
        client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
        tags = {"stage": "report", "champion": champion, **tracking.process_tags()}
        loop = load_card(layout.model(champion)).loop_run_id
        if loop is not None:
            tags["mlflow.parentRunId"] = loop
            client.set_tag(loop, "champion", champion)
            client.set_tag(loop, "loop_end", final_standing(settings, layout).reason)
        run_id = client.create_run(
            tracking.experiment_id(cfg), run_name="report", tags=tags
        ).info.run_id
        try:
            attach_to_run(settings, run_id, layout)
            for r in rounds.to_dict("records"):
                client.log_metric(run_id, f"test_accuracy/{r['model']}", r["test_accuracy"])
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except MlflowException as exc:
        log.warning("could not log the report to MLflow: %s", exc)
        return None

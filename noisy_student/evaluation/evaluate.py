"""Test accuracy of the teacher and every student: the one reader of the test set.

Writes ``metrics.json`` (per model: ``test_accuracy``, ``val_accuracy``, ``test_macro_f1``,
``test_ece`` (calibration), per-class ``test_precision`` and ``test_recall``; for
``dvc metrics show/diff``), ``reports/comparison.md``, each model's test predictions
(``reports/test_predictions/<model>.csv``: ``id``, ``actual``, ``predicted``, ``confidence``; the
report's confusion matrices); logs the test scores to each model's MLflow run. The register
stage then registers the models (noisy_student/tracking/registry.py). The test set is read here
only: no training stage ever sees it.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import torch

from noisy_student.core.atomic import atomic_path, write_text
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.splits import Split, load_split
from noisy_student.evaluation.rounds import comparison_markdown, rounds_table
from noisy_student.evaluation.scores import scores_on_test
from noisy_student.models import promotion
from noisy_student.models.classifier import Classifier, load_checkpoint, resolve_device
from noisy_student.models.inference import (
    EVAL_BATCH_SIZE,
    accuracy,
    eval_loader,
    iter_probabilities,
    probability_table,
)
from noisy_student.tracking import runs as tracking

log = logging.getLogger(__name__)


def predictions_table(probs: torch.Tensor, test: Split, classes: list[str]) -> pd.DataFrame:
    """One row per test image: the true and the predicted class by name, and the confidence
    (DVC's ``confusion`` template reads ``actual`` and ``predicted``)."""
    table = probability_table(probs, test.ids, classes, "predicted", with_probs=False)
    table.insert(1, "actual", [classes[i] for i in test.labels.tolist()])
    return table


def evaluate(
    settings: Settings,
    layout: Layout,
) -> dict:
    device = resolve_device(settings.runtime)
    test = load_split("test", layout.prepared)
    loader = eval_loader(test.images, EVAL_BATCH_SIZE, settings.runtime, device)
    metrics: dict = {}
    with atomic_path(layout.test_predictions) as staged_predictions:
        staged_predictions.mkdir()
        for name in promotion.trained_models(settings, layout):
            classifier, card = load_checkpoint(layout.model(name), device)
            batches = iter_probabilities(classifier, loader, device, settings.runtime)
            probs = torch.cat(list(batches))
            table = predictions_table(probs, test, card.classes)
            table.to_csv(staged_predictions / f"{name}.csv", index=False, float_format="%.6g")
            confidence, predicted = (t.numpy() for t in probs.max(1))
            acc = float((predicted == test.labels).mean())
            standing = promotion.load_standing(layout.model(name))
            metrics[name] = {
                "test_accuracy": acc,
                "val_accuracy": standing.val_accuracy,  # what every choice was made on
                **scores_on_test(test.labels, predicted, confidence, card.classes),
                "model": card.model,
            }
            scores = {k: v for k, v in metrics[name].items() if k.startswith("test_")}
            tracking.log_test_metrics(settings.mlflow, card.mlflow_run_id, scores)
            if len(card.members) > 1:  # an ensemble: how each member does alone
                for k, (net, member) in enumerate(zip(classifier.nets, card.members, strict=True)):
                    alone = Classifier([net], [member.mean], [member.std])
                    member_acc = accuracy(alone, loader, test.labels, device, settings.runtime)
                    metrics[name][f"member_{k}_test_accuracy"] = member_acc
                    tracking.log_test_metrics(
                        settings.mlflow, member.mlflow_run_id, {"test_accuracy": member_acc}
                    )
    final = promotion.final_standing(settings, layout)
    table = comparison_markdown(rounds_table(settings, layout, metrics), final)
    # metrics.json holds numbers only (per-class ones nested), so `dvc metrics diff` compares
    # every entry
    numbers = {name: {k: v for k, v in m.items() if k != "model"} for name, m in metrics.items()}
    write_text(layout.metrics, json.dumps(numbers, indent=2) + "\n")
    write_text(layout.comparison, f"# Test accuracy per round ({len(test)} test images)\n\n{table}")
    log.info("\n%s", table)
    return metrics

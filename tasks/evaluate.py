"""Stage `evaluate`: test accuracy of the teacher and every student.

Writes ``metrics.json`` (``{"teacher": {"test_accuracy": ...}, "student_1": {...}, ...}``, for
``dvc metrics show/diff``), ``reports/comparison.md``, each model's test predictions
(``reports/test_predictions/<model>.csv``: ``id``, ``actual``, ``predicted``, ``confidence``; the
report's confusion matrices) and ``reports/registry.json``; logs ``test_accuracy`` to each model's
MLflow run and registers every model in the MLflow model registry, the best as ``champion``
(tasks/registry.py). The test set is read here only: no training stage ever sees it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from tasks import cli, registry, tracking
from tasks.atomic import atomic_path, write_text
from tasks.data import PREPARED_DIR, Split, load_split
from tasks.inference import EVAL_BATCH_SIZE, accuracy, eval_loader, iter_probabilities
from tasks.models import MODELS_DIR, Classifier, load_checkpoint, resolve_device
from tasks.pseudo_label import PSEUDO_DIR
from tasks.settings import Settings

log = logging.getLogger(__name__)
METRICS_FILE = Path("metrics.json")
COMPARISON_FILE = Path("reports/comparison.md")
PREDICTIONS_DIR = Path("reports/test_predictions")
REGISTRY_FILE = Path("reports/registry.json")


def predictions_table(probs: torch.Tensor, test: Split, classes: list[str]) -> pd.DataFrame:
    """One row per test image: the true and the predicted class by name, and the confidence
    (DVC's ``confusion`` template reads ``actual`` and ``predicted``)."""
    confidence, pred = probs.max(dim=1)
    return pd.DataFrame(
        {
            "id": test.ids,
            "actual": [classes[i] for i in test.labels.tolist()],
            "predicted": [classes[i] for i in pred.tolist()],
            "confidence": confidence.numpy(),
        }
    )


def comparison_table(settings: Settings, metrics: dict, pseudo_dir: Path) -> str:
    teacher_acc = metrics["teacher"]["test_accuracy"]
    lines = [
        "| model | architecture | pseudo-labels kept | kept correct | test accuracy | vs teacher |",
        "|---|---|---|---|---|---|",
    ]
    for name in settings.model_names():
        m = metrics[name]
        kept = correct = "-"
        summary_path = pseudo_dir / f"{name}.json"
        if name != "teacher" and summary_path.exists():
            summary = json.loads(summary_path.read_text())
            kept = f"{summary['kept']}/{summary['pool_images']}"
            if summary.get("kept_accuracy") is not None:
                correct = f"{100 * summary['kept_accuracy']:.1f}%"
        delta = "" if name == "teacher" else f"{100 * (m['test_accuracy'] - teacher_acc):+.1f} pts"
        lines.append(
            f"| {name} | {m['model']} | {kept} | {correct} | "
            f"{100 * m['test_accuracy']:.1f}% | {delta} |"
        )
    return "\n".join(lines) + "\n"


def evaluate(
    settings: Settings,
    *,
    data_dir: Path = PREPARED_DIR,
    models_dir: Path = MODELS_DIR,
    pseudo_dir: Path = PSEUDO_DIR,
    metrics_file: Path = METRICS_FILE,
    comparison_file: Path = COMPARISON_FILE,
    predictions_dir: Path = PREDICTIONS_DIR,
    registry_file: Path = REGISTRY_FILE,
) -> dict:
    device = resolve_device(settings.runtime)
    test = load_split("test", data_dir)
    loader = eval_loader(test.images, EVAL_BATCH_SIZE, settings.runtime, device)
    metrics: dict = {}
    run_ids: dict[str, str | None] = {}
    with atomic_path(predictions_dir) as staged_predictions:
        staged_predictions.mkdir()
        for name in settings.model_names():
            classifier, card = load_checkpoint(models_dir / name, device)
            batches = iter_probabilities(classifier, loader, device, settings.runtime)
            probs = torch.cat(list(batches))
            table = predictions_table(probs, test, card.classes)
            table.to_csv(staged_predictions / f"{name}.csv", index=False, float_format="%.6g")
            acc = float((probs.argmax(1).numpy() == test.labels).mean())
            metrics[name] = {"test_accuracy": acc, "model": card.model}
            run_ids[name] = card.mlflow_run_id
            tracking.log_test_accuracy(settings.mlflow, card.mlflow_run_id, acc)
            if len(card.members) > 1:  # an ensemble: how each member does alone
                for k, (net, member) in enumerate(zip(classifier.nets, card.members, strict=True)):
                    alone = Classifier([net], [member.mean], [member.std])
                    member_acc = accuracy(alone, loader, test.labels, device, settings.runtime)
                    metrics[name][f"member_{k}_test_accuracy"] = member_acc
                    tracking.log_test_accuracy(settings.mlflow, member.mlflow_run_id, member_acc)
    registered = registry.register(
        settings.mlflow,
        {name: m["test_accuracy"] for name, m in metrics.items()},
        run_ids,
        {name: m["model"] for name, m in metrics.items()},
    )
    write_text(registry_file, json.dumps(registered, indent=2) + "\n")
    table = comparison_table(settings, metrics, pseudo_dir)
    # metrics.json holds numbers only, so `dvc metrics diff` compares every entry
    numbers = {
        name: {k: v for k, v in m.items() if k.endswith("test_accuracy")}
        for name, m in metrics.items()
    }
    write_text(metrics_file, json.dumps(numbers, indent=2) + "\n")
    write_text(comparison_file, f"# Test accuracy per round ({len(test)} test images)\n\n{table}")
    log.info("\n%s", table)
    return metrics


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    cli.run(lambda args, settings: evaluate(settings), p.parse_args())


if __name__ == "__main__":
    main()

"""Stage `evaluate`: test accuracy of the teacher and every student.

Writes ``metrics.json`` (``{"teacher": {"test_accuracy": ...}, "student_1": {...}, ...}``, for
``dvc metrics show/diff``) and ``reports/comparison.md``, and logs ``test_accuracy`` to each
model's MLflow run. The test set is read here only: no training stage ever sees it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks import cli, tracking
from tasks.atomic import write_text
from tasks.data import PREPARED_DIR, load_split
from tasks.inference import EVAL_BATCH_SIZE, accuracy, eval_loader
from tasks.models import MODELS_DIR, Classifier, load_checkpoint, resolve_device
from tasks.pseudo_label import PSEUDO_DIR
from tasks.settings import Settings

log = logging.getLogger(__name__)
METRICS_FILE = Path("metrics.json")
COMPARISON_FILE = Path("reports/comparison.md")


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
) -> dict:
    device = resolve_device(settings.runtime)
    test = load_split("test", data_dir)
    loader = eval_loader(test.images, EVAL_BATCH_SIZE, settings.runtime, device)
    metrics: dict = {}
    for name in settings.model_names():
        classifier, card = load_checkpoint(models_dir / name, device)
        acc = accuracy(classifier, loader, test.labels, device, settings.runtime)
        metrics[name] = {"test_accuracy": acc, "model": card.model}
        tracking.log_test_accuracy(settings.mlflow, card.mlflow_run_id, acc)
        if len(card.members) > 1:  # an ensemble: how each member does alone
            for k, (net, member) in enumerate(zip(classifier.nets, card.members, strict=True)):
                alone = Classifier([net], [member.mean], [member.std])
                member_acc = accuracy(alone, loader, test.labels, device, settings.runtime)
                metrics[name][f"member_{k}_test_accuracy"] = member_acc
                tracking.log_test_accuracy(settings.mlflow, member.mlflow_run_id, member_acc)
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

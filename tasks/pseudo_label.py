"""Stage `pseudo_label`: the round's teacher labels the whole unlabeled pool.

    python -m tasks.pseudo_label student_1     # labels for student_1, made by its teacher

Writes ``pseudo_labels/<student>.csv``, one row per pool image: ``id``, ``pred`` (class index),
``pred_class``, ``confidence``, ``kept`` (confidence >= pseudo_label.threshold) and ``p_<class>``,
the full probability vector; plus ``pseudo_labels/<student>.json``, a summary that reports the
accuracy of the kept labels when the pool's truth is known (the demo).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from tasks import cli
from tasks.atomic import atomic_path
from tasks.data import PREPARED_DIR, UNKNOWN, Split, load_split
from tasks.errors import PipelineError
from tasks.inference import eval_loader, iter_probabilities
from tasks.models import MODELS_DIR, load_for_inference, resolve_device
from tasks.settings import Settings

log = logging.getLogger(__name__)
PSEUDO_DIR = Path("pseudo_labels")


def label_rows(
    probs: torch.Tensor, ids: list[str], classes: list[str], threshold: float
) -> pd.DataFrame:
    confidence, pred = probs.max(dim=1)
    table = pd.DataFrame(
        {
            "id": ids,
            "pred": pred.numpy(),
            "pred_class": [classes[i] for i in pred.tolist()],
            "confidence": confidence.numpy(),
            "kept": (confidence >= threshold).numpy(),
        }
    )
    columns = pd.DataFrame(probs.numpy(), columns=[f"p_{c}" for c in classes])
    return pd.concat([table, columns], axis=1)


def summarize(table: pd.DataFrame, pool: Split, classes: list[str], threshold: float) -> dict:
    kept = table["kept"].to_numpy()
    pred = table["pred"].to_numpy()
    counts = np.bincount(pred[kept], minlength=len(classes))
    summary: dict = {
        "threshold": threshold,
        "pool_images": int(len(table)),
        "kept": int(kept.sum()),
        "kept_fraction": float(kept.mean()),
        "kept_per_class": {c: int(n) for c, n in zip(classes, counts, strict=True)},
    }
    if (pool.true_labels != UNKNOWN).all():
        correct = pred == pool.true_labels
        summary["pool_accuracy"] = float(correct.mean())
        summary["kept_accuracy"] = float(correct[kept].mean()) if kept.any() else None
    return summary


def pseudo_label(
    settings: Settings,
    student: str,
    *,
    data_dir: Path = PREPARED_DIR,
    models_dir: Path = MODELS_DIR,
    out_dir: Path = PSEUDO_DIR,
) -> dict:
    """Label the pool with the teacher of round ``student``; write the table and its summary."""
    teacher = settings.student(student).teacher
    cfg = settings.pseudo_label
    device = resolve_device(settings.runtime)
    model, normalize, card = load_for_inference(models_dir / teacher, device)
    pool = load_split("unlabeled", data_dir)
    if len(pool) == 0:
        raise PipelineError(f"{data_dir}/unlabeled: the unlabeled pool is empty")
    loader = eval_loader(pool.images, cfg.batch_size, settings.runtime, device)
    log.info("%s labels %d pool images for %s", teacher, len(pool), student)

    chunks = []
    with (
        atomic_path(out_dir / f"{student}.csv") as tmp,
        tqdm(
            total=len(pool),
            desc=f"pseudo-label ({teacher})",
            unit="img",
            disable=not sys.stderr.isatty(),
        ) as bar,
    ):
        start = 0
        for i, probs in enumerate(
            iter_probabilities(model, normalize, loader, device, settings.runtime)
        ):
            rows = label_rows(
                probs, pool.ids[start : start + len(probs)], card.classes, cfg.threshold
            )
            # streamed to disk batch by batch; only the small columns stay in memory
            rows.to_csv(tmp, mode="a", header=i == 0, index=False, float_format="%.6g")
            chunks.append(rows[["pred", "confidence", "kept"]])
            start += len(probs)
            bar.update(len(probs))
        table = pd.concat(chunks, ignore_index=True)
        summary = summarize(table, pool, card.classes, cfg.threshold)
        if summary["kept"] == 0:
            raise PipelineError(
                f"pseudo_label.threshold={cfg.threshold} keeps none of {len(pool)} pool images "
                f"(highest confidence {table['confidence'].max():.3f}); lower the threshold"
            )
    with atomic_path(out_dir / f"{student}.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    accuracy = summary.get("kept_accuracy")
    log.info(
        "kept %d/%d pseudo-labels (%.1f%%)%s",
        summary["kept"],
        summary["pool_images"],
        100 * summary["kept_fraction"],
        f", {100 * accuracy:.1f}% of them correct" if accuracy is not None else "",
    )
    return summary


def load_kept(path: Path, pool: Split) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices and hard labels of the kept rows of a pseudo-label table."""
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the pseudo_label stage first")
    table = pd.read_csv(path, usecols=["id", "pred", "kept"], dtype={"id": str})
    if table["id"].tolist() != pool.ids:
        raise PipelineError(f"{path}: rows do not match the prepared unlabeled pool; re-run it")
    kept = table["kept"].to_numpy(bool)
    return np.flatnonzero(kept), table["pred"].to_numpy(np.int64)[kept]


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("student", help="the round's student: student_1, student_2, ...")
    cli.run(lambda args, settings: pseudo_label(settings, args.student), p.parse_args())


if __name__ == "__main__":
    main()

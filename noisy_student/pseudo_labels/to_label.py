"""Which pool images a person should label next: where the loop is least sure.

    python -m noisy_student.pseudo_labels.to_label                 # params.yaml's to_label section
    python -m noisy_student.pseudo_labels.to_label --count 40 --strategy margin
    python -m flows.self_training --label-next                     # after the loop, in the flow

Each option defaults to params.yaml's ``to_label`` section. The champion (or ``--model``)
classifies the prepared pool; the strategy scores each image: ``least_confident`` (lowest top
probability), ``margin`` (smallest gap between the top two classes) or ``disagreement`` (how
many different classes the round teachers' pseudo-labels and the champion gave it; ties broken
by confidence). Picks are balanced over the predicted classes (round robin, each class's worst
first), so one confusing class does not take every slot.

Writes under ``--out`` (``to_label.out``), whole or not at all:

- ``picked.csv``: rank, id, the model's guess, its confidence and margin, the score, the source;
- ``contact_sheet.png``: every picked image with its top guesses;
- ``unsorted/<rank>_<id>.png`` (the image as prepared, or a copy of the user's file) and one
  empty folder per class: move each image into its class folder, then move those folders' files
  into ``data.labeled_dir/<class>/`` (and out of the pool) and run ``dvc repro``: the scan stage
  sees the change and reruns what depends on the labeled set.

This is no DVC stage: it reads the loop's outputs and writes a to-do list for a person, which
no later stage reads (a stage would run it on every `dvc repro`, the demo's included).
"""

from __future__ import annotations

import logging
import re
import shutil
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from noisy_student.core import cli
from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings, ToLabelSettings
from noisy_student.data.splits import load_classes, load_split
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint, resolve_device
from noisy_student.models.inference import EVAL_BATCH_SIZE, eval_loader, iter_probabilities
from noisy_student.pseudo_labels.table import read_columns

log = logging.getLogger(__name__)
STRATEGIES = typing.get_args(ToLabelSettings.model_fields["strategy"].annotation)
SHEET_COLUMNS = 8


def uncertainty(probs: np.ndarray, strategy: str, votes: np.ndarray | None = None) -> np.ndarray:
    """Per image, how much a person's label is worth: higher first."""
    top = np.sort(probs, axis=1)
    if strategy == "least_confident":
        return 1.0 - top[:, -1]
    if strategy == "margin":
        return 1.0 - (top[:, -1] - top[:, -2])
    if strategy == "disagreement":
        if votes is None:
            raise PipelineError("disagreement needs the rounds' pseudo-labels")
        distinct = np.array([len(set(row)) for row in votes.tolist()], dtype=np.float64)
        return distinct + (1.0 - top[:, -1]) / 2  # ties: the less confident first
    raise PipelineError(f"strategy '{strategy}': expected one of {', '.join(STRATEGIES)}")


def balanced_pick(score: np.ndarray, guess: np.ndarray, count: int) -> np.ndarray:
    """Row indices of ``count`` images: round robin over the guessed classes (class order), each
    class's highest score first; ties by row order, so the pick is deterministic."""
    queues = []
    for cls in np.unique(guess):
        rows = np.flatnonzero(guess == cls)
        queues.append(rows[np.argsort(-score[rows], kind="stable")].tolist())
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return np.array(picked, dtype=np.int64)


def round_votes(settings: Settings, layout: Layout, ids: list[str], guess: np.ndarray):
    """Per pool image: the class each round's teacher gave it (pseudo-label tables), and the
    model's own guess."""
    columns = [guess]
    for name in promotion.trained_models(settings, layout)[1:]:
        path = layout.pseudo_table(name)
        if path.exists():
            table = read_columns(path, ["id", "pred"])
            if table["id"].tolist() == ids:  # an emptied table (a stopped round) has no rows
                columns.append(table["pred"].to_numpy())
    return np.stack(columns, axis=1)


def file_name(rank: int, image_id: str) -> str:
    return f"{rank:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id)}"


def contact_sheet(images: np.ndarray, captions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(images) // SHEET_COLUMNS))
    fig, axes = plt.subplots(rows, SHEET_COLUMNS, figsize=(2.0 * SHEET_COLUMNS, 2.3 * rows))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k])
            ax.set_title(captions[k], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def to_label(
    settings: Settings,
    layout: Layout,
    *,
    count: int | None = None,
    strategy: str | None = None,
    model: str | None = None,
    out: Path | None = None,
) -> pd.DataFrame:
    """Pick ``count`` pool images for a person to label; write them under ``out``. Each argument
    left out is params.yaml's (``to_label``; its ``model: null`` is the champion)."""
    cfg = settings.to_label
    count = cfg.count if count is None else count
    strategy = strategy or cfg.strategy
    model = model or cfg.model
    out = Path(cfg.out) if out is None else out
    if count < 1:
        raise PipelineError(f"--count {count}: pick at least one image")
    if strategy not in STRATEGIES:
        raise PipelineError(f"--strategy {strategy}: expected one of {', '.join(STRATEGIES)}")
    name = model or promotion.champion(settings, layout)
    device = resolve_device(settings.runtime)
    classifier, card = load_checkpoint(layout.model(name), device)
    pool = load_split("unlabeled", layout.prepared)
    classes = load_classes(layout.prepared)
    loader = eval_loader(pool.images, EVAL_BATCH_SIZE, settings.runtime, device)
    probs = torch.cat(list(iter_probabilities(classifier, loader, device, settings.runtime)))
    probs_np = probs.numpy().astype(np.float64)
    guess = probs_np.argmax(1)
    votes = round_votes(settings, layout, pool.ids, guess) if strategy == "disagreement" else None
    score = uncertainty(probs_np, strategy, votes)
    picked = balanced_pick(score, guess, count)
    top = np.sort(probs_np, axis=1)
    sources = pd.read_csv(layout.prepared / "unlabeled" / "index.csv", dtype={"id": str})["source"]
    table = pd.DataFrame(
        {
            "rank": np.arange(1, len(picked) + 1),
            "id": [pool.ids[i] for i in picked],
            "guess": [classes[guess[i]] for i in picked],
            "confidence": top[picked, -1],
            "margin": top[picked, -1] - top[picked, -2],
            "score": score[picked],
            "source": sources.iloc[picked].tolist(),
        }
    )
    with atomic_path(out) as staged:
        (staged / "unsorted").mkdir(parents=True)
        for cls in classes:
            (staged / cls).mkdir()
        table.to_csv(staged / "picked.csv", index=False, float_format="%.6g")
        for row, i in zip(table.itertuples(), picked, strict=True):
            source = Path(row.source)
            target = staged / "unsorted" / file_name(row.rank, row.id)
            if source.is_file():  # the user's own file, untouched
                shutil.copyfile(source, target.with_suffix(source.suffix))
            else:  # the demo's digits exist only as prepared pixels
                Image.fromarray(np.asarray(pool.images[i])).save(target.with_suffix(".png"))
        captions = []
        for i in picked:
            best = np.argsort(-probs_np[i])[:2]
            captions.append(" / ".join(f"{classes[k]} {probs_np[i, k]:.2f}" for k in best))
        contact_sheet(np.asarray(pool.images[picked]), captions, staged / "contact_sheet.png")
    log.info("%s: %d pool images to label (%s, by %s): %s", out, len(table), strategy, card.name,
             out / "picked.csv")  # fmt: skip
    return table


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    # every default is params.yaml's to_label section
    p.add_argument("--count", type=int, help="how many images to pick (to_label.count)")
    p.add_argument("--strategy", choices=STRATEGIES, help="(to_label.strategy)")
    p.add_argument("--model", help="teacher, student_1, ... (to_label.model; null: the champion)")
    p.add_argument("--out", help="the folder to write (to_label.out)")

    def run(args, settings: Settings) -> None:
        out = None if args.out is None else Path(args.out)
        to_label(settings, Layout.at(), count=args.count, strategy=args.strategy,
                 model=args.model, out=out)  # fmt: skip

    cli.run(run, p.parse_args())


if __name__ == "__main__":
    cli.main_process(main)

"""Active-labeling benchmark: are the pool images ``to_label`` picks worth more to label than as
many picked at random?

    python -m bench.active                          # 20 more labels, seeds 0-4
    python -m bench.active --count 10 20 --seeds 0 1 2
    python -m bench.active --report-only
    python -m bench.active --loop --strategies random least_confident --seeds 0 1 2

Per seed: the demo's digits as the class folders a user brings (``bench.foreign.write_dataset``,
no foreign image: ``labels_per_class`` labeled per class, the pool's digits under their class's
folder, which the pipeline ignores), and params.yaml's teacher trained on the labeled folders
(the loop's own steps up to ``train_teacher``, read from dvc.yaml). Then, per strategy, ``count``
pool images are picked: by ``noisy_student.pseudo_labels.to_label`` (``least_confident``,
``margin``: the teacher's scores, balanced over its guesses) or uniformly at random (seeded);
moved, as a person would move them, into ``labeled/<their class>/``; and the teacher is trained
again from scratch, same seed, on the grown labeled set. Its test accuracy is what the table
compares, paired by seed with the random pick.

What it measures is the labels' worth to the labeled-only model, the first model a user has and
the one every round starts from. With ``--loop`` each teacher then goes through the rest of the
loop (dvc.yaml's rounds, evaluation, the champion chosen on validation), and the table compares
the model the loop ships: a loop per strategy and seed. ``disagreement`` needs rounds'
pseudo-labels, so it is not measured here. Results go to ``<out>/active.jsonl`` (``--loop``:
``active_loop.jsonl``; a killed run loses one training or loop), the tables to ``<out>/active.md``
(``active_loop.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from bench.accuracy import cell_layout, cell_overrides, digest, loop_steps, read_records
from bench.cli import run_cli
from bench.foreign import write_dataset
from noisy_student.core.atomic import write_text
from noisy_student.core.layout import Layout
from noisy_student.core.settings import PARAMS_FILE, Settings, load_settings
from noisy_student.data.splits import load_split
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint, resolve_device
from noisy_student.models.inference import EVAL_BATCH_SIZE, accuracy, eval_loader
from noisy_student.pseudo_labels.to_label import to_label

log = logging.getLogger("bench.active")

STRATEGIES = ("random", "least_confident", "margin")
NONE = "none"  # the teacher before any image is added


def train_teacher(settings: Settings, layout: Layout) -> float:
    """The loop's steps up to the teacher (from dvc.yaml); the teacher's test accuracy."""
    if not (layout.model("teacher") / "card.json").exists():  # atomic: there means complete
        for step in loop_steps(settings)[0]:
            step.call(settings, layout, None)
    device = resolve_device(settings.runtime)
    classifier, _ = load_checkpoint(layout.model("teacher"), device)
    test = load_split("test", layout.prepared)
    loader = eval_loader(test.images, EVAL_BATCH_SIZE, settings.runtime, device)
    return accuracy(classifier, loader, test.labels, device, settings.runtime)


def whole_loop(settings: Settings, layout: Layout) -> dict:
    """The loop after the teacher (dvc.yaml's rounds, evaluate, register) on ``layout``; the
    champion, chosen on validation, and every model's test accuracy."""
    metrics: dict = {}
    for step in loop_steps(settings)[1]:
        result = step.call(settings, layout, None)
        if step.stage == "evaluate":
            metrics = result
    champion = promotion.champion(settings, layout)
    accuracies = {name: m["test_accuracy"] for name, m in metrics.items()}
    return {"champion": champion, "shipped": accuracies[champion], "models": accuracies}


def pick(
    strategy: str, count: int, seed: int, settings: Settings, layout: Layout, out: Path
) -> list[str]:
    """Pool ids (``<class>/<file>``) to label next."""
    if strategy == "random":
        ids = load_split("unlabeled", layout.prepared).ids
        rng = np.random.default_rng(20_000 + seed)
        return [ids[i] for i in sorted(rng.choice(len(ids), count, replace=False))]
    picked = to_label(settings, layout, count=count, strategy=strategy, model="teacher", out=out)
    return picked["id"].tolist()


def grown(base: Path, ids: list[str], root: Path) -> Path:
    """A copy of the dataset ``base`` with the pool images ``ids`` moved into their class's
    labeled folder, as a person sorting ``to_label``'s picks would."""
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    for image_id in ids:
        cls, _, name = image_id.partition("/")
        shutil.move(root / "unlabeled" / image_id, root / "labeled" / cls / name)
    (root / "done").write_text("")
    return root


def folder_settings(params_file: Path, root: Path, seed: int, work: Path) -> Settings:
    dataset = f"folders:{root.resolve()}"
    return load_settings(params_file, cell_overrides(dataset, None, seed, {}, work))


def run(
    *,
    params_file: Path = PARAMS_FILE,
    counts: list[int],
    seeds: list[int],
    work: Path,
    out_dir: Path,
    loop: bool = False,
    strategies: tuple[str, ...] = STRATEGIES,
) -> str:
    name = "active_loop" if loop else "active"
    results = out_dir / f"{name}.jsonl"
    done = {tuple(r["key"]) for r in read_records(results)}

    def record(row: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(tuple(row["key"]))

    for seed in seeds:
        base_settings = load_settings(params_file, {"seed": seed})
        data = write_dataset(work / "data" / f"digits-seed{seed}", base_settings, 0.0)
        settings = folder_settings(params_file, data, seed, work)
        # params changed since the last call: other teachers
        runs = work / "runs" / f"seed{seed}-{digest(settings.model_dump())[:8]}"
        layout = cell_layout(runs / NONE)
        before = train_teacher(settings, layout)
        if (seed, 0, NONE) not in done:
            row = {"key": [seed, 0, NONE], "seed": seed, "count": 0, "strategy": NONE,
                   "test_accuracy": before}  # fmt: skip
            record(row | (whole_loop(settings, layout) if loop else {}))
        for count in counts:
            for strategy in strategies:
                if (seed, count, strategy) in done:
                    continue
                picks = runs / f"picks-{strategy}-{count}"
                ids = pick(strategy, count, seed, settings, layout, picks)
                root = grown(data, ids, work / "data" / f"digits-seed{seed}-{strategy}-{count}")
                grown_layout = cell_layout(runs / f"{strategy}-{count}")
                grown_settings = folder_settings(params_file, root, seed, work)
                after = train_teacher(grown_settings, grown_layout)
                log.info("seed %d, %d more labels by %s: teacher %.4f -> %.4f", seed, count,
                         strategy, before, after)  # fmt: skip
                classes = sorted({i.split("/", 1)[0] for i in ids})
                row = {"key": [seed, count, strategy], "seed": seed, "count": count,
                       "strategy": strategy, "test_accuracy": after, "picked": ids,
                       "classes_picked": len(classes)}  # fmt: skip
                record(row | (whole_loop(grown_settings, grown_layout) if loop else {}))
        write_report(out_dir, name)
    return write_report(out_dir, name)


def write_report(out_dir: Path, name: str = "active") -> str:
    """``active.md``: the teachers' accuracies; ``active_loop.md``: the shipped models' too."""
    rows = read_records(out_dir / f"{name}.jsonl")
    text = accuracy_tables(rows, "test_accuracy", "teacher test accuracy")
    if name == "active_loop":
        text += "\n" + accuracy_tables(rows, "shipped", "shipped model's test accuracy")
        text += "\n" + champions(rows)
    write_text(out_dir / f"{name}.md", text)
    return text


def accuracy_tables(rows: list[dict], field: str, what: str) -> str:
    acc = {(r["seed"], r["count"], r["strategy"]): r[field] for r in rows}
    counts = sorted({r["count"] for r in rows if r["count"] > 0})
    lines = [
        f"| labels added | picked by | {what}, % (mean ± std over seeds) | "
        "− random, paired by seed (worst seed) | seeds |",
        "|---|---|---|---|---|",
    ]
    none = [v for (_, c, s), v in acc.items() if s == NONE]
    if none:
        lines.append(f"| 0 | - | {mean_std(none)} | | {len(none)} |")
    for count in counts:
        for strategy in STRATEGIES:
            seeds = sorted(s for (s, c, st) in acc if c == count and st == strategy)
            if not seeds:
                continue
            values = [acc[(s, count, strategy)] for s in seeds]
            paired = [acc[(s, count, strategy)] - acc[(s, count, "random")] for s in seeds
                      if (s, count, "random") in acc]  # fmt: skip
            gain = (
                f"{100 * statistics.fmean(paired):+.1f} pts ({100 * min(paired):+.1f})"
                if paired and strategy != "random"
                else ""
            )
            lines.append(f"| {count} | {strategy} | {mean_std(values)} | {gain} | {len(seeds)} |")
    used = [s for s in STRATEGIES if any(st == s for (_, _, st) in acc)]
    lines += ["", "| seed | " + " | ".join(f"{s} +{c}" for c in counts for s in used)
              + " | none |", "|---|" + "---|" * (len(counts) * len(used) + 1)]  # fmt: skip
    for seed in sorted({r["seed"] for r in rows}):
        cells = [acc.get((seed, c, s)) for c in counts for s in used]
        cells.append(acc.get((seed, 0, NONE)))
        lines.append(f"| {seed} | " + " | ".join(
            "-" if v is None else f"{100 * v:.1f}" for v in cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def champions(rows: list[dict]) -> str:
    """Which model each loop shipped (chosen on validation)."""
    lines = ["| seed | labels added | picked by | champion |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["count"], r["strategy"])):
        lines.append(f"| {r['seed']} | {r['count']} | {r['strategy']} | {r['champion']} |")
    return "\n".join(lines) + "\n"


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--count", type=int, nargs="+", default=[20])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", type=Path, default=Path("bench/work/active"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument(
        "--loop",
        action="store_true",
        help="run the whole loop after each teacher and compare the shipped models",
    )
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--report-only", action="store_true", help="rebuild the tables, run nothing")
    args = p.parse_args()
    if any(c < 1 for c in args.count):
        sys.exit(f"error: --count {args.count}: each must be at least 1")
    name = "active_loop" if args.loop else "active"
    run_cli(args.report_only, lambda: write_report(args.out, name),
            lambda: run(params_file=Path(args.params), counts=args.count, seeds=args.seeds,
                        work=args.work, out_dir=args.out, loop=args.loop,
                        strategies=tuple(args.strategies)))  # fmt: skip


if __name__ == "__main__":
    main()

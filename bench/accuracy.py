"""Accuracy benchmark: does self-training beat the labels alone, and how close does it get to
training on every label?

    python -m bench.accuracy                         # digits, 3 and 5 labels/class, seeds 0-4
    python -m bench.accuracy --variants baseline no_promotion   # the promotion rule on and off
    python -m bench.accuracy --folders my_data       # my_data/{labeled,unlabeled,test[,val]}
    python -m bench.accuracy --set teacher.epochs=5  # any params.yaml key, for every run
    python -m bench.accuracy --report-only           # rebuild the tables from the raw results

Per (labels per class, seed) it runs the loop in this process, with Settings built from
params.yaml plus overrides, as dvc.yaml wires it: the steps come from the repository's dvc.yaml,
read by DVC with the run's own rounds (``students``), each bound to its stage's
``tasks/<stage>.py`` (flows/stages.py). The stages up to the labeled-only teacher (prepare,
augment, train_teacher) run once per cell; then, sharing that dataset and teacher, the rest of
the loop up to ``register`` (augment for the run's own student policy, every round's
pseudo_label and train_student, evaluate, register) for the pipeline as params.yaml has it and
for each ablation (a recipe of configs/ or one key); and the fully supervised upper bound. Each
run writes in folders of its own (``Layout.replace``): the repository's data/, models/ and
reports/ are the pipeline's, not the benchmark's. Every finished run is appended to
``<out>/accuracy.jsonl`` at once, so a killed benchmark loses one run at most and a second call
skips what is there; the tables (``accuracy.md``) and a flat ``accuracy.csv`` are rebuilt from
that file.

Each run is judged on the model it ships: its champion, the best on validation (the promotion
rule of ``selection``), against the issue's targets: at least as good as its teacher on every
seed, >= 80% of the gap to the upper bound closed on average and >= 60% on the worst seed.
``no_promotion`` (``selection.margin: null``) is the loop without the rule: the last student
ships.

The upper bound is not the loop, so it calls the library directly: the final student's recipe
(model, noise, epochs, ...) trained on the labeled images plus the whole pool with its true
labels. It goes through the same training code as any student
(``noisy_student.training.train.train``): a one-round run whose pseudo-label table holds the
truth (confidence 1, every row kept), read like any table; then evaluate and register. The truth
comes from the demo's hidden labels (``true_label`` of the prepared pool); for ``--folders``,
from the pool's first folder level where every image sits under a class folder
(``unlabeled/<class>/...``; the pipeline itself ignores those folders), else the upper bound is
marked not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import yaml

from bench.cli import run_cli
from flows.stages import Step, plan
from noisy_student.core.atomic import atomic_path, write_text
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import PARAMS_FILE, Settings, load_settings
from noisy_student.data.splits import UNKNOWN, Split, load_classes, load_split
from noisy_student.evaluation.evaluate import evaluate
from noisy_student.models import promotion
from noisy_student.pseudo_labels.labeling import table_rows
from noisy_student.pseudo_labels.selection import summarize
from noisy_student.pseudo_labels.table import TableWriter
from noisy_student.recipes import load_recipe
from noisy_student.tracking.registry import register_models
from noisy_student.training.train import train

log = logging.getLogger("bench.accuracy")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
UPPER = "fully_supervised"


def one_more_round(raw: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's rounds and one more: the last round's recipe again, taught by the last
    round (Noisy Student's third iteration; a recipe file cannot append to a list)."""
    rounds = raw["students"]
    extra = rounds[-1] | {"name": f"student_{len(rounds) + 1}", "teacher": rounds[-1]["name"]}
    return {"students": [*rounds, extra]}


def weak_last_round(raw: dict[str, Any]) -> dict[str, Any]:
    """The last round cut to 4 epochs: a round made not to pay, for the promotion rule to
    catch (or not) on a small validation set."""
    last = len(raw["students"]) - 1
    return {f"students.{last}.epochs": 4, f"students.{last}.warmup_epochs": 0}


Changes = Path | dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]
# name -> (what the table calls it, the params it changes: a recipe file, dotted keys, or a
# function of params.yaml's contents)
VARIANTS: dict[str, tuple[str, Changes]] = {
    "baseline": ("Noisy Student as in params.yaml", {}),
    "no_noise": ("no student noise (configs/no_noise.yaml)", CONFIGS / "no_noise.yaml"),
    "soft_labels": (
        "soft pseudo-labels, T 0.5 (configs/soft_pseudo_labels.yaml)",
        CONFIGS / "soft_pseudo_labels.yaml",
    ),
    "threshold_off": ("threshold off: every pool image kept", {"pseudo_label.threshold": 0.0}),
    "threshold_05": (
        "confidence floor 0.5: more of the pool's harder images kept",
        {"pseudo_label.threshold": 0.5},
    ),
    "distillation": ("distillation on (configs/distillation.yaml)", CONFIGS / "distillation.yaml"),
    "no_class_balance": (
        "class balancing off (configs/no_class_balance.yaml)",
        CONFIGS / "no_class_balance.yaml",
    ),
    "mixing": (
        "CutMix, MixUp and label smoothing on the students (configs/mixing.yaml)",
        CONFIGS / "mixing.yaml",
    ),
    "student_lr_x2": ("students at twice the learning rate", {"students.*.lr": 0.004}),
    "resnet18_lr_x2_warmup5": (
        "the resnet18 rounds at twice the learning rate, warmed up over 5 epochs (params.yaml's"
        " recipe since 14f6ff4: from then on the same as the baseline)",
        {
            "students.1.lr": 0.004,
            "students.2.lr": 0.004,
            "students.1.warmup_epochs": 5,
            "students.2.warmup_epochs": 5,
        },
    ),
    "ema_weights": (
        "students keep a moving average of their weights (configs/ema_weights.yaml)",
        CONFIGS / "ema_weights.yaml",
    ),
    "three_rounds": ("a third round: the last round's recipe again", one_more_round),
    "weak_last_round": ("the last round cut to 4 epochs (made not to pay)", weak_last_round),
    "no_promotion": (
        "promotion off: every student teaches the next round (selection.margin null)",
        {"selection.margin": None},
    ),
    "no_epoch_patience": (
        "early stopping off: every epoch of every student runs (students.*.epoch_patience null)",
        {"students.*.epoch_patience": None},
    ),
    "ood_filter": (
        "out-of-class filter on (pseudo_label.ood_filter 0.95)",
        {"pseudo_label.ood_filter": 0.95},
    ),
    "ood_knn": (
        "out-of-class filter on, kNN feature distance (ood_filter 0.95, ood_score knn)",
        {"pseudo_label.ood_filter": 0.95, "pseudo_label.ood_score": "knn"},
    ),
}
# a no_promotion run trains exactly what the baseline trained as long as the baseline promoted
# every round (same seeds, same steps; the loop is byte-reproducible: tests/pipeline), and so
# does a variant whose changes params.yaml has since adopted: each is recorded from the
# baseline's run instead of being trained again
SAME_AS_BASELINE_WHEN_ALL_PROMOTED = "no_promotion"
SAME_AS_BASELINE_BECAUSE = {
    SAME_AS_BASELINE_WHEN_ALL_PROMOTED: "every round promoted",
    "params": "params.yaml has these settings",
}
GAP_TARGET = 0.80  # the model shipped must close this share of labeled-only -> fully supervised
GAP_WORST = 0.60  # ...on average over seeds, and this share on the worst seed
# the loop's stages a cell runs once and its runs share (checked: no variant may change them)...
SHARED = ("scan", "prepare", "train_teacher")
TEACHER = "train_teacher"  # ...the cell's steps: this stage and the stages it depends on
LAST = "register"  # a run's steps: this stage and the stages it depends on, less SHARED
_DAGS: dict[tuple, tuple[list[str], list[tuple[str, str]]]] = {}  # per rounds, read once


def loop_dag(settings: Settings) -> tuple[list[str], list[tuple[str, str]]]:
    """The stages and their edges as DVC reads the repository's dvc.yaml with ``settings``'
    rounds (foreach stages depend on ``students``): from a throwaway DVC project holding that
    dvc.yaml and these settings as its params.yaml."""
    from dvc.repo import Repo

    from flows.dvc_project import DvcProject

    rounds = tuple((s.name, s.teacher) for s in settings.students)
    if rounds not in _DAGS:
        with tempfile.TemporaryDirectory(prefix="bench-dag-") as tmp:
            root = Path(tmp)
            shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
            params = yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
            write_text(root / "params.yaml", params)
            Repo.init(tmp, no_scm=True).close()
            _DAGS[rounds] = DvcProject(root).dag()
    return _DAGS[rounds]


def upstream_of(stage: str, edges: list[tuple[str, str]]) -> set[str]:
    """``stage`` and every stage it depends on, directly or not."""
    found, todo = {stage}, [stage]
    while todo:
        down = todo.pop()
        for up in (u for u, d in edges if d == down and u not in found):
            found.add(up)
            todo.append(up)
    return found


def loop_steps(settings: Settings) -> tuple[list[Step], list[Step]]:
    """The loop of dvc.yaml in its order, cut in two: the cell's steps (the teacher and what it
    needs) and a run's (up to ``register``, without the cell's shared stages)."""
    names, edges = loop_dag(settings)
    # as `dvc repro` runs the pseudo_label stage: its shards one after another in this process
    # (the plan sends them to Dask workers only for the Prefect flow)
    sequential = settings.pseudo_label.model_copy(update={"shards": 1})
    steps = plan(settings.model_copy(update={"pseudo_label": sequential}), names, edges)
    missing = {TEACHER, LAST, *SHARED} - set(names)
    if missing:
        raise PipelineError(f"dvc.yaml: no stage {sorted(missing)}: the benchmark needs them")
    cell, run = upstream_of(TEACHER, edges), upstream_of(LAST, edges) - set(SHARED)
    return [s for s in steps if s.stage in cell], [s for s in steps if s.stage in run]


def round_student(settings: Settings, step: Step) -> str | None:
    """The student of a foreach round's step (``pseudo_label@0`` -> ``student_1``)."""
    _, _, index = step.stage.partition("@")
    return settings.students[int(index)].name if index else None


def cell_layout(folder: Path) -> Layout:
    """A cell's dataset, augmentation policies, teacher and its checkpoints."""
    return Layout.at(folder).replace(prepared=folder / "prepared", augment=folder / "augment")


def run_layout(folder: Path, run: Path) -> Layout:
    """A run of the cell: the cell's dataset, everything else in the run's own folder (evaluate's
    and register's outputs too: the repository's reports/ is the pipeline's, not the
    benchmark's)."""
    return Layout.at(run).replace(
        prepared=cell_layout(folder).prepared,
        augment=run / "augment",
        comparison=run / "comparison.md",
        test_predictions=run / "test_predictions",
        registry=run / "registry.json",
    )


def evaluate_run(settings: Settings, layout: Layout) -> dict:
    """The evaluate and register stages' functions on a run that is not the loop (the upper
    bound)."""
    metrics = evaluate(settings, layout)
    register_models(settings, layout)
    return metrics


def variant_overrides(name: str, params_file: Path) -> dict[str, Any]:
    changes = VARIANTS[name][1]
    if isinstance(changes, Path):
        return load_recipe(changes, params_file)
    if callable(changes):
        return changes(yaml.safe_load(params_file.read_text()))
    return dict(changes)


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (dataset, labels per class, seed): one prepared split and one labeled-only teacher."""

    dataset: str  # "digits" or "folders:<path>"
    labels_per_class: int | None  # None for a folders dataset (its labeled folder decides)
    seed: int
    overrides: dict[str, Any]  # on params.yaml, for every run of the cell

    def key(self, variant: str) -> tuple:
        return (self.dataset, self.labels_per_class, self.seed, variant)


def cell_overrides(
    dataset: str, labels_per_class: int | None, seed: int, user: dict[str, Any], work: Path
) -> dict[str, Any]:
    overrides: dict[str, Any] = {"seed": seed}
    if labels_per_class is not None:
        overrides["data.labels_per_class"] = labels_per_class
    if dataset.startswith("folders:"):
        root = Path(dataset.removeprefix("folders:"))
        overrides["data.source"] = "folders"
        for key in ("labeled", "unlabeled", "test"):
            overrides[f"data.{key}_dir"] = str(root / key)
        overrides["data.val_dir"] = str(root / "val") if (root / "val").is_dir() else None
    # the benchmark's trainings go to their own MLflow store, not the project's
    overrides["mlflow.tracking_uri"] = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    overrides["mlflow.experiment"] = "bench-accuracy"
    return {**overrides, **user}


def pool_truth(pool: Split, classes: list[str]) -> np.ndarray | None:
    """The pool's true class per image: the demo's hidden labels, or the class folder each image
    sits in (``<class>/...``), or None when neither is known for every image."""
    if (pool.true_labels != UNKNOWN).all():
        return pool.true_labels
    index = {c: i for i, c in enumerate(classes)}
    first = [i.split("/", 1)[0] if "/" in i else None for i in pool.ids]
    if all(f in index for f in first):
        return np.array([index[f] for f in first], dtype=np.int64)
    return None


def write_truth_table(settings: Settings, name: str, layout: Layout, truth: np.ndarray) -> dict:
    """A pseudo-label table whose labels are the truth, every row kept once (the columns of the
    pseudo_label stage's table, built by its own ``table_rows`` of
    noisy_student/pseudo_labels/labeling.py, summarized by ``summarize`` of selection.py)."""
    classes = load_classes(layout.prepared)
    pool = load_split("unlabeled", layout.prepared)
    probs = torch.nn.functional.one_hot(torch.tensor(truth), len(classes)).float()
    cfg = settings.pseudo_label.model_copy(update={"threshold": 0.0})
    rows = table_rows(probs, pool.ids, classes, cfg)
    rows = rows.add_column(
        rows.schema.get_field_index("kept") + 1, "copies", pa.array(np.ones(len(pool), np.int64))
    )
    with atomic_path(layout.pseudo_table(name)) as tmp, TableWriter(tmp) as writer:
        writer.write(rows)
    table = rows.to_pandas()
    summary = summarize(
        table, dataclasses.replace(pool, true_labels=truth), classes, settings.pseudo_label
    )
    write_text(layout.pseudo_summary(name), json.dumps(summary, indent=2))
    return summary


def link_teacher(layout: Layout, teacher_dir: Path) -> None:
    """The cell's teacher, shared by every run of the cell (read only: no stage writes it)."""
    layout.models.mkdir(parents=True, exist_ok=True)
    link = layout.model("teacher")
    if not link.exists():
        link.symlink_to(teacher_dir.resolve(), target_is_directory=True)


def summary_of(pseudo: dict) -> dict:
    keys = ("pool_images", "above_threshold", "kept", "kept_accuracy", "trained_images")
    return {k: pseudo.get(k) for k in keys}


class Runner:
    def __init__(self, params_file: Path, work: Path, results: Path) -> None:
        self.params_file = params_file
        self.work = work
        self.results = results
        self.done = {tuple(r["key"]): r for r in read_records(results)}

    def settings(self, overrides: dict[str, Any]) -> Settings:
        return load_settings(self.params_file, overrides)

    def record(self, cell: Cell, variant: str, payload: dict) -> None:
        row = {"key": list(cell.key(variant)), "dataset": cell.dataset}
        row |= {"labels_per_class": cell.labels_per_class, "seed": cell.seed, "variant": variant}
        row |= payload
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a") as f:  # one line per finished run: a kill loses one run
            f.write(json.dumps(row) + "\n")
        self.done[cell.key(variant)] = row

    def cell_folder(self, cell: Cell) -> Path:
        """Where the cell's dataset, teacher and runs live (``runs/<variant>``)."""
        base = self.settings(cell.overrides)
        return self.work / (
            f"{Path(cell.dataset.split(':')[-1]).name}-lpc{cell.labels_per_class}-seed{cell.seed}"
            f"-{digest(base.model_dump())[:8]}"
        )

    def cell(self, cell: Cell, variants: list[str], upper: bool) -> None:
        base = self.settings(cell.overrides)
        folder = self.cell_folder(cell)
        layout = cell_layout(folder)
        teacher_dir = layout.model("teacher")
        todo = [v for v in variants if cell.key(v) not in self.done]
        if upper and cell.key(UPPER) not in self.done:
            todo.append(UPPER)
        if not todo:
            log.info("%s: every run already recorded", folder.name)
            return
        seconds: dict[str, float] = {}
        if not (teacher_dir / "card.json").exists():  # an atomic output: there means complete
            start = time.perf_counter()
            if layout.prepared.exists():
                shutil.rmtree(layout.prepared)  # a teacher never trained on it: prepare afresh
            for step in loop_steps(base)[0]:  # prepare, augment, train_teacher
                step.call(base, layout, None)
            seconds["teacher"] = time.perf_counter() - start
        for variant in variants:
            if variant in todo and (why := self.same_as_baseline(cell, base, variant)):
                log.info("%s: %s = baseline (%s)", folder.name, variant, why)
                base_run = self.done[cell.key("baseline")]
                same = {k: v for k, v in base_run.items() if k not in ("key", "variant")}
                self.record(cell, variant, same | {"same_as": "baseline", "same_because": why})
                continue
            if variant in todo:
                self.guarded(cell, variant, self.variant, cell, base, variant, folder, seconds)
            if variant == "baseline" and UPPER in todo:
                self.guarded(cell, UPPER, self.upper_bound, cell, base, folder)
        if UPPER in todo and "baseline" not in variants:
            self.guarded(cell, UPPER, self.upper_bound, cell, base, folder)

    def same_as_baseline(self, cell: Cell, base: Settings, variant: str) -> str | None:
        """Why ``variant`` would train exactly what the cell's recorded baseline run trained (the
        loop is byte-reproducible: tests/pipeline), or None: then it trains."""
        base_run = self.done.get(cell.key("baseline"))
        if variant == "baseline" or base_run is None or "not_run" in base_run:
            return None
        if variant == SAME_AS_BASELINE_WHEN_ALL_PROMOTED:
            promoted = base_run.get("promoted")
            return (
                SAME_AS_BASELINE_BECAUSE[variant] if promoted and all(promoted.values()) else None
            )
        try:
            settings = self.settings(
                {**cell.overrides, **variant_overrides(variant, self.params_file)}
            )
        except PipelineError:
            return None  # refused: the run says why (guarded)
        return SAME_AS_BASELINE_BECAUSE["params"] if settings == base else None

    def guarded(self, cell: Cell, variant: str, fn, *args) -> None:
        """A run refused by the pipeline (say, a threshold that keeps nothing) is recorded as not
        run, with the pipeline's one-line reason, and the benchmark goes on."""
        try:
            fn(*args)
        except PipelineError as exc:
            log.warning("%s: not run: %s", variant, exc)
            self.record(cell, variant, {"not_run": str(exc)})

    def variant(
        self, cell: Cell, base: Settings, variant: str, folder: Path, seconds: dict
    ) -> None:
        changes = variant_overrides(variant, self.params_file)
        settings = self.settings({**cell.overrides, **changes})
        for part in ("seed", "data", "teacher"):
            if getattr(settings, part) != getattr(base, part):
                raise PipelineError(
                    f"variant '{variant}' changes {part}: it cannot share the teacher"
                )
        if settings.augment.teacher != base.augment.teacher:
            raise PipelineError(f"variant '{variant}' changes augment.teacher")
        log.info("=== %s: %s (%s)", folder.name, variant, changes or "params.yaml")
        layout = run_layout(folder, folder / "runs" / variant)
        link_teacher(layout, cell_layout(folder).model("teacher"))
        start = time.perf_counter()
        # the loop after the teacher, as dvc.yaml wires it: augment (the run's own student
        # policy: no_noise changes it), every round's pseudo_label and train_student, evaluate,
        # register
        pseudo_summaries, metrics = {}, {}
        for step in loop_steps(settings)[1]:
            t0 = time.perf_counter()
            result = step.call(settings, layout, None)
            base_stage, student = step.stage.partition("@")[0], round_student(settings, step)
            if base_stage == "pseudo_label":
                pseudo_summaries[student] = summary_of(result)
                seconds[f"pseudo_label_{student}"] = time.perf_counter() - t0
            elif step.model is not None:
                seconds[f"train_{step.model}"] = time.perf_counter() - t0
            elif base_stage == "evaluate":
                metrics = result
        seconds["total"] = time.perf_counter() - start + seconds.pop("teacher", 0.0)
        accuracy = {name: m["test_accuracy"] for name, m in metrics.items()}
        standings = {n: promotion.load_standing(layout.model(n)) for n in settings.model_names()}
        self.record(
            cell,
            variant,
            {
                "overrides": changes,
                "models": {name: m["model"] for name, m in metrics.items()},
                "test_accuracy": accuracy,
                "val_accuracy": {name: m.get("val_accuracy") for name, m in metrics.items()},
                "promoted": {n: s.promoted for n, s in list(standings.items())[1:]},
                "champion": promotion.champion(settings, layout),
                "stop": promotion.final_standing(settings, layout).reason,
                "pseudo_labels": pseudo_summaries,
                "seconds": {k: round(v, 1) for k, v in seconds.items()},
            },
        )
        seconds.clear()

    def upper_bound(self, cell: Cell, base: Settings, folder: Path) -> None:
        # the cell's student policy (base's), not a run's own
        layout = run_layout(folder, folder / "runs" / UPPER).replace(
            augment=cell_layout(folder).augment
        )
        truth = pool_truth(load_split("unlabeled", layout.prepared), load_classes(layout.prepared))
        final = base.students[-1]
        if truth is None:
            log.warning("%s: the pool's labels are unknown: no upper bound", folder.name)
            self.record(cell, UPPER, {"not_run": "the pool's true labels are unknown"})
            return
        # the final student's recipe as a one-round run; its table is the truth, so nothing
        # from the teacher reaches it (no distillation, hard labels)
        recipe = {**final.model_dump(), "name": "student_1", "teacher": "teacher"}
        changes = {"students": [recipe], "distill.enabled": False, "pseudo_label.labels": "hard"}
        settings = self.settings({**cell.overrides, **changes})
        log.info("=== %s: %s (%s on labeled + the whole pool, true labels)", folder.name, UPPER,
                 final.model)  # fmt: skip
        link_teacher(layout, cell_layout(folder).model("teacher"))
        start = time.perf_counter()
        summary = write_truth_table(settings, "student_1", layout, truth)
        train(settings, "student_1", layout)
        metrics = evaluate_run(settings, layout)
        self.record(
            cell,
            UPPER,
            {
                "overrides": {"recipe": final.name},
                "models": {"final": metrics["student_1"]["model"]},
                "test_accuracy": {
                    "teacher": metrics["teacher"]["test_accuracy"],
                    "final": metrics["student_1"]["test_accuracy"],
                },
                "pseudo_labels": {"final": summary_of(summary)},
                "seconds": {"total": round(time.perf_counter() - start, 1)},
            },
        )


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


# ---- tables ---------------------------------------------------------------------------------


def stats(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    if not values:
        return float("nan"), float("nan"), 0
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread, len(values)


def pct(by_seed: dict[int, float]) -> str:
    mean, spread, n = stats(list(by_seed.values()))
    if n == 0:
        return "not run"
    return f"{100 * mean:.1f} ± {100 * spread:.1f}" + (f" (n={n})" if n != N_EXPECTED else "")


N_EXPECTED = 5  # seeds per setting: a cell with another count says so


def setting_name(dataset: str, labels_per_class: int | None) -> str:
    if labels_per_class is None:
        return dataset
    return f"{dataset}, {labels_per_class} labels/class"


def accuracies(records: list[dict], variant: str, model: str) -> dict[int, float]:
    """seed -> test accuracy of ``model`` in ``variant`` (within one setting's records);
    ``CHAMPION``: the run's champion, chosen on validation."""
    out = {}
    for r in records:
        name = r.get("champion") if model == CHAMPION else model
        if r["variant"] == variant and name in r.get("test_accuracy", {}):
            out[r["seed"]] = r["test_accuracy"][name]
    return out


CHAMPION = "champion"  # the model a run ships: its best on validation


def verdict(records: list[dict], variant: str = "baseline") -> dict[str, Any]:
    """The issue's targets for one setting and variant, on the model the run ships (its
    champion), over the seeds that have the run and the upper bound."""
    teacher = accuracies(records, variant, "teacher")
    final = accuracies(records, variant, CHAMPION)
    upper = accuracies(records, UPPER, "final")
    seeds = sorted(set(teacher) & set(final) & set(upper))
    out: dict[str, Any] = {"seeds": seeds}
    if seeds:
        t = statistics.fmean(teacher[s] for s in seeds)
        f = statistics.fmean(final[s] for s in seeds)
        u = statistics.fmean(upper[s] for s in seeds)
        out["gap_closed"] = (f - t) / (u - t) if u > t else float("nan")
        per_seed = [
            (final[s] - teacher[s]) / (upper[s] - teacher[s])
            for s in seeds
            if upper[s] > teacher[s]
        ]
        out["gap_closed_range"] = (min(per_seed), max(per_seed)) if per_seed else None
        worst = min(per_seed) if per_seed else float("nan")
        out["gap_met"] = out["gap_closed"] >= GAP_TARGET and worst >= GAP_WORST
    paired = sorted(set(teacher) & set(final))
    if paired:
        gains = [final[s] - teacher[s] for s in paired]
        out["gain"] = stats(gains)
        out["worst_gain"] = min(gains)
        out["not_below"] = min(gains) >= 0
    return out


def gap_cell(v: dict) -> str:
    if "gap_closed" not in v:
        return "not run"
    lo_hi = v.get("gap_closed_range")
    span = f", seeds {100 * lo_hi[0]:.0f} to {100 * lo_hi[1]:.0f}%" if lo_hi else ""
    mark = "met" if v["gap_met"] else "**missed**"
    return f"{100 * v['gap_closed']:.0f}%{span}: {mark}"


def gain_cell(v: dict) -> str:
    if "gain" not in v:
        return "not run"
    mean, spread, _ = v["gain"]
    mark = "met" if v["not_below"] else "**missed**"
    worst = 100 * v["worst_gain"]
    return f"{100 * mean:+.1f} ± {100 * spread:.1f} pts, worst seed {worst:+.1f}: {mark}"


def render(records: list[dict]) -> str:
    """Markdown: one table with every setting as a column, the pseudo-labels' quality, then every
    seed's run."""
    settings = sorted(
        {(r["dataset"], r["labels_per_class"]) for r in records},
        key=lambda s: (s[0] != "digits", s[0], s[1] or 0),
    )
    by_setting = {
        s: [r for r in records if (r["dataset"], r["labels_per_class"]) == s] for s in settings
    }
    models = {s: round_models(rows, "baseline") for s, rows in by_setting.items()}
    rounds = max((len(m) for m in models.values()), default=1)
    head = "| test accuracy, % (mean ± std over seeds) | " + " | ".join(
        setting_name(*s) for s in settings
    )
    lines = [head + " |", "|---" * (len(settings) + 1) + "|"]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def model_at(s, r: int) -> str | None:
        return models[s][r] if r < len(models[s]) else None

    def of(s, variant: str, model: str | None) -> dict[int, float]:
        return accuracies(by_setting[s], variant, model) if model else {}

    def claims(variant: str, label: str) -> None:
        verdicts = {s: verdict(by_setting[s], variant) for s in settings}
        target = f"target ≥ {100 * GAP_TARGET:.0f}% on average, ≥ {100 * GAP_WORST:.0f}% every seed"
        row(f"{label}: gap closed by the model shipped ({target})",
            [gap_cell(verdicts[s]) for s in settings])  # fmt: skip
        row(f"{label}: model shipped − teacher, paired by seed (target: ≥ 0 on every seed)",
            [gain_cell(verdicts[s]) for s in settings])  # fmt: skip

    row("labeled only (the teacher)", [pct(of(s, "baseline", "teacher")) for s in settings])
    for r in range(1, rounds):
        cells = [pct(of(s, "baseline", model_at(s, r))) for s in settings]
        row(f"Noisy Student, round {r} (trained whether or not it shipped)", cells)
    row("**the champion: best on validation, the model shipped**",
        [pct(of(s, "baseline", CHAMPION)) for s in settings])  # fmt: skip
    label = "fully supervised: the final student's recipe, every pool label"
    row(label, [pct(of(s, UPPER, "final")) for s in settings])
    claims("baseline", "params.yaml")
    ran = {r["variant"] for r in records}
    for variant, (label, _) in VARIANTS.items():
        if variant == "baseline" or variant not in ran:  # variants not run: no rows
            continue
        own = {s: round_models(by_setting[s], variant) for s in settings}
        for r in range(1, max(len(m) for m in own.values())):  # its own rounds: maybe more
            cells = []
            for s in settings:
                name = own[s][r] if r < len(own[s]) else None
                acc, base = of(s, variant, name), of(s, "baseline", name)
                paired = sorted(set(acc) & set(base))
                delta = ""
                if paired:
                    d = statistics.fmean(acc[k] - base[k] for k in paired)
                    delta = f", {100 * d:+.1f} vs params.yaml"
                cells.append(pct(acc) + delta if acc else "not run")
            row(f"{label}, round {r}", cells)
        if any(of(s, variant, CHAMPION) for s in settings):
            row(f"{label}: the model shipped",
                [pct(of(s, variant, CHAMPION)) for s in settings])  # fmt: skip
            claims(variant, label)

    lines += ["", pseudo_table(by_setting, settings)]
    lines += ["", seed_table(records)]
    return "\n".join(lines) + "\n"


def seed_table(records: list[dict]) -> str:
    """Every run, seed by seed: test accuracy of each model (validation in brackets), which
    rounds were promoted, and the model shipped."""
    lines = [
        "| setting | seed | variant | teacher | rounds: test (val), promoted | shipped | "
        "fully supervised |",
        "|---|---|---|---|---|---|---|",
    ]
    uppers = {(r["dataset"], r["labels_per_class"], r["seed"]): r for r in records
              if r["variant"] == UPPER and "test_accuracy" in r}  # fmt: skip
    for r in sorted(records, key=lambda r: (r["dataset"], r["labels_per_class"] or 0, r["seed"])):
        if r["variant"] == UPPER or "champion" not in r:
            continue
        test, promoted = r["test_accuracy"], r.get("promoted", {})

        def score(name: str, r: dict = r) -> str:
            v = r.get("val_accuracy", {}).get(name)
            text = f"{100 * r['test_accuracy'][name]:.1f}"
            return text + (f" ({100 * v:.1f})" if v is not None else "")

        rounds = ", ".join(
            f"{n} {score(n)}{' promoted' if promoted.get(n) else ''}" for n in list(test)[1:]
        )
        up = uppers.get((r["dataset"], r["labels_per_class"], r["seed"]))
        upper = f"{100 * up['test_accuracy']['final']:.1f}" if up else "not run"
        why = r.get("same_because", SAME_AS_BASELINE_BECAUSE[SAME_AS_BASELINE_WHEN_ALL_PROMOTED])
        same = f" (= baseline: {why})" if r.get("same_as") else ""
        lines.append(
            f"| {setting_name(r['dataset'], r['labels_per_class'])} | {r['seed']} | "
            f"{r['variant']}{same} | {score('teacher')} | {rounds} | "
            f"{r['champion']} {100 * test[r['champion']]:.1f} | {upper} |"
        )
    return "\n".join(lines)


def round_models(rows: list[dict], variant: str) -> list[str]:
    """The variant's models in round order, teacher first, as its longest run trained them (a
    variant may add rounds to params.yaml's)."""
    runs = [list(r["test_accuracy"]) for r in rows if r["variant"] == variant and "champion" in r]
    return max(runs, key=len, default=["teacher"])


def pseudo_table(by_setting: dict, settings: list) -> str:
    """Per variant and round: share of the pool kept, and how many of the kept labels were right."""
    head = "| pseudo-labels: kept of the pool / kept correct, % (mean over seeds) | "
    lines = [head + " | ".join(setting_name(*s) for s in settings) + " |"]
    lines.append("|---" * (len(settings) + 1) + "|")
    ran = {r["variant"] for rows in by_setting.values() for r in rows}
    for variant in (v for v in VARIANTS if v in ran):
        models = {s: round_models(by_setting[s], variant) for s in settings}
        for r in range(1, max(len(m) for m in models.values())):
            cells = []
            for s in settings:
                name = models[s][r] if r < len(models[s]) else None
                rows = [
                    x["pseudo_labels"][name]
                    for x in by_setting[s]
                    if x["variant"] == variant
                    and name in x.get("pseudo_labels", {})
                    # a round after the loop stopped labels nothing: its summary is empty
                    and x["pseudo_labels"][name].get("pool_images")
                ]
                if not rows:
                    cells.append("not run")
                    continue
                kept = statistics.fmean(x["kept"] / x["pool_images"] for x in rows)
                right = [x["kept_accuracy"] for x in rows if x["kept_accuracy"] is not None]
                right_text = f"{100 * statistics.fmean(right):.1f}" if right else "unknown"
                cells.append(f"{100 * kept:.1f} / {right_text}")
            lines.append(f"| {variant}, for round {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flat_rows(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        for model, acc in r.get("test_accuracy", {}).items():
            pseudo = r.get("pseudo_labels", {}).get(model, {})
            rows.append(
                {
                    "dataset": r["dataset"],
                    "labels_per_class": r["labels_per_class"],
                    "seed": r["seed"],
                    "variant": r["variant"],
                    "model": model,
                    "architecture": r.get("models", {}).get(model, ""),
                    "test_accuracy": acc,
                    "pseudo_kept": pseudo.get("kept"),
                    "pseudo_pool": pseudo.get("pool_images"),
                    "pseudo_kept_accuracy": pseudo.get("kept_accuracy"),
                }
            )
    return pd.DataFrame(rows)


def write_report(results: Path, out_dir: Path, header: str = "") -> str:
    records = read_records(results)
    text = header + render(records)
    write_text(out_dir / "accuracy.md", text)
    write_text(out_dir / "accuracy.csv", flat_rows(records).to_csv(index=False))
    return text


# ---- command line ---------------------------------------------------------------------------


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as YAML (``3``, ``0.5``, ``true``, ``[a, b]``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PipelineError(f"--set {item}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def run(
    *,
    params_file: Path = PARAMS_FILE,
    labels_per_class: list[int] | None = None,
    seeds: list[int] | None = None,
    variants: list[str] | None = None,
    folders: Path | None = None,
    user_overrides: dict[str, Any] | None = None,
    work: Path = Path("bench/work/accuracy"),
    out_dir: Path = Path("bench/results"),
    upper: bool = True,
) -> str:
    """Run every missing (setting, seed, variant) and rebuild the report; returns its text."""
    seeds = [0, 1, 2, 3, 4] if seeds is None else seeds
    variants = list(VARIANTS) if variants is None else variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise PipelineError(f"unknown variant(s) {unknown} (known: {', '.join(VARIANTS)})")
    if folders is not None:
        settings = [(f"folders:{folders.resolve()}", None)]
    else:
        settings = [("digits", n) for n in (labels_per_class or [3, 5])]
    work.mkdir(parents=True, exist_ok=True)
    results = out_dir / "accuracy.jsonl"
    runner = Runner(params_file, work, results)
    # the claims first: every setting and seed's teacher, students and upper bound; then the
    # ablations, setting by setting (a run cut short still has whole rows)
    first = [v for v in variants if v == "baseline"]
    phases = [(first, upper), ([v for v in variants if v != "baseline"], upper)]
    for phase_variants, phase_upper in phases:
        for dataset, n in settings:
            for seed in seeds:
                overrides = cell_overrides(dataset, n, seed, user_overrides or {}, work)
                runner.cell(Cell(dataset, n, seed, overrides), phase_variants, phase_upper)
            write_report(results, out_dir)
    return write_report(results, out_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--labels-per-class", type=int, nargs="+", default=[3, 5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--folders", type=Path, help="a dataset laid out as labeled/ unlabeled/ test/")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides")
    p.add_argument("--no-upper-bound", action="store_true")
    p.add_argument("--work", type=Path, default=Path("bench/work/accuracy"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--report-only", action="store_true", help="rebuild the tables, run nothing")
    args = p.parse_args()
    run_cli(
        args.report_only,
        lambda: write_report(args.out / "accuracy.jsonl", args.out),
        lambda: run(
            params_file=Path(args.params),
            labels_per_class=args.labels_per_class,
            seeds=args.seeds,
            variants=args.variants,
            folders=args.folders,
            user_overrides=parse_set(args.set),
            work=args.work,
            out_dir=args.out,
            upper=not args.no_upper_bound,
        ),
    )


if __name__ == "__main__":
    main()

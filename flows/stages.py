"""The loop as a list of steps, read from dvc.yaml: each stage bound to its tasks/ module.

dvc.yaml is the one place the loop is wired. ``plan`` takes its stages in an order DVC's DAG
allows (every stage after what it depends on, dvc.yaml's order among the rest) and binds each to
``tasks.<stage>.run``; a foreach stage's index (``train_student@1``) names the round's student.
The flow, the benchmarks and the tests all run the loop from this list.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.tracking.runs import ParentRun

LABELS = {  # what the Prefect UI shows; {student} is a foreach round's student
    "train_teacher": "train teacher",
    "pseudo_label": "pseudo-label for {student}",
    "train_student": "train {student}",
    "register": "register models",
    "export": "export to ONNX",
}
TRAINING_STAGES = {"train_teacher": "teacher", "train_student": "{student}"}


@dataclass(frozen=True)
class Step:
    stage: str  # the stage's name in dvc.yaml (foreach rounds: pseudo_label@0, ...)
    label: str
    call: Callable[[Settings, Layout, ParentRun | None], Any]
    model: str | None = None  # the model a training step writes


def dag_order(names: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """``names`` so that every (upstream, downstream) pair of ``edges`` runs in that order,
    keeping ``names``' own order wherever the DAG leaves a choice."""
    upstream = {name: {up for up, down in edges if down == name} for name in names}
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in order and upstream[n] <= set(order)]
        if not ready:
            raise PipelineError(
                f"dvc.yaml: the stages {sorted(set(names) - set(order))} form a cycle"
            )
        order.append(ready[0])
    return order


def plan(settings: Settings, names: list[str], edges: list[tuple[str, str]]) -> list[Step]:
    """One step per dvc.yaml stage (``names``, ``edges``: the DAG as DVC reads it)."""
    return [step(settings, stage) for stage in dag_order(names, edges)]


def step(settings: Settings, stage: str) -> Step:
    base, _, index = stage.partition("@")
    student = settings.students[int(index)].name if index else None
    try:
        module = importlib.import_module(f"tasks.{base}")
    except ModuleNotFoundError as exc:
        if exc.name != f"tasks.{base}":  # the module is there; something it imports is not
            raise
        raise PipelineError(f"dvc.yaml: stage '{base}' has no module tasks/{base}.py") from None
    accepts = inspect.signature(module.run).parameters
    if base == "pseudo_label" and settings.pseudo_label.shards > 1:
        run = lambda s, layout, parent: sharded_pool(s, layout, student)  # noqa: E731
    else:

        def run(s: Settings, layout: Layout, parent: ParentRun | None) -> Any:
            kwargs: dict[str, Any] = {"student": student} if student else {}
            if "parent" in accepts:
                kwargs["parent"] = parent
            return module.run(s, layout, **kwargs)

    label = LABELS.get(base, base).format(student=student)
    model = TRAINING_STAGES.get(base)
    return Step(stage, label, run, model.format(student=student) if model else None)


def sharded_pool(settings: Settings, layout: Layout, student: str) -> dict:
    """The pseudo_label stage's shards on Dask workers (flows/sharded.py)."""
    from flows import sharded

    return sharded.run(settings, student, Path(layout.params).parent.resolve())


def dvc_yaml_plan(settings: Settings, root: Path) -> list[Step]:
    """The plan of the DVC project at ``root``, as DVC reads its dvc.yaml and params.yaml."""
    from flows.dvc_project import DvcProject

    return plan(settings, *DvcProject(root).dag())


def run_in_process(steps: list[Step], settings: Settings, layout: Layout, until: str | None = None):
    """Every step in this process, without DVC's bookkeeping (tests and benchmarks that need the
    loop's outputs and not its lock file); ``until``: the last stage to run."""
    for s in steps:
        s.call(settings, layout, None)
        if s.stage == until:
            return

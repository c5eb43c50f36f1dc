"""The loop as a list of steps, each a dvc.yaml stage bound to the stage function its command calls.

tests/test_flow.py checks this list against the DAG DVC reads from dvc.yaml (same stages, every
dependency before its dependents), so the flow and `dvc repro` cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError
from tasks.settings import Settings
from tasks.tracking import ParentRun


@dataclass(frozen=True)
class Step:
    stage: str  # the stage's name in dvc.yaml (foreach rounds: pseudo_label@0, ...)
    label: str  # what the Prefect UI shows
    call: Callable[[Settings, ParentRun | None], Any]
    model: str | None = None  # the model a training step writes


def plan(settings: Settings) -> list[Step]:
    # modules are looked up when a step runs, not bound here, so every call goes to the function
    # dvc.yaml's command calls today
    from tasks import augment, evaluate, export, prepare, report, train

    steps = [
        Step("prepare", "prepare", lambda s, parent: prepare.prepare(s)),
        Step("augment", "augment", lambda s, parent: augment.augment(s)),
        Step(
            "train_teacher",
            "train teacher",
            lambda s, parent: train.train_or_launch(s, "teacher", parent),
            model="teacher",
        ),
    ]
    for index, student in enumerate(settings.students):
        name = student.name
        steps.append(
            Step(
                f"pseudo_label@{index}",
                f"pseudo-label for {name}",
                lambda s, parent, name=name: label_pool(s, name),
            )
        )
        steps.append(
            Step(
                f"train_student@{index}",
                f"train {name}",
                lambda s, parent, name=name: train.train_or_launch(s, name, parent),
                model=name,
            )
        )
    steps.append(Step("evaluate", "evaluate", lambda s, parent: evaluate.evaluate(s)))
    steps.append(Step("export", "export to ONNX", lambda s, parent: export.export(s)))
    steps.append(Step("report", "report", lambda s, parent: report.report(s, parent=parent)))
    return steps


def label_pool(settings: Settings, student: str) -> dict:
    """The pseudo_label stage: in this process, or its shards on Dask workers (flows/sharded.py)."""
    from tasks import pseudo_label

    if settings.pseudo_label.shards == 1:
        return pseudo_label.pseudo_label(settings, student)
    from flows import sharded

    return sharded.run(settings, student, Path.cwd())


def check_against_dag(steps: list[Step], names: list[str], edges: list[tuple[str, str]]) -> None:
    """The steps must be dvc.yaml's stages, each after the stages it depends on."""
    planned = [step.stage for step in steps]
    missing = sorted(set(names) - set(planned))
    unknown = sorted(set(planned) - set(names))
    if missing or unknown:
        raise PipelineError(
            "dvc.yaml and the flow (flows/stages.py) disagree: "
            f"stages only in dvc.yaml: {missing or 'none'}; only in the flow: {unknown or 'none'}"
        )
    position = {stage: i for i, stage in enumerate(planned)}
    for upstream, downstream in edges:
        if position[upstream] > position[downstream]:
            raise PipelineError(
                f"the flow runs {downstream} before {upstream}, which it depends on"
            )

"""A training here, or in ``runtime.devices x runtime.nodes`` processes under torchrun."""

from __future__ import annotations

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.models.classifier import resolve_device
from noisy_student.tracking.runs import ParentRun
from noisy_student.training import distributed
from noisy_student.training.loop import EpochResult
from noisy_student.training.train import skip_if_stopped, train


def train_or_launch(
    settings: Settings,
    name: str,
    layout: Layout,
    relaunch: tuple[str, list[str]],
    parent: ParentRun | None = None,
) -> list[EpochResult]:
    """Train ``name`` here, or start ``python -m <module> <args>`` (``relaunch``) again under
    torchrun when ``runtime`` asks for several processes; each of them then lands here and trains
    its share. The MLflow parent run reaches those processes through the environment. A round
    after the loop stopped (selection.patience) trains nothing."""
    if skip_if_stopped(settings, name, layout):
        return []
    if distributed.wanted(settings.runtime):
        module, args = relaunch
        env = distributed.parent_env(parent.run_id, parent.tags) if parent else {}
        distributed.launch(settings.runtime, module, args, env)
        return []
    if parent is None and (inherited := distributed.parent_from_env()) is not None:
        parent = ParentRun(*inherited)
    distributed.setup(resolve_device(settings.runtime).type)
    try:
        return train(settings, name, layout, parent=parent)
    finally:
        distributed.teardown()

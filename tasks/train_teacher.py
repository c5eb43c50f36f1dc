"""Stage `train_teacher`: the teacher (or an ensemble of them) on the labeled images alone."""

from __future__ import annotations

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.tracking.runs import ParentRun
from noisy_student.training.launch import train_or_launch
from noisy_student.training.loop import EpochResult

MODULE = "tasks.train_teacher"  # what torchrun starts again when runtime asks for processes


def run(settings: Settings, layout: Layout, parent: ParentRun | None = None) -> list[EpochResult]:
    return train_or_launch(settings, "teacher", layout, (MODULE, []), parent)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

"""Stage `train_student`: a round's student on the labeled images and its teacher's pseudo-labels.

    python -m tasks.train_student --name student_1 [--model resnet10t --lr 0.002 ...]

dvc.yaml passes the round's whole entry (``${item}`` unpacks to ``--name ... --model ...``) so that
DVC reruns exactly the rounds whose entry changed; the values are read from params.yaml, and the
command-line copies are only checked against it.
"""

from __future__ import annotations

import sys

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.tracking.runs import ParentRun
from noisy_student.training.launch import train_or_launch
from noisy_student.training.loop import EpochResult
from noisy_student.training.train import check_round_flags

MODULE = "tasks.train_student"  # what torchrun starts again when runtime asks for processes


def run(
    settings: Settings,
    layout: Layout,
    student: str,
    parent: ParentRun | None = None,
    argv: list[str] | None = None,
) -> list[EpochResult]:
    """``argv``: this command's arguments, for torchrun to start it again with."""
    relaunch = (MODULE, argv if argv is not None else ["--name", student])
    return train_or_launch(settings, student, layout, relaunch, parent)


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--name", required=True, help="student_1, student_2, ...")
    args, round_flags = p.parse_known_args()

    def stage(args, settings: Settings) -> None:
        check_round_flags(settings, args.name, round_flags)
        run(settings, Layout.at(), args.name, argv=sys.argv[1:])

    cli.run(stage, args)


if __name__ == "__main__":
    cli.main_process(main)

"""Stage `augment`: the teacher's and the student's augmentation policies, and their preview."""

from __future__ import annotations

from pathlib import Path

from noisy_student.augment.artifacts import augment
from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings


def run(settings: Settings, layout: Layout) -> Path:
    return augment(settings, layout)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

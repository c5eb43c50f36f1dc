"""Stage `report`: did each round pay off, and why; one HTML file with every picture in it.

Writes ``reports/report.html`` and ``reports/plots/`` (the data behind `dvc plots show`), and logs
them to MLflow: the flow's parent run, or a run of their own under `dvc repro`.
"""

from __future__ import annotations

from pathlib import Path

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.report.report import report
from noisy_student.tracking.runs import ParentRun


def run(settings: Settings, layout: Layout, parent: ParentRun | None = None) -> Path:
    return report(settings, layout, parent=parent)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

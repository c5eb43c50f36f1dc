"""Stage `evaluate`: every model's test accuracy and per-image test predictions.

The test set is read here only: no training stage ever sees it.
"""

from __future__ import annotations

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.evaluation.evaluate import evaluate


def run(settings: Settings, layout: Layout) -> dict:
    return evaluate(settings, layout)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

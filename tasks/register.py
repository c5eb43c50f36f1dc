"""Stage `register`: every model of the loop into MLflow's model registry, the best as `champion`.

Writes ``reports/registry.json`` (the versions and the champion). The registry lives in the MLflow
store, outside DVC's outputs: this stage is the one place that writes it.
"""

from __future__ import annotations

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.tracking.registry import register_models


def run(settings: Settings, layout: Layout) -> dict:
    return register_models(settings, layout)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

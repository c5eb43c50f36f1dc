"""The report: did each round pay off, and why; one HTML file with every picture in it.

Gathered (gather.py), drawn (plots.py, figures.py), written (render.py), published (publish.py).
Reads what the other stages wrote (never the test images: evaluate's per-image test predictions
stand in for them) and writes

- ``reports/report.html``: one self-contained page (pictures embedded as base64 PNG), to open in a
  browser, attach to a ticket, or read in MLflow's artifact view: the champion, a table of the
  rounds (each student against the model before it, with McNemar's exact test on the test
  images both got), test accuracy per round, learning curves, each round's pseudo-labels
  (confidence histogram with the threshold, kept count per class, and which labels were right
  where the pool's truth is known), the final model's confusion matrix, the augmentation preview;
- ``reports/plots/``: the same pictures as PNGs (``images/``) and the data behind them as CSVs,
  which dvc.yaml's top-level ``plots:`` declares for ``dvc plots show`` / ``dvc plots diff``.

The pictures also go to MLflow (under ``report/`` of the flow's parent run, or of a run named
``report`` tagged ``stage=report`` under plain ``dvc repro``); the flow publishes them as a
Prefect markdown artifact (``prefect_markdown``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from noisy_student.core.atomic import atomic_path, write_text
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.report.gather import gather
from noisy_student.report.plots import write_plots
from noisy_student.report.publish import log_to_mlflow
from noisy_student.report.render import render_html
from noisy_student.tracking import runs as tracking

log = logging.getLogger(__name__)


def report(
    settings: Settings,
    layout: Layout,
    *,
    parent: tracking.ParentRun | None = None,
) -> Path:
    """Write the page and the plots; log them to MLflow. Returns the page's path."""
    inputs = gather(settings, layout)
    with atomic_path(layout.plots) as staged:
        pictures = write_plots(inputs, settings, layout.augment / "preview.png", staged)
        page = render_html(inputs, pictures, settings.report.supervised_accuracy)
    write_text(layout.report, page)
    log.info("report: %s (%d pictures), data for `dvc plots show` in %s", layout.report,
             len(pictures), layout.plots)  # fmt: skip
    log_to_mlflow(settings, layout, inputs.rounds, inputs.registry["champion"], parent)
    return layout.report

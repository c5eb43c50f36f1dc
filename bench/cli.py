"""What every benchmark's command line shares: logging, --report-only, one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from noisy_student.core.errors import PipelineError


def run_cli(report_only: bool, report: Callable[[], str], run: Callable[[], str]) -> None:
    """Rebuild the tables (``report``) or run what is missing (``run``); print the tables. A
    refusal of the pipeline's is one line on stderr and a non-zero exit, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        text = report() if report_only else run()
    except PipelineError as exc:
        sys.exit(f"error: {exc}")
    print(text)

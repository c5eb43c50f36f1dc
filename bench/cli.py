"""What every benchmark's command line shares: logging, --report-only, one-line errors, and
the results written as JSON beside their table."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from noisy_student.core.atomic import write_text
from noisy_student.core.errors import PipelineError


def save_results(stem: Path, result: dict[str, Any], table: str) -> None:
    """``<stem>.json`` (the measurements) and ``<stem>.md`` (their table), each atomically."""
    write_text(stem.with_name(stem.name + ".json"), json.dumps(result, indent=2) + "\n")
    write_text(stem.with_name(stem.name + ".md"), table)


def run_cli(report_only: bool, report: Callable[[], str], run: Callable[[], str]) -> None:
    """Rebuild the tables (``report``) or run what is missing (``run``); print the tables. A
    refusal of the pipeline's is one line on stderr and a non-zero exit, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        text = report() if report_only else run()
    except PipelineError as exc:
        sys.exit(f"error: {exc}")
    print(text)

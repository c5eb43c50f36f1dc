"""Copyable recipes: a file of params.yaml changes (dotted keys), run as a DVC experiment.

    python -m noisy_student.recipes configs/distillation.yaml         # dvc exp run -n ... -S ...
    python -m noisy_student.recipes configs/distillation.yaml --print # that command, not run
    python -m noisy_student.recipes configs/distillation.yaml --temp  # in a copy of the project
    python -m noisy_student.recipes configs/distillation.yaml --queue # queued: dvc queue start
    python -m noisy_student.recipes configs/distillation.yaml --json  # the changes as JSON:
        prefect deployment run 'self-training/demo' --param overrides="$(...)"

A recipe holds only what it changes, e.g. ``distill.enabled: true`` (``students.*.drop_rate``:
every round's, one ``-S`` per round of the project's params.yaml); the changes are checked
against params.yaml like the file itself (an unknown key or a wrong value stops before any work).
With ``--temp`` or ``--queue`` the experiment runs in a copy of the project (the workspace's
outputs stay as they are; ``dvc exp apply <name>`` brings its results in); its trainings still
log to the project's MLflow store (tracking/runs.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import (
    PARAMS_FILE,
    Settings,
    apply_overrides,
    expand_overrides,
    format_validation_error,
)


def load_recipe(path: Path, params_file: Path = PARAMS_FILE) -> dict[str, Any]:
    """The recipe's changes, validated as params.yaml with them applied."""
    try:
        changes = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(changes, dict) or not changes:
        raise PipelineError(f"{path}: expected a mapping of dotted params keys to values")
    raw = yaml.safe_load(Path(params_file).read_text())
    try:
        Settings.model_validate(apply_overrides(raw, changes))
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    except ValidationError as exc:
        raise PipelineError(format_validation_error(exc, f"{path} on {params_file}")) from None
    return changes


def dvc_command(path: Path, changes: dict[str, Any], where: list[str] | None = None) -> list[str]:
    """``dvc exp run [--temp | --queue] -n <recipe> -S key=value ...``; values in the YAML/JSON
    form DVC parses."""
    command = ["dvc", "exp", "run", *(where or []), "-n", Path(path).stem]
    for key, value in changes.items():
        command += ["-S", f"{key}={json.dumps(value)}"]
    return command


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="a recipe file, e.g. configs/distillation.yaml")
    p.add_argument("--params", default=str(PARAMS_FILE))
    show = p.add_mutually_exclusive_group()
    show.add_argument("--print", action="store_true", help="print the dvc command, do not run it")
    show.add_argument("--json", action="store_true", help="print the changes as one JSON object")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--temp", action="store_true", help="run it in a copy of the project")
    where.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        changes = load_recipe(Path(args.recipe), Path(args.params))
    except PipelineError as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(changes))
        return
    flags = ["--temp"] * args.temp + ["--queue"] * args.queue
    raw = yaml.safe_load(Path(args.params).read_text())
    command = dvc_command(Path(args.recipe), expand_overrides(raw, changes), flags)
    print(shlex.join(command), flush=True)
    if not args.print:
        sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()

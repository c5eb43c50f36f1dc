"""Projects for the tests: the real params shrunk, fresh git + DVC repositories holding the
pipeline's code, and the commands run in them."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CODE = ("noisy_student", "tasks", "flows", "configs")  # what a project's dvc.yaml runs
# every stage of the digits loop with two rounds, in the order `dvc repro` and the flow run them
SCAN = "scan"  # always_changed: every repro runs it (it reads only images that changed)
STAGES = [
    SCAN,
    "prepare",
    "augment",
    "train_teacher",
    "pseudo_label@0",
    "train_student@0",
    "pseudo_label@1",
    "train_student@1",
    "evaluate",
    "register",
    "export",
    "report",
]
ONE_ROUND = [s for s in STAGES if not s.endswith("@1")]


def stages_from(stage: str) -> list[str]:
    """``stage`` and every stage after it."""
    return STAGES[STAGES.index(stage) :]


def stages_between(first: str, stop: str) -> list[str]:
    """From ``first`` up to, not including, ``stop``."""
    return STAGES[STAGES.index(first) : STAGES.index(stop)]


def load_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def shrink(params: dict[str, Any]) -> dict[str, Any]:
    """The real params with small models and few epochs: minutes of CPU for the whole loop."""
    p = copy.deepcopy(params)
    p["data"]["image_size"] = 16
    p["augment"]["preview_images"] = 2
    p["augment"]["preview_samples"] = 1
    p["pseudo_label"]["threshold"] = 0.6  # tiny models are rarely more confident
    p["teacher"].update(model="test_resnet", epochs=30, batch_size=8, warmup_epochs=1, lr=0.005)
    p["students"] = p["students"][:2]  # the tests' loop: two rounds (STAGES), whatever params has
    for student in p["students"]:
        student.update(model="test_resnet", epochs=6, batch_size=32, warmup_epochs=0, lr=0.005)
        student.update(drop_path_rate=0.0)
    p["flow"].update(retries=0, retry_delay_seconds=0)  # a failing test fails at once
    # one core per training: the suite runs one pytest worker per core (make test: pytest -n auto),
    # and tiny models gain nothing from a second thread
    p["runtime"]["cpu_threads"] = 1
    # a checkpoint after every epoch: the fault tests kill a training right after a given one
    p["runtime"]["checkpoint_epochs"] = 1
    return p


def quick(params: dict[str, Any], rounds: int = 2, teacher_epochs: int = 12) -> dict[str, Any]:
    """``shrink``'s params for the end-to-end runs: ``rounds`` students, and a shorter teacher
    training that still beats chance by far (the loop's tests compare runs with one another, not
    the accuracy a longer training would reach)."""
    p = shrink(params)
    p["teacher"]["epochs"] = teacher_epochs
    while len(p["students"]) < rounds:
        extra = dict(p["students"][-1])
        extra.update(name=f"student_{len(p['students']) + 1}", teacher=extra["name"])
        p["students"].append(extra)
    p["students"] = p["students"][:rounds]
    return p


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def venv_env() -> dict[str, str]:
    """Environment whose PATH finds this interpreter's `python`, `dvc` and `mlflow` first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def make_project(dest: Path, params: dict[str, Any]) -> Path:
    """A fresh git + DVC repository holding the pipeline's code and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for package in CODE:
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    write_params(dest / "params.yaml", params)
    (dest / ".gitignore").write_text("mlflow.db\nmlruns/\n__pycache__/\n.prefect/\ncheckpoints/\n")
    env = venv_env()
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline"],
    ):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
        if cmd[0] == "dvc":  # the product's DVC settings (cache link types), as a clone has them
            shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    return dest


def built_once(folder: Path, build: Callable[[Path], str]) -> str:
    """``build(folder)``'s output, built by the first process of the test run to ask (pytest-xdist
    workers share the run's temporary root); the others wait for it under a file lock and read
    it. A build that failed half-way is started again from nothing."""
    from filelock import FileLock

    output = folder.with_name(f"{folder.name}.output")
    with FileLock(f"{folder}.lock"):
        if not output.exists():
            shutil.rmtree(folder, ignore_errors=True)
            text = build(folder)
            output.write_text(text)
    return output.read_text()


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of a shared project, git history, DVC cache and MLflow store included, to change
    without retraining. The MLflow store's artifact locations are absolute paths into
    ``source``: they are pointed at the copy."""
    shutil.copytree(source, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as con:
            for table, column in (
                ("experiments", "artifact_location"),
                ("runs", "artifact_uri"),
                ("model_versions", "source"),
                ("model_versions", "storage_location"),
                ("logged_models", "artifact_location"),
            ):
                with contextlib.suppress(sqlite3.OperationalError):  # not in this MLflow
                    con.execute(
                        f"UPDATE {table} SET {column} = REPLACE({column}, ?, ?)",
                        (str(source), str(dest)),
                    )
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def ran(output: str) -> list[str]:
    """The stages `dvc repro` ran, in its order."""
    return re.findall(r"Running stage '([^']+)'", output)


def dvc_status(project: Path) -> dict:
    """The stages `dvc status` finds out of date; the scan stage, which DVC always calls changed
    (``always changed``, whatever the images), only where it says more."""
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    return {k: v for k, v in status.items() if v != ["always changed"]}


def mlflow_runs(project: Path) -> list:
    """Every run of the project's own sqlite MLflow store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    return mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")


def training_runs(runs: list) -> list:
    """MLflow runs of trainings only: under `dvc repro` the report stage logs a run of its own,
    and the loop has a run of its own that its trainings nest under."""
    return [r for r in runs if r.data.tags.get("stage") not in ("report", "loop")]


def loop_results(project: Path) -> dict[str, bytes]:
    """What one params.yaml and one dataset must always give, whichever entry point ran the loop:
    every model's weights and standing, and every pseudo-label table (not the run ids, the
    timings or the MLflow store)."""
    files = [
        *project.glob("models/*/*.safetensors"),
        *project.glob("models/*/standing.json"),
        *project.glob("pseudo_labels/*.parquet"),
    ]
    return {str(f.relative_to(project)): f.read_bytes() for f in sorted(files)}


def registry_champion(project: Path) -> str:
    """The champion the register stage recorded in ``reports/registry.json``."""
    return json.loads((project / "reports/registry.json").read_text())["champion"]

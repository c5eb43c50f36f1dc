"""The layout's rules, checked: import-linter's contracts, and dvc.yaml's deps against the code
each stage really runs (a stage whose deps miss a file it imports would be called up to date by
`dvc repro` after that file changed)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.imports import closure

ROOT = Path(__file__).resolve().parents[1]


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage by its ``do`` body."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in raw.items()}


def stage_module(cmd: str) -> Path:
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"], f"{cmd}: a stage runs `python -m tasks.<stage>`"
    return Path(*words[2].split(".")).with_suffix(".py")


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    paths = [Path(d) for d in deps]
    return sorted(str(f) for f in files if not any(f == p or p in f.parents for p in paths))


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and ", 0 broken" in result.stdout


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_cover_the_code_it_runs(name: str):
    stage = stages()[name]
    module = stage_module(stage["cmd"])
    assert module.parts[0] == "tasks", f"{name}: its command must run a tasks/ module"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    missing = uncovered(closure(ROOT, ROOT / module), deps)
    assert not missing, f"dvc.yaml stage {name}: deps miss code it runs: {missing}"


def test_every_stage_module_has_a_stage():
    modules = {stage_module(s["cmd"]).stem for s in stages().values()}
    on_disk = {p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    assert on_disk == modules, "tasks/ holds one module per dvc.yaml stage, and nothing else"


def test_the_check_catches_a_missing_dep():
    """The check itself can fail: the teacher's training without its training folder."""
    stage = stages()["train_teacher"]
    deps = [d for d in stage["deps"] if d != "noisy_student/training"]
    missing = uncovered(closure(ROOT, ROOT / "tasks" / "train_teacher.py"), deps)
    assert "noisy_student/training/resume.py" in missing
    assert "noisy_student/training/distributed.py" in missing


def test_the_pseudo_label_stage_declares_every_selection_key():
    """A key of `pseudo_label` that changes which rows a student learns from must be a param
    of the stage, else `dvc repro` calls a changed table up to date. Those it may leave out:
    what the student stage reads (labels, temperature) and what cannot change the table
    (shards: the same table either way, tested byte for byte)."""
    from noisy_student.core.settings import PseudoLabelSettings

    declared = set(stages()["pseudo_label"]["params"])
    not_read_here = {"labels", "temperature", "shards"}
    missing = {f"pseudo_label.{key}" for key in PseudoLabelSettings.model_fields} - declared
    assert missing == {f"pseudo_label.{key}" for key in not_read_here}

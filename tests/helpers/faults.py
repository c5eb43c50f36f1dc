"""Faults for the tests: a training killed with SIGKILL once it has written a checkpoint, and
every process below a pid (a machine that goes away takes them all)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.project import venv_env


def checkpointed_epoch(folder: Path, label: str) -> int:
    """The newest epoch with a complete checkpoint (its JSON is written last)."""
    names = [p.name for p in folder.glob(f"{label}.epoch*.json")] if folder.exists() else []
    return max(
        (int(n.removeprefix(f"{label}.epoch").removesuffix(".json")) for n in names), default=0
    )


def kill_training_after(project: Path, epoch: int) -> None:
    """Start the teacher's training (the stage's command) and SIGKILL it once checkpoint
    ``epoch`` is written."""
    folder = project / "checkpoints/teacher"
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.train_teacher"],
        cwd=project,
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while True:
        if checkpointed_epoch(folder, "teacher") >= epoch:
            break
        assert process.poll() is None, "the training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert not (project / "models/teacher").exists()  # nothing half-written


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

"""Write artifacts under a temporary name and rename, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    Works for files and folders alike: whatever the caller creates at the yielded path is moved.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:  # name the folder, not the temporary name
        message = f"cannot write {target.name} there: {exc.strerror}"
        raise OSError(exc.errno, message, str(target.parent)) from None
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            # a folder cannot be replaced in one rename: park the old one in tmp, then swap
            os.replace(target, tmp / "previous")
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)

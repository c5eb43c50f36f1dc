"""What the user's images are, file by file: ``data/sources.json``, the scan stage's output.

DVC tracks a stage's deps by path, and a folder outside the project (``data.labeled_dir`` may
be anywhere) cannot be a dvc.yaml dep whose path comes from params.yaml when the demo has none.
So the scan stage, which DVC always runs (``always_changed``), lists every image prepare would
read, with the digest of its bytes, per folder: prepare depends on this file, and reruns exactly
when an image, its class folder or its name changed. Prepare's splits are then compared one by
one (the stages depend on ``data/prepared/<split>``), so a changed test image reruns evaluation
and what follows it, not the trainings.

Digests are cached by path, size and modification time (as DVC does), so a scan of an unchanged
pool reads no image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.metadata import version
from pathlib import Path

from noisy_student.core.atomic import write_text
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.progress import track
from noisy_student.core.settings import Settings
from noisy_student.data.images import list_images
from noisy_student.data.manifest import read_manifest

log = logging.getLogger(__name__)
FOLDER_KEYS = ("labeled_dir", "unlabeled_dir", "test_dir", "val_dir")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 per file, reused while the file's size and modification time are unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.known = {}
        self.seen: dict[str, list] = {}

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = self.known.get(key)
        if entry is None or entry[:2] != stamp:
            entry = [*stamp, file_digest(path)]
        self.seen[key] = entry
        return entry[2]

    def save(self) -> None:
        write_text(self.path, json.dumps(self.seen))  # only what this scan saw: no growth


def folder_manifest(root: Path, key: str, cache: DigestCache) -> dict[str, str]:
    """Every image prepare would read under ``root`` (path relative to it -> sha256)."""
    if not root.is_dir():
        raise PipelineError(f"data.{key}: '{root}' is not a folder")
    images = list_images(root)
    return {
        p.relative_to(root).as_posix(): cache.digest(p)
        for p in track(images, len(images), f"scan {key}", "images", min_interval=5)
    }


def every_file(root: Path, cache: DigestCache) -> dict[str, str]:
    """Every file under ``root`` (a dataset's Arrow and JSON files, or its images) -> sha256."""
    if not root.exists():
        raise PipelineError(f"data.hf_dataset: '{root}' does not exist")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    return {
        p.relative_to(root).as_posix(): cache.digest(p)
        for p in track(files, len(files), "scan hf_dataset", "files", min_interval=5)
    }


def scan(settings: Settings, layout: Layout) -> dict:
    """Write ``layout.sources`` (only when it changed, so its timestamp means something too)."""
    data = settings.data
    if data.source == "digits":
        # the version from the package's metadata: importing scikit-learn costs ~0.8 s per scan
        manifest: dict = {"source": "digits", "scikit-learn": version("scikit-learn")}
    else:
        cache = DigestCache(layout.scan_cache)
        manifest = {"source": data.source}
        if data.source == "manifest":
            table = read_manifest(Path(data.manifest))  # type: ignore[arg-type]
            rows = track(table.rows.itertuples(), len(table.rows), "scan", "images", min_interval=5)
            files = {row.path: cache.digest(row.file) for row in rows}
            digest = file_digest(table.source)
            manifest["manifest"] = {"path": data.manifest, "digest": digest, "files": files}
        elif data.source == "hf_dataset":
            files = every_file(Path(data.hf_dataset), cache)  # type: ignore[arg-type]
            manifest["hf_dataset"] = {"path": data.hf_dataset, "files": files}
        else:
            for key in FOLDER_KEYS:
                folder = getattr(data, key)
                if folder:
                    files = folder_manifest(Path(folder), key, cache)
                    manifest[key] = {"path": folder, "files": files}
        cache.save()
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if not layout.sources.exists() or layout.sources.read_text() != text:
        write_text(layout.sources, text)
    counts = {k: len(v["files"]) for k, v in manifest.items() if isinstance(v, dict)}
    log.info("sources: %s", counts or manifest["source"])
    return manifest

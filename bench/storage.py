"""Storage at photo size: what a pool of real-looking JPEG photos costs on disk once prepared and
versioned by DVC, for each ``data.storage``, and how fast prepare writes it and loaders read it.

    python -m bench.storage                          # 720 and 2,000 photos of 260-670 px, 224 px
    python -m bench.storage --photos 720 --image-size 224 --workers 1 2

For each pool size: photo-like JPEGs (bench/photos.py) in the folder layout users bring; then, per
storage (``arrays``: images.npy of decoded pixels; ``encoded``: the photos' bytes in shards) and
per count of decode threads (``data.decode_workers``), the real prepare stage function
(noisy_student.data.prepare.prepare, what tasks/prepare.py runs) in a fresh git + DVC repository
with the product's .dvc/config (hard links into the cache), then ``dvc commit`` of the prepared
data as `dvc repro` does it. Measured:

- bytes on disk (``du``: a file with several hard links counted once) of ``data/prepared`` plus
  ``.dvc/cache``, against the source JPEGs; and the same with DVC's default, copies (cache.type
  ``reflink,copy`` on a file system without reflinks, as ext4 here);
- prepare: images/s of the stage function (wall);
- reading: images/s of one pass over the pool split, as the loaders read it (``split.images[i]``,
  decoded and viewed as evaluation views it for ``encoded``; a memory-mapped slice for
  ``arrays``);
- pseudo-labeling (with the product's cache links): the real pseudo_label stage function over
  the pool, an untrained ``teacher.model`` of params.yaml at ``image_size`` (its weights do not
  change its speed), on the CPU, with 0 and 2 DataLoader workers: images/s, and the peak growth
  of the process's own memory (RssAnon, sampled every 10 ms as bench.scale samples it).

Results: ``<out>/storage.json`` and ``storage.md``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.cli import run_cli, save_results
from bench.photos import write_photo_folders
from noisy_student.core.layout import Layout
from noisy_student.core.settings import PARAMS_FILE, Settings

log = logging.getLogger("bench.storage")
MB = 1024 * 1024


def disk_bytes(*paths: Path) -> int:
    """Bytes the paths take on disk together, hard links counted once (``du -scb``)."""
    out = subprocess.run(
        ["du", "-scb", *map(str, paths)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1].split()[0])


def dvc(args: list[str], cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True)


def project(root: Path, links: str) -> Path:
    """A git + DVC repository whose cache links as ``links`` (the product's: hardlink,copy)."""
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(["init", "-q"], root)
    dvc(["config", "cache.type", links], root)
    return root


def measure(
    photos: Path, params: dict, storage: str, workers: int, links: str, work: Path, label: bool
) -> dict[str, Any]:
    from noisy_student.data.prepare import prepare
    from noisy_student.data.splits import load_split

    data = {**params["data"], "storage": storage, "decode_workers": workers}
    settings = Settings.model_validate({**params, "data": data})
    root = project(work, links)
    layout = Layout.at(root)
    start = time.perf_counter()
    counts = prepare(settings, layout)
    prepare_s = time.perf_counter() - start
    dvc(["add", "-q", "data/prepared"], root)  # the cache as `dvc repro` fills it for prepare
    pool = load_split("unlabeled", layout.prepared)
    start = time.perf_counter()
    for i in range(len(pool)):
        np.array(pool.images[i])  # the pixels, copied out as a loader takes them
    read_s = time.perf_counter() - start
    images = sum(counts.values())
    labeling = label_runs(settings, layout) if label else {}
    return labeling | {
        "storage": storage,
        "workers": workers,
        "cache_links": links,
        "images": images,
        "prepared_bytes": disk_bytes(layout.prepared),
        "prepared_and_cache_bytes": disk_bytes(layout.prepared, root / ".dvc" / "cache"),
        "prepare_images_per_s": images / prepare_s,
        "read_images_per_s": len(pool) / read_s,
    }


def label_runs(settings: Settings, layout: Layout) -> dict[str, Any]:
    """Pseudo-labeling the prepared pool: images/s and peak RssAnon growth, per loader workers."""
    from bench.scale import PeakSampler, status_kb
    from bench.synthetic import write_model
    from noisy_student.data.splits import load_classes
    from noisy_student.pseudo_labels.labeling import pseudo_label

    write_model(layout.model("teacher"), settings.teacher, settings.data.image_size,
                load_classes(layout.prepared))  # fmt: skip
    pool = sum(1 for _ in (layout.prepared / "unlabeled" / "index.csv").open()) - 1
    out: dict[str, Any] = {}
    for workers in (0, 2):
        changed = settings.model_copy(
            update={
                "runtime": settings.runtime.model_copy(
                    update={"device": "cpu", "num_workers": workers}
                ),
                "pseudo_label": settings.pseudo_label.model_copy(update={"threshold": 0.0}),
            }
        )
        before = status_kb()["RssAnon"]
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        pseudo_label(changed, settings.students[0].name, layout)
        seconds = time.perf_counter() - start
        peak = sampler.stop()["RssAnon"]
        out[f"label_images_per_s_w{workers}"] = pool / seconds
        out[f"label_rss_anon_growth_mb_w{workers}"] = (peak - before) / 1024
    return out


def run(
    *,
    pools: tuple[int, ...] = (720, 2_000),
    size: int = 224,
    sides: tuple[int, int] = (260, 670),
    workers: tuple[int, ...] = (1, 2),
    params_file: Path = PARAMS_FILE,
    out_dir: Path | None = Path("bench/results"),
    command: str = "",
) -> dict[str, Any]:
    base = yaml.safe_load(Path(params_file).read_text())
    results = []
    for count in pools:
        with tempfile.TemporaryDirectory(prefix=f"bench-storage-{count}-") as tmp:
            tmp = Path(tmp)
            log.info("%d photos: writing them", count)
            photos = write_photo_folders(tmp / "photos", per_class=20, pool=count, sides=sides)
            source = disk_bytes(photos)
            files = sum(1 for f in photos.rglob("*.jpg"))
            params = {**base, "data": {**base["data"], "source": "folders", "image_size": size}}
            params["data"] |= {
                "labeled_dir": str(photos / "labeled"),
                "test_dir": str(photos / "test"),
                "unlabeled_dir": str(photos / "pool"),
                "val_dir": None,
            }
            runs = []
            cases = [(s, w, "hardlink,copy") for s in ("arrays", "encoded") for w in workers]
            cases += [(s, workers[-1], "reflink,copy") for s in ("arrays", "encoded")]
            for k, (storage, n, links) in enumerate(cases):
                log.info("%d photos: %s, %d decode threads, cache %s", count, storage, n, links)
                label = links == "hardlink,copy" and n == workers[-1]
                runs.append(measure(photos, params, storage, n, links, tmp / f"p{k}", label))
                shutil.rmtree(tmp / f"p{k}")
            results.append({"photos": files, "source_bytes": source, "pool": count, "runs": runs})
    result = {
        "device": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
        "image_size": size,
        "photo_sides": list(sides),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "pools": results,
    }
    if out_dir is not None:
        save_results(out_dir / "storage", result, render(result))
    return result


def labeled(run: dict[str, Any], key: str, spec: str) -> str:
    if f"{key}_w0" not in run:
        return ""
    return f"{run[f'{key}_w0']:{spec}} / {run[f'{key}_w2']:{spec}}"


def render(result: dict[str, Any]) -> str:
    head = (
        f"Device: {result['device']}; photos of {result['photo_sides'][0]}-"
        f"{result['photo_sides'][1]} px (JPEG), prepared at {result['image_size']} px; "
        f"{result['date']}.\nCommand: `{result['command']}`\n\n"
    )
    lines = [
        "| photos | source MB | storage | DVC cache links | decode threads | prepared MB "
        "| prepared + cache MB | x source | prepare images/s | read images/s "
        "| pseudo-label images/s, 0 / 2 workers | its RssAnon growth MB, 0 / 2 workers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pool in result["pools"]:
        src = pool["source_bytes"]
        for r in pool["runs"]:
            lines.append(
                f"| {pool['photos']:,} | {src / MB:.1f} | {r['storage']} | {r['cache_links']} | "
                f"{r['workers']} | {r['prepared_bytes'] / MB:.1f} | "
                f"{r['prepared_and_cache_bytes'] / MB:.1f} | "
                f"**{r['prepared_and_cache_bytes'] / src:.2f}** | "
                f"{r['prepare_images_per_s']:.0f} | {r['read_images_per_s']:.0f} | "
                f"{labeled(r, 'label_images_per_s', '.0f')} | "
                f"{labeled(r, 'label_rss_anon_growth_mb', '.0f')} |"
            )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, nargs="+", default=[720, 2_000], help="pool sizes")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sides", type=int, nargs=2, default=[260, 670], help="photo side range")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode threads")
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()

    def measured() -> str:
        return render(
            run(
                pools=tuple(args.photos),
                size=args.image_size,
                sides=tuple(args.sides),
                workers=tuple(args.workers),
                params_file=Path(args.params),
                out_dir=args.out,
                command=shlex.join(["python", "-m", "bench.storage", *sys.argv[1:]]),
            )
        )

    run_cli(False, lambda: "", measured)  # nothing to rebuild: every table is measured afresh


if __name__ == "__main__":
    main()

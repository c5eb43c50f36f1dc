"""Scale curve: pseudo-labeling time and peak memory for pools of 1k, 10k and 100k images.

    python -m bench.scale                               # 1k, 10k, 100k images of 32 x 32
    python -m bench.scale --pools 1000 10000 100000 1000000 --model resnet18

For each pool size this writes a synthetic prepared pool (noisy_student/data/splits.py's layout,
through noisy_student.data.prepare's ``write_split``) and an untrained model, then runs the real
stage function, ``noisy_student.pseudo_labels.labeling.pseudo_label`` (what tasks/pseudo_label.py
runs), in a fresh Python process whose stderr is a pipe (not a terminal, as under DVC or
Prefect), and measures there:

- wall time of the stage (model loading included), images/s, and the CPU time of the process
  (every thread's): on a machine shared with other work, wall time swings with their load, CPU
  time much less, so the linearity is read on CPU time;
- memory, sampled every 10 ms from /proc/self/status: **RssAnon**, the process's own memory
  (what it allocated: arrays, tensors, tables), and **RssFile**, pages of files mapped into it,
  here mostly the memory-mapped ``images.npy`` (the kernel's page cache, shared and evictable,
  so it can reach the pool's size without the process holding the pool); plus the kernel's
  peak RSS, VmHWM, which counts both. "Bounded by the batch" is a claim about RssAnon;
- the progress lines the stage logged (a line every tenth of the pool, at most one per 5 s).

Results: ``<out>/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.cli import save_results
from noisy_student.core.settings import PARAMS_FILE, known_timm_model, load_settings

log = logging.getLogger("bench.scale")
ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"pseudo-label \(teacher\): (\d+)/(\d+) images")
MB = 1024 * 1024


def status_kb() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM of this process, in kB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class PeakSampler(threading.Thread):
    """The highest RssAnon and RssFile seen, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = status_kb()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for key, value in status_kb().items():
                self.peak[key] = max(self.peak[key], value)

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join()
        return self.peak


def child(root: Path, params_file: Path, batch: int) -> None:
    """In a fresh process: pseudo-label the pool under ``root`` and print the measurements."""
    import torch  # noqa: F401  (imported before the baseline: its import is not the stage's)

    from bench.synthetic import layout
    from noisy_student.pseudo_labels.labeling import pseudo_label

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    overrides = {"runtime.device": "cpu", "pseudo_label.threshold": 0.0}
    overrides["pseudo_label.batch_size"] = batch
    settings = load_settings(params_file, overrides)
    before = status_kb()
    sampler = PeakSampler()
    sampler.start()
    cpu = time.process_time()
    start = time.perf_counter()
    summary = pseudo_label(settings, "student_1", layout(root))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu  # every thread's; robust to a crowded machine
    peak = sampler.stop()
    after = status_kb()
    print(
        json.dumps(
            {"seconds": seconds, "cpu_seconds": cpu_seconds}
            | {"before_kb": before, "peak_kb": peak, "after_kb": after}
            | {"pool_images": summary["pool_images"]}
        )
    )


def measure(
    count: int, size: int, model: str, params_file: Path, batch: int, work: Path
) -> dict[str, Any]:
    from bench.synthetic import layout, write_model, write_pool

    settings = load_settings(params_file)
    spec = settings.teacher.model_copy(update={"model": known_timm_model(model)})
    place = layout(work)
    log.info("pool of %d: writing it", count)
    write_pool(place.prepared, count, size)
    write_model(place.model("teacher"), spec, size)
    command = [sys.executable, "-m", "bench.scale", "--child", str(work)]
    command += ["--params", str(params_file), "--batch", str(batch)]
    log.info("pool of %d: pseudo-labeling in a fresh process", count)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pseudo-labeling {count} images failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    progress = [line for line in done.stderr.splitlines() if PROGRESS.search(line)]
    pool_bytes = (place.prepared / "unlabeled" / "images.npy").stat().st_size
    table_bytes = place.pseudo_table("student_1").stat().st_size
    before, peak = result["before_kb"], result["peak_kb"]
    return {
        "pool_images": count,
        "image_size": size,
        "model": model,
        "batch": batch,
        "seconds": result["seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "images_per_second": count / result["seconds"],
        "pool_file_mb": pool_bytes / MB,
        "table_mb": table_bytes / MB,
        "rss_anon_before_mb": before["RssAnon"] / 1024,
        "rss_anon_peak_mb": peak["RssAnon"] / 1024,
        "rss_anon_growth_mb": (peak["RssAnon"] - before["RssAnon"]) / 1024,
        "rss_file_before_mb": before["RssFile"] / 1024,
        "rss_file_peak_mb": peak["RssFile"] / 1024,
        "rss_file_growth_mb": (peak["RssFile"] - before["RssFile"]) / 1024,
        "vm_hwm_mb": result["after_kb"]["VmHWM"] / 1024,
        "progress_lines": progress,
    }


def render(result: dict[str, Any]) -> str:
    head = (
        f"Device: {result['device']}; {result['model']} at {result['image_size']} px, batch "
        f"{result['batch']}; one fresh process per pool, stderr a pipe (not a terminal); "
        f"{result['date']}; load average at the start {result['load_average']}.\n"
        f"Command: `{result['command']}`\n\n"
    )
    lines = [
        "| pool images | images.npy MB | seconds | CPU seconds | images/s "
        "| CPU ms per extra image "
        "| RssAnon peak − start, MB | RssFile peak − start, MB | VmHWM MB | table MB "
        "| progress lines |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for r in result["pools"]:
        marginal = ""
        if previous is not None:  # the slope: time = fixed cost + slope * images
            extra = r["pool_images"] - previous["pool_images"]
            marginal = f"{1e3 * (r['cpu_seconds'] - previous['cpu_seconds']) / extra:.2f}"
        lines.append(
            f"| {r['pool_images']:,} | {r['pool_file_mb']:.0f} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | {r['images_per_second']:.0f} | {marginal} | "
            f"**{r['rss_anon_growth_mb']:.1f}** | "
            f"{r['rss_file_growth_mb']:.0f} | {r['vm_hwm_mb']:.0f} | {r['table_mb']:.1f} | "
            f"{len(r['progress_lines'])} |"
        )
        previous = r
    pools = result["pools"]
    notes = []
    if len(pools) >= 2:
        a, b = pools[-2], pools[-1]
        extra = b["pool_images"] - a["pool_images"]
        per_image = (b["rss_anon_growth_mb"] - a["rss_anon_growth_mb"]) * MB / extra
        notes.append(
            f"From {a['pool_images']:,} to {b['pool_images']:,} images the process's own "
            f"memory grew by {per_image:.0f} bytes per image (an image is "
            f"{3 * result['image_size'] ** 2:,} bytes); CPU time per image went from "
            f"{1e3 * a['cpu_seconds'] / a['pool_images']:.2f} to "
            f"{1e3 * b['cpu_seconds'] / b['pool_images']:.2f} ms (the fixed cost of loading the "
            "model spread over more images)."
        )
    last = pools[-1]["progress_lines"]
    if last:
        shown = "\n".join(last)
        notes.append(f"Progress lines of the largest pool, as logged:\n\n```\n{shown}\n```")
    return head + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def run(
    *,
    pools: tuple[int, ...] = (1_000, 10_000, 100_000),
    size: int = 32,
    model: str = "resnet10t",
    batch: int | None = None,
    params_file: Path = PARAMS_FILE,
    out_dir: Path | None = Path("bench/results"),
    command: str = "",
) -> dict[str, Any]:
    import platform

    batch = batch or load_settings(params_file).pseudo_label.batch_size
    results = []
    for count in pools:
        with tempfile.TemporaryDirectory(prefix=f"bench-scale-{count}-") as tmp:
            results.append(measure(count, size, model, params_file, batch, Path(tmp)))
        log.info(
            "pool of %d: %s", count, {k: v for k, v in results[-1].items() if "lines" not in k}
        )
    result = {
        "device": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
        "model": model,
        "image_size": size,
        "batch": batch,
        "date": datetime.date.today().isoformat(),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": command,
        "pools": results,
    }
    if out_dir is not None:
        save_results(out_dir / "scale", result, render(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pools", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", default="resnet10t", help="timm name of the labeling model")
    p.add_argument("--batch", type=int, help="default: pseudo_label.batch_size of params.yaml")
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args()
    if args.child is not None:
        child(args.child, Path(args.params), args.batch)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = run(
        pools=tuple(args.pools),
        size=args.image_size,
        model=args.model,
        batch=args.batch,
        params_file=Path(args.params),
        out_dir=args.out,
        command=shlex.join(["python", "-m", "bench.scale", *sys.argv[1:]]),
    )
    print(render(result))


if __name__ == "__main__":
    main()

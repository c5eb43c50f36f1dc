"""Decoding at photo size: what the evaluation view of a large JPEG costs, decoded whole or
decoded scaled (libjpeg's DCT scaling, noisy_student.data.images.read_image).

    python -m bench.decode                                   # 260-670 px and 1,100-3,000 px
    python -m bench.decode --sides 2000 4000 --image-size 224 --photos 40

Per range of photo sides: photo-like JPEGs (bench/photos.py), then, over the same files in the
same run, alternating, best of ``--repeats`` passes each: images/s of the view evaluation,
pseudo-labeling and ``predict`` take (timm's centre crop at ``data.eval_crop_pct``) from a whole
decode (``square_view(read_rgb(...))``, what the product did before) and from ``read_image``
(the scaled decode it does now), one thread; and how far the two views are apart (mean absolute
difference in grey levels, per image; mean and worst). Results: ``<out>/decode.json`` and
``decode.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cli import run_cli, save_results
from bench.photos import sample_photos, save_photo
from noisy_student.data.images import read_image, read_rgb, square_view


def images_per_s(view, paths: list[Path], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            view(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def measure_sides(sides: tuple[int, int], photos: int, size: int, crop_pct: float, repeats: int):
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        rng, sources = np.random.default_rng(0), sample_photos()
        paths = [Path(tmp) / f"photo_{k}.jpg" for k in range(photos)]
        for k, path in enumerate(paths):
            save_photo(sources, path, rng, sides, k % 2)

        def whole(path: Path) -> np.ndarray:
            return square_view(read_rgb(path), size, crop_pct)

        def scaled(path: Path) -> np.ndarray:
            return read_image(path, size, crop_pct=crop_pct)

        gaps = [np.abs(whole(p).astype(int) - scaled(p).astype(int)).mean() for p in paths]
        whole_ips, scaled_ips = [], []
        for _ in range(2):  # alternating, so both see the same state of the machine
            whole_ips.append(images_per_s(whole, paths, repeats))
            scaled_ips.append(images_per_s(scaled, paths, repeats))
        return {
            "sides": list(sides),
            "photos": photos,
            "mean_bytes": int(np.mean([p.stat().st_size for p in paths])),
            "whole_ips": max(whole_ips),
            "scaled_ips": max(scaled_ips),
            "speedup": max(scaled_ips) / max(whole_ips),
            "gap_mean": float(np.mean(gaps)),
            "gap_worst": float(np.max(gaps)),
        }


def run(
    *,
    ranges: list[tuple[int, int]],
    photos: int = 40,
    size: int = 224,
    crop_pct: float = 0.875,
    repeats: int = 3,
    out_dir: Path | None = Path("bench/results"),
    command: str = "",
) -> str:
    rows = [measure_sides(sides, photos, size, crop_pct, repeats) for sides in ranges]
    result = {
        "device": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
        "image_size": size,
        "crop_pct": crop_pct,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "rows": rows,
    }
    text = render(result)
    if out_dir is not None:
        save_results(out_dir / "decode", result, text)
    return text


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Device: {result['device']}; evaluation view {result['image_size']} px at crop_pct "
        f"{result['crop_pct']}; one thread; {result['date']}.",
        f"Command: `{result['command']}`",
        "",
        "| photo sides px | photos | mean JPEG KB | whole decode img/s | scaled decode img/s "
        "| **speed-up** | view gap, grey levels: mean / worst image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['sides'][0]}-{r['sides'][1]} | {r['photos']} | {r['mean_bytes'] / 1024:.0f} | "
            f"{r['whole_ips']:.0f} | {r['scaled_ips']:.0f} | **{r['speedup']:.1f}x** | "
            f"{r['gap_mean']:.2f} / {r['gap_worst']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[260, 670, 1100, 3000],
                   help="pairs of photo side ranges, px")  # fmt: skip
    p.add_argument("--photos", type=int, default=40, help="photos per range")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    if len(args.sides) % 2 or any(s < 16 for s in args.sides):
        sys.exit(f"error: --sides {args.sides}: pairs of sides (low high), each at least 16 px")
    ranges = [(args.sides[i], args.sides[i + 1]) for i in range(0, len(args.sides), 2)]
    command = shlex.join(["python", "-m", "bench.decode", *sys.argv[1:]])
    run_cli(False, lambda: "", lambda: run(ranges=ranges, photos=args.photos,
            size=args.image_size, crop_pct=args.crop_pct, out_dir=args.out,
            command=command))  # fmt: skip


if __name__ == "__main__":
    main()

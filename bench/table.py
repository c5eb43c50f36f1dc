"""The pseudo-label table at many classes: bytes per pool image on disk, and what a student's
training set holds in memory, per ``pseudo_label.probs`` / ``pseudo_label.top_k``.

    python -m bench.table                            # 20,000 images x 1,000 classes
    python -m bench.table --images 50000 --classes 1000 --top-k 5

For each format the real functions of the pseudo_label stage write the table (labeling.table_rows
batch by batch into a TableWriter, then write_with_copies, as pseudo_label does) and a student's
training reads it back (table.load_pseudo_labels, then training.items.pool_label_targets for
soft labels). The teacher's distributions are drawn, seeded: a softmax of N(0, 2) logits with
one class raised by 6 (a confident teacher on most images). The CSV table this product wrote
before (pyarrow's CSV writer, shortest round-trip floats) is measured too, as the reference.

Results: ``<out>/table.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import torch

from bench.cli import run_cli
from noisy_student.core.atomic import write_text
from noisy_student.core.settings import PseudoLabelSettings
from noisy_student.data.splits import UNKNOWN, Split
from noisy_student.pseudo_labels.labeling import table_rows
from noisy_student.pseudo_labels.table import TableWriter, load_pseudo_labels, write_with_copies

MB = 1024 * 1024
BATCH = 256  # pseudo_label.batch_size: one row group per batch in the stage's shard file


def distributions(images: int, classes: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (images, classes)).astype(np.float32)
    logits[np.arange(images), rng.integers(0, classes, images)] += 6.0
    return torch.softmax(torch.from_numpy(logits), dim=1)


def settings(probs: str, top_k: int | None) -> PseudoLabelSettings:
    return PseudoLabelSettings(
        threshold=0.0, labels="soft", temperature=1.0, balance=False, per_class=None,
        batch_size=BATCH, shards=1, ood_filter=None, probs=probs, top_k=top_k,
    )  # fmt: skip


def measure_format(
    probs: torch.Tensor, ids: list[str], classes: list[str], cfg: PseudoLabelSettings, work: Path
) -> dict[str, Any]:
    from noisy_student.training.items import pool_label_targets

    rows, out = work / "rows.parquet", work / "table.parquet"
    start = time.perf_counter()
    with TableWriter(rows) as writer:
        for at in range(0, len(ids), BATCH):
            writer.write(table_rows(probs[at : at + BATCH], ids[at : at + BATCH], classes, cfg))
    write_with_copies([rows], out, np.ones(len(ids), np.int64))
    write_s = time.perf_counter() - start
    pool = Split(np.zeros((len(ids), 1, 1, 3), np.uint8), ids, np.full(len(ids), UNKNOWN),
                 np.full(len(ids), UNKNOWN))  # fmt: skip
    start = time.perf_counter()
    labels = load_pseudo_labels(out, pool, classes)
    read_s = time.perf_counter() - start
    targets = pool_label_targets(labels, cfg, 0.0, len(classes))
    held = (
        targets.nbytes
        if isinstance(targets, np.ndarray)
        else targets.columns.nbytes + targets.values.nbytes
    )
    return {
        "format": f"parquet, {cfg.probs}, "
        + ("every class" if cfg.top_k is None else f"top {cfg.top_k}"),
        "bytes_per_image": out.stat().st_size / len(ids),
        "write_s": write_s,
        "read_s": read_s,
        "training_bytes_per_image": held / len(ids),
    }


def measure_csv(probs: torch.Tensor, ids: list[str], classes: list[str], work: Path) -> dict:
    """The CSV table as written before (pyarrow's CSV writer, batch by batch)."""
    out = work / "table.csv"
    start = time.perf_counter()
    with open(out, "wb") as f:
        for at in range(0, len(ids), BATCH):
            part = probs[at : at + BATCH].numpy()
            table = pa.table(
                {"id": ids[at : at + BATCH]} | {f"p_{c}": part[:, k] for k, c in enumerate(classes)}
            )
            pa_csv.write_csv(table, f, pa_csv.WriteOptions(include_header=at == 0))
    return {
        "format": "csv (before), float32, every class",
        "bytes_per_image": out.stat().st_size / len(ids),
        "write_s": time.perf_counter() - start,
        "read_s": None,
        "training_bytes_per_image": 4.0 * len(classes),  # the dense float32 rows it was read into
    }


def run(images: int, num_classes: int, top_k: int, seed: int, out_dir: Path, command: str) -> dict:
    probs = distributions(images, num_classes, seed)
    ids = [f"pool/{i:07d}.jpg" for i in range(images)]
    classes = [f"class_{k:04d}" for k in range(num_classes)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-table-") as tmp:
        rows.append(measure_csv(probs, ids, classes, Path(tmp)))
        for dtype, k in (
            ("float32", None),
            ("float16", None),
            ("float16", top_k),
            ("float32", top_k),
        ):
            work = Path(tmp) / f"{dtype}-{k}"
            work.mkdir()
            rows.append(measure_format(probs, ids, classes, settings(dtype, k), work))
    result = {
        "images": images,
        "classes": num_classes,
        "seed": seed,
        "rows": rows,
        "date": datetime.date.today().isoformat(),
        "command": command,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "table.json", json.dumps(result, indent=2))
    text = render(result)
    write_text(out_dir / "table.md", text)
    return result


def render(result: dict) -> str:
    n, k = result["images"], result["classes"]
    lines = [
        f"{n:,} pool images x {k:,} classes, seed {result['seed']}; {result['date']}. "
        f"Command: `{result['command']}`",
        "",
        "| table | bytes per image | 1M images, GB | write, s | read kept rows, s "
        "| training holds, bytes per image | 1M images, GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        read = "" if r["read_s"] is None else f"{r['read_s']:.1f}"
        per_million = r["bytes_per_image"] * 1e6 / 1e9
        lines.append(
            f"| {r['format']} | {r['bytes_per_image']:,.0f} | {per_million:.2f} "
            f"| {r['write_s']:.1f} | {read} | {r['training_bytes_per_image']:,.0f} "
            f"| {r['training_bytes_per_image'] * 1e6 / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=1_000)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    command = shlex.join(["python", "-m", "bench.table", *sys.argv[1:]])

    def measured() -> str:
        result = run(args.images, args.classes, args.top_k, args.seed, args.out, command)
        return render(result)

    run_cli(False, lambda: "", measured)


if __name__ == "__main__":
    main()

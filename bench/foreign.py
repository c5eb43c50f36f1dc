"""Foreign-image benchmark: images of none of the classes in the pool, with the out-of-class
filter off and on.

    python -m bench.foreign                                # 0, 20 and 50% foreign; seed 0
    python -m bench.foreign --fractions 0.2 0.5 --seeds 0 1 2
    python -m bench.foreign --report-only                  # rebuild the table from the results

Per (seed, share of foreign images) it writes the demo's digits (scikit-learn's 8 x 8 digits,
split as the `digits` source splits them: ``labels_per_class`` labeled per class, the same
validation and test shares) as the image folders a user brings: ``labeled/``, ``val/`` and
``test/`` by class, and ``unlabeled/`` holding the pool's digits under their class's folder
(the pipeline ignores folders in the pool: they only tell this benchmark the truth) and the
foreign images under ``unlabeled/foreign/``, so that they make the given share of the pool.
Foreign images are cut from the two photos scikit-learn ships (``load_sample_images``: a temple
and a flower): random squares of 12 to 220 px, grey, shrunk to 8 x 8, half of them inverted: no
digits, and no two alike.

On each dataset it runs the loop with ``bench.accuracy``'s runner (as ``--folders`` does, without
the upper bound): params.yaml as it is (``baseline``), with ``pseudo_label.ood_filter: 0.95``
on the teacher's free energy (``ood_filter``) and on the kNN feature distance to the labeled
images (``ood_knn``: ``pseudo_label.ood_score: knn``), all three from the same teacher. Read
from each round's pseudo-label table: the share of foreign images flagged and the share trained
on, the share of the pool's digits the filter flagged (its cost), and the share of the kept
pseudo-labels that are right (a kept foreign image is never right); and the test accuracy of the
model each run ships (its champion, chosen on validation). Runs go to ``<out>/foreign.jsonl``
(the runner's records) and ``<out>/foreign_pseudo.jsonl`` (the tables' counts); the table to
``<out>/foreign.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bench.accuracy import Cell, Runner, cell_overrides, read_records, run_layout
from bench.cli import run_cli
from noisy_student.core.atomic import write_text
from noisy_student.core.settings import PARAMS_FILE, Settings, load_settings
from noisy_student.data.prepare import digit_pixels, split_digits

log = logging.getLogger("bench.foreign")

FOREIGN = "foreign"  # the pool's folder of foreign images
# variant -> what the table calls it
VARIANTS = {"baseline": "off", "ood_filter": "energy (0.95)", "ood_knn": "kNN (0.95)"}
FRACTIONS = (0.0, 0.2, 0.5)


def foreign_images(count: int, seed: int) -> list[np.ndarray]:
    """``count`` 8 x 8 grey images cut from scikit-learn's sample photos, none alike."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(Image.fromarray(p).convert("L")) for p in load_sample_images().images]
    rng = np.random.default_rng(10_000 + seed)
    out: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(out) < count:
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(12, 221))
        top = int(rng.integers(photo.shape[0] - side))
        left = int(rng.integers(photo.shape[1] - side))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        small = np.asarray(crop.resize((8, 8), Image.Resampling.LANCZOS))
        if rng.random() < 0.5:
            small = 255 - small
        if small.tobytes() not in seen:
            seen.add(small.tobytes())
            out.append(small)
    return out


def write_dataset(root: Path, settings: Settings, fraction: float) -> Path:
    """The digits split of ``settings`` (its seed and data keys) as class folders, plus foreign
    images making ``fraction`` of the pool. Written once: an existing folder is reused."""
    from sklearn.datasets import load_digits

    if (root / "done").exists():
        return root
    digits = load_digits()
    pixels = digit_pixels(digits.images)  # as the `digits` source makes them
    for split, idx in split_digits(digits.target, settings.data, settings.seed).items():
        folder = "unlabeled" if split == "unlabeled" else split
        for i in idx:
            path = root / folder / str(digits.target[i]) / f"digit_{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(path)
        if split == "unlabeled":
            extra = round(len(idx) * fraction / (1 - fraction))
            (root / "unlabeled" / FOREIGN).mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(foreign_images(extra, settings.seed)):
                Image.fromarray(image).save(root / "unlabeled" / FOREIGN / f"photo_{k:04d}.png")
    (root / "done").write_text("")
    return root


def table_counts(table: pd.DataFrame) -> dict:
    """What a round's pseudo-label table did with the foreign images and with the digits."""
    truth = table["id"].str.split("/", n=1).str[0]
    foreign = (truth == FOREIGN).to_numpy()
    trained = table["copies"].to_numpy() > 0
    right = (truth == table["pred_class"].astype(str)).to_numpy()
    flagged = table["foreign"].to_numpy(bool) if "foreign" in table else np.zeros(len(table), bool)
    return {
        "pool_images": len(table),
        "foreign_images": int(foreign.sum()),
        "foreign_flagged": int((flagged & foreign).sum()),
        "foreign_trained": int((trained & foreign).sum()),
        "digits_flagged": int((flagged & ~foreign).sum()),
        "kept": int(trained.sum()),
        "kept_right": int((trained & right).sum()),
    }


def run(
    *,
    params_file: Path = PARAMS_FILE,
    fractions: list[float],
    seeds: list[int],
    work: Path,
    out_dir: Path,
) -> str:
    results = out_dir / "foreign.jsonl"
    counts_file = out_dir / "foreign_pseudo.jsonl"
    runner = Runner(params_file, work, results)
    done = {tuple(r["key"]) for r in read_records(counts_file)}
    for seed in seeds:
        for fraction in fractions:
            base = load_settings(params_file, {"seed": seed})
            root = write_dataset(
                work / "data" / f"digits-{round(100 * fraction)}pct-foreign-seed{seed}",
                base,
                fraction,
            )
            dataset = f"folders:{root.resolve()}"
            cell = Cell(dataset, None, seed, cell_overrides(dataset, None, seed, {}, work))
            runner.cell(cell, list(VARIANTS), upper=False)
            folder = runner.cell_folder(cell)
            settings = runner.settings(cell.overrides)
            for variant in VARIANTS:
                key = (seed, fraction, variant)
                if key in done or "not_run" in runner.done[cell.key(variant)]:
                    continue  # a run the pipeline refused is in foreign.jsonl, with its reason
                layout = run_layout(folder, folder / "runs" / variant)
                rounds = {}
                for student in (s.name for s in settings.students):
                    table = pd.read_parquet(layout.pseudo_table(student))
                    if len(table):  # a round after the loop stopped has no rows
                        rounds[student] = table_counts(table)
                row = {"key": list(key), "seed": seed, "fraction": fraction, "variant": variant,
                       "dataset": dataset, "rounds": rounds}  # fmt: skip
                with open(counts_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done.add(key)
            write_report(out_dir)
    return write_report(out_dir)


def write_report(out_dir: Path) -> str:
    runs = {(r["dataset"], r["variant"]): r for r in read_records(out_dir / "foreign.jsonl")}
    rows = []
    for c in read_records(out_dir / "foreign_pseudo.jsonl"):
        record = runs.get((c["dataset"], c["variant"]))
        if record is None or "test_accuracy" not in record:
            continue
        rows.append((c, record))
    lines = [
        "| foreign share of the pool | seed | filter | round | foreign images flagged | foreign "
        "images trained on | pool digits flagged | pseudo-labels kept, right | teacher test | "
        "shipped test (model) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, record in sorted(rows, key=lambda x: (x[0]["fraction"], x[0]["seed"], x[0]["variant"])):
        acc = record["test_accuracy"]
        champion = record["champion"]
        for student, n in c["rounds"].items():
            digits = n["pool_images"] - n["foreign_images"]
            foreign = n["foreign_images"]
            lines.append(
                f"| {100 * c['fraction']:.0f}% | {c['seed']} | "
                f"{VARIANTS.get(c['variant'], c['variant'])} | {student} | "
                f"{share(n['foreign_flagged'], foreign)} | {share(n['foreign_trained'], foreign)} "
                f"| {share(n['digits_flagged'], digits)} | {n['kept']} kept, "
                f"{share(n['kept_right'], n['kept'])} right | {100 * acc['teacher']:.1f} | "
                f"{100 * acc[champion]:.1f} ({champion}) |"
            )
    lines += ["", summary_lines(rows)]
    text = "\n".join(lines) + "\n"
    write_text(out_dir / "foreign.md", text)
    return text


def share(part: int, whole: int) -> str:
    return "-" if whole == 0 else f"{100 * part / whole:.1f}% ({part}/{whole})"


def summary_lines(rows: list[tuple[dict, dict]]) -> str:
    """Shipped test accuracy per (share, filter), mean over seeds."""
    by: dict[tuple[float, str], list[float]] = {}
    for c, record in rows:
        acc = record["test_accuracy"][record["champion"]]
        by.setdefault((c["fraction"], c["variant"]), []).append(acc)
    heads = " | ".join(f"filter {label}: shipped test %" for label in VARIANTS.values())
    out = [f"| foreign share | {heads} | seeds |", "|---" * (len(VARIANTS) + 2) + "|"]
    for fraction in sorted({f for f, _ in by}):
        runs = [by.get((fraction, variant), []) for variant in VARIANTS]
        cells = [f"{100 * statistics.fmean(v):.1f}" if v else "not run" for v in runs]
        seeds = max(len(v) for v in runs)
        out.append(f"| {100 * fraction:.0f}% | {' | '.join(cells)} | {seeds} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work", type=Path, default=Path("bench/work/foreign"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--report-only", action="store_true", help="rebuild the table, run nothing")
    args = p.parse_args()
    if any(not 0 <= f < 1 for f in args.fractions):
        sys.exit(f"error: --fractions {args.fractions}: each must be in [0, 1)")
    run_cli(args.report_only, lambda: write_report(args.out),
            lambda: run(params_file=Path(args.params), fractions=args.fractions,
                        seeds=args.seeds, work=args.work, out_dir=args.out))  # fmt: skip


if __name__ == "__main__":
    main()

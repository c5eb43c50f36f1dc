"""Before and after the speed fixes, in one process: the pipeline's code at a git revision
against the working tree's, alternated on the same synthetic data and model.

    python -m bench.compare --before <rev>        # a revision with the noisy_student package

- **training**: ``noisy_student.training.loop.fit`` with ``create_optimizer`` from
  ``noisy_student/models/transfer.py`` at ``--before`` (at the commit before the speed fixes:
  AdamW's default, a Python loop over tensors on the CPU) and from the working tree (fused
  AdamW); everything else is the same code;
- **pseudo-labeling**: the pseudo_label stage's function, ``pseudo_label`` of
  ``noisy_student/pseudo_labels/labeling.py``, with the rest of its package (the selection, the
  table's CSV writer) at ``--before`` (before the fixes: pandas ``to_csv``) and of the working
  tree (pyarrow's CSV writer), each checked to write the same table (ids, predictions, kept
  rows, probabilities to 1e-5).

The modules at ``--before`` run with the working tree's other modules, so ``--before`` must be a
revision with the ``noisy_student`` package (cfe5559 or later). The speed fixes themselves
(``--before 20a922c``, bench/README.md) predate it: their modules were ``tasks/transfer.py`` and
``tasks/pseudo_label.py``, importing ``tasks.*`` modules that no longer exist; measure them with
this benchmark as it was at a726fc9, in a checkout of that commit.

Each side runs ``--repeats`` times, alternating with the other and with the bare model, and
the best run of each counts (timeit's rule on a shared machine: other processes only ever slow a
run down). Results: ``<out>/compare_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.abc
import importlib.util
import logging
import shlex
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import noisy_student.training.loop
from bench.cli import save_results
from bench.speed import (
    BareInference,
    BareTraining,
    device_name,
    new_model,
    precision,
    settings_for,
    train_spec,
    training_set,
)
from bench.synthetic import layout, write_model, write_pool
from noisy_student.augment.batched import BatchAugment
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import PARAMS_FILE, Settings
from noisy_student.data.splits import Split, load_split
from noisy_student.models.classifier import resolve_device

log = logging.getLogger("bench.compare")
ROOT = Path(__file__).resolve().parents[1]


def git_show(rev: str, path: str) -> str:
    shown = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True
    )
    if shown.returncode != 0:
        raise PipelineError(
            f"--before {rev}: no {path} there ({shown.stderr.strip()}); the comparison needs a "
            "revision with the noisy_student package (see this module's docstring)"
        )
    return shown.stdout


def package_at(rev: str, folder: str) -> list[str]:
    """The modules of package ``folder`` at ``rev`` (its ``__init__.py`` aside)."""
    listed = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, f"{folder}/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    paths = [p for p in listed if p.endswith(".py") and not p.endswith("/__init__.py")]
    if not paths:
        raise PipelineError(
            f"--before {rev}: no {folder}/ there; the comparison needs a revision with the "
            "noisy_student package (see this module's docstring)"
        )
    return paths


class RevisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves some modules of this repository from their source at a git revision."""

    def __init__(self, rev: str, paths: list[str]) -> None:
        self.rev = rev
        self.paths = {path.removesuffix(".py").replace("/", "."): path for path in paths}
        self.sources = {name: git_show(rev, path) for name, path in self.paths.items()}

    def find_spec(self, name, path=None, target=None):
        if name not in self.sources:
            return None
        return importlib.util.spec_from_loader(name, self, origin=f"{self.rev}:{self.paths[name]}")

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        origin = module.__spec__.origin
        module.__file__ = origin
        exec(compile(self.sources[module.__name__], origin, "exec"), module.__dict__)


def modules_at(rev: str, paths: list[str]) -> dict[str, types.ModuleType]:
    """The modules ``paths`` of this repository as they were at git revision ``rev``, importing
    one another's versions at ``rev`` and the working tree's other modules. The working tree's
    own versions stay where they were (``sys.modules`` and their packages' attributes)."""
    finder = RevisionFinder(rev, paths)
    names = list(finder.sources)
    for name in names:  # the packages above them: the working tree's
        importlib.import_module(name.rpartition(".")[0])
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    missing = object()
    attributes = []  # importing a submodule sets it on its package: put the old one back
    for name in names:
        parent, _, child = name.rpartition(".")
        package = sys.modules[parent]
        attributes.append((package, child, getattr(package, child, missing)))
    sys.meta_path.insert(0, finder)
    try:
        return {name: importlib.import_module(name) for name in names}
    finally:
        sys.meta_path.remove(finder)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        for package, child, value in attributes:
            if value is missing:
                vars(package).pop(child, None)
            else:
                setattr(package, child, value)


def module_at(rev: str, path: str) -> types.ModuleType:
    """``path`` (a module of this repository) as it was at git revision ``rev``; it imports the
    working tree's other modules."""
    return modules_at(rev, [path])[path.removesuffix(".py").replace("/", ".")]


def fit_ips(
    settings: Settings,
    spec,
    device,
    items,
    val: Split,
    create_optimizer,
    compile_: bool,
    batched: BatchAugment | None = None,
) -> float:
    """Best images/s of fit's epochs after the first, with ``create_optimizer`` in its place."""
    loop = noisy_student.training.loop
    original = loop.create_optimizer
    loop.create_optimizer = create_optimizer  # the one difference between the sides
    try:
        net = new_model(spec, device, settings, compile_)
        config = loop.FitConfig(
            spec, settings.runtime, device, 0, "compare", settings.data.image_size, augment=batched
        )
        history = loop.fit(net, items, val, config)
    finally:
        loop.create_optimizer = original
    return max(len(items) / r.seconds for r in history[1:])


def side_layout(root: Path, out: str) -> Layout:
    """The synthetic pool and model under ``root``, the pseudo-label table into ``root/out``."""
    return layout(root).replace(pseudo_labels=root / out)


def label_ips(settings: Settings, stage, root: Path, out: str, count: int) -> float:
    """Images/s of ``stage`` (a side's ``pseudo_label``) on the pool under ``root``."""
    start = time.perf_counter()
    stage(settings, "student_1", side_layout(root, out))
    return count / (time.perf_counter() - start)


def read_table(path: Path) -> pd.DataFrame:
    """A pseudo-label table as either side wrote it: Parquet, or CSV before it was Parquet."""
    with open(path, "rb") as f:
        parquet = f.read(4) == b"PAR1"
    if parquet:
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype={"id": str, "pred_class": str})


def same_table(a: Path, b: Path) -> bool:
    x, y = read_table(a), read_table(b)
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return False
    exact = ["id", "pred", "pred_class", "kept", "copies"]
    floats = [c for c in x.columns if c not in exact]
    return bool(
        (x[exact] == y[exact]).all().all()
        # float16 probabilities (pseudo_label.probs) hold 3 significant digits
        and np.allclose(x[floats].to_numpy(float), y[floats].to_numpy(float), atol=1e-3)
    )


def run(
    *,
    before: str,
    params_file: Path = PARAMS_FILE,
    device: str = "auto",
    size: int = 32,
    model: str = "resnet18",
    train_images: int = 512,
    epochs: int = 3,
    pool: int = 4096,
    repeats: int = 5,
    compile_: bool = False,
    out_dir: Path | None = Path("bench/results"),
    command: str = "",
) -> dict[str, Any]:
    old_transfer = module_at(before, "noisy_student/models/transfer.py")
    # the stage's code is the whole package (labeling, selection, the table's writer)
    old_pseudo = modules_at(before, package_at(before, "noisy_student/pseudo_labels"))[
        "noisy_student.pseudo_labels.labeling"
    ]
    from noisy_student.models.transfer import create_optimizer
    from noisy_student.pseudo_labels.labeling import pseudo_label

    settings = settings_for(params_file, size, device, None)
    torch_device = resolve_device(settings.runtime)
    spec = train_spec(settings, model, epochs)
    teacher = spec.model_copy(update={"drop_rate": 0.0, "drop_path_rate": 0.0})
    sides: dict[str, dict[str, list[float]]] = {
        k: {"fit": [], "pseudo_label": []} for k in ("before", "after")
    }
    bare_train: list[float] = []
    bare_infer: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        work = Path(tmp)
        write_pool(work / "train", train_images, size, split="labeled")
        items, batched = training_set(settings, spec, work / "train")
        val = load_split("labeled", work / "train")
        val = Split(val.images[:64], val.ids[:64], val.labels[:64], val.true_labels[:64])
        write_pool(layout(work).prepared, pool, size)
        write_model(layout(work).model("teacher"), teacher, size)
        bare = BareTraining(spec, settings, torch_device, size, compile_)
        batch = settings.pseudo_label.batch_size
        infer = BareInference(teacher, settings, torch_device, size, batch)
        steps = max(3, train_images // spec.batch_size)
        infer_steps = max(3, pool // settings.pseudo_label.batch_size)
        label_ips(settings, pseudo_label, work, "warm", pool)  # the pool's pages, the model
        for i in range(repeats):
            log.info("round %d of %d", i + 1, repeats)
            # alternate which side goes first, so neither always follows the other
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for side in order:
                factory = old_transfer.create_optimizer if side == "before" else create_optimizer
                sides[side]["fit"].append(
                    fit_ips(settings, spec, torch_device, items, val, factory, compile_, batched)
                )
            bare_train.append(bare(steps))
            for side in order:
                stage = old_pseudo.pseudo_label if side == "before" else pseudo_label
                sides[side]["pseudo_label"].append(label_ips(settings, stage, work, side, pool))
            bare_infer.append(infer(infer_steps))
        tables_match = same_table(
            side_layout(work, "before").pseudo_table("student_1"),
            side_layout(work, "after").pseudo_table("student_1"),
        )
    med = max  # best of the repeats
    result = {
        "device": device_name(torch_device),
        "precision": precision(settings, torch_device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "before": before,
        "model": model,
        "image_size": size,
        "train_batch": spec.batch_size,
        "train_images": train_images,
        "pool_images": pool,
        "repeats": repeats,
        "measured": sides,
        "bare_train_ips": bare_train,
        "bare_infer_ips": bare_infer,
        "tables_match": tables_match,
        "fit_speedup": med(sides["after"]["fit"]) / med(sides["before"]["fit"]),
        "pseudo_label_speedup": (
            med(sides["after"]["pseudo_label"]) / med(sides["before"]["pseudo_label"])
        ),
    }
    if out_dir is not None:
        stem = out_dir / f"compare_{torch_device.type}"
        save_results(stem, result, render(result))
    return result


def render(r: dict[str, Any]) -> str:
    med = max  # best of the repeats
    m = r["measured"]
    head = (
        f"Device: {r['device']}; torch {r['torch']}; {r['precision']}; {r['model']} at "
        f"{r['image_size']} px; best of {r['repeats']} alternated runs; {r['date']}.\n"
        f"Command: `{r['command']}`\n\n"
    )
    bare_t, bare_i = med(r["bare_train_ips"]), med(r["bare_infer_ips"])
    lines = [
        f"| img/s | before ({r['before']}) | after | speed-up | bare model (same run) |",
        "|---|---|---|---|---|",
        f"| `fit`, batch {r['train_batch']}, {r['train_images']} images per epoch | "
        f"{med(m['before']['fit']):.0f} | {med(m['after']['fit']):.0f} | "
        f"**{r['fit_speedup']:.2f}x** | fwd+bwd+step {bare_t:.0f} (AdamW fused) |",
        f"| `pseudo_label`, a pool of {r['pool_images']} | "
        f"{med(m['before']['pseudo_label']):.0f} | {med(m['after']['pseudo_label']):.0f} | "
        f"**{r['pseudo_label_speedup']:.2f}x** | inference {bare_i:.0f} |",
    ]
    same = "the same" if r["tables_match"] else "**different**"
    return head + "\n".join(lines) + f"\n\nBoth sides wrote {same} pseudo-label table.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision before the fixes")
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="per fit call; the first warms up")
    p.add_argument("--pool", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        result = run(
            before=args.before,
            params_file=Path(args.params),
            device=args.device,
            size=args.size,
            model=args.model,
            train_images=args.train_images,
            epochs=args.epochs,
            pool=args.pool,
            repeats=args.repeats,
            compile_=args.compile,
            out_dir=args.out,
            command=shlex.join(["python", "-m", "bench.compare", *sys.argv[1:]]),
        )
    except PipelineError as exc:
        sys.exit(f"error: {exc}")
    print(render(result))


if __name__ == "__main__":
    main()

"""channels_last on the CPU: the same network trained and run in both memory formats, in one
process, alternated, at each image size; what ``runtime.cpu_channels_last_from`` is set from.

    python -m bench.channels_last                      # resnet18 at 32, 64, 128, 224 px
    python -m bench.channels_last --sizes 128 --repeats 5

Per size and format: the bare forward + backward + AdamW step on a synthetic batch (bench.speed's
``BareTraining``), bare inference (``BareInference``) and ``noisy_student.training.loop.fit``
itself (its second epoch: the students' augmentation, the step, the validation pass), with the
network, its batches and its optimizer state in that format. Each side runs ``--repeats`` times,
alternating with the other; the best run counts (timeit's rule on a shared machine). Results:
``<out>/channels_last_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.cli import save_results
from bench.speed import (
    BareInference,
    BareTraining,
    device_name,
    new_model,
    settings_for,
    train_spec,
    training_set,
)
from bench.synthetic import write_pool
from noisy_student.core.settings import PARAMS_FILE, Settings
from noisy_student.data.splits import Split, load_split
from noisy_student.training.loop import FitConfig, fit

log = logging.getLogger("bench.channels_last")
LAYOUTS = ("contiguous", "channels_last")


def in_layout(settings: Settings, layout: str) -> Settings:
    """``settings`` with the CPU in ``layout`` at every size (cpu_channels_last_from 1 or None)."""
    start = 1 if layout == "channels_last" else None
    runtime = settings.runtime.model_copy(
        update={"channels_last": True, "cpu_channels_last_from": start}
    )
    return settings.model_copy(update={"runtime": runtime})


def fit_ips(settings: Settings, spec, items, val: Split) -> float:
    """Images/s of fit's second epoch (the first warms up), validation included."""
    device = torch.device("cpu")
    net = new_model(spec, device, settings, False)
    config = FitConfig(spec, settings.runtime, device, 0, "layout", settings.data.image_size)
    history = fit(net, items, val, config)
    return len(items) / history[1].seconds


def measure_size(
    params_file: Path, model: str, size: int, seconds: float, repeats: int, work: Path
) -> dict[str, Any]:
    device = torch.device("cpu")
    base = settings_for(params_file, size, "cpu", None)
    spec = train_spec(base, model, epochs=2)
    probe = BareTraining(spec, base, device, size, False, warmup=1)(2)
    images = max(2, round(probe * seconds / spec.batch_size)) * spec.batch_size
    steps = images // spec.batch_size
    write_pool(work, images, size, split="labeled")
    items, _ = training_set(base, spec, work)
    val = load_split("labeled", work)
    n = spec.batch_size
    val = Split(val.images[:n], val.ids[:n], val.labels[:n], val.true_labels[:n])
    runs: dict[str, dict[str, list[float]]] = {
        layout: {"bare_train_ips": [], "bare_infer_ips": [], "fit_ips": []} for layout in LAYOUTS
    }
    for repeat in range(repeats):
        for layout in LAYOUTS:
            settings = in_layout(base, layout)
            log.info("size %d, %s, run %d of %d", size, layout, repeat + 1, repeats)
            bare = BareTraining(spec, settings, device, size, False)
            runs[layout]["bare_train_ips"].append(bare(steps))
            del bare
            infer = BareInference(spec, settings, device, size, n)
            runs[layout]["bare_infer_ips"].append(infer(steps))
            del infer
            runs[layout]["fit_ips"].append(fit_ips(settings, spec, items, val))
    best = {layout: {k: max(v) for k, v in runs[layout].items()} for layout in LAYOUTS}
    gain = {k: best["channels_last"][k] / best["contiguous"][k] for k in best["contiguous"]}
    return {
        "image_size": size,
        "model": spec.model,
        "batch": spec.batch_size,
        "train_images": images,
        "runs": runs,
        "best": best,
        "channels_last_over_contiguous": gain,
    }


def render(result: dict[str, Any]) -> str:
    head = (
        f"Device: {result['device']}; torch {result['torch']}; fp32; {result['threads']} threads; "
        f"best of {result['repeats']} alternated runs; {result['date']}.\n"
        f"Command: `{result['command']}`\n\n"
    )
    lines = [
        "| model | image size | memory format | bare fwd+bwd+step img/s | `fit` img/s "
        "(augmentation, step, validation) | bare inference img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        for layout in LAYOUTS:
            b = r["best"][layout]
            lines.append(
                f"| {r['model']} | {r['image_size']} | {layout} | {b['bare_train_ips']:.1f} | "
                f"{b['fit_ips']:.1f} | {b['bare_infer_ips']:.1f} |"
            )
        g = r["channels_last_over_contiguous"]
        lines.append(
            f"| | | **channels_last / contiguous** | **{g['bare_train_ips']:.2f}** | "
            f"**{g['fit_ips']:.2f}** | **{g['bare_infer_ips']:.2f}** |"
        )
    return head + "\n".join(lines) + "\n"


def run(
    *,
    params_file: Path = PARAMS_FILE,
    sizes: tuple[int, ...] = (32, 64, 128, 224),
    model: str = "resnet18",
    seconds: float = 2.0,
    repeats: int = 3,
    out_dir: Path | None = Path("bench/results"),
    command: str = "",
) -> dict[str, Any]:
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-layout-{size}-") as tmp:
            start = time.perf_counter()
            results.append(measure_size(params_file, model, size, seconds, repeats, Path(tmp)))
        log.info("size %d in %.0f s: %s", size, time.perf_counter() - start,
                 json.dumps(results[-1]["channels_last_over_contiguous"]))  # fmt: skip
    result = {
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "sizes": results,
    }
    if out_dir is not None:
        save_results(out_dir / "channels_last_cpu", result, render(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(PARAMS_FILE))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    p.add_argument("--model", default="resnet18", help="timm name")
    p.add_argument("--seconds", type=float, default=2.0, help="about how long each bare pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    command = shlex.join(["python", "-m", "bench.channels_last", *sys.argv[1:]])
    result = run(
        params_file=Path(args.params),
        sizes=tuple(args.sizes),
        model=args.model,
        seconds=args.seconds,
        repeats=args.repeats,
        out_dir=args.out,
        command=command,
    )
    print(render(result))


if __name__ == "__main__":
    main()

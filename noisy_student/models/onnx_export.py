"""A model as an ONNX file, checked against PyTorch before it is kept (the export stage).

The ONNX graph takes what the PyTorch model takes: float32 pixels 0..255, N x 3 x H x W (any N;
H = W = the model card's image_size), input ``pixels``, and returns ``logits`` (N x classes); the
class names and image view ride along in the model's metadata (``classes``, a JSON list;
``image_size``; ``eval_crop_pct``, JSON: null for the whole image squeezed into the square, else
timm's centre crop, see data.images.square_view; ``model``). Run it with ONNX Runtime:

    sess = onnxruntime.InferenceSession("exports/final.onnx")
    logits = sess.run(None, {"pixels": images.astype("float32")})[0]

Exported with ``torch.onnx.export(dynamo=True)``: torch.export's graph (the same capture as the
MLflow model, tracking.logged_models.log_model), translated by onnxscript; the TorchScript
exporter is deprecated in torch 2.x. Before the file replaces the previous one, ONNX Runtime runs
it on validation images, one and several at a time, and its logits must match PyTorch's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.splits import load_split
from noisy_student.models import promotion
from noisy_student.models.classifier import Classifier, load_checkpoint

log = logging.getLogger(__name__)
INPUT, OUTPUT = "pixels", "logits"
OPSET = 18
# ONNX Runtime and PyTorch add up in different orders: logits may differ by float32 rounding
ATOL, RTOL = 1e-4, 1e-4
CHECK_IMAGES = 8


def export_onnx(classifier: Classifier, image_size: int, path: Path) -> None:
    """Write ``classifier`` (on the CPU, in eval mode) to ``path`` with a dynamic batch size."""
    example = torch.rand(2, 3, image_size, image_size) * 255  # two: the batch stays symbolic
    batch = torch.export.Dim("batch")
    # the exporter reports its steps with print() and its graph passes log each rewrite at INFO:
    # keep both out of the stage's log (warnings and errors still show)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            classifier,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            external_data=False,  # one file, weights inside
        )


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def onnx_logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: pixels.astype(np.float32)})[0]


def check_against_torch(classifier: Classifier, path: Path, images: np.ndarray) -> float:
    """ONNX Runtime's logits against PyTorch's on ``images`` (uint8 N x H x W x 3), batch by
    batch and one image at a time; raises if they differ beyond the tolerance. Returns the
    largest absolute difference."""
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32)
    with torch.inference_mode():
        expected = classifier(torch.from_numpy(pixels)).numpy()
    worst = 0.0
    for batch in (pixels, pixels[:1]):
        got = onnx_logits(path, batch)
        want = expected[: len(batch)]
        if got.shape != want.shape or not np.allclose(got, want, atol=ATOL, rtol=RTOL):
            diff = np.abs(got - want).max() if got.shape == want.shape else float("nan")
            raise PipelineError(
                f"{path}: ONNX Runtime's logits differ from PyTorch's "
                f"(shape {got.shape} vs {want.shape}, largest difference {diff:.3g})"
            )
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def export(
    settings: Settings,
    layout: Layout,
    *,
    model: str | None = None,
    out: Path | None = None,
) -> Path:
    """Export ``model`` (default: the champion, the loop's best on validation) to ``out``
    (default: ``exports/final.onnx``, or ``exports/<model>.onnx`` for a named model)."""
    name = model or promotion.champion(settings, layout)
    if out is None:
        out = layout.final_export if model is None else layout.exports / f"{model}.onnx"
    data_dir = layout.prepared
    classifier, card = load_checkpoint(layout.model(name), "cpu")
    val = load_split("val", data_dir)
    if len(val) == 0:
        raise PipelineError(f"{data_dir}/val: no validation images to check the export on")
    if val.images.shape[1] != card.image_size:
        raise PipelineError(
            f"{data_dir}/val: images are {val.images.shape[1]} px, {name} takes "
            f"{card.image_size} px; run the pipeline again (dvc repro)"
        )
    with atomic_path(out) as tmp:
        export_onnx(classifier, card.image_size, tmp)
        add_metadata(
            tmp,
            {"classes": json.dumps(card.classes), "image_size": str(card.image_size),
             "eval_crop_pct": json.dumps(card.eval_crop_pct),
             "model": name, "architecture": card.model},
        )  # fmt: skip
        worst = check_against_torch(classifier, tmp, np.asarray(val.images[:CHECK_IMAGES]))
    log.info(
        "exported %s (%s) to %s: ONNX Runtime matches PyTorch on %d validation images "
        "(largest logit difference %.2g)",
        name,
        card.model,
        out,
        min(CHECK_IMAGES, len(val)),
        worst,
    )
    return out
